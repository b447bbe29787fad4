"""Rejection-sampling fine-tuning (RFT / best-of-n), the library side of ``tasks/rejection.py``.

pool.py (the prompt pool: train split or prompt file, and screening of pool/held-out duplicates)
· sampling.py (k samples per prompt and their answer/rubric scores, through the batch inference
API) · selection.py (reasons, candidate columns, answer scoring, the keep rule, the accounting)
· report.py (score histogram, ``rs_*`` metrics, summary).
"""
