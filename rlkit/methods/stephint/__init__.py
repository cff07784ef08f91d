"""StepHint (arXiv 2507.02841): GRPO with multi-level stepwise hints (``method: stephint``) and the hint building
it trains on (``rlkit hints build``). See ``docs/methods/stephint.md``.

- :mod:`.trainer`: ``StepHintConfig``, ``StepHintTrainer`` and the registered method (imports TRL);
- :mod:`.hints`: reference chains -> steps -> hint levels, written as a resumable jsonl (no TRL import).
"""

from __future__ import annotations

from typing import Any

__all__ = ["StepHintConfig", "StepHintMethod", "StepHintTrainer"]


def __getattr__(name: str) -> Any:  # the trainer (and TRL) load on first use, not with the hints
    if name in __all__:
        from . import trainer

        return getattr(trainer, name)
    raise AttributeError(name)
