"""BOLT: Bootstrap Long Chain-of-Thought without distillation (arXiv 2502.03860). See ``docs/methods/bolt.md``.

- :mod:`.core`: the pure pieces (thought/solution format, the format filter, the global percentile cut, best per
  query, best/worst DPO pairs).
- :mod:`.stage`: ``method: bolt_bootstrap`` (Stage 1: in-context bootstrapping, y-only scoring, the selection) and
  ``method: bolt_sample`` (Stage 3's on-policy sampler). Stage 2 is ``method: sft`` and Stage 3's trainer
  ``method: dpo`` with ``pairs: best_worst``.
- :mod:`.reward`: the ``thought_solution`` reward (the outcome score of the solution part plus the format rule) for
  trainers that score completions themselves (GRPO).
"""
