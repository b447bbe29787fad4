"""Held-out evaluation, the library side of ``tasks/evaluate.py`` (the stage runs these in order).

sets.py (what is evaluated: the held-out rows, extra sets, prompt/reference split, and ``eval_key``,
the digest that says two evaluations are comparable) · metrics.py (pure metrics on strings and
counts: ROUGE-L, answer accuracy, generation rates, the ``auto`` generation bound) · passes.py (the
model passes: held-out loss, generation through the batch inference API, format robustness) ·
judge.py (which model judges, ``resolve_judge``, and the judge pass).
"""
