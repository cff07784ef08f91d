"""BOLT: Bootstrap Long Chain-of-Thought without distillation (arXiv 2502.03860). See ``docs/methods/bolt.md``.

- :mod:`.core`: the pure pieces (thought/solution format, the format filter, the global percentile cut, best per
  query, best/worst DPO pairs).
"""
