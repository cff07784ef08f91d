"""``rlkit`` command line: parse arguments, load the recipe, call the library. No logic lives here."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml


def _recipes_root() -> Path:
    return Path(__file__).resolve().parent.parent / "recipes"


def cmd_train(args) -> int:
    from .pipeline import prepare_distributed_env, run_recipe
    from .recipe import load_recipe

    prepare_distributed_env()  # before any TRL config is built
    recipe = load_recipe(args.recipe, args.overrides)
    run_recipe(recipe, resume=args.resume_from or (True if args.resume else None))
    return 0


def cmd_quickstart(args) -> int:
    from .quickstart import run_quickstart

    run_quickstart(output_dir=args.output_dir, overrides=args.overrides, fresh=args.fresh)
    return 0


def cmd_recipes(args) -> int:
    from .recipe import list_recipes

    for path, desc in list_recipes(_recipes_root()):
        print(f"{path:<48} {desc}")
    return 0


def _key_values(fields: dict, options: list[str] | None, flag: str, example: str) -> dict:
    """``fields`` plus ``key=value`` items of a repeated CLI option (values parsed as YAML)."""
    for item in options or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"rlkit eval: {flag} {item!r} must look like key=value, e.g. {example}")
        fields[key.strip()] = yaml.safe_load(value)
    return fields


def kv_cache_config(kind: str, options: list[str]):
    """``KVCacheConfig`` from ``--kv-cache KIND`` and ``--kv-option key=value`` items (values parsed as YAML)."""
    from .config import build
    from .kvcache import KVCacheConfig

    return build(KVCacheConfig, _key_values({"kind": kind}, options, "--kv-option", "pruning_ratio=0.5"), "--kv-cache")


def _top_level_split(text: str, sep: str = ",") -> list[str]:
    """``text`` split at ``sep`` outside brackets and braces (``a=[[0, 1, 0.5]],b=2`` -> two items)."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += ch in "[{"
        depth -= ch in "]}"
        if ch == sep and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    return parts + [text[start:]]


def patch_specs(items: list[str] | None) -> list[dict] | None:
    """Model patches from repeated ``--patch`` items: ``NAME``, ``NAME:key=value,key=value`` (values parsed as YAML)
    or a YAML/JSON file holding one spec or a list of specs (``{name: pear, coefficients: [[l, h, a], ...]}``);
    validated by :func:`rlkit.patches.check_patches` before any model loads."""
    from .config import ConfigError
    from .patches import check_patches

    if not items:
        return None
    specs: list = []
    for item in items:
        path = Path(item)
        if item.endswith((".yaml", ".yml", ".json")):
            if not path.is_file():
                raise ConfigError(f"--patch {item}: no such file (give NAME, NAME:key=value,... or a YAML/JSON file)")
            loaded = yaml.safe_load(path.read_text())
            specs.extend(loaded if isinstance(loaded, list) else [loaded])
            continue
        name, _, rest = item.partition(":")
        spec: dict = {"name": name.strip()}
        for kv in filter(None, (x.strip() for x in _top_level_split(rest))):
            key, sep, value = kv.partition("=")
            if not sep or not key:
                raise ConfigError(f"--patch {item!r}: options must look like NAME:key=value,key=value, "
                                  "e.g. hope:train_length=4096")
            try:
                spec[key.strip()] = yaml.safe_load(value)
            except yaml.YAMLError:
                raise ConfigError(f"--patch {item!r}: {key.strip()}={value} is not a YAML value") from None
        specs.append(spec)
    checked = check_patches(specs, "--patch")
    return [{"name": spec["name"], **options} for spec, options in zip(specs, checked)]


def vllm_settings(dtype: str, options: list[str]):
    """``VLLMSettings`` from ``--dtype`` and ``--vllm-option key=value`` items (values parsed as YAML)."""
    from .config import build
    from .rollout.settings import VLLMSettings

    return build(VLLMSettings, _key_values({"dtype": dtype}, options, "--vllm-option", "max_model_len=2048"),
                 "--vllm-option")


def search_settings(args):
    """``SearchSettings`` from the ``rlkit eval`` value-search flags (None for the greedy decoder)."""
    if args.decoder != "value_search":
        return None
    from .rollout.search import SearchSettings, parse_step_stops

    return SearchSettings(beams=args.beams, expansions=args.expansions, max_rounds=args.max_rounds,
                          stop=parse_step_stops(args.step_stops, args.benchmark),
                          max_step_tokens=256 if args.max_step_tokens is None else args.max_step_tokens,
                          max_total_tokens=args.max_new_tokens,
                          temperature=1.0 if args.temperature is None else args.temperature, seed=args.seed,
                          add_eos=args.add_eos, batch_size=args.batch_size)


_RSD_FLAGS = {"threshold": "--threshold", "weighting": "--weighting", "constant_p": "--constant-p",
              "logistic_alpha": "--logistic-alpha", "step_separator": "--step-separator", "max_steps": "--max-steps"}


def rsd_settings(args):
    """``RSDSettings`` from the ``rlkit eval --decoder rsd`` flags (None for other decoders, where those flags are
    an error)."""
    from .config import ConfigError

    given = {k: getattr(args, k) for k in _RSD_FLAGS if getattr(args, k) is not None}
    if args.decoder != "rsd":
        if given:
            raise ConfigError(f"{_RSD_FLAGS[next(iter(given))]} only applies to --decoder rsd")
        return None
    from .rollout.rsd import RSDSettings, parse_separator

    if "step_separator" in given:
        given["step_separator"] = parse_separator(given["step_separator"])
    if args.max_step_tokens is not None:
        given["max_step_tokens"] = args.max_step_tokens
    return RSDSettings(seed=args.seed, **given)


def cmd_eval(args) -> int:
    from .config import ConfigError

    if sum(bool(x) for x in (args.benchmark, args.games, args.manyshot)) > 1:
        raise ConfigError("rlkit eval: give one of --benchmark, --games and --manyshot")
    if not args.manyshot and (args.shots is not None or args.items is not None or args.max_context is not None):
        raise ConfigError("--shots, --items and --max-context apply to --manyshot")
    if args.calibration is not None and not args.benchmark:
        raise ConfigError("--calibration applies to --benchmark evaluation")
    if args.patch and not args.benchmark:
        raise ConfigError("--patch applies to --benchmark evaluation")
    if (args.judge is not None or args.prompt_style is not None) and not (args.benchmark or "").startswith("mathhay:"):
        raise ConfigError("--judge and --prompt-style apply to --benchmark mathhay:PATH")
    if args.manyshot:
        return _eval_manyshot(args)
    if args.games:
        return _eval_games(args)
    if not args.benchmark:
        raise SystemExit("rlkit eval: give --benchmark (math), --games (TextArena games) or --manyshot (many-shot ICL)")
    from .eval.run import run_eval

    if args.max_new_tokens is None and not args.benchmark.startswith("mathhay:"):
        args.max_new_tokens = 512  # mathhay picks its own: 32 for short prompts, 512 for the released JSON answer

    kv = kv_cache_config(args.kv_cache, args.kv_option)
    vllm = vllm_settings(args.dtype, args.vllm_option) if args.backend == "vllm" else None
    summary = run_eval(model=args.model, benchmark=args.benchmark, split=args.split, limit=args.limit,
                       samples=args.samples, temperature=args.temperature, max_new_tokens=args.max_new_tokens,
                       batch_size=args.batch_size, backend=args.backend, template=args.template,
                       output_dir=args.output_dir, dtype=args.dtype, kv_cache=kv if kv.kind != "none" else None,
                       vllm=vllm, path=args.path, decoder=args.decoder, value_model=args.value_model,
                       search=search_settings(args), draft=args.draft, target=args.target, scorer=args.scorer,
                       rsd=rsd_settings(args), select=args.select,
                       synthetic=_key_values({}, args.synthetic, "--synthetic", "max_operand=12"),
                       idk_phrases=args.idk_phrases, idk_lambda=args.idk_lambda, calibration=args.calibration,
                       ece_bins=args.ece_bins, patches=patch_specs(args.patch), prompt_style=args.prompt_style,
                       judge=args.judge)
    print(json.dumps(summary, indent=2))
    return 0


def _shot_list(text: str) -> list[int]:
    try:
        ks = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated shot counts like 0,1,5,10, got {text!r}") from None
    if not ks or min(ks) < 0:
        raise argparse.ArgumentTypeError(f"expected non-negative shot counts like 0,1,5,10, got {text!r}")
    return ks


def _eval_manyshot(args) -> int:
    """``rlkit eval --manyshot``: accuracy against the number of demonstrations (:mod:`rlkit.eval.manyshot`)."""
    from .config import ConfigError
    from .data.manyshot import EpisodeError, load_episodes, resolve_tasks
    from .eval.manyshot import DEFAULT_SHOTS, run_manyshot_eval
    from .models import load_model
    from .recipe import ModelSpec

    if args.model is None:
        raise ConfigError("rlkit eval --manyshot: give --model")
    if args.items is not None and args.items < 1:
        raise ConfigError(f"--items must be at least 1, got {args.items}")
    out = args.output_dir or str(Path("runs") / "eval" / f"{Path(args.model).name}-manyshot")
    try:  # the tasks or episodes first: a wrong name fails before the model loads
        tasks = load_episodes(args.manyshot) if args.manyshot.endswith(".jsonl") else resolve_tasks(args.manyshot)
    except EpisodeError as e:
        print(f"rlkit: error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    model, tokenizer = load_model(ModelSpec(name=args.model, dtype=args.dtype))
    import torch

    if torch.cuda.is_available():
        model = model.to("cuda")
    try:
        summary = run_manyshot_eval(model, tasks, DEFAULT_SHOTS if args.shots is None else args.shots,
                                    20 if args.items is None else args.items, out, seed=args.seed,
                                    max_new_tokens=16 if args.max_new_tokens is None else args.max_new_tokens,
                                    batch_size=args.batch_size, max_context=args.max_context, tokenizer=tokenizer,
                                    label=args.model)
    except EpisodeError as e:
        print(f"rlkit: error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    print(json.dumps({k: v for k, v in summary.items() if k != "records"}, indent=2))
    return 0


def _eval_games(args) -> int:
    from .config import ConfigError
    from .envs.games import GameError
    from .eval.games import run_game_eval

    if args.model is None:
        raise SystemExit("rlkit eval --games: give --model")
    try:
        summary = run_game_eval(args.model, args.games, args.episodes, opponent=args.opponent, seed=args.seed,
                                temperature=args.temperature or 0.0, output_dir=args.output_dir,
                                dtype=None if args.dtype == "auto" else args.dtype,
                                env_options=_key_values({}, args.env_option, "--env-option", "seed_offset=100000"))
    except (GameError, ConfigError) as e:
        print(f"rlkit: error: {e}", file=sys.stderr)
        return 2
    for game, g in summary["games"].items():
        print(f"{game:28s} win {g['win']:.3f} +- {g['win_se']:.3f}  draw {g['draw']:.3f}  loss {g['loss']:.3f}  "
              f"invalid {g['invalid']:.3f}  (n={g['n']})")
    print(f"{'mean':28s} win {summary['mean_win']:.3f} +- {summary['mean_win_se']:.3f}")
    return 0


def cmd_hints(args) -> int:
    from .config import ConfigError, from_arguments
    from .methods.stephint.hints import GenerateConfig, HintConfig, HintError, default_end_marker, run_build

    try:
        if not args.generate and (args.gen_teacher or args.gen_backend != "hf"):
            raise HintError("--teacher/--backend only apply with --generate")
        end_marker = args.end_marker if args.end_marker is not None else default_end_marker(args.data)
        config = from_arguments(HintConfig, args, "rlkit hints build", end_marker=end_marker)
        generate = None
        if args.generate:
            generate = from_arguments(GenerateConfig, args, "rlkit hints build", prefix="gen_", dtype=args.dtype)
        summary = run_build(args.data, args.out, config, split=args.split, path=args.path, limit=args.limit,
                            tokenizer=args.tokenizer, scorer=args.scorer, generate=generate, dtype=args.dtype,
                            chunk_size=args.chunk_size, progress=not args.quiet)
    except (HintError, ConfigError) as e:
        print(f"rlkit: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2))
    return 0


def _run_data_command(args, config_cls, make_recipe, where: str) -> int:
    """Build ``config_cls`` from the flags, run the one-stage recipe ``make_recipe`` returns, print its summary."""
    from .config import from_arguments
    from .pipeline import run_recipe

    config = from_arguments(config_cls, args, where)
    recipe = make_recipe(args.model, args.data, args.out, config, split=args.split, limit=args.limit,
                         template=args.template, path=args.path, rewards=args.reward, seed=args.seed,
                         dtype=args.dtype)
    summary = run_recipe(recipe)[0]
    print(json.dumps({k: v for k, v in summary.items() if k != "stage"}, indent=2))
    return 0


def cmd_sample(args) -> int:
    from .methods.sample import SampleConfig, sample_recipe

    return _run_data_command(args, SampleConfig, sample_recipe, "rlkit sample")


def cmd_prm_label(args) -> int:
    from .methods.prm.labels import PRMLabelConfig, label_recipe

    return _run_data_command(args, PRMLabelConfig, label_recipe, "rlkit prm label")


def _settings(text: str) -> tuple[tuple[int, int], ...]:
    try:
        return tuple((int(a), int(b)) for a, b in (x.lower().split("x") for x in text.split(",") if x.strip()))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected NxN pairs like 20x50,40x25, got {text!r}") from None


def cmd_pear(args) -> int:
    from .config import ConfigError, from_arguments
    from .methods.pear import PearError, PearStageConfig, pear_command

    try:
        extra = {"positive_only": not args.all_signs}
        if args.settings:
            extra["settings"] = [list(s) for s in args.settings]
        config = from_arguments(PearStageConfig, args, "rlkit pear", **extra)
        brief = pear_command(args.model, args.out, config, dtype=args.dtype, progress=not args.quiet)
    except (PearError, ConfigError) as e:
        print(f"rlkit: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(brief, indent=2))
    return 0


def cmd_distill_prepare(args) -> int:
    """``rlkit distill prepare``: the teacher's top-k distributions over a data set's responses
    (:func:`rlkit.methods.first.topk.prepare_topk`; the stage form is ``method: distill_prepare``)."""
    from .config import from_arguments
    from .data import build_dataset
    from .methods.first.stage import DistillPrepareConfig
    from .methods.first.topk import prepare_topk
    from .models import load_model
    from .recipe import DatasetSpec, ModelSpec

    config = from_arguments(DistillPrepareConfig, args, "rlkit distill prepare", tau=args.tau)
    data = DatasetSpec(name=args.data, split=args.split, limit=args.limit, template=args.template, path=args.path)
    model, tokenizer = load_model(ModelSpec(name=args.teacher, dtype=args.dtype))
    import torch

    if torch.cuda.is_available():
        model = model.to("cuda")
    rows = build_dataset(data, tokenizer).to_list()
    try:
        summary = prepare_topk(model, tokenizer, rows, args.out, k=config.k, responses=config.responses,
                               heldout_fraction=config.heldout_fraction, tau=config.tau,
                               criterion=config.tau_criterion, use_other=config.use_other,
                               max_length=config.max_length, batch_size=config.batch_size,
                               max_new_tokens=config.max_new_tokens, do_sample=config.do_sample,
                               temperature=config.temperature, seed=args.seed, ece_bins=config.ece_bins,
                               teacher_name=args.teacher)
    except ValueError as e:
        print(f"rlkit: error: rlkit distill prepare: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2))
    return 0


def cmd_mathhay_build(args) -> int:
    """``rlkit mathhay build``: MathHay-style long-context items in --tokenizer's tokens
    (:func:`rlkit.data.mathhay.build_mathhay`; the stage form is ``method: mathhay_build``)."""
    from .config import from_arguments
    from .data.mathhay import MathHayError, build_mathhay
    from .methods.mathhay_build import MathHayBuildConfig
    from .models import load_tokenizer
    from .recipe import ModelSpec

    config = from_arguments(MathHayBuildConfig, args, "rlkit mathhay build")
    tokenizer = load_tokenizer(ModelSpec(name=args.tokenizer))
    try:
        meta = build_mathhay(args.out, tokenizer, config.lengths, config.placements, config.task_types,
                             config.n_items, args.seed, config.noise_files or None, progress=not args.quiet,
                             style=config.style)
    except MathHayError as e:
        print(f"rlkit: error: rlkit mathhay build: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    print(json.dumps({k: meta[k] for k in ("path", "rows", "items", "lengths", "placements", "style",
                                           "build_seconds") if k in meta}, indent=2))
    print(f"rlkit: evaluate with: rlkit eval --model {args.tokenizer} --benchmark mathhay:{args.out}",
          file=sys.stderr)
    return 0


def cmd_env(args) -> int:
    from .env import main as env_main

    return env_main(as_json=args.json)


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The parser; with ``only`` set, the flags that come from method config dataclasses are added for that
    subcommand alone (importing a method's config costs seconds; ``rlkit env`` should not pay for it)."""
    from .config import add_arguments

    def full(name: str) -> bool:
        return only is None or only == name

    p = argparse.ArgumentParser(prog="rlkit", description="Post-training toolkit for reasoning LLMs on TRL.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="run a YAML recipe")
    t.add_argument("recipe", help="path to a recipe .yaml (see `rlkit recipes`)")
    t.add_argument("overrides", nargs="*", help="dotted.key=value overrides, e.g. trainer.max_steps=10")
    t.add_argument("--resume", action="store_true",
                   help="continue from the last complete checkpoint in output_dir")
    t.add_argument("--resume-from", metavar="CHECKPOINT", default=None,
                   help="continue from this checkpoint folder")
    t.set_defaults(func=cmd_train)

    q = sub.add_parser("quickstart", help="offline demo: tiny model, SFT then GRPO on synthetic arithmetic")
    q.add_argument("--output-dir", default="runs/quickstart")
    q.add_argument("--fresh", action="store_true", help="delete earlier quickstart output first")
    q.add_argument("overrides", nargs="*", help="dotted.key=value overrides of recipes/quickstart.yaml")
    q.set_defaults(func=cmd_quickstart)

    r = sub.add_parser("recipes", help="list the shipped recipes")
    r.set_defaults(func=cmd_recipes)

    v = sub.add_parser("env", help="versions, platform and GPUs for a bug report; flags versions outside the "
                                   "tested window")
    v.add_argument("--json", action="store_true", help="print as JSON")
    v.set_defaults(func=cmd_env)

    e = sub.add_parser("eval", help="evaluate a model on a math benchmark, on TextArena games (--games) or many-shot "
                                    "in-context tasks (--manyshot)")
    e.add_argument("--model", default=None,
                   help="hub id, local path, or built-in name (--decoder rsd: the default --target)")
    e.add_argument("--benchmark", default=None,
                   help="gsm8k | math500 | aime24 | amc23 | synthetic | jsonl:PATH | mathhay:PATH (long-context items "
                        "from `rlkit mathhay build` or the released MathHay JSON)")
    e.add_argument("--patch", action="append", default=[], metavar="SPEC",
                   help="a model patch applied after loading (repeatable, HF backend): NAME, NAME:key=value,... or a "
                        "YAML/JSON file with a spec or a list, e.g. {name: pear, coefficients: [[9, 3, 0.5]]}")
    e.add_argument("--prompt-style", choices=["short", "released"], default=None,
                   help="mathhay: the short prompt ending in 'Answer:' (small models) or the released instruction "
                        "asking for JSON {reasoning, answer}; default: the style each item was built with")
    e.add_argument("--judge", default=None, metavar="MODEL",
                   help="mathhay: a judge model that also accepts an answer with other units or scale "
                        "(355 billion vs 355e9), shown the gold solution and the model's answer")
    e.add_argument("--games", default=None, metavar="G1,G2",
                   help="evaluate on TextArena games instead (ids such as TicTacToe-v0,Nim-v0): win, draw, loss and "
                        "invalid-move rates per game; every episode goes to episodes.jsonl")
    e.add_argument("--manyshot", default=None, metavar="TASKS_OR_JSONL",
                   help="many-shot in-context evaluation instead: built-in task names, train, heldout or all "
                        "(comma-separated), or an ICL-50 episodes .jsonl; accuracy per number of shots and per task "
                        "in manyshot.json, every completion in manyshot_records.jsonl, the curve in manyshot.png")
    e.add_argument("--shots", type=_shot_list, default=None, metavar="K1,K2",
                   help="--manyshot: demonstration counts (default 0,1,5,10,25,50,100)")
    e.add_argument("--items", type=int, default=None, help="--manyshot: queries per task (default 20)")
    e.add_argument("--max-context", type=int, default=None,
                   help="--manyshot: prompt + answer tokens at most (default: the model's context); a shot count "
                        "beyond it is skipped and reported")
    e.add_argument("--episodes", type=int, default=64, help="--games: episodes per game (default 64)")
    e.add_argument("--opponent", default="random", help="--games: random | rule | model:PATH (default random)")
    e.add_argument("--env-option", action="append", default=[], metavar="KEY=VALUE",
                   help="--games: an env setting (repeatable): seat, seed_offset, max_turns, max_action_tokens, "
                        "error_allowance, invalid_penalty, ...")
    e.add_argument("--split", default="test")
    e.add_argument("--limit", type=int, default=None, help="evaluate only the first N problems")
    e.add_argument("--samples", type=int, default=0, help="k sampled completions for pass@k / maj@k (0: greedy only)")
    e.add_argument("--select", default=None, metavar="SPEC",
                   help="best-of-N over the --samples: prm:DIR or orm:DIR (highest PRM/ORM solution score), majority "
                        "or first; reports bon@N and writes every candidate's scores")
    e.add_argument("--temperature", type=float, default=None,
                   help="sampling temperature (default 0.6 for --samples, 1.0 for --decoder value_search, 0 "
                        "(greedy) for both models of --decoder rsd)")
    e.add_argument("--max-new-tokens", type=int, default=None, help="default 512 (--manyshot: 16)")
    e.add_argument("--batch-size", type=int, default=16,
                   help="prompts per generate call (value_search, rsd: problems decoded together)")
    e.add_argument("--backend", choices=["hf", "vllm"], default="hf")
    e.add_argument("--template", choices=["auto", "plain", "chat", "think_answer"], default="auto")
    e.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    e.add_argument("--output-dir", default=None, help="where completions.jsonl and summary.json go")
    e.add_argument("--path", default=None, help="local jsonl file (or folder) for a known benchmark")
    e.add_argument("--synthetic", action="append", default=[], metavar="KEY=VALUE",
                   help="an option of the synthetic task for --benchmark synthetic (repeatable), e.g. max_operand=12 "
                        "min_ops=2 max_ops=4 to match a tiny recipe's data")
    e.add_argument("--idk-phrases", default=None, metavar="LIST",
                   help="also report Auto-CEI's precision (correct / non-IDK answers), idk_rate, accuracy and f: an "
                        "answer is IDK when it contains a phrase of LIST (eval: the released MATH_eval.py list, "
                        "reward: the released reward's list, or phrases separated by ';') or answers 'no answer'")
    e.add_argument("--idk-lambda", type=float, default=0.2,
                   help="lambda of f = (1 - lambda) precision + lambda (1 - idk_rate) (default 0.2, Auto-CEI's)")
    e.add_argument("--calibration", nargs="?", const="answer", default=None, choices=["answer", "sequence"],
                   help="also report calibration of the greedy answers (HF backend): each answer's confidence "
                        "(answer, the default: the probability of the final answer's tokens, i.e. the answer-token "
                        "probability for single-token answers; sequence: of the whole completion), the ECE and "
                        "reliability.png beside summary.json")
    e.add_argument("--ece-bins", type=int, default=10, help="--calibration: equal-width confidence bins (default 10)")
    e.add_argument("--vllm-option", action="append", default=[], metavar="KEY=VALUE",
                   help="a vLLM setting for --backend vllm (repeatable): enforce_eager, cpu_kvcache_space, "
                        "max_model_len, gpu_memory_utilization (dtype comes from --dtype)")
    e.add_argument("--kv-cache", default="none", choices=["none", "polarquant", "think", "both"],
                   help="key-cache compression for HF generate: PolarQuant, ThinK channel pruning, or both")
    e.add_argument("--kv-option", action="append", default=[], metavar="KEY=VALUE",
                   help="a kv-cache setting (repeatable): group_size, residual_length, rbits, tbits, lut, "
                        "pruning_ratio, obs_window, recent")
    e.add_argument("--decoder", choices=["greedy", "value_search", "rsd"], default="greedy",
                   help="greedy (pass@1, plus --samples), value_search: step-level beam search steered by "
                        "--value-model (HF backend), or rsd: reward-guided speculative decoding (--draft, --target, "
                        "--scorer)")
    e.add_argument("--value-model", default=None, metavar="DIR",
                   help="a saved value model for --decoder value_search (an OREO stage's final/critic)")
    e.add_argument("--beams", type=int, default=3, help="value_search: beams kept per problem (B)")
    e.add_argument("--expansions", type=int, default=None,
                   help="value_search: sampled steps per beam and round (default: --beams)")
    e.add_argument("--max-rounds", type=int, default=20, help="value_search: expansion rounds at most")
    e.add_argument("--max-step-tokens", type=int, default=None,
                   help="value_search, rsd: tokens per step at most (default: 256 for value_search; rsd: "
                        "--max-new-tokens)")
    e.add_argument("--step-stops", nargs="+", default=None, metavar="STOP",
                   help="value_search: strings that end a step: a preset (gsm8k: \\n; math: \\n, '. ', '.$ ') or "
                        "literal strings with backslash escapes (default: math for MATH-style benchmarks, else gsm8k)")
    e.add_argument("--add-eos", action="store_true",
                   help="value_search: score finished candidates with EOS appended (the released search script's "
                        "option; off by default: in OREO's layout that position is the untrained terminal state)")
    e.add_argument("--seed", type=int, default=0,
                   help="value_search: sampling seed; rsd: seeds sampling and non-binary acceptance; --games: seeds "
                        "seats, opponents and sampling; --manyshot: seeds the queries and demonstrations")
    e.add_argument("--draft", default=None, metavar="MODEL", help="rsd: the small model that proposes each step")
    e.add_argument("--target", default=None, metavar="MODEL",
                   help="rsd: the large model that writes rejected steps (default: --model)")
    e.add_argument("--scorer", default=None, metavar="DIR",
                   help="rsd: the step scorer, a PRM (a `method: prm` stage's final/) or a value model")
    e.add_argument("--threshold", type=float, default=None,
                   help="rsd: delta, the reward a draft step needs (default 0.7, the paper's)")
    e.add_argument("--weighting", default=None, metavar="RULE",
                   help="rsd: binary (default, the paper's code: accept iff reward >= delta), constant, clipped, "
                        "sigmoidal or logistic (accept with probability omega(reward))")
    e.add_argument("--constant-p", type=float, default=None, help="rsd: p of --weighting constant (default 0.5)")
    e.add_argument("--logistic-alpha", type=float, default=None,
                   help="rsd: alpha of --weighting logistic (default 10)")
    e.add_argument("--step-separator", default=None, metavar="SEP",
                   help="rsd: the string that ends a step, backslash escapes read (default '\\n\\n', the paper's)")
    e.add_argument("--max-steps", type=int, default=None, help="rsd: steps per problem at most (default 100)")
    e.set_defaults(func=cmd_eval)

    sa = sub.add_parser("sample", help="N completions per prompt, scored by the reward engine, as a resumable jsonl",
                        description="Generate num_samples completions for every prompt of a data set, score them "
                                    "with the reward engine and write <out>/samples.jsonl (prompt, completion, reward, "
                                    "status, token counts, sample index, optional steps). Re-running resumes.")
    sa.add_argument("--model", required=True, help="hub id, local path or built-in name")
    sa.add_argument("--data", required=True, help="gsm8k | math500 | aime24 | amc23 | math | synthetic | jsonl:PATH | hub id")
    sa.add_argument("--split", default="test")
    sa.add_argument("--path", default=None, help="local jsonl file (or folder) for a known benchmark")
    sa.add_argument("--limit", type=int, default=None, help="only the first N problems")
    sa.add_argument("--template", choices=["auto", "plain", "chat", "think_answer"], default="auto")
    sa.add_argument("--out", required=True, help="output folder (samples.jsonl, summary.json, manifest.json)")
    sa.add_argument("--reward", action="append", default=None, metavar="NAME",
                    help="reward from rlkit_rewards (repeatable; default math_accuracy)")
    sa.add_argument("--seed", type=int, default=0)
    sa.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    if full("sample"):
        from .methods.sample import SampleConfig

        add_arguments(sa, SampleConfig)
    sa.set_defaults(func=cmd_sample)

    pr = sub.add_parser("prm", help="process reward models (ER-PRM): step labels from rollouts")
    prsub = pr.add_subparsers(dest="prm_command", required=True)
    pl = prsub.add_parser("label", help="label every step of solutions by rollouts (ER, hard and soft labels)",
                          description="Split each solution (a samples jsonl's completions, or a benchmark's "
                                      "reference solutions) into steps, sample --num-rollouts continuations of every "
                                      "prefix with --model, score them with the reward engine and write "
                                      "<out>/labels.jsonl with ER-PRM's entropy-regularised, hard and soft labels. "
                                      "Re-running resumes.")
    pl.add_argument("--model", required=True, help="the completion model: hub id, local path or built-in name")
    pl.add_argument("--data", required=True,
                    help="jsonl:PATH of a sample stage's rows (prompt, completion, answer) | gsm8k | math500 | "
                         "synthetic | ... (a benchmark: its reference solutions are labelled)")
    pl.add_argument("--split", default="train")
    pl.add_argument("--path", default=None, help="local jsonl file (or folder) for a known benchmark")
    pl.add_argument("--limit", type=int, default=None, help="only the first N rows")
    pl.add_argument("--template", choices=["auto", "plain", "chat", "think_answer"], default="auto",
                    help="prompt template for rows without a rendered prompt (benchmarks)")
    pl.add_argument("--out", required=True, help="output folder (labels.jsonl, labels.meta.json, summary.json)")
    pl.add_argument("--reward", action="append", default=None, metavar="NAME",
                    help="reward from rlkit_rewards (repeatable; default math_accuracy)")
    pl.add_argument("--seed", type=int, default=0)
    pl.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    if full("prm"):
        from .methods.prm.labels import PRMLabelConfig

        add_arguments(pl, PRMLabelConfig)
    pl.set_defaults(func=cmd_prm_label)

    h = sub.add_parser("hints", help="StepHint: split reference chains into steps and hint levels")
    hsub = h.add_subparsers(dest="hints_command", required=True)
    hb = hsub.add_parser("build", help="build a hints jsonl from a data set's solutions or teacher chains")
    hb.add_argument("--data", required=True, help="gsm8k | math500 | math | aime24 | jsonl:PATH | hub id")
    hb.add_argument("--split", default="train")
    hb.add_argument("--path", default=None, help="local jsonl file (or folder) for a known benchmark")
    hb.add_argument("--limit", type=int, default=None, help="only the first N problems")
    hb.add_argument("--out", required=True, help="output jsonl; an existing file is resumed (appended)")
    hb.add_argument("--scorer", default=None, help="causal LM scoring p(end marker | prefix) (adaptive splitter)")
    hb.add_argument("--tokenizer", default=None,
                    help="the policy's tokenizer (default: the scorer's); every cut is splittable under it")
    hb.add_argument("--chunk-size", type=int, default=64, help="rows built and appended to --out at a time")
    hb.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    hb.add_argument("--quiet", action="store_true", help="no progress bar")
    hb.add_argument("--end-marker", default=None,
                    help="end-of-thinking text whose probability is read (default: '####' for gsm8k, else '</think>')")
    hb.add_argument("--generate", action="store_true", help="generate reference chains with --teacher")
    if full("hints"):
        from .methods.stephint.hints import GenerateConfig, HintConfig

        add_arguments(hb, HintConfig, exclude=("end_marker",))
        add_arguments(hb, GenerateConfig, exclude=("dtype", "system_prompt"), prefix="gen_",
                      rename={"batch_size": "teacher_batch_size"}, defaults={"max_new_tokens": 4096})
    hb.set_defaults(func=cmd_hints)

    pe = sub.add_parser("pear", help="PEAR: find copy-suppression heads, train one scale each, fold into o_proj",
                        description="Score every attention head on the proxy copying task, train one coefficient "
                                    "per chosen head with the model frozen, fold the coefficients into o_proj and "
                                    "save the model (safetensors) with pear_report.json. Defaults are the paper's.")
    pe.add_argument("--model", required=True, help="hub id, local path, built-in name or `tiny`")
    pe.add_argument("--out", required=True, help="output folder for the re-weighted model and pear_report.json")
    pe.add_argument("--all-signs", action="store_true", help="take the top-K heads even if their Delta <= 0")
    pe.add_argument("--settings", type=_settings, default=None,
                    help="scoring (N samples)x(n) pairs (default: 20x50,40x25,80x15,100x10)")
    pe.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    pe.add_argument("--quiet", action="store_true", help="no progress bars")
    if full("pear"):
        from .methods.pear import PearStageConfig

        add_arguments(pe, PearStageConfig, exclude=("settings", "positive_only"))
    pe.set_defaults(func=cmd_pear)

    di = sub.add_parser("distill", help="FIRST: a teacher's top-k next-token distributions for distillation")
    disub = di.add_subparsers(dest="distill_command", required=True)
    dp = disub.add_parser("prepare", help="store a teacher's top-k log-probs per response token and choose tau",
                          description="Run --teacher over the responses of --data (its reference solutions, or "
                                      "responses the teacher generates), store the top-k next-token ids and "
                                      "log-probs of every response token in --out (topk.jsonl, topk.safetensors, "
                                      "topk_meta.json) and choose the temperature on held-out rows. The folder is "
                                      "what `method: first` trains from (the stage form: `method: distill_prepare`).")
    dp.add_argument("--teacher", required=True, help="the teacher: hub id, local path or built-in name")
    dp.add_argument("--data", required=True,
                    help="gsm8k | math500 | math | synthetic | jsonl:PATH | hub id (rows with a prompt and a "
                         "completion, response or solution)")
    dp.add_argument("--split", default="train")
    dp.add_argument("--path", default=None, help="local jsonl file (or folder) for a known benchmark")
    dp.add_argument("--limit", type=int, default=None, help="only the first N rows")
    dp.add_argument("--template", choices=["auto", "plain", "chat", "think_answer"], default="auto")
    dp.add_argument("--out", required=True, help="output folder (topk.jsonl, topk.safetensors, topk_meta.json)")
    dp.add_argument("--tau", default="auto",
                    help="teacher temperature: auto (chosen on the held-out rows) or a positive number (default auto)")
    dp.add_argument("--seed", type=int, default=0, help="seeds the held-out draw and generated responses")
    dp.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    if full("distill"):
        from .methods.first.stage import DistillPrepareConfig

        add_arguments(dp, DistillPrepareConfig, exclude=("tau",), rename={"use_other": "other"})
    dp.set_defaults(func=cmd_distill_prepare)

    mh = sub.add_parser("mathhay", help="MathHay: long-context math items (numbers spread over a haystack)")
    mhsub = mh.add_subparsers(dest="mathhay_command", required=True)
    mb = mhsub.add_parser("build", help="build MathHay-style items at given haystack lengths and placements",
                          description="Generate MathHay-style items (template documents, a question, a solution "
                                      "program and its exact answer), pad each with noise documents to every "
                                      "--lengths in --tokenizer's tokens, and write items.jsonl and meta.json to "
                                      "--out; evaluate with `rlkit eval --benchmark mathhay:OUT` (the stage form: "
                                      "`method: mathhay_build`).")
    mb.add_argument("--tokenizer", required=True,
                    help="the model whose tokens the lengths count: hub id, local path or built-in name")
    mb.add_argument("--out", required=True, help="output folder (items.jsonl, meta.json)")
    mb.add_argument("--seed", type=int, default=0, help="seeds the items and the noise order")
    mb.add_argument("--quiet", action="store_true", help="no progress bar")
    if full("mathhay"):
        from .methods.mathhay_build import MathHayBuildConfig

        add_arguments(mb, MathHayBuildConfig)
    mb.set_defaults(func=cmd_mathhay_build)
    return p


def main(argv: list[str] | None = None) -> int:
    from .config import ConfigError
    from .data import DataError
    from .models import ModelError
    from .rollout.errors import VLLMError

    from .compat import hide_dependency_deprecations

    # TRL calls transformers' renamed gradient_checkpointing names on every run: hide what users cannot act on.
    hide_dependency_deprecations()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(argv[0] if argv and not argv[0].startswith("-") else None).parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, DataError, ModelError, VLLMError) as e:
        print(f"rlkit: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
