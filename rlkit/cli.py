"""``rlkit`` command line: parse arguments, load the recipe, call the library. No logic lives here."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


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


def cmd_eval(args) -> int:
    from .eval.run import run_eval

    summary = run_eval(model=args.model, benchmark=args.benchmark, split=args.split, limit=args.limit,
                       samples=args.samples, temperature=args.temperature, max_new_tokens=args.max_new_tokens,
                       batch_size=args.batch_size, backend=args.backend, template=args.template,
                       output_dir=args.output_dir, dtype=args.dtype)
    print(json.dumps(summary, indent=2))
    return 0


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
    e.set_defaults(func=cmd_eval)
    return p


def main(argv: list[str] | None = None) -> int:
    from .data import DataError
    from .models import ModelError
    from .recipe import RecipeError

    import warnings

    # transformers 5 renamed gradient_checkpointing; TRL still calls the old names on every run.
    warnings.filterwarnings("ignore", message=".*is deprecated and will be removed in v6.*", category=FutureWarning)
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (RecipeError, DataError, ModelError) as e:
        print(f"rlkit: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
