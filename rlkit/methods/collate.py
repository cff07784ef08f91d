"""Batch helpers shared by the methods' own collators (PRM, DR-ICL, FIRST)."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def right_pad(rows: Sequence[Sequence], value: float | int, dtype: torch.dtype = torch.long,
              width: int | None = None) -> torch.Tensor:
    """``[len(rows), width]`` with each row's values at its start and ``value`` after them (``width``: the longest
    row by default)."""
    width = max((len(r) for r in rows), default=0) if width is None else width
    out = torch.full((len(rows), width), value, dtype=dtype)
    for i, r in enumerate(rows):
        if len(r):
            out[i, :len(r)] = torch.as_tensor(r, dtype=dtype)
    return out


def pad_ids(items: Sequence[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids`` and the matching ``attention_mask`` (1 on real tokens) of items with
    ``input_ids``."""
    ids = [x["input_ids"] for x in items]
    return {"input_ids": right_pad(ids, pad_id),
            "attention_mask": right_pad([[1] * len(r) for r in ids], 0)}
