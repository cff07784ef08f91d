"""PEAR on SmolLM2-135M-Instruct on CPU: copy accuracy on held-out proxy sequences and key-value retrieval from
real text (GSM8K questions), before and after PEAR, with the chosen heads.

One ``rlkit.methods.pear.run_pear`` call (the path ``rlkit pear`` takes): measure before, score all 270 heads
by path patching, choose K, train one coefficient per head with the model frozen, fold them into ``o_proj``,
measure after. The baseline is the same model measured in the same run before the fold.

    python bench/pear_smollm2.py            # paper scoring settings, 40 steps, 3 copy lengths, 64 kv examples
    python bench/pear_smollm2.py --quick    # < 3 min on 2 cores: 2 small scoring settings, 12 steps
    python bench/pear_smollm2.py --smoke    # the tiny test model, seconds (tests/test_pear.py)

Training is far shorter than the paper's (2,500 steps x 20 sequences of n=50 at lr 5e-3): a CPU budget allows
tens of steps, so the bench uses lr 0.05 with batch 8 (quick: 6) and n=25. See bench/README.md.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _runs import ROOT, add_out, bench_parser, data_dir, print_result  # noqa: E402

sys.path.insert(0, str(ROOT))

PRESETS = {
    "full": dict(model="smollm2-135m-instruct", settings=((20, 50), (40, 25), (80, 15), (100, 10)), steps=40,
                 batch_size=8, n=25, lr=0.05, eval_n=(10, 25, 50), eval_samples=32, kv_examples=64, kv_pairs=20),
    "quick": dict(model="smollm2-135m-instruct", settings=((8, 25), (16, 10)), steps=12, batch_size=6, n=25,
                  lr=0.05, eval_n=(25,), eval_samples=24, kv_examples=16, kv_pairs=10),
    "smoke": dict(model="tiny", settings=((4, 8), (4, 5)), steps=2, batch_size=2, n=8, lr=0.05, eval_n=(8,),
                  eval_samples=4, kv_examples=3, kv_pairs=3),
}


def default_kv_data() -> Path:
    return data_dir() / "gsm8k_train.jsonl"


def parse_args(argv=None):
    p = bench_parser(__doc__, quick="done within 3 minutes on 2 CPU cores",
                     smoke="tiny model, a few seconds (used by the tests)")
    p.add_argument("--model", default=None, help="model to re-weight (default: smollm2-135m-instruct; smoke: tiny)")
    p.add_argument("--heads", type=int, default=None, help="K (default: the paper's 40/1024 of all heads)")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--n", type=int, default=None, help="tokens per copy in training sequences")
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--eval-samples", type=int, default=None, help="held-out proxy sequences per copy length")
    p.add_argument("--kv-data", default=None, help="jsonl of real text (default: shared gsm8k_train.jsonl)")
    p.add_argument("--kv-examples", type=int, default=None)
    p.add_argument("--kv-pairs", type=int, default=None)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default)")
    p.add_argument("--seed", type=int, default=0)
    add_out(p, "write the full JSON report here")
    p.add_argument("--save", default=None, help="also save the re-weighted model to this folder")
    p.add_argument("--progress", action="store_true", help="show progress bars")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    preset = dict(PRESETS["smoke" if args.smoke else "quick" if args.quick else "full"])
    for key in ("model", "steps", "batch_size", "n", "lr", "eval_samples", "kv_examples", "kv_pairs"):
        if getattr(args, key) is not None:
            preset[key] = getattr(args, key)
    kv_path = Path(args.kv_data) if args.kv_data else default_kv_data()
    if not kv_path.is_file():
        print(f"error: real-text data {kv_path} not found (pass --kv-data or set RLKIT_DATA_DIR)", file=sys.stderr)
        return 2

    import torch

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    from rlkit.models import load_model
    from rlkit.methods.pear import PearConfig, PearError, kv_retrieval_examples, load_texts, run_pear
    from rlkit.recipe import ModelSpec

    t0 = time.perf_counter()
    model, tok = load_model(ModelSpec(name=preset["model"], dtype="float32"))
    config = PearConfig(heads=args.heads, settings=preset["settings"], steps=preset["steps"],
                        batch_size=preset["batch_size"], n=preset["n"], lr=preset["lr"], eval_n=preset["eval_n"],
                        eval_samples=preset["eval_samples"], seed=args.seed)
    try:
        kv = kv_retrieval_examples(load_texts(kv_path, limit=2000), tok, examples=preset["kv_examples"],
                                   pairs=preset["kv_pairs"], seed=args.seed)
        report = run_pear(model, tok, config, out_dir=args.save, kv_examples=kv, progress=args.progress)
    except PearError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    wall = time.perf_counter() - t0
    m = report["model"]
    kv_len = sum(len(e["input_ids"]) for e in kv) / len(kv)

    def ratio(a: float, b: float) -> str:
        return f"{b / a:.3f}" if a > 0 else "inf" if b > 0 else "nan"

    print(f"PEAR on {preset['model']} ({m['layers']} layers x {m['heads']} heads = {m['layers'] * m['heads']}), "
          f"float32, torch threads {torch.get_num_threads()}, wall {wall:.0f} s")
    settings = " ".join(f"{s['samples']}x{s['n']}" for s in report["scores"]["per_setting"])
    clean = " ".join(f"{s['clean_copy_logit']:.2f}" for s in report["scores"]["per_setting"])
    print(f"head scoring ({config.scoring} patching, N x n = {settings}): {report['seconds']['scoring']:.1f} s; "
          f"clean centered copy logit {clean}")
    heads = report["heads"]
    print(f"chosen heads (K={len(heads)}, Delta>0): "
          + " ".join(f"L{h['layer']}H{h['head']}({h['delta']:+.4f})" for h in heads))
    tr = report["train"]
    print(f"trained coefficients ({config.steps} steps x {config.batch_size} seqs, n={config.n}, lr {config.lr}; "
          f"{report['seconds']['training']:.1f} s; loss {tr['loss_first']:.3f} -> {tr['loss_last']:.3f}): "
          + " ".join(f"L{h['layer']}H{h['head']}={h['alpha']:.3f}" for h in heads))
    before, after = report["copy_before"], report["copy_after"]
    for n in before:
        b, a = before[n]["token_acc"], after[n]["token_acc"]
        print(f"copy accuracy n={n} (held-out, {before[n]['samples']} seqs): before {b:.4f} after {a:.4f} "
              f"ratio {ratio(b, a)}")
    copy_b = sum(v["token_acc"] for v in before.values()) / len(before)
    copy_a = sum(v["token_acc"] for v in after.values()) / len(after)
    print(f"copy accuracy mean over n: before {copy_b:.4f} after {copy_a:.4f} ratio {ratio(copy_b, copy_a)}")
    kb, ka = report["kv_before"], report["kv_after"]
    what = f"kv retrieval ({kv_path.name}, {preset['kv_pairs']} pairs, {len(kv)} examples, ~{kv_len:.0f} tokens)"
    for key, label in (("exact", "exact match"), ("first_token_acc", "first value token"),
                       ("token_acc", "value tokens")):
        print(f"{what} {label}: before {kb[key]:.4f} after {ka[key]:.4f} ratio {ratio(kb[key], ka[key])}")
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    head_list = ",".join(f"L{h['layer']}H{h['head']}" for h in heads)
    print_result(copy_before=copy_b, copy_after=copy_a, kv_before=kb["exact"], kv_after=ka["exact"],
                 kv_first_before=kb["first_token_acc"], kv_first_after=ka["first_token_acc"],
                 kv_tok_before=kb["token_acc"], kv_tok_after=ka["token_acc"], copy_ratio=ratio(copy_b, copy_a),
                 heads=head_list, scoring_s=report["seconds"]["scoring"], train_s=report["seconds"]["training"],
                 wall_s=wall, precision={"scoring_s": 1, "train_s": 1, "wall_s": 0})
    return 0


if __name__ == "__main__":
    sys.exit(main())
