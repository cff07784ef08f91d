"""rlkit_rewards: TRL-signature reward functions, importable on their own (no torch at import).

Every reward has TRL's signature ``f(prompts, completions, **columns) -> list[float | None]`` and
accepts plain-text or conversational completions. ``None`` means "not applicable to this row" (for
example no gold answer), which TRL turns into NaN and leaves out of the group statistics.

    >>> import rlkit_rewards
    >>> reward = rlkit_rewards.get("math_accuracy")
    >>> reward(prompts=["1+1?"], completions=["so \\\\boxed{2}"], answer=["2"])
    [1.0]
"""

from .registry import answer_format, available, check, get, register
from . import math as _math  # noqa: F401  (registers the built-in rewards)
from .engine import RewardEngine
from . import format as _format  # noqa: F401
from . import rpr as _rpr  # noqa: F401
from . import noisy as _noisy  # noqa: F401
from . import calibrated as _calibrated  # noqa: F401
from . import verl as _verl  # noqa: F401

__all__ = ["RewardEngine", "answer_format", "available", "check", "get", "register"]
__version__ = "0.1.0"
