"""MathHay long-context lab: SmolLM2-135M-Instruct on MathHay-style items at growing haystack lengths, with the
default key cache, PolarQuant, ThinK (both GQA modes) and PEAR.

Items come from ``rlkit.data.mathhay.build_mathhay`` (offline: seeded template documents, noise documents without
the needed quantities, lengths counted in SmolLM2's tokens), the relevant document at the three single-document
placements (first, middle, last). Every configuration answers the same items greedily through the rollout layer
(``rlkit.eval.mathhay.evaluate_mathhay``), scored by exact numeric match:

- ``none``: the default (uncompressed) cache;
- ``polar``: PolarQuant keys (4-bit radius and angle, groups of 128; ``--kv-cache polarquant``);
- ``think``: ThinK key-channel pruning at ratio 0.4, the released per-query-head mode (``--kv-cache think``);
- ``think_kv``: ThinK per KV head (rlkit's GQA extension, ``--kv-option think_heads=kv``);
- ``pear``: PEAR scales found by ``rlkit.methods.pear.run_pear`` on this model (the quick setting of
  ``bench/pear_smollm2.py``) and folded into ``o_proj`` (``--patch pear.json``).

HoPE changes a model only when it is trained with it, so it is not applied to SmolLM2 here. The key-cache bytes of
each cache are measured on one prompt of the longest length after the prefill and the answer's decoding.

Answers get 32 new tokens and stop at a newline: SmolLM2 often restates the question's sentence (20-30 tokens)
before the number, and 16 tokens cut most first- and middle-placement answers off. Each configuration's results
are cached in the output folder, so a killed run continues; ``setting.json`` ties a folder to one setting, and a
run with other settings is refused. ``--lengths``, ``--items`` and ``--max-new-tokens`` override the preset.

    python bench/mathhay.py            # 1K-8K tokens; lookup + sssd; 4 items per length x placement (~4.5 h, 2 cores)
    python bench/mathhay.py --quick    # 1K-8K tokens; lookup; 2 items per length x placement (~42 min, 2 cores)
    python bench/mathhay.py --smoke    # seconds (tests): a tiny random model, two short lengths, the plumbing only

Ends with ``RESULT acc_<config>_<L>=...`` for every configuration and length (``L`` as 1k, 2k, 4k, 8k), ``acc_<config>``
(over all lengths), ``bytes_none``, ``bytes_polar``, ``bytes_think``, ``bytes_think_kv`` (key-cache bytes at the longest
length) and the wall time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _runs import ROOT, add_out, bench_parser, preset_of, print_result  # noqa: E402

sys.path.insert(0, str(ROOT))

CONFIGS = ("none", "polar", "think", "think_kv", "pear")
PLACEMENTS = ("first", "middle", "last")
PRESETS = {
    "smoke": dict(model="tiny", lengths=(800, 1200), task_types=("lookup",), items=1, max_new_tokens=6, batch_size=3,
                  pear=dict(settings=((4, 8),), steps=1, batch_size=2, n=8, lr=0.05, eval_n=(8,), eval_samples=2)),
    "quick": dict(model="smollm2-135m-instruct", lengths=(1024, 2048, 4096, 8000), task_types=("lookup",), items=2,
                  max_new_tokens=32, batch_size=2,
                  pear=dict(settings=((8, 25), (16, 10)), steps=12, batch_size=6, n=25, lr=0.05, eval_n=(25,),
                            eval_samples=24)),
    "full": dict(model="smollm2-135m-instruct", lengths=(1024, 2048, 4096, 8000), task_types=("lookup", "sssd"),
                 items=4, max_new_tokens=32, batch_size=2,
                 pear=dict(settings=((20, 50), (40, 25), (80, 15), (100, 10)), steps=40, batch_size=8, n=25, lr=0.05,
                           eval_n=(10, 25, 50), eval_samples=32)),
}


def cache_config(name: str):
    from rlkit.kvcache import KVCacheConfig

    if name == "polar":
        return KVCacheConfig(kind="polarquant")
    if name == "think":
        return KVCacheConfig(kind="think", think_heads="query")
    if name == "think_kv":
        return KVCacheConfig(kind="think", think_heads="kv")
    return None


def load(preset: dict, patches: list | None = None):
    """(model, tokenizer): SmolLM2, or for the smoke a tiny random Llama (GQA 4/2, char tokenizer, 2K positions);
    ``patches`` are applied on load (``rlkit.patches``)."""
    from rlkit.models import load_model
    from rlkit.recipe import ModelSpec, TinyModelSpec

    model, tok = load_model(ModelSpec(name=preset["model"], dtype="float32", patches=list(patches or []),
                                      tiny=TinyModelSpec(max_position_embeddings=2048)))
    model.eval()
    return model, tok


def pear_coefficients(preset: dict, out: Path, seed: int) -> list:
    """Train PEAR on the bench model (once; cached in ``out/pear_coefficients.json``) and return the folded coefficients."""
    path = out / "pear_coefficients.json"
    if path.is_file():
        return json.loads(path.read_text())["coefficients"]
    from rlkit.methods.pear import PearConfig, run_pear

    model, tok = load(preset)
    config = PearConfig(seed=seed, **preset["pear"])
    report = run_pear(model, tok, config)
    keep = {k: report[k] for k in ("coefficients", "heads", "copy_before", "copy_after") if k in report}
    path.write_text(json.dumps(keep, indent=1))
    return report["coefficients"]


def build_items(preset: dict, tok, out: Path, seed: int) -> list[dict]:
    from rlkit.data.mathhay import build_mathhay, load_mathhay

    folder = out / "items"
    if not (folder / "items.jsonl").is_file():
        build_mathhay(folder, tok, lengths=list(preset["lengths"]), placements=list(PLACEMENTS),
                      task_types=list(preset["task_types"]), n_items=preset["items"], seed=seed, progress=True,
                      style="short")
    return load_mathhay(str(folder))


def evaluate(name: str, model, tok, rows: list[dict], preset: dict, out: Path) -> dict:
    """Accuracy per length for one configuration (cached in ``out/<name>.json``)."""
    from rlkit.eval.mathhay import evaluate_mathhay
    from rlkit.rollout import GenerationSettings

    path = out / f"{name}.json"
    if path.is_file():
        return json.loads(path.read_text())
    settings = GenerationSettings(max_new_tokens=preset["max_new_tokens"], batch_size=preset["batch_size"],
                                  temperature=0.0, kv_cache=cache_config(name), stop=["\n"])
    t0 = time.time()
    summary, records = evaluate_mathhay(model, tok, rows, settings, style="short")
    by_length: dict[str, list[bool]] = {}
    for r in records:
        by_length.setdefault(str(r["length"]), []).append(bool(r["correct"]))
    result = {"config": name, "accuracy": statistics.mean(bool(r["correct"]) for r in records),
              "by_length": {k: statistics.mean(v) for k, v in by_length.items()},
              "n_by_length": {k: len(v) for k, v in by_length.items()}, "wall_s": time.time() - t0,
              "summary": {k: v for k, v in summary.items() if k != "records"}}
    with open(out / f"{name}_records.jsonl", "w") as f:
        for r in records:
            f.write(json.dumps({k: v for k, v in r.items() if k not in ("prompt", "context")}) + "\n")
    path.write_text(json.dumps(result, indent=1))
    return result


def cache_bytes(model, row: dict, tok, name: str) -> dict:
    """Key-cache bytes (real sizes, and the ratio to a plain 16-bit cache) after prefilling ``row``'s prompt and
    decoding 8 greedy tokens with the configuration's cache."""
    import torch
    from transformers import DynamicCache

    from rlkit.compat import cache_kwargs
    from rlkit.data.mathhay import render_prompt
    from rlkit.kvcache import key_cache_report, make_cache, prepare_model, restore_model

    config = cache_config(name)
    if config is None:
        cache = DynamicCache()
    else:
        prepare_model(model, config)
        cache = make_cache(model, config)
    ids = tok(render_prompt(row, tok, "short"), return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        out = model(input_ids=ids, **cache_kwargs(cache), use_cache=True)
        for _ in range(8):
            out = model(input_ids=out.logits[:, -1:].argmax(-1), **cache_kwargs(cache), use_cache=True)
    restore_model(model)
    report = key_cache_report(cache)
    return {"bytes": int(report["bytes"]), "ratio": float(report["ratio"]), "tokens": int(report["tokens"])}


def short(length: int) -> str:
    return f"{round(length / 1024)}k" if length >= 1000 else str(length)


def plot(results: dict[str, dict], path: Path, title: str) -> None:
    from rlkit.eval.mathhay import plot_mathhay

    curves = {name: {int(k): v for k, v in r["by_length"].items()} for name, r in results.items()}
    plot_mathhay(curves, path, title=title)


def _positive_int(text: str) -> int:
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return n


def main() -> None:
    ap = bench_parser(__doc__, quick="1K-8K tokens, lookup items, 2 per length x placement (about 40 min on 2 cores)",
                      smoke="a tiny random model, the plumbing only (tests)")
    ap.add_argument("--configs", nargs="+", choices=CONFIGS, default=list(CONFIGS))
    ap.add_argument("--seed", type=int, default=0, help="seeds the items and PEAR's training data")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--lengths", type=_positive_int, nargs="+", default=None,
                    help="haystack lengths (default: the preset's)")
    ap.add_argument("--items", type=_positive_int, default=None,
                    help="items per length x placement (default: the preset's)")
    ap.add_argument("--max-new-tokens", type=_positive_int, default=None,
                    help="answer tokens (default: the preset's, 32: SmolLM2 often restates the sentence before the "
                         "number, which takes 20-30 tokens)")
    add_out(ap, "output folder (default runs/bench_mathhay[_quick|_smoke])", type=Path)
    a = ap.parse_args()
    preset_name = preset_of(a)
    overrides = {"lengths": a.lengths and tuple(a.lengths), "items": a.items, "max_new_tokens": a.max_new_tokens}
    preset = {**PRESETS[preset_name], **{k: v for k, v in overrides.items() if v is not None}}
    out = (a.out or ROOT / "runs" / ("bench_mathhay" + ("" if preset_name == "full" else f"_{preset_name}"))).resolve()
    out.mkdir(parents=True, exist_ok=True)
    # results are cached per configuration: a folder holds one setting only
    setting = {k: list(v) if isinstance(v, tuple) else v for k, v in preset.items() if k != "pear"}
    setting["seed"] = a.seed
    marker = out / "setting.json"
    if marker.is_file() and json.loads(marker.read_text()) != setting:
        ap.error(f"{out} holds a run with other settings ({marker}); give another --out")
    marker.write_text(json.dumps(setting, indent=1))
    import torch

    if a.threads > 0:
        torch.set_num_threads(a.threads)
    t0 = time.time()
    model, tok = load(preset)
    rows = build_items(preset, tok, out, a.seed)
    print(f"{len(rows)} items: lengths {list(preset['lengths'])}, placements {list(PLACEMENTS)}, "
          f"task types {list(preset['task_types'])}", flush=True)
    results = {}
    for name in a.configs:
        if name == "pear":
            continue
        results[name] = evaluate(name, model, tok, rows, preset, out)
        print(f"{name}: {results[name]['by_length']}", flush=True)
    longest = max(rows, key=lambda r: r["length"])
    nbytes = {name: cache_bytes(model, longest, tok, name) for name in a.configs if name != "pear"}
    if "pear" in a.configs:
        coefficients = pear_coefficients(preset, out, a.seed)
        del model
        model, tok = load(preset, patches=[{"name": "pear", "coefficients": coefficients}])
        results["pear"] = evaluate("pear", model, tok, rows, preset, out)
        print(f"pear: {results['pear']['by_length']}", flush=True)
    plot(results, out / "mathhay.png",
         title=f"MathHay-style items, {preset['model']} ({', '.join(preset['task_types'])})")
    (out / "bytes.json").write_text(json.dumps(nbytes, indent=1))
    figures: dict = {}
    for name, r in results.items():
        for length in preset["lengths"]:
            figures[f"acc_{name}_{short(length)}"] = r["by_length"].get(str(length), float("nan"))
        figures[f"acc_{name}"] = r["accuracy"]
    for name, b in nbytes.items():
        figures[f"bytes_{name}"] = b["bytes"]
        figures[f"bytes_ratio_{name}"] = round(b["ratio"], 3)
    figures["items_per_length"] = len(rows) // len(preset["lengths"])
    figures["wall_s"] = round(time.time() - t0)
    print_result(**figures)


if __name__ == "__main__":
    main()
