"""``method: prm_label`` (and ``rlkit prm label``): process-reward step labels from rollouts, as ER-PRM builds them.

ER-PRM (Zhang et al., "Entropy-Regularized Process Reward Model", arXiv 2412.11006; released code
hanningzhang/ER-PRM ``MCTS/mc_reward_data_gsm.py`` and ``MCTS/calculate_score.py``). Each solution is split into
steps s_1..s_L; for every proper prefix s_1..s_l (l < L) the completion model samples N continuations
(default 16, temperature 1, top-p 1, as the released code), each full solution (prefix + continuation) is scored
with the recipe's rewards in the reward engine, and with y_j in {0, 1} the correctness of rollout j the step's
label is the entropy-regularised soft-max (the paper's Eq. 1)

    label_l = (1/eta) * ln( (1/N) * sum_j exp(eta * y_j) )            (eta default 1, as the released code)

which goes to the mean (the "soft" label) as eta -> 0 and to the max (the "hard", Math-Shepherd label) as
eta -> inf. The final step's label is the solution's own hard correctness. All three kinds come from the same
rollouts and are all written; ``kind`` picks the one in the ``labels`` column.

Pure label math (no torch): :func:`er_label`, :func:`hard_label`, :func:`soft_label`, :func:`er_label_from_p` (the
released code's form, from the fraction of correct rollouts), :func:`step_labels` (a rollout table -> the three
label lists) and :func:`solution_steps` (splitting, merging short steps, capping the count).

Rows (``<output_dir>/labels.jsonl``, dataset ``labels``): the input row's fields plus ``row_index``, ``prompt``
(the text the model saw), ``completion``, ``steps`` (``"".join(steps) == completion``), ``labels`` (the configured
kind), ``labels_er``, ``labels_hard``, ``labels_soft``, ``step_correct`` (correct rollouts per step; 0 for the last
step, which has no rollouts), ``step_rollouts`` (N per step; 0 for the last), ``correct`` (0/1, the solution's
own status), ``eta``, ``label_model``, and with ``target: reward`` also ``step_rewards`` (each step's N rollout
rewards). Resumable exactly as the ``sample`` stage: rows are labelled in chunks of ``chunk_size`` appended
whole, a restart skips the rows already in the file (a half-written last line is dropped), each chunk is
seeded from the stage seed and its first row's index (a resumed run writes what an uninterrupted one does),
and the settings live in ``labels.meta.json`` (resuming with other settings is an error).

Every choice where the paper and the code are silent or differ from this module (what y_j is, the absolute
value, deduplicated prefixes, splitting, where the prefix goes) is listed in ``docs/methods/er_prm_labels.md``.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

from .. import register_method
from ..base import StageOutput
from ..sample import GeneratingMethod, check_generation_fields

DATASET = "labels"
KINDS = ("er", "hard", "soft")
SPLITTER_NAMES = ("newline", "paragraph", "sentence", "latex_sentence", "stephint")

# Fields a `sample` stage (or this stage) writes per completion: not passed to the reward functions as columns
# (they describe the sampled completion, not the problem; `sample_index` would also defeat prefix sharing).
_OWN_FIELDS = frozenset({
    "prompt", "completion", "reward", "rewards", "status", "prompt_tokens", "completion_tokens", "finish_reason",
    "steps", "model", "seed", "sample_index", "row_index", "labels", "labels_er", "labels_hard", "labels_soft",
    "step_correct", "step_rollouts", "step_rewards", "correct", "eta", "label_model",
})


# --------------------------------------------------------------------------------------------------
# Label math (pure Python)


def _values(ys: Sequence[float]) -> list[float]:
    vals = [float(y) for y in ys]
    if not vals:
        raise ValueError("a step label needs at least one rollout")
    if any(math.isnan(v) for v in vals):
        raise ValueError(f"rollout values must be numbers, got {vals}")
    return vals


def _check_eta(eta: float) -> float:
    eta = float(eta)
    if not eta >= 0:  # also NaN
        raise ValueError(f"eta must be >= 0 (0: the mean, inf: the max), got {eta}")
    return eta


def hard_label(ys: Sequence[float]) -> float:
    """The hard (Math-Shepherd) label: the best rollout, max_j y_j (ER-PRM's eta -> inf limit)."""
    return max(_values(ys))


def soft_label(ys: Sequence[float]) -> float:
    """The soft label: the mean rollout value, (1/N) sum_j y_j (ER-PRM's eta -> 0 limit)."""
    vals = _values(ys)
    return math.fsum(vals) / len(vals)


def er_label(ys: Sequence[float], eta: float = 1.0) -> float:
    """ER-PRM's entropy-regularised label (1/eta) * ln((1/N) sum_j exp(eta * y_j)) (arXiv 2412.11006, Eq. 1;
    eta default 1 as the released ``calculate_score.py``).

    Computed stably: with m = max_j y_j it is m + log1p(mean_j expm1(eta (y_j - m))) / eta, which neither
    overflows for large eta nor loses the small differences of a small eta. ``eta == 0`` is the mean exactly and
    ``eta == inf`` the max; the result is clamped into [mean, max], where it lies mathematically (Jensen).
    No absolute value is taken (the released code takes one; see ``docs/methods/er_prm_labels.md``)."""
    vals = _values(ys)
    eta = _check_eta(eta)
    mean, top = math.fsum(vals) / len(vals), max(vals)
    if eta == 0:
        return mean
    if math.isinf(eta):
        return top
    excess = math.fsum(math.expm1(eta * (v - top)) for v in vals) / len(vals)  # in (-1, 0]
    value = top + math.log1p(excess) / eta
    return min(max(value, mean), top)


def er_label_from_p(p: float, eta: float = 1.0, round_to: int | None = None) -> float:
    """The released code's form of :func:`er_label` for 0/1 rollouts: (1/eta) * ln(1 - p + p * e^eta), with
    ``p`` the fraction of correct rollouts (``calculate_score.py``'s ``normalize_score``). ``round_to``: round
    the label to that many decimals (the released code rounds every label to 3). Computed stably (log1p of
    p * expm1(eta), or eta + ln(p + (1 - p) e^-eta) for large eta); eta 0 gives p and eta inf gives 1 if p > 0."""
    p = float(p)
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p is a fraction of correct rollouts, in [0, 1]; got {p}")
    eta = _check_eta(eta)
    if eta == 0:
        value = p
    elif math.isinf(eta):
        value = 1.0 if p > 0 else 0.0
    elif p == 0:
        value = 0.0
    elif eta <= 30:
        value = math.log1p(p * math.expm1(eta)) / eta
    else:
        value = 1.0 + math.log(p + (1.0 - p) * math.exp(-eta)) / eta
    value = min(max(value, p), 1.0)
    return round(value, round_to) if round_to is not None else value


def step_labels(table: Sequence[Sequence[float]], final: float, eta: float = 1.0,
                round_to: int | None = None) -> dict[str, list[float]]:
    """The three label lists of one solution from its rollout table: ``table[l][j]`` is y_j of the rollouts
    after step l + 1 (one row per proper prefix), ``final`` the solution's own value (its hard correctness),
    which every kind gives the last step. Returns ``{"er": [...], "hard": [...], "soft": [...]}``, each one
    longer than ``table``; ``round_to`` rounds every label (the released code: 3 decimals)."""
    out = {"er": [er_label(ys, eta) for ys in table], "hard": [hard_label(ys) for ys in table],
           "soft": [soft_label(ys) for ys in table]}
    for values in out.values():
        values.append(float(final))
        if round_to is not None:
            values[:] = [round(v, round_to) for v in values]
    return out


def merge_short_steps(steps: list[str], min_chars: int) -> list[str]:
    """Join each step with fewer than ``min_chars`` characters (separators included) to the steps after it until
    the joined step has ``min_chars``; a short remainder at the end stays the last step. ``min_chars`` 0 keeps
    every step. The released ``process_list`` keeps a prefix when it adds more than 30 characters (about
    ``min_chars: 31``, except that it always keeps the first one)."""
    if min_chars <= 0:
        return list(steps)
    out, current = [], ""
    for s in steps:
        current += s
        if len(current) >= min_chars:
            out.append(current)
            current = ""
    if current:
        out.append(current)
    return out


def solution_steps(text: str, splitter: str = "newline", min_step_chars: int = 0, max_steps: int | None = None,
                   tokenizer: Any = None) -> list[str]:
    """``text`` split into steps with a :mod:`rlkit.rollout.steps` splitter, short steps merged
    (:func:`merge_short_steps`), then at most ``max_steps`` steps (the rest joined to the last one; the
    ``stephint`` splitter makes ``max_steps`` steps itself, 4 when None). ``"".join(result) == text``."""
    from ...rollout.steps import split_steps

    steps = split_steps(text, splitter, max_steps or 4, tokenizer)
    steps = merge_short_steps(steps, min_step_chars)
    if max_steps is not None and len(steps) > max_steps:
        steps = steps[:max_steps - 1] + ["".join(steps[max_steps - 1:])]
    return steps


# --------------------------------------------------------------------------------------------------
# The stage


@dataclass
class PRMLabelConfig:
    """Settings of the ``prm_label`` stage (recipe section ``args:``; flags of ``rlkit prm label``). Defaults are
    the released ER-PRM code's (``mc_reward_data_gsm.py``, ``calculate_score.py``) where it has one."""

    num_rollouts: int = 16
    """Continuations sampled per step prefix (N; the paper: 16)."""
    eta: float = 1.0
    """Entropy-regularisation coefficient eta of the ER label (the released code: 1; 0: the soft label, the mean;
    inf -- .inf in YAML -- the hard label, the max)."""
    kind: Literal["er", "hard", "soft"] = "er"
    """Which label goes into the ``labels`` column (all three are always written as labels_er/hard/soft)."""
    target: Literal["correct", "reward"] = "correct"
    """What a rollout's y_j is: correct (1 when the reward engine's status is ok, i.e. the first reward scored
    > 0 -- with math_accuracy first, a correct final answer; else 0; the paper) or reward (the weighted reward
    total; labels then leave [0, 1] unless the rewards lie in it)."""
    splitter: Literal["newline", "paragraph", "sentence", "latex_sentence", "stephint"] = "newline"
    """How a solution is split into steps (rlkit.rollout.steps; the released code uses spaCy sentences)."""
    min_step_chars: int = 0
    """Merge a step shorter than this many characters into the steps after it (0: off; the released code keeps
    a prefix only when it adds more than 30 characters, about 31 here)."""
    max_steps: int | None = None
    """Most steps per solution; the rest join the last one (None: all; the stephint splitter's step count, 4
    when None)."""
    round_digits: int | None = None
    """Round every label to this many decimals (None: no rounding; the released code rounds to 3)."""
    max_new_tokens: int = 1024
    """Longest continuation of a prefix, in tokens (the released code: 1024)."""
    temperature: float = 1.0
    """Sampling temperature of the rollouts (the released code: 1.0)."""
    top_p: float = 1.0
    """Nucleus sampling mass (the released code: 1.0)."""
    top_k: int | None = None
    """Top-k filtering (None: the model's generation-config default; 0: off)."""
    stop: list[str] = field(default_factory=list)
    """Strings that end a continuation (cut from the text)."""
    backend: Literal["hf", "vllm"] = "hf"
    """Generation back end: hf (transformers generate) or vllm (the released code)."""
    batch_size: int = 16
    """Prefixes per HF generate call (each with num_rollouts return sequences)."""
    chunk_size: int = 16
    """Input rows labelled and appended to the file at a time (the unit a restart resumes from)."""
    dedupe_prefixes: bool = True
    """Identical (prompt, prefix) texts within a chunk share one set of rollouts (samples of one prompt often
    share their first steps); off: each row's prefixes get their own rollouts."""

    def __post_init__(self):
        if self.num_rollouts < 1:
            raise ValueError(f"num_rollouts must be at least 1, got {self.num_rollouts}")
        if not self.eta >= 0:
            raise ValueError(f"eta must be >= 0 (0: the soft label, .inf: the hard label), got {self.eta}")
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if self.splitter not in SPLITTER_NAMES:
            raise ValueError(f"splitter must be one of {', '.join(SPLITTER_NAMES)}, got {self.splitter!r}")
        if self.min_step_chars < 0:
            raise ValueError(f"min_step_chars must be >= 0, got {self.min_step_chars}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be at least 1 (or null: every step), got {self.max_steps}")
        if self.round_digits is not None and self.round_digits < 0:
            raise ValueError(f"round_digits must be >= 0 (or null: no rounding), got {self.round_digits}")
        check_generation_fields(self, self.num_rollouts, "num_rollouts", "rollout")


def _read_rows(path: Path) -> list[dict]:
    """The complete rows of a labels file (a half-written last line is dropped from the file)."""
    from ..sample import read_complete_rows

    return read_complete_rows(path, "prm_label")


def load_label_inputs(spec: Any, tokenizer: Any = None) -> tuple[list[dict], str]:
    """The rows to label and their source: rows with a ``completion`` (a ``sample`` stage's, or any jsonl with
    prompt/completion/answer) as stored after ``where``/``balance`` and ``limit``; otherwise (a benchmark, or
    rows with question/answer/solution) the data set's reference ``solution`` as the completion, with the
    prompt in the recipe's template. Every row gets a text ``prompt`` (chat messages rendered)."""
    from ...data import DataError, build_dataset, format_prompt, load_selected_rows, resolve_template
    from ...rollout.generation import render_prompts

    raw, source, bench = load_selected_rows(spec)
    if spec.limit is not None:
        raw = raw[: spec.limit]
    if raw and bench is None and spec.name != "synthetic" and "completion" in raw[0]:
        rows = [dict(r) for r in raw]
    else:
        rows = build_dataset(spec, tokenizer).to_list()
        for i, r in enumerate(rows):
            if not isinstance(r.get("solution"), str) or not r["solution"]:
                raise DataError(f"prm_label: {source} row {i} has no completion to label and no reference solution; "
                                "label a sample stage's rows (data.train: {from: STAGE, dataset: samples}) or a jsonl "
                                "with prompt, completion and answer")
            r["completion"] = r["solution"]
    if not rows:
        raise DataError(f"prm_label: no row to label in {source}")
    template = None
    for i, r in enumerate(rows):
        if not isinstance(r.get("completion"), str):
            raise DataError(f"prm_label: {source} row {i}: the completion is "
                            f"{type(r.get('completion')).__name__}, not text")
        prompt = r.get("prompt")
        if prompt is None and isinstance(r.get("question"), str):
            template = template or resolve_template(spec.template, tokenizer)
            prompt = format_prompt(r["question"], template, spec.system_prompt)
        if isinstance(prompt, list):
            if tokenizer is None or not getattr(tokenizer, "chat_template", None):
                raise DataError(f"prm_label: {source} row {i} has a chat-message prompt but the tokenizer has no "
                                "chat template; store rendered prompt texts")
            prompt = render_prompts([prompt], tokenizer)[0]
        if not isinstance(prompt, str):
            raise DataError(f"prm_label: {source} row {i} has no text `prompt` (the text the model saw) and no "
                            f"`question` (fields: {', '.join(sorted(r))})")
        r["prompt"] = prompt
    return rows, source


@register_method
class PRMLabelMethod(GeneratingMethod):
    """Step labels from rollouts (see the module docstring)."""

    name = "prm_label"
    outputs = (DATASET,)
    config = PRMLabelConfig

    def run(self, run, ctx) -> StageOutput:
        from tqdm.auto import tqdm

        from ...models import BUILTIN_MODELS, builtin_path
        from ...rewarding import answer_check_for, build_reward_funcs, make_reward_engine

        t0 = time.time()
        config: PRMLabelConfig = self.make_config(run)
        out = Path(run.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        path, meta_path = out / f"{DATASET}.jsonl", out / f"{DATASET}.meta.json"
        model_name = ctx.model_path or run.model.name
        from ..sample import write_resume_meta

        write_resume_meta(path, meta_path, config, run, model_name)

        rows, source = load_label_inputs(run.data.train, ctx.tokenizer)
        done = {r["row_index"] for r in _read_rows(path)}
        todo = [i for i in range(len(rows)) if i not in done]
        scoring = _Scoring(build_reward_funcs(run.rewards), [r.weight for r in run.rewards],
                           make_reward_engine(run.reward_engine, run.rewards), answer_check_for(run.rewards))
        if scoring.engine is not None:
            ctx.on_close(scoring.engine.close)
        vllm_path = None
        if config.backend == "vllm":
            from ...rollout.vllm import close_engines

            vllm_path = str(builtin_path(model_name)) if model_name in BUILTIN_MODELS else model_name
            ctx.on_close(close_engines)
        written = generated = steps_now = 0
        bar = tqdm(total=len(rows), initial=len(rows) - len(todo), desc="prm_label", disable=not _main())
        for start in range(0, len(todo), config.chunk_size):
            chunk = todo[start:start + config.chunk_size]
            labelled, n_gen = label_chunk([rows[i] for i in chunk], chunk, config, ctx.model, ctx.tokenizer,
                                          scoring, seed=run.seed * 1_000_003 + chunk[0], run=run,
                                          model_name=model_name, vllm_path=vllm_path, source=source)
            if _main():
                with path.open("a") as f:
                    f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in labelled))
            written += len(labelled)
            generated += n_gen
            steps_now += sum(len(r["steps"]) for r in labelled)
            bar.update(len(chunk))
            bar.set_postfix(steps=steps_now, rollouts=generated)
        bar.close()
        total = _read_rows(path) if _main() else []
        summary = label_summary(total)
        summary.update(inputs=len(rows), written_now=written, rollouts_generated=generated,
                       seconds=round(time.time() - t0, 1))
        print(f"[rlkit] prm_label: {summary['rows']} rows, {summary['steps']} steps labelled in {path} "
              f"({generated} rollouts generated now; mean ER label {summary['mean_label_er']})", flush=True)
        return StageOutput(model=model_name, datasets={DATASET: str(path)}, summary=summary)


@dataclass
class _Scoring:
    funcs: list
    weights: list[float]
    engine: Any
    answer_check: Any


def label_summary(rows: list[dict]) -> dict:
    """Figures of a labels file: rows, steps, rollouts behind the labels, the solutions' correct rate and the
    mean label of each kind over every step."""
    steps = sum(len(r["steps"]) for r in rows)

    def mean(key: str) -> float | None:
        vals = [v for r in rows for v in r[key]]
        return round(math.fsum(vals) / len(vals), 4) if vals else None

    return {"rows": len(rows), "steps": steps, "rollouts_labelled": sum(sum(r["step_rollouts"]) for r in rows),
            "correct_rate": round(sum(r["correct"] for r in rows) / len(rows), 4) if rows else None,
            "mean_label_er": mean("labels_er"), "mean_label_hard": mean("labels_hard"),
            "mean_label_soft": mean("labels_soft")}


def label_chunk(rows: list[dict], indices: list[int], config: PRMLabelConfig, model: Any, tokenizer: Any,
                scoring: _Scoring, seed: int, run: Any, model_name: str, vllm_path: str | None = None,
                source: str = "dataset") -> tuple[list[dict], int]:
    """Label one chunk of rows (each with a text ``prompt`` and a ``completion``); returns the output rows and
    the number of rollouts generated. One generate call (seeded with ``seed``) covers every prefix of the chunk,
    one scoring call every rollout and every row's own completion."""
    from ...data import DataError
    from ...rewarding import score
    from ...rollout.generation import GenerationSettings, generate

    n = config.num_rollouts
    steps_of = [solution_steps(r["completion"], config.splitter, config.min_step_chars, config.max_steps, tokenizer)
                for r in rows]
    columns_of = [{k: v for k, v in r.items() if k not in _OWN_FIELDS} for r in rows]
    # generation inputs: prompt + prefix for every proper prefix of every row (shared when dedupe_prefixes)
    gen_inputs: list[str] = []
    gen_key_index: dict[Any, int] = {}
    job_gen: dict[tuple[int, int], int] = {}  # (row, prefix length l) -> generation input index
    for pos, (r, steps) in enumerate(zip(rows, steps_of)):
        for l in range(1, len(steps)):
            text = r["prompt"] + "".join(steps[:l])
            key = text if config.dedupe_prefixes else (pos, l)
            if key not in gen_key_index:
                gen_key_index[key] = len(gen_inputs)
                gen_inputs.append(text)
            job_gen[(pos, l)] = gen_key_index[key]
    outs = []
    if gen_inputs:
        settings = GenerationSettings(max_new_tokens=config.max_new_tokens, batch_size=config.batch_size,
                                      temperature=config.temperature, top_p=config.top_p, top_k=config.top_k,
                                      stop=list(config.stop), seed=seed, backend=config.backend,
                                      kv_cache=run.kv_cache, vllm=run.vllm)
        outs = generate(model, tokenizer, gen_inputs, settings, n, do_sample=config.temperature > 0, progress=False,
                        model_path=vllm_path)
    # scoring: every row's own completion, then each (generation input, columns) once
    items: list[tuple[str, str, dict]] = [(r["prompt"], r["completion"], c) for r, c in zip(rows, columns_of)]
    score_key_index: dict[Any, int] = {}
    job_score: dict[tuple[int, int], int] = {}  # (row, l) -> index of its first rollout in items
    for (pos, l), g in job_gen.items():
        key = (g, json.dumps(columns_of[pos], sort_keys=True, default=str)) if config.dedupe_prefixes else (pos, l)
        if key not in score_key_index:
            score_key_index[key] = len(items)
            prefix = "".join(steps_of[pos][:l])
            items.extend((rows[pos]["prompt"], prefix + c.text, columns_of[pos]) for c in outs[g])
        job_score[(pos, l)] = score_key_index[key]
    keys = sorted({k for _, _, c in items for k in c})
    scored = score(scoring.engine, scoring.funcs, scoring.weights, [p for p, _, _ in items], [c for _, c, _ in items],
                   tokenizer([c for _, c, _ in items], add_special_tokens=False)["input_ids"],
                   {k: [c.get(k) for _, _, c in items] for k in keys}, answer_check=scoring.answer_check)

    def value(i: int) -> float:
        if config.target == "correct":
            return 1.0 if scored.status[i] == "ok" else 0.0
        return 0.0 if scored.total[i] is None else float(scored.total[i])

    labelled = []
    for pos, (r, steps) in enumerate(zip(rows, steps_of)):
        if scored.total[pos] is None:
            raise DataError(f"prm_label: {source} row {indices[pos]}: no reward applies to it (a null reward: no gold "
                            "answer to check); drop such rows with data.train.where or give every row a gold answer")
        table = [[value(job_score[(pos, l)] + j) for j in range(n)] for l in range(1, len(steps))]
        correct = [sum(scored.status[job_score[(pos, l)] + j] == "ok" for j in range(n)) for l in range(1, len(steps))]
        labels = step_labels(table, value(pos), config.eta, config.round_digits) if steps else \
            {kind: [] for kind in KINDS}
        row = dict(r)
        row.update(row_index=indices[pos], steps=steps, labels=labels[config.kind], labels_er=labels["er"],
                   labels_hard=labels["hard"], labels_soft=labels["soft"],
                   step_correct=correct + [0] * bool(steps), step_rollouts=[n] * len(table) + [0] * bool(steps),
                   correct=int(scored.status[pos] == "ok"), eta=config.eta, label_model=model_name)
        if config.target == "reward":
            row["step_rewards"] = table
        labelled.append(row)
    return labelled, len(gen_inputs) * n


def _main() -> bool:
    import os

    return int(os.environ.get("RANK", "0")) == 0


def label_recipe(model: str, data: str, out: str, config: PRMLabelConfig, split: str = "train",
                 limit: int | None = None, template: str = "auto", path: str | None = None,
                 rewards: list[str] | None = None, seed: int = 0, dtype: str = "auto", engine: dict | None = None):
    """The one-stage recipe ``rlkit prm label`` runs (validated like any recipe)."""
    from ..sample import one_stage_recipe

    return one_stage_recipe("prm_label", model, data, out, config, split, limit, template, path, rewards, seed,
                            dtype, engine)
