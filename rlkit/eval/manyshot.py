"""Many-shot in-context evaluation: accuracy against the number of demonstrations (the DR-ICL / ICL-50 curve).

- :func:`evaluate_manyshot(model, tokenizer, tasks, shots, items, seed)`: for each task, ``items`` queries; for
  query ``j`` one pool of ``max(shots)`` demonstrations is drawn, and the ``k``-shot prompt uses its first ``k``
  (nested prompts, so the curve compares the same queries and demonstrations across ``k``). The prompt is the
  training layout of :mod:`rlkit.data.manyshot` (demonstrations as user/assistant turns, the instruction in the
  first user turn, the query as the last user turn, generation prompt on). Greedy decoding through
  :func:`rlkit.rollout.generate`; a completion is right when its first line equals the answer after
  :func:`normalize_answer`. A ``k`` whose prompt plus ``max_new_tokens`` would exceed the context is skipped
  for that task and reported under ``skipped``. Tasks are built-in task names / splits or
  :class:`~rlkit.data.manyshot.Task` objects; ICL-50 episodes (a jsonl path) are evaluated too: the last
  demonstration of each episode is the query, its first ``k`` demonstrations the shots.
- :func:`plot_manyshot(results, path)`: PNG of accuracy against shots (log-scaled axis), one line per run.
- :func:`run_manyshot_eval(model, tasks_or_jsonl, shots, items, output_dir, ...)`: load the model, evaluate,
  write ``manyshot.json``, ``manyshot_records.jsonl`` and ``manyshot.png`` (what ``rlkit eval --manyshot`` calls).
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Any, Sequence

from ..data.manyshot import (EpisodeError, Task, draw_demos, load_episodes, query_messages, render_messages,
                             resolve_tasks, text_tokens)

DEFAULT_SHOTS = (0, 1, 5, 10, 25, 50, 100)
_LABEL = re.compile(r"^(output|answer)\s*:\s*", re.IGNORECASE)


def normalize_answer(text: str) -> str:
    """The comparable form of an answer: its first non-empty line, without a leading ``Output:`` / ``Answer:``,
    surrounding quotes, backticks, asterisks and trailing ``.,;:!?``, whitespace collapsed, lower-cased."""
    lines = [ln for ln in str(text).strip().splitlines() if ln.strip()]
    s = lines[0].strip() if lines else ""
    s = _LABEL.sub("", s)
    s = s.strip().strip("\"'`*").strip()
    s = s.rstrip(".,;:!?").strip().strip("\"'`*").strip()
    return " ".join(s.split()).lower()


def exact_match(completion: str, answer: str) -> bool:
    return normalize_answer(completion) == normalize_answer(answer)


def context_limit(model, tokenizer) -> int:
    """Positions the model can attend over: ``max_position_embeddings`` (else the tokenizer's limit)."""
    n = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if n:
        return int(n)
    return int(min(getattr(tokenizer, "model_max_length", 1 << 20), 1 << 20))


def _shots(shots: Sequence[int]) -> list[int]:
    ks = sorted({int(k) for k in shots})
    if not ks or ks[0] < 0:
        raise EpisodeError(f"shots must be non-negative integers, got {list(shots)}")
    return ks


def _task_items(task: Task, items: int, max_k: int, seed: int) -> list[tuple[str, str, list[tuple[str, str]]]]:
    out = []
    for j in range(items):
        rng = random.Random(f"manyshot-eval|{seed}|{task.name}|{j}")
        x, y = task.sample(rng)
        out.append((x, y, draw_demos(task, rng, max_k, exclude=x)))
    return out


def _episode_items(rows: list[dict], items: int) -> dict[str, list[tuple[str, str, list[tuple[str, str]], str]]]:
    """ICL-50 rows -> per resource: (query input turn, answer, earlier (user, assistant) pairs, instruction)."""
    out: dict[str, list] = {}
    for row in rows:
        msgs = [m for m in row["messages"] if m["role"] != "system"]
        pairs = [(msgs[i]["content"], msgs[i + 1]["content"]) for i in range(len(msgs) - 1)
                 if msgs[i]["role"] == "user" and msgs[i + 1]["role"] == "assistant"]
        if not pairs:
            raise EpisodeError(f"episode {row.get('id')}: no user/assistant pair to use as the query")
        name = str(row.get("resource") or row.get("task") or "episodes")
        if len(out.setdefault(name, [])) < items:
            out[name].append((pairs[-1][0], pairs[-1][1], pairs[:-1]))
    return out


def _raw_prompt(demos: list[tuple[str, str]], query: str) -> list[dict]:
    msgs = []
    for u, a in demos:
        msgs += [{"role": "user", "content": u}, {"role": "assistant", "content": a}]
    return msgs + [{"role": "user", "content": query}]


def evaluate_manyshot(model, tokenizer, tasks: Any, shots: Sequence[int] = DEFAULT_SHOTS, items: int = 20,
                      seed: int = 0, max_new_tokens: int = 16, batch_size: int = 8, max_context: int | None = None,
                      progress: bool = False, label: str | None = None) -> dict:
    """Accuracy per number of shots and per task (module docstring). ``tasks``: task names / splits (a list or a
    comma-separated string), :class:`Task` objects, or a list of ICL-50 rows. Returns ``{"label", "shots",
    "accuracy": {k: acc}, "n": {k: items scored}, "per_task": {task: {k: acc}}, "skipped": {task: [k, ...]},
    "prompt_tokens": {task: {k: mean}}, "items", "seed", "records": [...]}``; a ``k`` no task could be scored at
    is absent from ``accuracy``."""
    from ..rollout import GenerationSettings, generate

    ks = _shots(shots)
    if items < 1:
        raise EpisodeError(f"items must be at least 1, got {items}")
    limit = (max_context or context_limit(model, tokenizer)) - max_new_tokens
    # (task name, k, item index, prompt text, answer, prompt tokens)
    jobs: list[tuple[str, int, int, str, str, int]] = []
    skipped: dict[str, list[int]] = {}
    prompt_tokens: dict[str, dict[int, float]] = {}
    if isinstance(tasks, (list, tuple)) and tasks and isinstance(tasks[0], dict):
        groups = {name: [(q, a, d, None) for q, a, d in its] for name, its in _episode_items(list(tasks), items).items()}
    else:
        groups = {t.name: [(x, y, demos, t.instruction) for x, y, demos in _task_items(t, items, ks[-1], seed)]
                  for t in resolve_tasks(tasks)}
    for name, its in groups.items():
        for k in ks:
            built = []
            for j, (x, y, demos, instruction) in enumerate(its):
                if instruction is None:  # an ICL-50 episode: turns as stored, its first k pairs as the shots
                    if k > len(demos):
                        break
                    msgs = _raw_prompt(demos[:k], x) if k else _raw_prompt([], _zero_shot(demos, x))
                else:
                    msgs = query_messages(instruction, demos[:k], x)
                text = render_messages(msgs, tokenizer, add_generation_prompt=True)
                n_tok = text_tokens(text, tokenizer)
                if n_tok > limit:
                    break
                built.append((name, k, j, text, y, n_tok))
            if len(built) < len(its):
                skipped.setdefault(name, []).append(k)
                continue
            jobs.extend(built)
            prompt_tokens.setdefault(name, {})[k] = sum(b[5] for b in built) / len(built)
    settings = GenerationSettings(max_new_tokens=max_new_tokens, batch_size=batch_size)
    outs = generate(model, tokenizer, [j[3] for j in jobs], settings, progress=progress, desc="manyshot") if jobs else []
    records = []
    right: dict[str, dict[int, list[int]]] = {}
    for (name, k, j, _text, answer, n_tok), comps in zip(jobs, outs):
        ok = exact_match(comps[0].text, answer)
        right.setdefault(name, {}).setdefault(k, []).append(int(ok))
        records.append({"task": name, "shots": k, "item": j, "answer": answer, "completion": comps[0].text,
                        "correct": ok, "prompt_tokens": n_tok})
    per_task = {name: {k: sum(v) / len(v) for k, v in sorted(by_k.items())} for name, by_k in right.items()}
    accuracy, n = {}, {}
    for k in ks:
        scores = [s for by_k in right.values() for s in by_k.get(k, [])]
        if scores:
            accuracy[k] = sum(scores) / len(scores)
            n[k] = len(scores)
    return {"label": label or getattr(getattr(model, "config", None), "_name_or_path", "") or "model", "shots": ks,
            "accuracy": accuracy, "n": n, "per_task": per_task, "skipped": skipped, "prompt_tokens": prompt_tokens,
            "items": items, "seed": seed, "records": records}


def _zero_shot(demos: list[tuple[str, str]], query: str) -> str:
    """An ICL-50 query with no shots keeps the instruction of the episode's first user turn (the text before its
    last blank line), as the training layout puts it."""
    first = demos[0][0] if demos else ""
    instruction = first.rsplit("\n\n", 1)[0] if "\n\n" in first else ""
    return f"{instruction}\n\n{query}" if instruction and not query.startswith(instruction) else query


def _curve(result: dict) -> tuple[list[int], list[float]]:
    acc = {int(k): float(v) for k, v in result["accuracy"].items()}
    ks = sorted(acc)
    return ks, [acc[k] for k in ks]


def plot_manyshot(results: dict | Sequence[dict], path: str | Path, title: str = "", per_task: bool = False) -> Path:
    """PNG of accuracy against the number of shots, one line per result of :func:`evaluate_manyshot` (its
    ``label`` in the legend); ``per_task`` adds a dashed line per task. Zero shots sit at the left end of a
    symlog axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .plot import save_figure

    runs = [results] if isinstance(results, dict) else list(results)
    if not runs:
        raise ValueError("plot_manyshot needs at least one result")
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, res in enumerate(runs):
        ks, acc = _curve(res)
        line, = ax.plot(ks, acc, "o-", label=res.get("label") or f"run {i}")
        if per_task:
            for name, by_k in res.get("per_task", {}).items():
                tks = sorted(int(k) for k in by_k)
                ax.plot(tks, [by_k[k] if k in by_k else by_k[str(k)] for k in tks], "--", alpha=0.35,
                        color=line.get_color(), linewidth=1)
    ax.set_xscale("symlog", linthresh=1)
    ax.set_xlabel("shots (demonstrations in context)")
    ax.set_ylabel("exact-match accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(loc="best")
    if title:
        ax.set_title(title)
    return save_figure(fig, path)


def _jsonable(result: dict) -> dict:
    return json.loads(json.dumps({k: v for k, v in result.items() if k != "records"}))


def run_manyshot_eval(model: Any, tasks_or_jsonl: Any, shots: Sequence[int] = DEFAULT_SHOTS, items: int = 20,
                      output_dir: str | Path = "manyshot_eval", seed: int = 0, max_new_tokens: int = 16,
                      batch_size: int = 8, max_context: int | None = None, tokenizer: Any = None,
                      label: str | None = None, plot: bool = True) -> dict:
    """Evaluate and write ``manyshot.json`` (the summary), ``manyshot_records.jsonl`` (every completion) and
    ``manyshot.png`` in ``output_dir``. ``model``: a loaded model (then give ``tokenizer``), or a name/path
    that :func:`rlkit.models.load_model` loads (hub id, folder, ``smollm2-135m-instruct``). ``tasks_or_jsonl``:
    task names / splits (list or comma-separated), or the path of an ICL-50 jsonl. Returns the summary."""
    if isinstance(model, str):
        from ..models import load_model
        from ..recipe import ModelSpec

        label = label or model
        model, tokenizer = load_model(ModelSpec(name=model))
    elif tokenizer is None:
        raise EpisodeError("run_manyshot_eval: give the tokenizer with a loaded model")
    tasks: Any = tasks_or_jsonl
    if isinstance(tasks_or_jsonl, (str, Path)) and str(tasks_or_jsonl).endswith(".jsonl"):
        tasks = load_episodes(tasks_or_jsonl)
    result = evaluate_manyshot(model, tokenizer, tasks, shots, items, seed, max_new_tokens, batch_size, max_context,
                               progress=True, label=label)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "manyshot_records.jsonl", "w") as fh:
        for r in result["records"]:
            fh.write(json.dumps(r) + "\n")
    summary = _jsonable(result)
    if plot:
        summary["plot"] = str(plot_manyshot(result, out / "manyshot.png", per_task=True))
    (out / "manyshot.json").write_text(json.dumps(summary, indent=2) + "\n")
    curve = " ".join(f"{k}:{v:.3f}" for k, v in result["accuracy"].items())
    print(f"[rlkit] many-shot accuracy by shots {curve}" + (f"; skipped {result['skipped']}" if result["skipped"]
                                                              else ""), flush=True)
    return summary
