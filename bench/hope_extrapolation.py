"""HoPE vs RoPE length extrapolation: perplexity at 1x, 2x and 4x the training context.

The same tiny char-level Llama (hidden 128, 4 layers, 4 heads of dim 32, rope theta 1e4,
``max_position_embeddings`` 512) is trained from scratch twice per seed through the pretraining lab
(``rlkit train`` on ``recipes/pretrain/tiny_gsm8k_hope.yaml``, the path users run): once with plain RoPE
(the recipe without its ``patches``) and once with HoPE (``{name: hope, train_length: 128}``: 6 of 16
rotary pairs keep their rotation, the rest are position-free). Both train on GSM8K train text (question
+ answer per document, packed into 128-token sequences) with the same seed, init, batches and optimizer;
they differ only in the patch. Perplexity is measured on the same held-out GSM8K documents (5%, seeded)
at context 128, 256 and 512 (non-overlapping blocks, the same tokens at every length). The copying probe
runs at the start and end of each run (``[BOS] S S``, n=32, 64 sequences), reported as an extra.

The paper's claim (arXiv 2410.21216): HoPE extrapolates better, i.e. ``ppl_ratio_512`` = HoPE ppl@512 /
RoPE ppl@512 < 1, while ppl at the training length stays about equal (``ppl_ratio_128`` ~ 1).
Over seeds, perplexities are combined by geometric mean (so a ratio is the geometric mean of the per-seed
ratios).

    python bench/hope_extrapolation.py            # 3 seeds x 1500 steps, batch 16 x 128, 32k eval tokens
    python bench/hope_extrapolation.py --quick    # 1 seed x 300 steps, 16k eval tokens
    python bench/hope_extrapolation.py --smoke    # 1 seed x 4 steps on 300 documents (tests)
    python bench/hope_extrapolation.py --steps 800 --seeds 0 1 --jobs 2 --threads 1 --out runs/bench_hope

GSM8K comes from ``--data`` (default: ``$RLKIT_DATA_DIR/gsm8k_train.jsonl``, else ``../shared/data``).
Ends with ``RESULT ppl_ratio_512=... ppl_ratio_256=... ppl_ratio_128=... rope_ppl_128=... rope_ppl_256=...
rope_ppl_512=... hope_ppl_128=... hope_ppl_256=... hope_ppl_512=... rope_copy_acc=... hope_copy_acc=...``.
"""

from __future__ import annotations

import copy
import json
import math
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _runs import (ROOT, add_jobs_threads, add_out, bench_parser, data_dir, load_recipe_dict, preset_of,  # noqa: E402
                   print_result, train)

RECIPE = ROOT / "recipes" / "pretrain" / "tiny_gsm8k_hope.yaml"
LENGTHS = (128, 256, 512)
VARIANTS = ("rope", "hope")
PRESETS = {  # seeds, steps, eval tokens, documents (None: all)
    "smoke": ([0], 4, 1024, 300),
    "quick": ([0], 300, 16384, None),
    "full": ([0, 1, 2], 1500, 32768, None),
}


def variant_recipe(base: dict, variant: str, steps: int, eval_tokens: int, docs: int | None, data: Path) -> dict:
    r = copy.deepcopy(base)
    hope = [p for p in r["model"].get("patches", []) if p.get("name") == "hope"]
    if len(hope) != 1 or hope[0].get("train_length") != r["trainer"]["seq_length"]:
        raise SystemExit(f"{RECIPE}: expected one hope patch with train_length == trainer.seq_length")
    r["model"]["patches"] = hope if variant == "hope" else []
    r["data"]["train"] = dict(r["data"]["train"], path=str(data), limit=docs)
    r["trainer"].update(max_steps=steps, eval_context_lengths=list(LENGTHS), eval_max_tokens=eval_tokens,
                        probe_steps=steps, save_strategy="no", logging_steps=max(1, steps // 10),
                        warmup_steps=min(r["trainer"].get("warmup_steps", 0), steps // 5))
    r["plot"] = True
    return r


def run(seeds, steps, eval_tokens, docs, data: Path, out: Path, jobs: int, threads: int, variants):
    base = load_recipe_dict(RECIPE)
    out.mkdir(parents=True, exist_ok=True)

    def one(key):
        seed, variant = key
        d = out / f"seed{seed}" / variant
        if not (d / "final" / ".rlkit_done").exists():
            train(variant_recipe(base, variant, steps, eval_tokens, docs, data),
                  [f"output_dir={d}", f"seed={seed}"], out / f"{variant}_seed{seed}.log", threads)
        ppl = json.loads((d / "perplexity.json").read_text())
        probe = json.loads((d / "probe_history.json").read_text())["history"][-1]
        summary = json.loads((d / "summary.json").read_text())
        return {"ppl": {int(k): v for k, v in ppl["ppl"].items()}, "eval_tokens": ppl["validation_tokens"],
                "copy_acc": probe["probe/copy_accuracy"], "induction_max": probe["probe/induction_max"],
                "wall_s": summary.get("wall_seconds")}

    t0 = time.time()
    keys = [(s, v) for s in seeds for v in variants]
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        results = dict(zip(keys, pool.map(one, keys)))
    return results, time.time() - t0


def gmean(xs) -> float:
    return math.exp(statistics.mean(math.log(x) for x in xs))


def main(argv=None) -> int:
    p = bench_parser(__doc__, quick="1 seed x 300 steps (within 3 min on 2 cores)",
                     smoke="seconds: 4 steps on 300 documents, for tests", seeds=True)
    p.add_argument("--steps", type=int)
    p.add_argument("--data", type=Path, default=None, help="GSM8K train jsonl (fields question, answer)")
    add_jobs_threads(p)
    add_out(p, "output folder (default: runs/bench_hope_<preset>)")
    a = p.parse_args(argv)
    preset = preset_of(a)
    seeds, steps, eval_tokens, docs = PRESETS[preset]
    seeds, steps = a.seeds or seeds, a.steps or steps
    data = a.data or data_dir() / "gsm8k_train.jsonl"
    if not data.is_file():
        p.error(f"GSM8K train file {data} not found; pass --data or set RLKIT_DATA_DIR")
    from rlkit.patches import available_patches

    if "hope" not in available_patches():
        p.error("the hope patch (rlkit/patches/hope.py) is not installed in this checkout")
    out = Path(a.out or ROOT / "runs" / f"bench_hope_{preset}")
    print(f"HoPE vs RoPE extrapolation ({preset}): seeds {seeds}, {steps} steps at context 128, "
          f"eval at {list(LENGTHS)}, out {out}", flush=True)
    res, wall = run(seeds, steps, eval_tokens, docs, data, out, a.jobs, a.threads, VARIANTS)

    for s in seeds:
        for v in VARIANTS:
            r = res[(s, v)]
            print(f"seed {s} {v:>4}: " + ", ".join(f"ppl@{n} {r['ppl'][n]:.3f}" for n in LENGTHS)
                  + f" | copy acc {r['copy_acc']:.3f}, max induction {r['induction_max']:.3f}"
                  + (f" | {r['wall_s']:.0f} s" if r["wall_s"] else ""))
    ppl = {v: {n: gmean(res[(s, v)]["ppl"][n] for s in seeds) for n in LENGTHS} for v in VARIANTS}
    fields = {}
    for n in LENGTHS:
        ratio = ppl["hope"][n] / ppl["rope"][n]
        fields[f"ppl_ratio_{n}"] = ratio
        per_seed = ", ".join(f"{res[(s, 'hope')]['ppl'][n] / res[(s, 'rope')]['ppl'][n]:.3f}" for s in seeds)
        print(f"ppl@{n}: rope {ppl['rope'][n]:.3f}, hope {ppl['hope'][n]:.3f} -> ratio hope/rope {ratio:.3f} "
              f"(per seed {per_seed})")
    for v in VARIANTS:
        growth = ppl[v][LENGTHS[-1]] / ppl[v][LENGTHS[0]]
        print(f"{v}: ppl@{LENGTHS[-1]} / ppl@{LENGTHS[0]} = {growth:.3f} (extrapolation growth)")
        fields[f"{v}_growth_{LENGTHS[-1]}"] = growth
    for v in VARIANTS:
        for n in LENGTHS:
            fields[f"{v}_ppl_{n}"] = ppl[v][n]
    for v in VARIANTS:
        fields[f"{v}_copy_acc"] = statistics.mean(res[(s, v)]["copy_acc"] for s in seeds)
        print(f"{v}: copy accuracy after training {fields[f'{v}_copy_acc']:.3f} (mean over seeds)")
    (out / "results.json").write_text(json.dumps({
        "preset": preset, "seeds": seeds, "steps": steps, "ppl": ppl, "fields": fields,
        "runs": {f"{v}/seed{s}": r for (s, v), r in res.items()}}, indent=1) + "\n")
    print(f"eval tokens per length {res[(seeds[0], 'rope')]['eval_tokens']}; wall time {wall:.0f} s")
    order = ["ppl_ratio_512", "ppl_ratio_256", "ppl_ratio_128"]
    keys = order + [k for k in fields if k not in order]
    print_result(**{k: float(fields[k]) for k in keys}, seeds=len(seeds), steps=steps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
