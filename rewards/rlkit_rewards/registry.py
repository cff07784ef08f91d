"""Name -> reward-factory registry used by ``rlkit_rewards.get`` and by rlkit recipes."""

from __future__ import annotations

import difflib
import inspect
from typing import Any, Callable

RewardFunc = Callable[..., list]
_REGISTRY: dict[str, Callable[..., RewardFunc]] = {}


def register(name: str) -> Callable[[Callable[..., RewardFunc]], Callable[..., RewardFunc]]:
    """Register a factory ``factory(**options) -> reward_func`` under ``name``."""

    def deco(factory: Callable[..., RewardFunc]) -> Callable[..., RewardFunc]:
        if name in _REGISTRY:
            raise ValueError(f"reward {name!r} is already registered")
        _REGISTRY[name] = factory
        return factory

    return deco


def available() -> list[str]:
    """Names of all registered rewards, sorted."""
    return sorted(_REGISTRY)


def get(name: str, **options: Any) -> RewardFunc:
    """Return the reward function registered as ``name``, configured with ``options``.

    Unknown names and unknown options raise ``ValueError`` naming the nearest valid choice.
    """
    if name not in _REGISTRY:
        near = difflib.get_close_matches(name, list(_REGISTRY), n=1)
        hint = f"; did you mean {near[0]!r}?" if near else ""
        raise ValueError(f"unknown reward {name!r}{hint} (available: {', '.join(available())})")
    factory = _REGISTRY[name]
    params = inspect.signature(factory).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        for key in options:
            if key not in params:
                near = difflib.get_close_matches(key, list(params), n=1)
                hint = f"; did you mean {near[0]!r}?" if near else ""
                raise ValueError(f"reward {name!r} has no option {key!r}{hint} (options: {', '.join(params)})")
    func = factory(**options)
    if not getattr(func, "__name__", None) or func.__name__ == "<lambda>":
        func.__name__ = name
    try:  # lets the reward engine's worker processes rebuild this function by reference
        func.__rlkit_spec__ = (name, dict(options))
    except (AttributeError, TypeError):
        pass
    return func
