"""verl adapter: ``compute_score(data_source, solution_str, ground_truth, extra_info=None) -> float``.

verl's custom reward hook calls one item at a time; this runs a registered reward on a batch of one,
passing ``ground_truth`` as the ``answer`` column (the column math_accuracy reads), every key of
``extra_info`` (a dict) as a further column, and ``data_source``. The prompt is ``extra_info["prompt"]``
when present, else "". None (not applicable) becomes 0.0.
"""

from __future__ import annotations

from typing import Any, Callable

from .registry import get

_CACHE: dict[str, Callable[..., list]] = {}


def _score_one(func: Callable[..., list], data_source: Any, solution_str: str, ground_truth: Any,
               extra_info: dict | None) -> float:
    extra = dict(extra_info or {})
    prompt = extra.pop("prompt", "")
    columns = {k: [v] for k, v in extra.items()}
    columns.setdefault("answer", [ground_truth])
    columns["data_source"] = [data_source]
    out = func(prompts=[prompt], completions=[solution_str], **columns)
    value = out[0] if out else None
    return 0.0 if value is None else float(value)


def compute_score(data_source: Any, solution_str: str, ground_truth: Any, extra_info: dict | None = None,
                  reward: str = "math_accuracy") -> float:
    """Score one verl item with the registered reward ``reward`` (default math_accuracy, no options)."""
    if reward not in _CACHE:
        _CACHE[reward] = get(reward)
    return _score_one(_CACHE[reward], data_source, solution_str, ground_truth, extra_info)


def make_compute_score(name: str = "math_accuracy", **options: Any) -> Callable[..., float]:
    """A verl ``compute_score`` function that runs reward ``name`` configured with ``options``."""
    func = get(name, **options)

    def compute_score_fn(data_source: Any, solution_str: str, ground_truth: Any, extra_info: dict | None = None,
                         **_: Any) -> float:
        return _score_one(func, data_source, solution_str, ground_truth, extra_info)

    compute_score_fn.__name__ = f"compute_score_{name}"
    return compute_score_fn
