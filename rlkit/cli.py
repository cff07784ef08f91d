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


def kv_cache_config(kind: str, options: list[str]):
    """``KVCacheConfig`` from ``--kv-cache KIND`` and ``--kv-option key=value`` items (values parsed as YAML)."""
    from .kvcache import KVCacheConfig
    from .recipe import build

    fields = {"kind": kind}
    for item in options or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"rlkit eval: --kv-option {item!r} must look like key=value, e.g. pruning_ratio=0.5")
        fields[key.strip()] = yaml.safe_load(value)
    return build(KVCacheConfig, fields, "--kv-cache")


def cmd_eval(args) -> int:
    from .eval.run import run_eval

    kv = kv_cache_config(args.kv_cache, args.kv_option)
    summary = run_eval(model=args.model, benchmark=args.benchmark, split=args.split, limit=args.limit,
                       samples=args.samples, temperature=args.temperature, max_new_tokens=args.max_new_tokens,
                       batch_size=args.batch_size, backend=args.backend, template=args.template,
                       output_dir=args.output_dir, dtype=args.dtype, kv_cache=kv if kv.kind != "none" else None)
    print(json.dumps(summary, indent=2))
    return 0


def cmd_hints(args) -> int:
    from .hints import GenerateConfig, HintConfig, HintError, default_end_marker, run_build

    try:
        if not args.generate and (args.teacher or args.backend):
            raise HintError("--teacher/--backend only apply with --generate")
        end_marker = args.end_marker if args.end_marker is not None else default_end_marker(args.data)
        config = HintConfig(splitter=args.splitter, m=args.m, min_step_tokens=args.min_step_tokens,
                            end_marker=end_marker, selection=args.selection, batch_size=args.batch_size,
                            candidates=args.candidates, fill=not args.no_fill, prompt_template=args.prompt_template)
        generate = None
        if args.generate:
            generate = GenerateConfig(teacher=args.teacher, backend=args.backend or "hf", samples=args.samples,
                                      max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                      top_p=args.top_p, template=args.template, dtype=args.dtype,
                                      fallback_to_dataset=args.fallback_to_dataset, seed=args.seed)
        summary = run_build(args.data, args.out, config, split=args.split, path=args.path, limit=args.limit,
                            tokenizer=args.tokenizer, scorer=args.scorer, generate=generate, dtype=args.dtype,
                            chunk_size=args.chunk_size, progress=not args.quiet)
    except HintError as e:
        print(f"rlkit: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2))
    return 0


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _settings(text: str) -> tuple[tuple[int, int], ...]:
    try:
        return tuple((int(a), int(b)) for a, b in (x.lower().split("x") for x in text.split(",") if x.strip()))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected NxN pairs like 20x50,40x25, got {text!r}") from None


def cmd_pear(args) -> int:
    from .models import load_model
    from .patches.pear import PearConfig, PearError, kv_retrieval_examples, load_texts, run_pear
    from .recipe import ModelSpec

    try:
        config = PearConfig(heads=args.heads, positive_only=not args.all_signs, scoring=args.scoring,
                            metric=args.metric, steps=args.steps, batch_size=args.batch_size,
                            micro_batch_size=args.micro_batch_size, n=args.n, lr=args.lr, seed=args.seed,
                            eval_n=args.eval_n, eval_samples=args.eval_samples, bos=args.bos,
                            **({"settings": args.settings} if args.settings else {}))
        config.validate()
        model, tokenizer = load_model(ModelSpec(name=args.model, dtype=args.dtype))
        kv = None
        if args.kv_data:
            kv = kv_retrieval_examples(load_texts(args.kv_data, limit=args.kv_texts), tokenizer,
                                       examples=args.kv_examples, pairs=args.kv_pairs, seed=args.seed)
        report = run_pear(model, tokenizer, config, out_dir=args.out, kv_examples=kv, progress=not args.quiet)
    except PearError as e:
        print(f"rlkit: error: {e}", file=sys.stderr)
        return 2
    brief = {k: v for k, v in report.items() if k not in ("scores", "train", "config")}
    brief["train"] = {k: report["train"][k] for k in ("loss_first", "loss_last")}
    print(json.dumps(brief, indent=2))
    return 0


def cmd_env(args) -> int:
    from .env import main as env_main

    return env_main(as_json=args.json)


def build_parser() -> argparse.ArgumentParser:
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

    e = sub.add_parser("eval", help="evaluate a model on a math benchmark")
    e.add_argument("--model", required=True, help="hub id, local path, or built-in name")
    e.add_argument("--benchmark", required=True, help="gsm8k | math500 | aime24 | amc23 | synthetic | jsonl:PATH")
    e.add_argument("--split", default="test")
    e.add_argument("--limit", type=int, default=None, help="evaluate only the first N problems")
    e.add_argument("--samples", type=int, default=0, help="k sampled completions for pass@k / maj@k (0: greedy only)")
    e.add_argument("--temperature", type=float, default=0.6)
    e.add_argument("--max-new-tokens", type=int, default=512)
    e.add_argument("--batch-size", type=int, default=16)
    e.add_argument("--backend", choices=["hf", "vllm"], default="hf")
    e.add_argument("--template", choices=["auto", "plain", "chat", "think_answer"], default="auto")
    e.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    e.add_argument("--output-dir", default=None, help="where completions.jsonl and summary.json go")
    e.add_argument("--kv-cache", default="none", choices=["none", "polarquant", "think", "both"],
                   help="key-cache compression for HF generate: PolarQuant, ThinK channel pruning, or both")
    e.add_argument("--kv-option", action="append", default=[], metavar="KEY=VALUE",
                   help="a kv-cache setting (repeatable): group_size, residual_length, rbits, tbits, lut, "
                        "pruning_ratio, obs_window, recent")
    e.set_defaults(func=cmd_eval)

    h = sub.add_parser("hints", help="StepHint: split reference chains into steps and hint levels")
    hsub = h.add_subparsers(dest="hints_command", required=True)
    hb = hsub.add_parser("build", help="build a hints jsonl from a data set's solutions or teacher chains")
    hb.add_argument("--data", required=True, help="gsm8k | math500 | math | aime24 | jsonl:PATH | hub id")
    hb.add_argument("--split", default="train")
    hb.add_argument("--path", default=None, help="local jsonl file (or folder) for a known benchmark")
    hb.add_argument("--limit", type=int, default=None, help="only the first N problems")
    hb.add_argument("--out", required=True, help="output jsonl; an existing file is resumed (appended)")
    hb.add_argument("--splitter", choices=["adaptive", "paragraph", "equal"], default="adaptive")
    hb.add_argument("--m", type=int, default=4, help="steps per chain (hint levels 1..m-1)")
    hb.add_argument("--min-step-tokens", type=int, default=8, help="minimum tokens per step (the paper's l)")
    hb.add_argument("--end-marker", default=None,
                    help="end-of-thinking text whose probability is read (default: '####' for gsm8k, else '</think>')")
    hb.add_argument("--selection", choices=["salient", "base"], default="salient")
    hb.add_argument("--candidates", choices=["sentence", "line", "paragraph"], default="sentence",
                    help="candidate cut points of the adaptive rule")
    hb.add_argument("--no-fill", action="store_true",
                    help="keep only boundary-set cuts (no filling from other candidates when too few)")
    hb.add_argument("--prompt-template", choices=["auto", "plain", "chat", "think_answer", "none"], default="auto",
                    help="prompt the scorer sees before the chain")
    hb.add_argument("--scorer", default=None, help="causal LM scoring p(end marker | prefix) (adaptive splitter)")
    hb.add_argument("--tokenizer", default=None,
                    help="the policy's tokenizer (default: the scorer's); every cut is splittable under it")
    hb.add_argument("--batch-size", type=int, default=8, help="chains per scorer forward pass")
    hb.add_argument("--chunk-size", type=int, default=64, help="rows built and appended to --out at a time")
    hb.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    hb.add_argument("--generate", action="store_true", help="generate reference chains with --teacher")
    hb.add_argument("--teacher", default=None, help="stronger model generating the chains")
    hb.add_argument("--backend", choices=["hf", "vllm"], default=None, help="teacher generation backend (default hf)")
    hb.add_argument("--samples", type=int, default=4, help="chains per problem; the first that verifies is kept")
    hb.add_argument("--max-new-tokens", type=int, default=4096)
    hb.add_argument("--temperature", type=float, default=0.6)
    hb.add_argument("--top-p", type=float, default=0.95)
    hb.add_argument("--template", choices=["auto", "plain", "chat", "think_answer"], default="auto",
                    help="teacher prompt template")
    hb.add_argument("--seed", type=int, default=None, help="sampling seed for the teacher")
    hb.add_argument("--fallback-to-dataset", action="store_true",
                    help="use the data set's solution when no teacher chain verifies (default: drop the row)")
    hb.add_argument("--quiet", action="store_true", help="no progress bar")
    hb.set_defaults(func=cmd_hints)

    pe = sub.add_parser("pear", help="PEAR: find copy-suppression heads, train one scale each, fold into o_proj",
                        description="Score every attention head on the proxy copying task, train one coefficient "
                                    "per chosen head with the model frozen, fold the coefficients into o_proj and "
                                    "save the model (safetensors) with pear_report.json. Defaults are the paper's.")
    pe.add_argument("--model", required=True, help="hub id, local path, built-in name or `tiny`")
    pe.add_argument("--out", required=True, help="output folder for the re-weighted model and pear_report.json")
    pe.add_argument("--heads", type=int, default=None,
                    help="K heads to re-weight (default: the paper's 40/1024 of all heads, at least 1)")
    pe.add_argument("--all-signs", action="store_true", help="take the top-K even if their Delta <= 0")
    pe.add_argument("--steps", type=int, default=2500, help="optimizer steps (paper: 2500)")
    pe.add_argument("--batch-size", type=int, default=20, help="sequences per step (paper: 20)")
    pe.add_argument("--micro-batch-size", type=int, default=None, help="sequences per forward (grad accumulation)")
    pe.add_argument("--n", type=int, default=50, help="tokens per copy in training sequences (paper: 50)")
    pe.add_argument("--lr", type=float, default=5e-3, help="peak learning rate (paper: 5e-3)")
    pe.add_argument("--settings", type=_settings, default=None,
                    help="scoring (N samples)x(n) pairs (default: 20x50,40x25,80x15,100x10)")
    pe.add_argument("--scoring", choices=["path", "ablation"], default="path",
                    help="path: released-code path patching (cheap); ablation: full mean ablation")
    pe.add_argument("--metric", choices=["relative", "difference"], default="relative")
    pe.add_argument("--bos", action="store_true", help="prepend BOS to the proxy sequences")
    pe.add_argument("--eval-n", type=_int_list, default=(10, 25, 50), help="held-out copy lengths, e.g. 10,25,50")
    pe.add_argument("--eval-samples", type=int, default=64, help="held-out sequences per copy length")
    pe.add_argument("--kv-data", default=None,
                    help="jsonl of real text (e.g. gsm8k_train.jsonl) for the key-value retrieval before/after")
    pe.add_argument("--kv-texts", type=int, default=2000, help="rows of --kv-data to draw values from")
    pe.add_argument("--kv-examples", type=int, default=50)
    pe.add_argument("--kv-pairs", type=int, default=20, help="key-value lines per example")
    pe.add_argument("--seed", type=int, default=0)
    pe.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    pe.add_argument("--quiet", action="store_true", help="no progress bars")
    pe.set_defaults(func=cmd_pear)
    return p


def main(argv: list[str] | None = None) -> int:
    from .data import DataError
    from .models import ModelError
    from .recipe import RecipeError

    from .compat import hide_dependency_deprecations

    # TRL calls transformers' renamed gradient_checkpointing names on every run: hide what users cannot act on.
    hide_dependency_deprecations()
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (RecipeError, DataError, ModelError) as e:
        print(f"rlkit: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
