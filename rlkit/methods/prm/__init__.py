"""Process rewards (ER-PRM, arXiv 2412.11006). See ``docs/methods/er_prm.md``.

- :mod:`.labels`: ``method: prm_label``: step labels from rollouts (entropy-regularised, hard and soft);
- :mod:`.trainer`: ``method: prm``: a PRM (or the ORM baseline) trained by soft-label cross-entropy at step tags.
  The trained model is a :class:`rlkit.process_reward.ProcessRewardModel`.
"""
