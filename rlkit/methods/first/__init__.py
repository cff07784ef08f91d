"""FIRST: Efficient Trustworthy Distillation (arXiv 2408.12168, EMNLP 2024). See ``docs/methods/first.md``.

- :mod:`.topk`: the teacher's top-k per response token, stored compactly (``prepare_topk``, ``read_topk``);
- :mod:`.calibration`: temperature scaling of the top-k (+ other) buckets and the held-out choice of tau;
- :mod:`.stage`: ``method: distill_prepare``, the stage form of the preparation;
- :mod:`.trainer`: ``method: first`` (forward KL to the calibrated teacher buckets) and ``method: kd``
  (full-vocabulary forward KL from an online teacher, the baseline).
"""
