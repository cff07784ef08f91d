"""Dataset loading for recipes and evaluation.

``load_rows(spec)`` returns normalized rows (``question``, ``answer``, optional ``solution``);
``build_dataset(spec, tokenizer)`` adds the ``prompt`` column in the chosen template and returns a
``datasets.Dataset`` ready for TRL; ``load_selected_rows(spec)`` returns the stored rows after the ``where``
filter and the ``balance`` selection (:mod:`rlkit.data.balance`), for methods that read a ``sample`` stage's
rows whole (DPO pairs, OREO). Sources: a known benchmark (``gsm8k``, ``math500``, ``aime24``,
``amc23``) from the hub or a local jsonl, ``synthetic``, ``jsonl:PATH`` or any hub id (with
``question_column``/``answer_column`` set).
"""

from __future__ import annotations

import random

from .balance import balance_rows, group_by_prompt, is_positive, require_sample_fields
from .benchmarks import BENCHMARKS, DataError, extract_rows, load_hub, local_file, read_jsonl
from .synthetic import SyntheticConfig, generate
from .templates import format_prompt

__all__ = ["BENCHMARKS", "DataError", "SyntheticConfig", "balance_rows", "build_dataset", "group_by_prompt",
           "is_positive", "is_stage_rows", "load_raw_rows", "load_rows", "load_selected_rows", "format_prompt", "require_sample_fields",
           "resolve_template", "select_rows"]


def load_raw_rows(spec) -> tuple[list[dict], str, object]:
    """``(rows as stored, source name, benchmark or None)`` for a ``DatasetSpec``-like object: synthetic rows,
    a known benchmark's local jsonl or hub split, ``jsonl:PATH`` or a hub id (no column normalisation)."""
    name = spec.name
    if name == "synthetic":
        try:
            return generate(SyntheticConfig(**(spec.synthetic or {})), split=spec.split, seed=spec.seed), "synthetic", None
        except (TypeError, ValueError) as e:
            raise DataError(f"data.synthetic: {e}") from None
    if name in BENCHMARKS:
        bench = BENCHMARKS[name]
        local = local_file(bench, spec.split, spec.path)
        if local is not None:
            return read_jsonl(local), str(local), bench
        if spec.split not in bench.hub_split:
            raise DataError(f"{name} has no {spec.split!r} split (splits: {', '.join(bench.hub_split)})")
        return load_hub(bench.hub_id, bench.hub_config, bench.hub_split[spec.split]), bench.hub_id, bench
    if name.startswith("jsonl:"):
        return read_jsonl(name[len("jsonl:"):]), name[len("jsonl:"):], None
    return load_hub(name, None, spec.split), name, None


def is_stage_rows(spec) -> bool:
    """Whether a dataset spec reads rows an earlier stage wrote: ``{from: STAGE, dataset: NAME}`` or a
    ``jsonl:`` file (what stages that consume sampled completions accept: dpo, select, autocei_data)."""
    return spec.source is not None or spec.name.startswith("jsonl:")


def select_rows(rows: list[dict], where: dict | None, source: str = "dataset") -> list[dict]:
    """The rows whose fields equal ``where``'s values (a list value: any of them); a field no row has is an
    error naming the fields there are (a typo would otherwise silently select nothing)."""
    if not where:
        return rows
    if rows:
        missing = [k for k in where if not any(k in r for r in rows)]
        if missing:
            raise DataError(f"data.where: {source} has no field {missing[0]!r} (fields: {', '.join(sorted(rows[0]))})")
    wanted = {k: v if isinstance(v, list) else [v] for k, v in where.items()}
    return [r for r in rows if all(r.get(k) in vs for k, vs in wanted.items())]


def load_selected_rows(spec) -> tuple[list[dict], str, object]:
    """``(rows as stored, source, benchmark or None)`` keeping the rows that match ``spec.where``, then the
    balanced selection ``spec.balance`` (a ``sample`` stage's rows; :func:`rlkit.data.balance.balance_rows`).
    No column normalisation and no ``limit``."""
    raw, source, bench = load_raw_rows(spec)
    raw = select_rows(raw, getattr(spec, "where", None), source)
    raw = balance_rows(raw, getattr(spec, "balance", None), source)
    return raw, source, bench


def load_stored_rows(spec, who: str) -> tuple[list[dict], str]:
    """``(rows as stored, source)`` after ``spec``'s ``where`` / ``balance`` selection and ``limit``, for a method
    that reads its own fields; a DataError naming ``who`` when no row is left."""
    raw, source, _ = load_selected_rows(spec)
    if spec.limit is not None:
        raw = raw[: spec.limit]
    if not raw:
        raise DataError(f"{who}: dataset {spec.name!r} has no row")
    return raw, source

def load_rows(spec) -> list[dict]:
    """Rows for a ``DatasetSpec``-like object (name, path, split, limit, columns, seed, synthetic), keeping
    only the rows that match its ``where`` filter and, with ``balance``, the balanced selection of a ``sample``
    stage's rows (both applied to the stored rows, in that order, before ``limit``)."""
    raw, source, bench = load_selected_rows(spec)
    if spec.name == "synthetic":
        rows = raw
    elif bench is not None:
        q = spec.question_column or bench.question_column
        a = spec.answer_column or bench.answer_column
        s = spec.solution_column if spec.solution_column is not None else bench.solution_column
        rows = extract_rows(raw, q, a, s, bench.gold, source)
    else:
        rows = extract_rows(raw, spec.question_column or "question", spec.answer_column or "answer",
                            spec.solution_column, None, source)
    if spec.limit is not None:
        rows = rows[: spec.limit]
    if not rows:
        if getattr(spec, "where", None):
            raise DataError(f"dataset {spec.name!r}: no row matches where {spec.where}")
        raise DataError(f"dataset {spec.name!r} (split {spec.split!r}) is empty")
    return rows


def resolve_template(template: str, tokenizer) -> str:
    if template != "auto":
        return template
    return "chat" if getattr(tokenizer, "chat_template", None) else "plain"


def build_dataset(spec, tokenizer=None, shuffle: bool = False):
    """A ``datasets.Dataset`` with ``prompt``, ``answer``, ``question`` (and ``solution``) columns."""
    import datasets

    rows = load_rows(spec)
    template = resolve_template(spec.template, tokenizer)
    if template == "chat" and tokenizer is not None and not getattr(tokenizer, "chat_template", None):
        raise DataError("data.template is 'chat' but the tokenizer has no chat template; use 'plain' or 'think_answer'")
    for r in rows:
        r["prompt"] = format_prompt(r["question"], template, spec.system_prompt)
    if shuffle:
        random.Random(spec.seed).shuffle(rows)
    return datasets.Dataset.from_list(rows)
