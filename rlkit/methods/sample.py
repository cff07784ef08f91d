"""``method: sample`` (and ``rlkit sample``): N completions per prompt, scored by the reward engine, written
as a resumable dataset. The data source of OREO, ER-PRM, Auto-CEI, BOLT and RAFT-style pipelines.

For every prompt of ``data.train`` (in the recipe's template) the stage generates ``num_samples``
completions through :mod:`rlkit.rollout` (HF ``generate`` or vLLM; temperature, top-p, top-k, stop strings),
scores them with the recipe's ``rewards`` in the hang-proof engine (:mod:`rlkit.rewarding`), and appends one
row per completion to ``<output_dir>/samples.jsonl``:

``prompt_index``, ``sample_index``, ``question``, ``answer`` (and the input row's other fields, e.g.
``solution``), ``prompt`` (the text the model saw), ``completion``, ``reward`` (weighted sum of the rewards),
``rewards`` (each reward by name), ``status`` (``ok``/``wrong``/``unparseable``/``timeout``/``error``),
``prompt_tokens``, ``completion_tokens``, ``finish_reason`` (``stop``/``length``), ``steps`` (with
``steps: SPLITTER``; see :mod:`rlkit.rollout.steps`), ``model`` and ``seed``.

Resumable: prompts are processed in chunks of ``chunk_size``; each finished chunk is appended whole, and a
restart skips the prompts already in the file (a half-written last line is dropped). Each chunk's sampling is
seeded from the stage seed and the chunk's first prompt index, so an interrupted and resumed run writes the
same rows as an uninterrupted one. The settings are kept in ``samples.meta.json``; resuming with different
settings is an error. The stage hands on the model it sampled from (a chain of stages keeps its model) and
the dataset ``samples``.

Choices where nothing prescribes them: ``reward`` is None when every reward was not applicable (no gold);
``completion_tokens`` counts the generated tokens (EOS included, padding not; for a stop string the tokens
generated up to it); evaluation settings (``eval:``) do not apply to this stage.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from ..config import RecipeError
from . import register_method
from .base import Method, StageOutput

DATASET = "samples"


@dataclass
class GenerationArgs:
    """The generation settings every generating stage's config shares (``sample``, BOLT's samplers); a stage
    subclasses it, adds its own fields and may re-declare a field for another default."""

    max_new_tokens: int = 256
    """Longest completion, in tokens."""
    temperature: float = 1.0
    """Sampling temperature (0: greedy, needs one sample per prompt)."""
    top_p: float = 1.0
    """Nucleus sampling mass."""
    top_k: int | None = None
    """Top-k filtering (None: the model's generation-config default; 0: off)."""
    stop: list[str] = field(default_factory=list)
    """Strings that end a completion (cut from the text)."""
    backend: Literal["hf", "vllm"] = "hf"
    """Generation back end: hf (transformers generate, CPU or GPU) or vllm."""
    batch_size: int = 16
    """Prompts per HF generate call."""
    chunk_size: int = 64
    """Prompts generated, scored and appended to the file at a time (the unit a restart resumes from)."""

    def settings(self, run, first_prompt: int, **extra):
        """The rollout settings of the chunk starting at prompt ``first_prompt`` (seeded from the stage seed and
        that index, so a resumed run writes what an uninterrupted one would)."""
        from ..rollout import GenerationSettings

        return GenerationSettings(max_new_tokens=self.max_new_tokens, batch_size=self.batch_size,
                                  temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
                                  stop=list(self.stop), seed=run.seed * 1_000_003 + first_prompt,
                                  backend=self.backend, kv_cache=run.kv_cache, vllm=run.vllm, **extra)


@dataclass
class SampleConfig(GenerationArgs):
    """Settings of the ``sample`` stage (recipe section ``args:``; flags of ``rlkit sample``)."""

    num_samples: int = 4
    """Completions per prompt (N)."""
    steps: Literal["newline", "paragraph", "sentence", "latex_sentence", "stephint"] | None = None
    """Also write each completion split into steps with this splitter (None: no steps column)."""
    max_steps: int = 4
    """Steps per completion for the stephint splitter."""

    def __post_init__(self):
        if self.num_samples < 1:
            raise ValueError(f"num_samples must be at least 1, got {self.num_samples}")
        check_generation_fields(self, self.num_samples, "num_samples", "sample")


def check_generation_fields(config, count: int, count_name: str, noun: str) -> None:
    """The checks every generating stage's config shares (``max_new_tokens``, ``temperature``, ``top_p``,
    ``batch_size``, ``chunk_size``); ``count`` completions of each input (``count_name``, each a ``noun``) must
    not be asked of greedy decoding."""
    if config.max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {config.max_new_tokens}")
    if config.temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {config.temperature}")
    if config.temperature == 0 and count > 1:
        raise ValueError(f"temperature 0 is greedy decoding: every {noun} would be the same; set {count_name}: 1 "
                         "or a temperature > 0")
    if not 0 < config.top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {config.top_p}")
    if config.batch_size < 1 or config.chunk_size < 1:
        raise ValueError("batch_size and chunk_size must be at least 1")


def read_complete_rows(path: Path, who: str = "sample") -> list[dict]:
    """The complete rows of a jsonl a resumable stage appends to; a half-written last line (a killed run) is
    dropped from the file (``who`` names the stage in the message)."""
    if not path.is_file():
        return []
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        cut = data.rfind(b"\n") + 1
        print(f"[rlkit] {who}: dropping a half-written last line of {path}", flush=True)
        path.write_bytes(data[:cut])
        data = data[:cut]
    return [json.loads(line) for line in data.decode().splitlines() if line.strip()]


def check_backend(run, backend: str, where: str) -> None:
    """Recipe-time checks of a generating stage's back end: vLLM loads models by path (not the in-memory tiny
    model) and does not take rlkit's key-cache compression."""
    if backend == "vllm" and run.model.name == "tiny":
        raise RecipeError(f"{where}.backend: vLLM cannot load the in-memory 'tiny' model; use backend hf "
                          "or a saved model")
    if backend == "vllm" and run.kv_cache.kind != "none":
        raise RecipeError(f"{where}.backend: kv_cache {run.kv_cache.kind!r} compresses HF generate only")


def write_resume_meta(path: Path, meta_path: Path, config, run, model_name: str) -> None:
    """Record the settings a resumable stage writes ``path`` with in ``meta_path``; when ``path`` already holds
    rows written with other settings, a RecipeError names what differs (resuming would mix them)."""
    meta = {"config": asdict(config), "model": model_name, "seed": run.seed, "data": asdict(run.data.train),
            "rewards": [asdict(r) for r in run.rewards]}
    meta = json.loads(json.dumps(meta, default=str))
    if path.is_file() and meta_path.is_file():
        old = json.loads(meta_path.read_text())
        if old != meta:
            changed = sorted(k for k in set(old) | set(meta) if old.get(k) != meta.get(k))
            raise RecipeError(f"{path} was written with other settings ({', '.join(changed)} differ); delete "
                              "it or use another output_dir")
    meta_path.write_text(json.dumps(meta, indent=2) + "\n")


class GeneratingMethod(Method):
    """A non-training stage that generates with the stage's model through ``rlkit.rollout`` and scores with the
    recipe's rewards (``sample``, ``prm_label``): its config has a ``backend``; with vLLM only the tokenizer loads
    here (the engine loads the model by path)."""

    section = "args"
    rewards = "required"

    def check(self, run, config, where: str) -> None:
        check_backend(run, config.backend, where)

    def loads(self, run) -> str:
        return "tokenizer" if run.args.get("backend") == "vllm" else "model"

    @staticmethod
    def scoring(run, ctx, backend: str, model_name: str):
        """``(funcs, weights, names, engine, vllm_path)``: the recipe's reward functions, their weights and unique
        names, the reward engine (closed when the stage ends; None when disabled) and, for the vLLM back end, the
        path the engine loads (its memory goes back when the stage ends)."""
        from ..models import BUILTIN_MODELS, builtin_path
        from ..rewarding import build_reward_funcs, make_reward_engine

        funcs = build_reward_funcs(run.rewards)
        weights = [r.weight for r in run.rewards]
        names = _unique([r.name for r in run.rewards])
        engine = make_reward_engine(run.reward_engine, run.rewards)
        if engine is not None:
            ctx.on_close(engine.close)
        vllm_path = None
        if backend == "vllm":
            from ..rollout.vllm import close_engines

            vllm_path = str(builtin_path(model_name)) if model_name in BUILTIN_MODELS else model_name
            ctx.on_close(close_engines)
        return funcs, weights, names, engine, vllm_path


@register_method
class SampleMethod(GeneratingMethod):
    """Generate, score and write completions (see the module docstring)."""

    name = "sample"
    outputs = (DATASET,)
    config = SampleConfig

    def run(self, run, ctx) -> StageOutput:
        from tqdm.auto import tqdm

        from ..data import build_dataset
        from ..rewarding import answer_check_for, score
        from ..rollout import generate, render_prompts, split_steps

        config: SampleConfig = self.make_config(run)
        out = Path(run.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        path, meta_path = out / f"{DATASET}.jsonl", out / f"{DATASET}.meta.json"
        model_name = ctx.model_path or run.model.name
        write_resume_meta(path, meta_path, config, run, model_name)

        rows = build_dataset(run.data.train, ctx.tokenizer).to_list()
        done = {r["prompt_index"] for r in read_complete_rows(path)}
        todo = [i for i in range(len(rows)) if i not in done]
        funcs, weights, names, engine, vllm_path = self.scoring(run, ctx, config.backend, model_name)
        counts: dict[str, int] = {}
        written = 0
        bar = tqdm(total=len(rows), initial=len(rows) - len(todo), desc="sample", disable=not _main())
        for start in range(0, len(todo), config.chunk_size):
            chunk = todo[start:start + config.chunk_size]
            settings = config.settings(run, chunk[0])
            prompts = render_prompts([rows[i]["prompt"] for i in chunk], ctx.tokenizer)
            outs = generate(ctx.model, ctx.tokenizer, prompts, settings, config.num_samples,
                            do_sample=config.temperature > 0, progress=False, model_path=vllm_path)
            flat = [(i, k, p, c) for i, p, cs in zip(chunk, prompts, outs) for k, c in enumerate(cs)]
            columns = {key: [rows[i][key] for i, _, _, _ in flat] for key in rows[0] if key != "prompt"}
            scored = score(engine, funcs, weights, [p for _, _, p, _ in flat], [c.text for _, _, _, c in flat],
                           [c.token_ids for _, _, _, c in flat], columns,
                           answer_check=answer_check_for(run.rewards))
            prompt_tokens = {i: len(ctx.tokenizer(p, add_special_tokens=False)["input_ids"])
                             for i, p in zip(chunk, prompts)}
            lines = []
            for n, (i, k, p, c) in enumerate(flat):
                row = {key: v for key, v in rows[i].items() if key != "prompt"}
                row.update(prompt_index=i, sample_index=k, prompt=p, completion=c.text, reward=scored.total[n],
                           rewards={name: _num(v) for name, v in zip(names, scored.per_func[n])},
                           status=scored.status[n], prompt_tokens=prompt_tokens[i],
                           completion_tokens=len(c.token_ids), finish_reason=c.finish_reason,
                           model=model_name, seed=run.seed)
                if config.steps is not None:
                    row["steps"] = split_steps(c.text, config.steps, config.max_steps, ctx.tokenizer)
                lines.append(json.dumps(row, ensure_ascii=False) + "\n")
                counts[scored.status[n]] = counts.get(scored.status[n], 0) + 1
            if _main():
                with path.open("a") as f:
                    f.write("".join(lines))
            written += len(lines)
            bar.update(len(chunk))
            bar.set_postfix(ok=counts.get("ok", 0), written=written)
        bar.close()
        total = read_complete_rows(path) if _main() else []
        ok = sum(r["status"] == "ok" for r in total)
        summary = {"samples": len(total), "prompts": len(rows), "written_now": written,
                   "ok_rate": round(ok / len(total), 4) if total else None, "status": _status_counts(total)}
        print(f"[rlkit] sample: {len(total)} completions for {len(rows)} prompts in {path} "
              f"(ok {summary['ok_rate']})", flush=True)
        return StageOutput(model=model_name, datasets={DATASET: str(path)}, summary=summary)


def _unique(names: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for n in names:
        seen[n] = seen.get(n, 0) + 1
        out.append(n if seen[n] == 1 else f"{n}_{seen[n]}")
    return out


def _num(v: float) -> float | None:
    return None if v != v else v  # NaN (not applicable) -> null


def _status_counts(rows: list[dict]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    return counts


def _main() -> bool:
    import os

    return int(os.environ.get("RANK", "0")) == 0


def one_stage_recipe(method: str, model: str, data: str, out: str, config, split: str = "test",
                     limit: int | None = None, template: str = "auto", path: str | None = None,
                     rewards: list[str] | None = None, seed: int = 0, dtype: str = "auto", engine: dict | None = None):
    """The one-stage recipe a data command (``rlkit sample``, ``rlkit prm label``) runs: ``method`` with
    ``config`` (its args dataclass) on ``data``, scored by ``rewards`` (default math_accuracy); validated like
    any recipe."""
    from ..recipe import recipe_from_dict

    raw = {"method": method, "seed": seed, "output_dir": out, "plot": False,
           "model": {"name": model, "dtype": dtype},
           "data": {"train": {"name": data, "split": split, "limit": limit, "template": template, "path": path}},
           "rewards": [{"name": r} for r in (rewards or ["math_accuracy"])],
           "args": dict(asdict(config))}
    if engine:
        raw["reward_engine"] = engine
    return recipe_from_dict(raw)


def sample_recipe(model: str, data: str, out: str, config: SampleConfig, split: str = "test", limit: int | None = None,
                  template: str = "auto", path: str | None = None, rewards: list[str] | None = None,
                  seed: int = 0, dtype: str = "auto", engine: dict | None = None):
    """The one-stage recipe ``rlkit sample`` runs (validated like any recipe)."""
    return one_stage_recipe("sample", model, data, out, config, split, limit, template, path, rewards, seed, dtype,
                            engine)
