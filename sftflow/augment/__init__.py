"""Instruction backtranslation (Humpback), the library side of ``tasks/backtranslate.py``.

corpus.py (files -> segments) · filters.py (segment and instruction filters, each with its reason)
· pairs.py (candidate table, statuses, accounting, reversed/curated records, keep rule)
· humpback.py (the driver: backward model, generation, curation, iterations) · report.py
(figures, histogram, summary).
"""
