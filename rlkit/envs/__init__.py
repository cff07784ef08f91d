"""Multi-turn environments for RL rollouts: TextArena games played turn by turn by the policy.

- :mod:`.config`: the recipe's ``env:`` section (:class:`EnvConfig`).
- :mod:`.games`: the game catalogue (offline checks, players, random vs fixed start, rendering).
- :mod:`.opponents`: scripted opponents (random legal moves, rule-based players).
- :mod:`.episode`: playing episodes in lockstep as growing conversations, with action-token masks and rewards.
- :mod:`.rollout`: the TRL ``rollout_func`` and reward function that plug episodes into GRPO.

Only :mod:`.config` is imported with the package; the others (torch, textarena) load on first use.
"""

from .config import EnvConfig

__all__ = ["EnvConfig"]
