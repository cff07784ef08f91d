"""MathHay evaluation (arXiv 2410.04698): prompts, answer extraction, numeric scoring, the optional judge, accuracy
per task type x length x placement, and a plot of accuracy against length.

- :func:`render_prompt(row, tokenizer, style)`: ``released`` (the documents, then instructions to find the needed
  numbers and solve, and a JSON reply ``{"reasoning": ..., "answer": <number>}``, as the released evaluation asks)
  or ``short`` (documents, question, "Reply with the number only.", and the prompt ends with ``Answer:``; for small
  models). Under a chat template the message is the user turn; ``Answer:`` opens the assistant turn.
- :func:`extract_answer(text, prefer)`: the number a completion gives (see its docstring for what is parsed).
- :func:`score(pred, gold, rel_tol, none_correct)`: ``math.isclose`` with ``rel_tol=1e-9`` as the released code.
  A missing answer is wrong; the released ``compare_answers`` counts it right when either side is None
  (``none_correct=True`` reproduces that).
- :func:`judge_records(records, judge_model, tokenizer, settings)`: the released hybrid's second half: a judge
  model, shown the gold solution program with its answer and the model's reasoning with its answer, says Yes or No
  (same final value; units and scale may differ, "355 billion" vs 355e9), through :func:`rlkit.rollout.generate`.
- :func:`evaluate_mathhay(model, tokenizer, rows, settings, style, judge)`: generation through the rollout layer
  (one batched call, so ``settings.kv_cache`` and the batch size apply), scoring, the summary.
- :func:`summarize(records)`, :func:`plot_mathhay(curves, path, title)`, :func:`run_mathhay_eval` (evaluate and
  write ``mathhay.json``, ``mathhay_records.jsonl``, ``mathhay.png``).

Nothing a model writes is executed; choices are in ``docs/methods/mathhay.md``.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any, Callable, Sequence

from ..data.mathhay import MathHayError, load_mathhay, render_prompt

__all__ = ["evaluate_mathhay", "extract_answer", "judge_prompt", "judge_records", "parse_judgement", "plot_mathhay",
           "render_prompt", "run_mathhay_eval", "score", "summarize"]

# a number: optional sign, digits with optional thousands separators, optional decimals and exponent
_NUM = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:[eE][-+]?\d+)?|-?\.\d+(?:[eE][-+]?\d+)?")
_ANSWER_FIELD = re.compile(r"[\"']answer[\"']\s*:\s*(\"[^\"]*\"|'[^']*'|[^,}\n]*)", re.IGNORECASE)
_ANSWER_MARK = re.compile(r"\b(?:final\s+)?answer\s*(?:is|:|=)\s*", re.IGNORECASE)


def _numbers(text: str) -> list[float]:
    out = []
    for m in _NUM.finditer(text):
        s = m.group()
        start = m.start()
        if s.startswith("-") and start > 0 and (text[start - 1].isalnum() or text[start - 1] in "._"):
            s = s[1:]  # "2022-2024": a range or a hyphen, not a negative number
        try:
            out.append(float(s.replace(",", "")))
        except ValueError:
            continue
    return [x for x in out if math.isfinite(x)]


def _as_number(value: Any) -> float | None:
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, float)):
        return float(value) if math.isfinite(value) else None
    nums = _numbers(str(value))
    return nums[0] if nums else None


def _json_answer(text: str) -> tuple[bool, float | None]:
    """(whether a JSON ``answer`` field is present, its number): the last JSON object holding ``answer``, else a
    broken (e.g. unclosed) ``"answer": value`` field."""
    for start in reversed([m.start() for m in re.finditer(r"\{", text)]):
        end = text.find("}", start)
        while end != -1:
            try:
                obj = json.loads(text[start:end + 1])
            except json.JSONDecodeError:
                end = text.find("}", end + 1)
                continue
            if isinstance(obj, dict) and "answer" in obj:
                return True, _as_number(obj["answer"])
            break
    matches = list(_ANSWER_FIELD.finditer(text))
    if matches:
        return True, _as_number(matches[-1].group(1).strip().strip("\"'"))
    return False, None


def extract_answer(text: str | None, prefer: str = "last", skip: Sequence[float] = ()) -> float | None:
    """The number a completion gives, or None. In order: the ``answer`` field of a JSON object (a number, or the
    first number of a string value; a present field without a number gives None); else the first number after the
    last "answer is" / "answer:" / "answer =" marker; else the last number of the text (``prefer="first"``: the
    first number, what a ``short`` prompt ending in "Answer:" is continued with). Outside a JSON field, numbers
    equal to one of ``skip`` are passed over (the evaluation gives the numbers the question states, e.g. its
    years, which a model restating the question writes before the answer).

    Parsed: signs, decimals, exponents (``3.55e11``), thousands separators (``"1,234,567.8"``), a leading ``$``;
    a ``%`` sign is dropped (``"12.5%"`` -> 12.5). Not parsed: scale words ("355 billion" -> 355.0, not 3.55e11)
    and units (both left to the judge, as in the released evaluation), fractions written ``a/b`` (-> b), spelled-out
    numbers."""
    if prefer not in ("last", "first"):
        raise MathHayError(f"prefer must be 'last' or 'first', got {prefer!r}")
    if not text:
        return None
    has_field, value = _json_answer(text)
    if has_field:
        return value
    skipped = {float(x) for x in skip}
    marks = list(_ANSWER_MARK.finditer(text))
    if marks:
        nums = [x for x in _numbers(text[marks[-1].end():]) if x not in skipped]
        if nums:
            return nums[0]
    nums = [x for x in _numbers(text) if x not in skipped]
    if not nums:
        return None
    return nums[0] if prefer == "first" else nums[-1]


def score(pred: float | None, gold: float | None, rel_tol: float = 1e-9, none_correct: bool = False) -> bool:
    """Whether a predicted number matches the gold one (``math.isclose(pred, gold, rel_tol=rel_tol)``). A missing
    prediction (or gold) is wrong; ``none_correct=True`` counts it right, as the released ``compare_answers``
    does."""
    if pred is None or gold is None:
        return bool(none_correct)
    try:
        p, g = float(pred), float(gold)
    except (TypeError, ValueError):
        return False
    if not (math.isfinite(p) and math.isfinite(g)):
        return False
    return math.isclose(p, g, rel_tol=rel_tol)


# --------------------------------------------------------------------------------------------------
# The judge

_JUDGE = (
    "Decide whether two solutions of the same math question reach the same final value. Units and scale may be "
    "written differently (for example 355000000000 and \"355 billion\" are the same value); small rounding "
    "differences in the last digits do not matter.\n\n"
    "Example:\nSolution 1:\ndef solve():\n    current = 45e9  # $45 billion\n    projected = 400e9  # $400 billion\n"
    "    answer = projected - current\n    return answer\nAnswer 1: 355000000000.0\n\n"
    "Solution 2:\nThe market grows from $45 billion to $400 billion, so the difference is $355 billion.\n"
    "Answer 2: 355.0\n\nSame value: Yes\n\n"
    "Now the two solutions to compare.\n\nSolution 1:\n{gold_solution}\nAnswer 1: {gold}\n\n"
    "Solution 2:\n{reasoning}\nAnswer 2: {pred}\n\n"
    "Reply with Yes if the two final values are the same, otherwise No."
)


def _reasoning(completion: str) -> str:
    """A completion's ``reasoning`` JSON field when it has one, else the whole completion."""
    m = re.search(r"\"reasoning\"\s*:\s*\"((?:[^\"\\]|\\.)*)\"", completion or "")
    if m:
        try:
            return json.loads(f"\"{m.group(1)}\"")
        except json.JSONDecodeError:
            return m.group(1)
    return (completion or "").strip()


def judge_prompt(record: dict) -> str:
    """The judge's user message for one record (``solution``, ``answer``, ``completion``, ``pred``)."""
    return _JUDGE.format(gold_solution=str(record.get("solution") or "").strip(), gold=record.get("answer"),
                         reasoning=_reasoning(record.get("completion", "")) or "(no reasoning)",
                         pred=record.get("pred"))


def parse_judgement(text: str) -> bool:
    """A judge's verdict: the ``output`` field of a JSON reply if present, else the first standalone Yes / No
    (case-insensitive); anything else is No."""
    m = re.search(r"\"output\"\s*:\s*\"([^\"]*)\"", text or "")
    target = m.group(1) if m else (text or "")
    w = re.search(r"\b(yes|no)\b", target, re.IGNORECASE)
    return bool(w and w.group(1).lower() == "yes")


def judge_records(records: Sequence[dict], judge_model, tokenizer, settings=None, progress: bool = False) -> list[bool]:
    """The judge's Yes (True) / No per record, generated greedily through :func:`rlkit.rollout.generate`
    (``settings``: a ``GenerationSettings``; None: 64 new tokens, batch size 8). The message goes through the
    judge tokenizer's chat template when it has one."""
    from ..data.manyshot import render_messages
    from ..rollout import GenerationSettings, generate

    if not records:
        return []
    settings = settings or GenerationSettings(max_new_tokens=64, batch_size=8)
    prompts = [render_messages([{"role": "user", "content": judge_prompt(r)}], tokenizer, add_generation_prompt=True)
               for r in records]
    outs = generate(judge_model, tokenizer, prompts, settings, progress=progress, desc="mathhay judge")
    return [parse_judgement(o[0].text) for o in outs]


# --------------------------------------------------------------------------------------------------
# Evaluation


def _acc(xs: list[bool]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def summarize(records: Sequence[dict]) -> dict:
    """Accuracy overall and by ``task_type``, ``length``, ``placement``, task type x length, and per cell (task
    type x length x placement, a list of ``{"task_type", "length", "placement", "accuracy", "n"}``); also
    ``numeric_accuracy`` (before the judge) and ``no_answer`` (share of completions without a number)."""
    if not records:
        raise MathHayError("no MathHay records to summarize")
    out: dict[str, Any] = {"n": len(records), "accuracy": _acc([r["correct"] for r in records]),
                           "numeric_accuracy": _acc([r.get("numeric_correct", r["correct"]) for r in records]),
                           "no_answer": _acc([r.get("pred") is None for r in records])}
    for key in ("task_type", "length", "placement"):
        groups: dict[Any, list[bool]] = {}
        for r in records:
            groups.setdefault(r[key], []).append(r["correct"])
        out[f"by_{key}"] = {k: _acc(v) for k, v in sorted(groups.items(), key=lambda kv: str(kv[0]).zfill(12))}
    tl: dict[str, dict[int, list[bool]]] = {}
    cells: dict[tuple, list[bool]] = {}
    for r in records:
        tl.setdefault(r["task_type"], {}).setdefault(r["length"], []).append(r["correct"])
        cells.setdefault((r["task_type"], r["length"], r["placement"]), []).append(r["correct"])
    out["by_task_type_length"] = {t: {L: _acc(v) for L, v in sorted(d.items())} for t, d in tl.items()}
    out["cells"] = [{"task_type": t, "length": L, "placement": p, "accuracy": _acc(v), "n": len(v)}
                    for (t, L, p), v in sorted(cells.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2]))]
    return out


def evaluate_mathhay(model, tokenizer, rows: Sequence[dict], settings, style: str | None = None,
                     judge: Any = None, rel_tol: float = 1e-9, none_correct: bool = False,
                     max_context: int | None = None, progress: bool = True) -> tuple[dict, list[dict]]:
    """Generate an answer for every row (one :func:`rlkit.rollout.generate` call with ``settings``, greedy, so
    ``settings.kv_cache`` and ``settings.batch_size`` apply), extract and score it; returns ``(summary,
    records)``. ``style``: the prompt style (None: each row's own, i.e. the one its length was built for);
    ``judge``: None, a callable ``records -> list[bool]``, or a ``(judge_model, judge_tokenizer)`` pair; a record
    is correct when the number matches or, for a record with a number that does not match, the judge says Yes.
    Rows whose prompt plus ``settings.max_new_tokens`` exceed ``max_context`` (None: the model's positions) are
    skipped and listed in ``summary["skipped"]``."""
    from ..rollout import generate
    from .manyshot import context_limit

    rows = list(rows)
    if not rows:
        raise MathHayError("no MathHay rows to evaluate")
    limit = (max_context or context_limit(model, tokenizer)) - settings.max_new_tokens
    jobs, skipped = [], []
    for r in rows:
        if "n_tokens" in r and (style is None or style == r.get("style")) and r["n_tokens"] > limit:
            skipped.append(r["id"])
            continue
        jobs.append(r)
    if not jobs:
        raise MathHayError(f"every MathHay row is longer than the model's context ({limit} prompt tokens)")
    prompts = [render_prompt(r, tokenizer, style) for r in jobs]
    outs = generate(model, tokenizer, prompts, settings, progress=progress, desc="mathhay")
    records = []
    for r, out in zip(jobs, outs):
        st = style or r.get("style") or "released"
        text = out[0].text
        pred = extract_answer(text, prefer="first" if st == "short" else "last", skip=_numbers(r["question"]))
        ok = score(pred, r["answer"], rel_tol, none_correct)
        records.append({"id": r["id"], "item_id": r.get("item_id", r["id"]), "task_type": r["task_type"],
                        "topic": r.get("topic", ""), "length": r["length"], "placement": r["placement"],
                        "n_tokens": r.get("n_tokens"), "style": st, "question": r["question"], "answer": r["answer"],
                        "solution": r.get("solution", ""), "completion": text, "pred": pred,
                        "numeric_correct": ok, "judge": None, "correct": ok})
    if judge is not None:
        todo = [rec for rec in records if not rec["numeric_correct"] and rec["pred"] is not None]
        if todo:
            if callable(judge):
                verdicts = list(judge(todo))
            elif isinstance(judge, (tuple, list)) and len(judge) == 2:
                verdicts = judge_records(todo, judge[0], judge[1], progress=progress)
            else:
                raise MathHayError("judge must be None, a callable records -> list[bool], or (judge_model, "
                                   "judge_tokenizer)")
            if len(verdicts) != len(todo):
                raise MathHayError(f"the judge returned {len(verdicts)} verdicts for {len(todo)} records")
            for rec, v in zip(todo, verdicts):
                rec["judge"] = bool(v)
                rec["correct"] = bool(v)
    summary = summarize(records)
    summary["skipped"] = skipped
    summary["judge"] = judge is not None
    return summary, records


# --------------------------------------------------------------------------------------------------
# Plot and the one-call run


def plot_mathhay(curves: dict[str, dict[int, float]], path: str | Path, title: str = "") -> Path:
    """PNG of accuracy against haystack length (log-2 axis), one line per configuration (``{label: {length:
    accuracy}}``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .plot import save_figure

    if not curves:
        raise MathHayError("plot_mathhay needs at least one curve")
    fig, ax = plt.subplots(figsize=(7, 4))
    lengths: set[int] = set()
    styles = ("o-", "s--", "^-.", "D:", "v-", "P--", "X-.", "*:")
    for i, (label, by_len) in enumerate(curves.items()):
        xs = sorted(int(k) for k in by_len)
        lengths.update(xs)
        ys = [by_len[x] if x in by_len else by_len[str(x)] for x in xs]
        # distinct markers and dashes, and markers shrinking with i, so curves that coincide stay visible
        ax.plot(xs, ys, styles[i % len(styles)], label=label, markersize=max(4, 11 - 1.5 * i), alpha=0.85)
    ax.set_xscale("log", base=2)
    ticks = sorted(lengths)
    ax.set_xticks(ticks)
    ax.set_xticklabels([f"{x // 1024}K" if x >= 1024 and x % 1024 == 0 else f"{x / 1000:g}K" if x >= 1000
                        else str(x) for x in ticks])
    ax.set_xlabel("haystack length (tokens)")
    ax.set_ylabel("accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(loc="best")
    if title:
        ax.set_title(title)
    return save_figure(fig, path)


def run_mathhay_eval(model, tokenizer, rows_or_path: Any, settings, output_dir: str | Path, style: str | None = None,
                     judge: Any = None, label: str | None = None, plot: bool = True,
                     progress: bool = True, write: Callable[[str], None] | None = print) -> dict:
    """Evaluate (``rows_or_path``: rows, or what :func:`rlkit.data.mathhay.load_mathhay` reads) and write
    ``mathhay.json`` (the summary), ``mathhay_records.jsonl`` and ``mathhay.png`` (accuracy against length: all
    rows, and one line per task type when there are several) to ``output_dir``. Returns the summary."""
    rows = load_mathhay(rows_or_path) if isinstance(rows_or_path, (str, Path)) else list(rows_or_path)
    summary, records = evaluate_mathhay(model, tokenizer, rows, settings, style, judge, progress=progress)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "mathhay_records.jsonl", "w") as fh:
        for r in records:
            fh.write(json.dumps(r) + "\n")
    label = label or getattr(getattr(model, "config", None), "_name_or_path", "") or "model"
    summary["label"] = label
    if plot:
        curves = {label: summary["by_length"]}
        if len(summary["by_task_type"]) > 1:
            curves.update({f"{label} {t}": d for t, d in summary["by_task_type_length"].items()})
        summary["plot"] = str(plot_mathhay(curves, out / "mathhay.png", "MathHay accuracy by length"))
    (out / "mathhay.json").write_text(json.dumps(summary, indent=2) + "\n")
    if write:
        curve = " ".join(f"{L}:{a:.3f}" for L, a in summary["by_length"].items())
        write(f"[rlkit] mathhay accuracy {summary['accuracy']:.3f} by length {curve}")
    return summary
