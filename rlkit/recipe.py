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
import difflib
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml

from .kvcache import KVCacheConfig


class RecipeError(ValueError):
    """A user-fixable problem in a recipe; the message says what to change."""


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


@dataclass
class DatasetSpec:
    """A dataset: a known benchmark name (``gsm8k``, ``math500``, ``aime24``, ``amc23``), ``synthetic``,
    a hub id, or ``jsonl:PATH`` (``method: pretrain`` also reads ``txt:PATH``, a whole file as one
    document). ``path`` points a known benchmark at a local jsonl instead of the hub."""

    name: str = "synthetic"
    path: str | None = None
    split: str = "train"
    limit: int | None = None
    template: Literal["plain", "chat", "think_answer", "auto"] = "auto"
    """``auto``: chat template when the tokenizer has one, else plain text."""
    system_prompt: str | None = None
    question_column: str | None = None
    answer_column: str | None = None
    solution_column: str | None = None
    seed: int = 0
    synthetic: dict = field(default_factory=dict)
    """Options of the synthetic task (see ``rlkit.data.synthetic.SyntheticConfig``)."""


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
    """One stage of a multi-stage recipe; its sections override the top-level ones."""

    name: str = ""
    method: str = ""
    model: dict = field(default_factory=dict)
    data: dict = field(default_factory=dict)
    rewards: list[dict] | None = None
    trainer: dict = field(default_factory=dict)
    eval: dict = field(default_factory=dict)
    reward_engine: dict = field(default_factory=dict)
    kv_cache: dict = field(default_factory=dict)


@dataclass
class Recipe:
    """A whole recipe. Either ``method`` (single run) or ``stages`` (pipeline) is set."""

    method: str | None = None
    description: str = ""
    seed: int = 42
    output_dir: str = "runs/rlkit"
    model: ModelSpec = field(default_factory=ModelSpec)
    data: DataSpec = field(default_factory=DataSpec)
    rewards: list[RewardSpec] = field(default_factory=list)
    trainer: dict = field(default_factory=dict)
    eval: EvalSpec = field(default_factory=EvalSpec)
    stages: list[StageSpec] = field(default_factory=list)
    reward_engine: RewardEngineSpec = field(default_factory=RewardEngineSpec)
    plot: bool = True
    """Save a PNG of reward and held-out accuracy against step at the end of an RL run."""
    kv_cache: KVCacheConfig = field(default_factory=KVCacheConfig)
    """Key-cache compression (``none`` | ``polarquant`` | ``think`` | ``both`` and their settings) for every HF
    ``generate`` of the run: held-out evaluation and HF-generate rollouts (not vLLM)."""


# --------------------------------------------------------------------------------------------------
# Generic typed construction with helpful errors


def _nearest(key: str, choices: list[str]) -> str:
    near = difflib.get_close_matches(key, choices, n=1, cutoff=0.5)
    return f"; did you mean {near[0]!r}?" if near else f"; valid keys: {', '.join(sorted(choices))}"


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


_FLOAT_RE = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check/convert ``value`` against annotation ``tp``; raise RecipeError naming ``where``."""
    if tp is Any:
        return value
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except RecipeError as e:
                errors.append(str(e))
        raise RecipeError(errors[-1] if len(errors) == 1 else f"{where}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value not in get_args(tp):
            raise RecipeError(f"{where}: {value!r} is not one of {', '.join(map(repr, get_args(tp)))}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise RecipeError(f"{where}: expected a list, got {value!r}")
        (inner,) = get_args(tp)[:1] or (Any,)
        return [_coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise RecipeError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        return build(tp, value, where)
    if tp is bool:
        if not isinstance(value, bool):
            raise RecipeError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise RecipeError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str) and _FLOAT_RE.match(value.strip()):
            return float(value)  # PyYAML reads ``1e-5`` (no dot) as a string
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RecipeError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise RecipeError(f"{where}: expected a string, got {value!r}")
        return value
    return value


def build(cls: type, data: Any, where: str = "recipe") -> Any:
    """Build dataclass ``cls`` from a mapping, rejecting unknown keys and wrong types."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(f"{where}: expected a mapping of keys, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            raise RecipeError(f"{where}: unknown key {key!r}{_nearest(str(key), names)}")
        kwargs[key] = _coerce(value, hints[key], f"{where}.{key}")
    try:
        return cls(**kwargs)
    except RecipeError:
        raise
    except ValueError as e:  # a section's own validation (e.g. KVCacheConfig)
        raise RecipeError(f"{where}: {e}") from None


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


def _apply_override(raw: dict, parts: list[str], value: Any) -> None:
    if parts[0] == "stages" and len(parts) >= 3:
        stages = raw.get("stages") or []
        names = [s.get("name") for s in stages if isinstance(s, dict)]
        if parts[1] not in names:
            raise RecipeError(f"override stages.{parts[1]}: no stage named {parts[1]!r}{_nearest(parts[1], names)}")
        target = stages[names.index(parts[1])]
        parts = parts[2:]
    else:
        target = raw
    for p in parts[:-1]:
        nxt = target.get(p)
        if nxt is None:
            nxt = target[p] = {}
        if not isinstance(nxt, dict):
            raise RecipeError(f"override {'.'.join(parts)}: {p!r} is not a section")
        target = nxt
    target[parts[-1]] = value


def deep_merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def load_raw(path: str | os.PathLike) -> dict:
    p = Path(path)
    if not p.is_file():
        raise RecipeError(f"recipe file {str(p)!r} not found (list the shipped ones with `rlkit recipes`)")
    try:
        raw = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise RecipeError(f"{p}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise RecipeError(f"{p}: a recipe must be a mapping of sections (method, model, data, trainer, ...)")
    return raw


def load_recipe(path: str | os.PathLike, overrides: list[str] | None = None, validate: bool = True) -> Recipe:
    """Load, override and validate a recipe file. Raises RecipeError with one clear line on bad input."""
    raw = load_raw(path)
    for parts, value in parse_overrides(overrides or []):
        _apply_override(raw, parts, value)
    return recipe_from_dict(raw, validate=validate)


def recipe_from_dict(raw: dict, validate: bool = True) -> Recipe:
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


def resolve_runs(recipe: Recipe) -> list[RunSpec]:
    """Expand a recipe into its runs: one per stage (stage sections merged over the top level)."""
    if not recipe.stages:
        return [
            RunSpec("main", recipe.method or "", recipe.seed, recipe.output_dir, recipe.model, recipe.data,
                    recipe.rewards, dict(recipe.trainer), recipe.eval, recipe.plot, recipe.reward_engine,
                    recipe.kv_cache)
        ]
    runs = []
    base_model = dataclasses.asdict(recipe.model)
    base_data = dataclasses.asdict(recipe.data)
    base_eval = dataclasses.asdict(recipe.eval)
    base_engine = dataclasses.asdict(recipe.reward_engine)
    base_kv = dataclasses.asdict(recipe.kv_cache)
    for i, st in enumerate(recipe.stages):
        where = f"stages[{i}]({st.name})"
        model = build(ModelSpec, deep_merge(base_model, st.model), f"{where}.model")
        data = build(DataSpec, deep_merge(base_data, st.data), f"{where}.data")
        ev = build(EvalSpec, deep_merge(base_eval, st.eval), f"{where}.eval")
        rewards = (
            [build(RewardSpec, r, f"{where}.rewards[{j}]") for j, r in enumerate(st.rewards)]
            if st.rewards is not None
            else recipe.rewards
        )
        engine = build(RewardEngineSpec, deep_merge(base_engine, st.reward_engine), f"{where}.reward_engine")
        kv = build(KVCacheConfig, deep_merge(base_kv, st.kv_cache), f"{where}.kv_cache")
        trainer = deep_merge(recipe.trainer, st.trainer)
        out = str(Path(recipe.output_dir) / st.name)
        runs.append(RunSpec(st.name, st.method, recipe.seed, out, model, data, rewards, trainer, ev, recipe.plot,
                            engine, kv))
    return runs


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def validate_recipe(recipe: Recipe) -> None:
    """Check the whole recipe, including each trainer section against its method's TRL config."""
    from .trainers import registry  # local import: the trainer registry pulls in TRL

    if recipe.stages and recipe.method:
        raise RecipeError("recipe: set either `method` (one run) or `stages` (a pipeline), not both")
    if not recipe.stages and not recipe.method:
        raise RecipeError(f"recipe: no `method` given; choose one of {', '.join(registry.method_names())}")
    names = [s.name for s in recipe.stages]
    for i, st in enumerate(recipe.stages):
        if not st.name or not st.method:
            raise RecipeError(f"stages[{i}]: every stage needs a `name` and a `method`")
    if len(set(names)) != len(names):
        raise RecipeError(f"stages: stage names must be unique, got {names}")
    for run in resolve_runs(recipe):
        where = "trainer" if run.name == "main" else f"stages.{run.name}.trainer"
        method = registry.get_method(run.method, where=where.rsplit(".", 1)[0] + ".method" if recipe.stages else "method")
        method.validate(run, where)


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
