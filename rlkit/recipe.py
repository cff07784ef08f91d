"""YAML recipe -> typed, validated config objects. The one place recipes are parsed.

A recipe names a ``method`` (or a list of ``stages``), a ``model``, ``data``, ``rewards`` and a
``trainer`` section whose keys are the method's TRL config fields, passed through unchanged. The whole
file is validated before any model loads: unknown keys fail naming the nearest valid key, wrong types
and impossible combinations fail with one line saying what to change.

Overrides on the command line use dotted keys, ``trainer.learning_rate=1e-5``; the value is parsed as
YAML (so ``true``, ``3``, ``[a, b]`` work). For staged recipes, ``stages.<name>.trainer.max_steps=5``
addresses one stage.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from .config import ConfigError, RecipeError, build, coerce, nearest
from .envs.config import EnvConfig
from .kvcache import KVCacheConfig
from .rollout.settings import VLLMSettings

__all__ = ["RecipeError", "ConfigError", "Recipe", "RunSpec", "ModelSpec", "DatasetSpec", "BalanceSpec", "DataSpec",
           "RewardSpec", "RewardEngineSpec", "EvalSpec", "StageSpec", "TinyModelSpec", "LoraSpec", "build", "load_recipe",
           "load_raw", "recipe_from_dict", "resolve_runs", "validate_recipe", "parse_overrides", "list_recipes",
           "ITERATION"]

ITERATION = "{iteration}"
"""Placeholder for the iteration number (1, 2, ...) in the string values of a repeated block of stages."""


# --------------------------------------------------------------------------------------------------
# Schema


@dataclass
class TinyModelSpec:
    """Architecture of a tiny Llama-family model built from a config (tests, quickstart)."""

    hidden_size: int = 128
    intermediate_size: int = 384
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_position_embeddings: int = 256
    tokenizer: Literal["char"] = "char"
    """``char``: a character-level tokenizer over printable ASCII, built offline."""


@dataclass
class LoraSpec:
    """PEFT LoRA adapter settings (``peft.LoraConfig`` fields)."""

    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: str | list[str] = "all-linear"


@dataclass
class ModelSpec:
    """Which model to load. ``name`` is a hub id, a local path, a built-in name
    (``smollm2-135m-instruct``) or ``tiny`` (built from ``tiny``)."""

    name: str = "tiny"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    attn_implementation: str | None = None
    trust_remote_code: bool = False
    revision: str | None = None
    lora: LoraSpec | None = None
    tiny: TinyModelSpec = field(default_factory=TinyModelSpec)
    patches: list[dict] = field(default_factory=list)
    """Model patches, ``[{"name": "hope", ...}]``; applied by ``rlkit.patches`` when present."""
    source: str | None = field(default=None, metadata={"alias": "from"})
    """``from: STAGE``: start from the model an earlier stage produced (default for a stage: the model of
    the stage before it, unless the stage names a model itself)."""


@dataclass
class BalanceSpec:
    """Balanced selection of scored samples (OREO, arXiv 2412.16145, A.1, and its ``gen_balanced_new*.py``): per
    prompt at most ``max_positive`` positives and ``max_negative`` negatives, with #positives <= max(#negatives, 1),
    the first ones by ``sample_index``. For the rows of a ``sample`` stage (``prompt_index``, ``reward``); see
    :func:`rlkit.data.balance.balance_rows`."""

    max_positive: int = 4
    """Most positives kept per prompt (the paper: 4)."""
    max_negative: int = 4
    """Most negatives kept per prompt (the paper: 4)."""
    threshold: float = 0.5
    """A row is positive when its ``reward`` is above this (0.5: rewards in {0, 1}, 1 = correct)."""

    def __post_init__(self):
        for name in ("max_positive", "max_negative"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.max_positive == 0 and self.max_negative == 0:
            raise ValueError("max_positive and max_negative are both 0: nothing would be kept")


@dataclass
class DatasetSpec:
    """A dataset: a known benchmark name (``gsm8k``, ``math500``, ``aime24``, ``amc23``), ``synthetic``,
    a hub id, or ``jsonl:PATH`` (``method: pretrain`` also reads ``txt:PATH``, a whole file as one
    document). ``path`` points a known benchmark at a local jsonl instead of the hub."""

    name: str = "synthetic"
    path: str | None = None
    split: str = "train"
    limit: int | None = None
    template: Literal["plain", "chat", "think_answer", "raw", "auto"] = "auto"
    """``auto``: chat template when the tokenizer has one, else plain text; ``raw``: the question as it is."""
    system_prompt: str | None = None
    question_column: str | None = None
    answer_column: str | None = None
    solution_column: str | None = None
    seed: int = 0
    synthetic: dict = field(default_factory=dict)
    """Options of the synthetic task (see ``rlkit.data.synthetic.SyntheticConfig``)."""
    source: str | None = field(default=None, metadata={"alias": "from"})
    """``from: STAGE``: a dataset an earlier stage wrote (with ``dataset``); replaces ``name``."""
    dataset: str | None = None
    """Which of that stage's datasets (e.g. ``samples`` of a ``sample`` stage)."""
    where: dict = field(default_factory=dict)
    """Keep only rows whose fields equal these values (a list value: any of them), e.g. ``{status: ok}``."""
    balance: BalanceSpec | None = None
    """Balanced selection of a ``sample`` stage's rows, applied right after ``where`` (e.g. ``{max_positive: 4,
    max_negative: 4}``; see :class:`BalanceSpec`). None: every row."""

    def __post_init__(self):
        if self.dataset is not None and self.source is None:
            raise ValueError("`dataset` names a dataset of an earlier stage; set `from: STAGE` with it")


@dataclass
class DataSpec:
    train: DatasetSpec = field(default_factory=DatasetSpec)
    eval: DatasetSpec | None = None


@dataclass
class RewardSpec:
    """A reward from ``rlkit_rewards`` by registered name, with options and a weight."""

    name: str = "math_accuracy"
    weight: float = 1.0
    options: dict = field(default_factory=dict)


@dataclass
class RewardEngineSpec:
    """How RL trainers score rewards: ``rlkit_rewards.engine.RewardEngine`` (a pool of worker processes
    with per-item deadlines) by default, or TRL's serial in-process scoring with ``enabled: false``."""

    enabled: bool = True
    num_workers: int | None = None
    """Worker processes per rank (None: CPU cores / processes on this machine, at least 1, at most 8)."""
    item_timeout: float = 10.0
    """Seconds one completion may take (all its reward functions); a stuck worker is killed and replaced."""
    batch_timeout: float = 300.0
    """Seconds one scoring call may take; unfinished items then score 0 with status ``timeout``."""

    def __post_init__(self):
        for name in ("item_timeout", "batch_timeout"):
            if not getattr(self, name) > 0:
                raise RecipeError(f"reward_engine.{name}: must be a positive number of seconds, got {getattr(self, name)}")

    def resolved_workers(self) -> int:
        if self.num_workers is not None:
            if self.num_workers < 1:
                raise RecipeError(f"reward_engine.num_workers: must be at least 1, got {self.num_workers}")
            return self.num_workers
        local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        return max(1, min(8, (os.cpu_count() or 1) // max(1, local)))


@dataclass
class EvalSpec:
    """Held-out evaluation run before and after training (``rlkit eval`` settings)."""

    enabled: bool = False
    before: bool = True
    """Also evaluate the starting model, so before/after accuracy is reported."""
    max_new_tokens: int = 256
    batch_size: int = 32
    limit: int | None = None
    samples: int = 0
    """Sampled completions per problem for pass@k / maj@k (0: greedy pass@1 only)."""
    temperature: float = 1.0
    every_steps: int = 0
    """Also measure held-out greedy accuracy every N optimizer steps during training (0: off)."""


@dataclass
class StageSpec:
    """One stage of a multi-stage recipe; its sections override the top-level ones. A stage with ``repeat: N``
    is a block: its own ``stages`` run N times in order (iteration 1..N), each a normal stage."""

    name: str = ""
    method: str = ""
    seed: int | None = None
    """This stage's seed (default: the recipe's, plus iteration - 1 inside a repeated block)."""
    model: dict = field(default_factory=dict)
    data: dict = field(default_factory=dict)
    rewards: list[dict] | None = None
    trainer: dict = field(default_factory=dict)
    args: dict = field(default_factory=dict)
    eval: dict = field(default_factory=dict)
    reward_engine: dict = field(default_factory=dict)
    kv_cache: dict = field(default_factory=dict)
    vllm: dict = field(default_factory=dict)
    env: dict = field(default_factory=dict)
    repeat: int = 0
    """Run the block's ``stages`` this many times (0: this is a plain stage)."""
    stages: list[dict] = field(default_factory=list)
    """The stages of a repeated block."""


@dataclass
class Recipe:
    """A whole recipe. Either ``method`` (single run) or ``stages`` (pipeline) is set."""

    method: str | None = None
    description: str = ""
    base: str | None = None
    """A recipe this one extends (path relative to this file): its sections, deep-merged under this one's;
    stages with the same name merge, new ones are added after."""
    seed: int = 42
    output_dir: str = "runs/rlkit"
    model: ModelSpec = field(default_factory=ModelSpec)
    data: DataSpec = field(default_factory=DataSpec)
    rewards: list[RewardSpec] = field(default_factory=list)
    trainer: dict = field(default_factory=dict)
    """The settings of a method that trains: its TRL config fields."""
    args: dict = field(default_factory=dict)
    """The settings of a method that does not train (``sample``, ``pear``...): its config dataclass's fields."""
    eval: EvalSpec = field(default_factory=EvalSpec)
    stages: list[StageSpec] = field(default_factory=list)
    reward_engine: RewardEngineSpec = field(default_factory=RewardEngineSpec)
    plot: bool = True
    """Save a PNG of reward and held-out accuracy against step at the end of an RL run."""
    kv_cache: KVCacheConfig = field(default_factory=KVCacheConfig)
    """Key-cache compression (``none`` | ``polarquant`` | ``think`` | ``both`` and their settings) for every HF
    ``generate`` of the run: held-out evaluation and HF-generate rollouts (not vLLM)."""
    vllm: VLLMSettings = field(default_factory=VLLMSettings)
    """How vLLM runs wherever the run uses it (``trainer.use_vllm``, ``args.backend: vllm``): dtype, eager mode,
    CPU KV-cache size, maximum length and the stale-weights check of weight syncs (``rlkit.rollout.vllm``)."""
    env: EnvConfig = field(default_factory=EnvConfig)
    """Multi-turn game environments (TextArena) that GRPO-family stages play (``rlkit.envs``): games, opponent,
    episode limits and reward shaping; empty ``games``: none."""


# --------------------------------------------------------------------------------------------------
# Loading, overrides, merging


def parse_overrides(items: list[str]) -> list[tuple[list[str], Any]]:
    out = []
    for item in items:
        if "=" not in item:
            raise RecipeError(f"override {item!r} must look like dotted.key=value, e.g. trainer.max_steps=10")
        key, raw = item.split("=", 1)
        parts = [p for p in key.strip().split(".") if p]
        if not parts:
            raise RecipeError(f"override {item!r} has an empty key")
        out.append((parts, yaml.safe_load(raw) if raw != "" else ""))
    return out


def _stage_dicts(raw: dict) -> list[dict]:
    """Every stage mapping of a raw recipe, the stages inside repeated blocks included."""
    out = []
    for st in raw.get("stages") or []:
        if isinstance(st, dict):
            out.append(st)
            out.extend(s for s in st.get("stages") or [] if isinstance(s, dict))
    return out


def _apply_override(raw: dict, parts: list[str], value: Any) -> None:
    if parts[0] == "stages" and len(parts) >= 3:
        stages = _stage_dicts(raw)
        names = [s.get("name") for s in stages]
        if parts[1] not in names:
            raise RecipeError(f"override stages.{parts[1]}: no stage named {parts[1]!r}{nearest(parts[1], names)}")
        target = stages[names.index(parts[1])]
        parts = parts[2:]
    else:
        target = raw
    for p in parts[:-1]:
        if isinstance(target, list):  # rewards.0.options.p: an index into a list section
            target = _list_item(target, p, parts)
            continue
        nxt = target.get(p)
        if nxt is None:
            nxt = target[p] = {}
        if not isinstance(nxt, (dict, list)):
            raise RecipeError(f"override {'.'.join(parts)}: {p!r} is not a section")
        target = nxt
    if isinstance(target, list):
        target[_index(target, parts[-1], parts)] = value
    else:
        target[parts[-1]] = value


def _index(items: list, part: str, parts: list[str]) -> int:
    if not part.isdigit() or int(part) >= len(items):
        raise RecipeError(f"override {'.'.join(parts)}: {part!r} is not an index of a list of {len(items)} items")
    return int(part)


def _list_item(items: list, part: str, parts: list[str]) -> Any:
    item = items[_index(items, part, parts)]
    if not isinstance(item, dict):
        raise RecipeError(f"override {'.'.join(parts)}: item {part} is not a section")
    return item


def deep_merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _merge_stage_lists(base: list, over: list) -> list:
    """Stages of ``over`` merged into ``base`` by name: a stage (or a repeated block) with a name found in
    ``base``, also inside its blocks, is deep-merged there; one with a new name is appended."""
    merged = [copy.deepcopy(s) for s in base or []]

    def find(stages: list, name: str) -> tuple[list, int] | None:
        for k, st in enumerate(stages):
            if isinstance(st, dict) and st.get("name") == name:
                return stages, k
        for st in stages:
            if isinstance(st, dict) and isinstance(st.get("stages"), list):
                hit = find(st["stages"], name)
                if hit is not None:
                    return hit
        return None

    for st in over or []:
        hit = find(merged, st.get("name")) if isinstance(st, dict) and st.get("name") is not None else None
        if hit is None:
            merged.append(copy.deepcopy(st))
            continue
        stages, k = hit
        target = stages[k]
        inner = _merge_stage_lists(target.get("stages") or [], st["stages"]) if "stages" in st else None
        target = deep_merge({kk: v for kk, v in target.items()}, {kk: v for kk, v in st.items() if kk != "stages"})
        if inner is not None:
            target["stages"] = inner
        stages[k] = target
    return merged


def _merge_recipes(base: dict, over: dict) -> dict:
    """``over`` deep-merged onto ``base``; ``stages`` merge by name (same name: deep merge, new: appended)."""
    out = deep_merge(base, {k: v for k, v in over.items() if k != "stages"})
    if over.get("stages") is not None:
        out["stages"] = _merge_stage_lists(base.get("stages") or [], over["stages"])
    return out


def _read_yaml(p: Path) -> dict:
    if not p.is_file():
        raise RecipeError(f"recipe file {str(p)!r} not found (list the shipped ones with `rlkit recipes`)")
    try:
        raw = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise RecipeError(f"{p}: not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise RecipeError(f"{p}: a recipe must be a mapping of sections (method, model, data, trainer, ...)")
    return raw


def load_raw(path: str | os.PathLike, _seen: tuple = ()) -> dict:
    """The recipe file as a mapping, with its ``base`` recipes merged in (see ``Recipe.base``)."""
    p = Path(path).resolve() if Path(path).is_file() else Path(path)
    if p in _seen:
        raise RecipeError(f"{path}: `base` recipes form a cycle ({' -> '.join(str(x) for x in (*_seen, p))})")
    raw = _read_yaml(p)
    base = raw.pop("base", None)
    if base is None:
        return raw
    if not isinstance(base, str):
        raise RecipeError(f"{path}: base: expected a recipe path, got {base!r}")
    base_path = (p.parent / base) if not Path(base).is_absolute() else Path(base)
    if not base_path.is_file():
        raise RecipeError(f"{path}: base recipe {base!r} not found (looked for {base_path})")
    return _merge_recipes(load_raw(base_path, (*_seen, p)), raw)


def load_recipe(path: str | os.PathLike, overrides: list[str] | None = None, validate: bool = True) -> Recipe:
    """Load, override and validate a recipe file. Raises RecipeError with one clear line on bad input."""
    raw = load_raw(path)
    for parts, value in parse_overrides(overrides or []):
        _apply_override(raw, parts, value)
    return recipe_from_dict(raw, validate=validate)


def recipe_from_dict(raw: dict, validate: bool = True) -> Recipe:
    if "base" in raw and raw["base"] is not None:
        raise RecipeError("recipe.base: only a recipe file can extend another (load it with load_recipe)")
    recipe = build(Recipe, raw)
    if validate:
        validate_recipe(recipe)
    return recipe


@dataclass
class RunSpec:
    """A fully resolved single-method run (one stage, or the whole recipe when it has no stages)."""

    name: str
    method: str
    seed: int
    output_dir: str
    model: ModelSpec
    data: DataSpec
    rewards: list[RewardSpec]
    trainer: dict
    eval: EvalSpec
    plot: bool = True
    reward_engine: RewardEngineSpec = field(default_factory=RewardEngineSpec)
    kv_cache: KVCacheConfig = field(default_factory=KVCacheConfig)
    args: dict = field(default_factory=dict)
    vllm: VLLMSettings = field(default_factory=VLLMSettings)
    stage: str = ""
    """The stage's name in the recipe (``name`` adds ``-<iteration>`` inside a repeated block)."""
    iteration: int | None = None
    """1..N inside a repeated block, else None."""
    model_named: bool = False
    """The stage names its model (``model.name``) instead of taking the previous stage's."""
    env: EnvConfig = field(default_factory=EnvConfig)
    """The games this run plays (``rlkit.envs``; empty: none)."""
    own_sections: tuple[str, ...] = ()
    """Which of ``trainer`` / ``args`` the stage (or a single-run recipe) sets itself; the top level's apply
    to the stages whose method takes them."""


def _fill(value: Any, iteration: int) -> Any:
    """``{iteration}`` replaced in every string of ``value``."""
    if isinstance(value, str):
        return value.replace(ITERATION, str(iteration))
    if isinstance(value, dict):
        return {k: _fill(v, iteration) for k, v in value.items()}
    if isinstance(value, list):
        return [_fill(v, iteration) for v in value]
    return value


def _expanded_stages(recipe: Recipe) -> list[tuple[StageSpec, int | None, str]]:
    """``(stage, iteration, where)`` in run order, repeated blocks unrolled."""
    out = []
    for i, st in enumerate(recipe.stages):
        where = f"stages[{i}]"
        if not st.repeat:
            if st.stages:
                raise RecipeError(f"{where}: `stages` inside a stage needs `repeat: N` (a repeated block)")
            out.append((st, None, where))
            continue
        if st.repeat < 1:
            raise RecipeError(f"{where}.repeat: must be a positive number of iterations, got {st.repeat}")
        if st.method:
            raise RecipeError(f"{where}: a repeated block has `stages`, not a `method` of its own")
        if not st.stages:
            raise RecipeError(f"{where}: a repeated block needs `stages: [...]`")
        inner = [build(StageSpec, s, f"{where}.stages[{j}]") for j, s in enumerate(st.stages)]
        for j, s in enumerate(inner):
            if s.repeat or s.stages:
                raise RecipeError(f"{where}.stages[{j}]: repeated blocks cannot be nested")
        for it in range(1, st.repeat + 1):
            for j, s in enumerate(st.stages):
                filled = build(StageSpec, _fill(s, it), f"{where}.stages[{j}]")
                out.append((filled, it, f"{where}.stages[{j}]"))
    return out


def resolve_runs(recipe: Recipe) -> list[RunSpec]:
    """Expand a recipe into its runs: one per stage (stage sections merged over the top level), repeated
    blocks unrolled (stage ``sample`` of iteration 2 runs as ``sample-2`` in ``<output_dir>/sample-2``)."""
    if not recipe.stages:
        return [
            RunSpec("main", recipe.method or "", recipe.seed, recipe.output_dir, recipe.model, recipe.data,
                    recipe.rewards, dict(recipe.trainer), recipe.eval, recipe.plot, recipe.reward_engine,
                    recipe.kv_cache, dict(recipe.args), recipe.vllm, stage="main", model_named=True, env=recipe.env,
                    own_sections=tuple(k for k in ("trainer", "args") if getattr(recipe, k)))
        ]
    runs = []
    base_model = dataclasses.asdict(recipe.model)
    base_data = dataclasses.asdict(recipe.data)
    base_eval = dataclasses.asdict(recipe.eval)
    base_engine = dataclasses.asdict(recipe.reward_engine)
    base_kv = dataclasses.asdict(recipe.kv_cache)
    base_vllm = dataclasses.asdict(recipe.vllm)
    base_env = dataclasses.asdict(recipe.env)
    for st, it, where in _expanded_stages(recipe):
        where = f"{where}({st.name})"
        model = build(ModelSpec, deep_merge(base_model, st.model), f"{where}.model")
        data = build(DataSpec, _merge_data(base_data, st.data), f"{where}.data")
        ev = build(EvalSpec, deep_merge(base_eval, st.eval), f"{where}.eval")
        rewards = (
            [build(RewardSpec, r, f"{where}.rewards[{j}]") for j, r in enumerate(st.rewards)]
            if st.rewards is not None
            else recipe.rewards
        )
        engine = build(RewardEngineSpec, deep_merge(base_engine, st.reward_engine), f"{where}.reward_engine")
        kv = build(KVCacheConfig, deep_merge(base_kv, st.kv_cache), f"{where}.kv_cache")
        vllm = build(VLLMSettings, deep_merge(base_vllm, st.vllm), f"{where}.vllm")
        env = build(EnvConfig, deep_merge(base_env, st.env), f"{where}.env")
        trainer = deep_merge(recipe.trainer, st.trainer)
        args = deep_merge(recipe.args, st.args)
        name = st.name if it is None else f"{st.name}-{it}"
        seed = st.seed if st.seed is not None else recipe.seed + ((it or 1) - 1)
        out = str(Path(recipe.output_dir) / name)
        runs.append(RunSpec(name, st.method, seed, out, model, data, rewards, trainer, ev, recipe.plot,
                            engine, kv, args, vllm, stage=st.name, iteration=it,
                            model_named="name" in st.model or "from" in st.model, env=env,
                            own_sections=tuple(k for k in ("trainer", "args") if getattr(st, k))))
    return runs


def _merge_data(base: dict, over: dict) -> dict:
    """A stage's data sections over the top level's; a section that takes a dataset ``from`` a stage starts
    from that reference (the top level's benchmark name and columns do not leak into it)."""
    out = copy.deepcopy(base)
    for key, section in (over or {}).items():
        if isinstance(section, dict) and "from" in section:
            out[key] = copy.deepcopy(section)
        elif isinstance(section, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], section)
        else:
            out[key] = copy.deepcopy(section)
    return out


def _is_ref(value: Any) -> bool:
    return isinstance(value, dict) and set(value) == {"from"} and isinstance(value["from"], str)


def model_references(run: RunSpec) -> list[tuple[str, str, str]]:
    """``(section, key, STAGE)`` for every ``key: {from: STAGE}`` of a run's ``trainer`` / ``args`` (a setting that
    takes the model an earlier stage produced, as a path, e.g. DPO's ``ref_model: {from: sft}``), and for every
    ``{from: STAGE}`` item of a list setting (key ``name[i]``, e.g. fuse's ``models[1]``)."""
    out = []
    for section in ("trainer", "args"):
        for key, value in getattr(run, section).items():
            if _is_ref(value):
                out.append((section, key, value["from"]))
            elif isinstance(value, list):
                out += [(section, f"{key}[{i}]", v["from"]) for i, v in enumerate(value) if _is_ref(v)]
    return out


def fill_model_references(run: RunSpec, model_of) -> RunSpec:
    """``run`` with each ``{from: STAGE}`` setting (:func:`model_references`) replaced by ``model_of(STAGE)``."""
    refs = model_references(run)
    if not refs:
        return run
    sections = {"trainer": dict(run.trainer), "args": dict(run.args)}
    for section, key, stage in refs:
        item = re.fullmatch(r"(.+)\[(\d+)\]", key)
        if item:
            items = sections[section][item[1]] = list(sections[section][item[1]])
            items[int(item[2])] = model_of(stage)
        else:
            sections[section][key] = model_of(stage)
    return dataclasses.replace(run, **sections)


def _check_references(runs: list[RunSpec], methods: dict) -> None:
    """``from:`` references point at an earlier stage that writes what is asked for."""
    for k, run in enumerate(runs):
        earlier = runs[:k]
        where = f"stages.{run.stage}"
        refs = [("model", run.model.source, None)]
        refs += [(f"{section}.{key}", stage, None) for section, key, stage in model_references(run)]
        for part in ("train", "eval"):
            spec = getattr(run.data, part)
            if spec is not None and spec.source is not None:
                refs.append((f"data.{part}", spec.source, spec.dataset or ""))
        for section, source, dataset in refs:
            if source is None:
                continue
            found = resolve_reference(earlier, source, run.iteration)
            if found is None:
                names = list(dict.fromkeys(r.stage for r in earlier))
                raise RecipeError(f"{where}.{section}.from: {source!r} is not an earlier stage"
                                  f"{nearest(source, names) if names else ' (this is the first stage)'}")
            method = methods[found.name]
            if dataset is None:
                continue
            if not method.outputs:
                raise RecipeError(f"{where}.{section}: stage {source!r} (method {method.name}) writes no dataset")
            if dataset == "" and len(method.outputs) == 1:
                continue
            if dataset not in method.outputs:
                raise RecipeError(f"{where}.{section}.dataset: stage {source!r} writes "
                                  f"{', '.join(method.outputs)}, not {dataset or '(none given)'!r}")


def resolve_reference(earlier: list[RunSpec], stage: str, iteration: int | None) -> RunSpec | None:
    """The run a ``from: stage`` reference names: the same iteration's stage inside a repeated block, else
    the latest earlier run of that stage."""
    same = [r for r in earlier if r.stage == stage and iteration is not None and r.iteration == iteration]
    if same:
        return same[-1]
    matches = [r for r in earlier if r.stage == stage or r.name == stage]
    return matches[-1] if matches else None


def validate_recipe(recipe: Recipe) -> None:
    """Check the whole recipe: every stage's method config, rewards and references, before any model loads."""
    from .methods import get_method, method_names

    if recipe.stages and recipe.method:
        raise RecipeError("recipe: set either `method` (one run) or `stages` (a pipeline), not both")
    if not recipe.stages and not recipe.method:
        raise RecipeError(f"recipe: no `method` given; choose one of {', '.join(method_names())}")
    for i, st in enumerate(recipe.stages):
        if st.repeat or st.stages:
            continue
        if not st.name or not st.method:
            raise RecipeError(f"stages[{i}]: every stage needs a `name` and a `method`")
    runs = resolve_runs(recipe)
    for run in runs:
        if not run.stage or not run.method:
            raise RecipeError(f"stages: every stage needs a `name` and a `method` (stage {run.stage!r})")
    names = [r.name for r in runs]
    if len(set(names)) != len(names):
        raise RecipeError(f"stages: stage names must be unique, got {names}")
    from .patches import check_patches

    methods = {}
    for run in runs:
        prefix = "" if run.name == "main" else f"stages.{run.stage}."
        if not recipe.stages and (run.model.source or model_references(run) or any(
                spec is not None and spec.source for spec in (run.data.train, run.data.eval))):
            raise RecipeError("recipe: `from:` refers to an earlier stage; a recipe without `stages` has none")
        check_patches(run.model.patches, f"{prefix}model.patches")
        method = get_method(run.method, where=f"{prefix}method")
        methods[run.name] = method
        method.validate(fill_model_references(run, lambda stage: f"<model of stage {stage}>"),
                        f"{prefix}{method.section}")
    if recipe.stages:
        _check_references(runs, methods)


def list_recipes(root: str | os.PathLike) -> list[tuple[str, str]]:
    """``(relative path, description)`` for every recipe under ``root``."""
    root = Path(root)
    out = []
    for p in sorted(root.rglob("*.yaml")):
        try:
            desc = str((yaml.safe_load(p.read_text()) or {}).get("description", "")).strip().splitlines()
        except yaml.YAMLError:
            desc = ["(invalid YAML)"]
        out.append((str(p.relative_to(root.parent)), desc[0] if desc else ""))
    return out
