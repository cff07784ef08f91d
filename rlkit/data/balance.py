"""Scored samples grouped by prompt: positive/negative split and the balanced selection of OREO.

OREO (arXiv 2412.16145, A.1; released ``gen_balanced_new*.py``) samples k responses per training query and keeps,
per query, at most 4 positives and 4 negatives with ``#pos <= max(#neg, 1)``. :func:`balance_rows` applies that
rule to the rows of a ``sample`` stage (``prompt_index``, ``sample_index``, ``reward``); recipes reach it through
``data.train.balance`` (:class:`rlkit.recipe.BalanceSpec`), applied by :func:`rlkit.data.load_rows` right after
the ``where`` filter.

Choices where the paper is silent (documented in ``docs/methods/sample.md``):

- **Positive** means ``reward > threshold`` (default 0.5, so a {0, 1} correctness reward splits at "correct"); a
  row whose reward is null (no gold answer to check) is an error, not a silent negative.
- **Which ones** are kept: the first by ``sample_index`` (file order when a row has none). The k samples of a
  prompt are i.i.d. draws, so the first m are a uniform choice of m, and the selection is deterministic.
- The negatives are capped first (``n_neg = min(#neg, max_negative)``), then
  ``n_pos = min(#pos, max_positive, max(n_neg, 1))``: a prompt with only correct samples keeps one of them, one
  with only wrong samples keeps up to ``max_negative``.
- Kept rows stay in their input order.
"""

from __future__ import annotations

from typing import Any

from .benchmarks import DataError

__all__ = ["balance_counts", "balance_rows", "group_by_prompt", "is_positive", "require_sample_fields"]


def _opt(balance: Any, key: str, default: Any) -> Any:
    if isinstance(balance, dict):
        return balance.get(key, default)
    return getattr(balance, key, default)


def is_positive(reward: float, threshold: float = 0.5) -> bool:
    """Whether a scored sample counts as positive (correct): ``reward > threshold``."""
    return float(reward) > threshold


def require_sample_fields(rows: list[dict], fields: tuple[str, ...], what: str, source: str = "dataset") -> None:
    """One clear error when a row lacks a field a ``sample`` stage writes, or has a null reward."""
    for i, r in enumerate(rows):
        for key in fields:
            if key not in r:
                raise DataError(f"{what}: {source} row {i} has no {key!r} field (fields: {', '.join(sorted(r))}); "
                                "it applies to the rows of a `sample` stage: data.train: {from: STAGE, dataset: "
                                "samples}")
        if "reward" in fields and r["reward"] is None:
            raise DataError(f"{what}: {source} row {i} (prompt_index {r.get('prompt_index')}) has a null reward "
                            "(no gold answer to check it against); drop such rows with `where:` or give every "
                            "prompt a gold answer")


def group_by_prompt(rows: list[dict]) -> dict[Any, list[tuple[int, dict]]]:
    """``prompt_index -> [(position in rows, row), ...]`` in order of first appearance, each group sorted by
    ``sample_index`` (then position)."""
    groups: dict[Any, list[tuple[int, dict]]] = {}
    for pos, r in enumerate(rows):
        groups.setdefault(r["prompt_index"], []).append((pos, r))
    for items in groups.values():
        items.sort(key=lambda item: (item[1].get("sample_index", item[0]), item[0]))
    return groups


def balance_counts(n_pos: int, n_neg: int, max_positive: int = 4, max_negative: int = 4) -> tuple[int, int]:
    """How many positives and negatives of a prompt the balanced selection keeps (module docstring)."""
    keep_neg = min(n_neg, max_negative)
    keep_pos = min(n_pos, max_positive, max(keep_neg, 1))
    return keep_pos, keep_neg


def balance_rows(rows: list[dict], balance: Any, source: str = "dataset", log: bool = True) -> list[dict]:
    """The balanced selection of ``rows`` (a ``sample`` stage's rows) per :class:`rlkit.recipe.BalanceSpec`
    ``balance`` (or a mapping with its keys); None returns ``rows`` unchanged."""
    if balance is None:
        return rows
    max_pos = int(_opt(balance, "max_positive", 4))
    max_neg = int(_opt(balance, "max_negative", 4))
    threshold = float(_opt(balance, "threshold", 0.5))
    require_sample_fields(rows, ("prompt_index", "reward"), "data.balance", source)
    keep: set[int] = set()
    n_pos = n_neg = 0
    groups = group_by_prompt(rows)
    for items in groups.values():
        pos = [p for p, r in items if is_positive(r["reward"], threshold)]
        neg = [p for p, r in items if not is_positive(r["reward"], threshold)]
        k_pos, k_neg = balance_counts(len(pos), len(neg), max_pos, max_neg)
        keep.update(pos[:k_pos])
        keep.update(neg[:k_neg])
        n_pos, n_neg = n_pos + k_pos, n_neg + k_neg
    if log:
        print(f"[rlkit] data.balance: kept {len(keep)} of {len(rows)} rows over {len(groups)} prompts "
              f"({n_pos} positive, {n_neg} negative)", flush=True)
    return [r for p, r in enumerate(rows) if p in keep]
