"""OREO: Offline REasoning Optimization (arXiv 2412.16145), ``method: oreo``. See ``docs/methods/oreo.md``.

- :mod:`.losses`: the value loss (Eq. 8), the token / step / response-level policy losses (Eq. 9, Eq. 10) and
  the KL regulariser as pure torch functions in the released code's tensor layout (no transformers import);
- :mod:`.data`: scored (prompt, completion, reward) rows -> ids, action and state positions, the collator;
- :mod:`.trainer`: ``OREOConfig``, ``OREOTrainer`` (policy + critic on one ``transformers.Trainer``) and the
  registered method. The critic is an :class:`rlkit.value.ValueModel`.
"""

from __future__ import annotations

from typing import Any

__all__ = ["OREOConfig", "OREOMethod", "OREOModel", "OREOTrainer"]


def __getattr__(name: str) -> Any:  # the trainer (and transformers' Trainer) load on first use
    if name in __all__:
        from . import trainer

        return getattr(trainer, name)
    raise AttributeError(name)
