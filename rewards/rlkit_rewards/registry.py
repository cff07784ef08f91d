"""Name -> reward-factory registry used by ``rlkit_rewards.get`` and by rlkit recipes."""

from __future__ import annotations

import difflib
import inspect
from typing import Any, Callable

RewardFunc = Callable[..., list]
_REGISTRY: dict[str, Callable[..., RewardFunc]] = {}
_CHECKS: dict[str, Callable[..., None]] = {}
_ANSWERS: dict[str, str | None] = {}
ANSWER_FORMATS = ("math",)


def register(name: str, check: Callable[..., None] | None = None, answers: str | None = None
             ) -> Callable[[Callable[..., RewardFunc]], Callable[..., RewardFunc]]:
    """Register a factory ``factory(**options) -> reward_func`` under ``name``.

    ``check(**options)``, when given, validates options without building the function (for factories that
    load a model); :func:`check` otherwise builds the function once. ``answers="math"`` says the reward
    scores a final math answer, so the reward engine may call a completion with no extractable answer
    ``unparseable`` rather than ``wrong``."""
    if answers not in (None, *ANSWER_FORMATS):
        raise ValueError(f"answers must be None or one of {ANSWER_FORMATS}, got {answers!r}")

    def deco(factory: Callable[..., RewardFunc]) -> Callable[..., RewardFunc]:
        if name in _REGISTRY:
            raise ValueError(f"reward {name!r} is already registered")
        _REGISTRY[name] = factory
        if check is not None:
            _CHECKS[name] = check
        _ANSWERS[name] = answers
        return factory

    return deco


def answer_format(name: str) -> str | None:
    """``"math"`` when the registered reward ``name`` scores a final math answer, else None."""
    return _ANSWERS.get(name)


def available() -> list[str]:
    """Names of all registered rewards, sorted."""
    return sorted(_REGISTRY)


def _factory(name: str, options: dict) -> Callable[..., RewardFunc]:
    """The factory of ``name`` after checking the name and the option names (nearest-match errors)."""
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
    return factory


def check(name: str, **options: Any) -> None:
    """Validate a reward name and its options without using the function: ``ValueError``/``TypeError`` on a
    bad name, option or value (what a recipe checks before any model loads). A reward registered with a
    ``check`` is not built (it may load a model); any other is built once and dropped."""
    factory = _factory(name, options)
    if name in _CHECKS:
        _CHECKS[name](**options)
    else:
        factory(**options)


def get(name: str, **options: Any) -> RewardFunc:
    """Return the reward function registered as ``name``, configured with ``options``.

    Unknown names and unknown options raise ``ValueError`` naming the nearest valid choice.
    """
    factory = _factory(name, options)
    func = factory(**options)
    if not getattr(func, "__name__", None) or func.__name__ == "<lambda>":
        func.__name__ = name
    try:  # lets the reward engine's worker processes rebuild this function by reference
        func.__rlkit_spec__ = (name, dict(options))
    except (AttributeError, TypeError):
        pass
    return func
