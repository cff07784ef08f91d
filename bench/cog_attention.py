"""Cog attention vs softmax attention: loss after the same steps and training-step time.

Three variants train the same tiny Llama (same seed, same init, same batches, same optimizer) on real text,
GSM8K train questions + answers, tokenized with rlkit's character tokenizer:

- ``softmax_eager``: plain HF, ``attn_implementation="eager"``;
- ``softmax_sdpa``: plain HF, ``attn_implementation="sdpa"``;
- ``cog``: the eager model patched with ``{"name": "cog"}`` (Cog in every layer but the first and the last,
  which keep exactly the eager softmax they had), fused kernel.

Runs alternate (the variant order rotates every round) so machine drift hits every variant equally; each
step (forward, backward, AdamW update) is timed, the first ``--warmup`` steps of every run are dropped and
the step time of a variant is the median over all its rounds. The loss figures come from the first round
(every round of a variant is bit-identical): the mean training loss over the last 10 steps and the loss on
held-out GSM8K rows (the last rows of the file, never trained on).

The issue's target is ``cog_step_ratio`` (Cog step time / eager softmax step time) <= 1.3.

    python bench/cog_attention.py            # 3 rounds x 80 steps, batch 8 x 256 chars, 4 layers
    python bench/cog_attention.py --quick    # 3 rounds x 40 steps, batch 8 x 192 chars
    python bench/cog_attention.py --smoke    # 1 round x 4 steps (tests)

Output ends with ``RESULT cog_step_ratio=... cog_vs_sdpa_ratio=... eager_step_s=... sdpa_step_s=...
cog_step_s=... loss_eager=... loss_sdpa=... loss_cog=... heldout_eager=... heldout_sdpa=... heldout_cog=...``.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _runs import ROOT, add_jobs_threads, add_out, bench_parser, data_dir, preset_of, print_result  # noqa: E402

sys.path.insert(0, str(ROOT))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

VARIANTS = ("softmax_eager", "softmax_sdpa", "cog")
PRESETS = {  # defaults of the flags left unset
    "smoke": dict(rounds=1, steps=4, warmup=1, seq_len=64, rows=400),
    "quick": dict(rounds=3, steps=40, warmup=3, seq_len=192),
    "full": dict(rounds=3, steps=80, warmup=3, seq_len=256),
}


def parse_args(argv=None):
    p = bench_parser(__doc__, quick="smaller run, same comparison (< 3 min on 2 cores)",
                     smoke="a few steps, for tests", exclusive=False)
    p.add_argument("--rounds", type=int, help="runs per variant (order rotates every round)")
    p.add_argument("--steps", type=int, help="optimizer steps per run")
    p.add_argument("--warmup", type=int, help="steps dropped from the timing of each run")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, help="characters per training sequence")
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--lr", type=float, default=2e-3)
    add_jobs_threads(p, jobs=None, threads_help="torch threads (0: torch's default)")
    p.add_argument("--data", default=None, help="GSM8K train jsonl (default: $RLKIT_DATA_DIR or ../shared/data)")
    p.add_argument("--rows", type=int, default=None, help="use only the first N GSM8K rows (default: all)")
    add_out(p, "also write the figures as JSON here")
    a = p.parse_args(argv)
    defaults = PRESETS[preset_of(a)]
    for k, v in defaults.items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    if a.steps <= a.warmup:
        p.error("--steps must exceed --warmup")
    return a


def data_path(arg: str | None) -> Path:
    return Path(arg) if arg else data_dir() / "gsm8k_train.jsonl"


def load_streams(path: Path, tokenizer, rows: int | None = None,
                 heldout_rows: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Token streams (train, held-out): each row is ``Question: ...\\nAnswer: ...`` + ``</s>``, concatenated;
    the last ``heldout_rows`` rows (of the first ``rows``) are held out."""
    if not path.is_file():
        sys.exit(f"GSM8K train data not found at {path}; pass --data PATH or set RLKIT_DATA_DIR")
    lines = [line for line in path.read_text().splitlines() if line.strip()][:rows]
    texts = [f"Question: {r['question']}\nAnswer: {r['answer']}" for r in map(json.loads, lines)]

    def stream(ts):
        ids: list[int] = []
        for row in tokenizer(ts, add_special_tokens=False)["input_ids"]:
            ids += row + [tokenizer.eos_token_id]
        return torch.tensor(ids, dtype=torch.long)

    return stream(texts[:-heldout_rows]), stream(texts[-heldout_rows:])


def batches(stream: torch.Tensor, n: int, batch: int, seq_len: int, seed: int) -> list[torch.Tensor]:
    """``n`` batches of ``batch`` random windows of ``seq_len`` tokens (same for every variant)."""
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(stream) - seq_len, (n, batch), generator=g)
    return [torch.stack([stream[s:s + seq_len] for s in row.tolist()]) for row in starts]


def build(variant: str, args, tokenizer):
    from rlkit.models import build_tiny_model
    from rlkit.patches import apply_patches
    from rlkit.recipe import TinyModelSpec

    spec = TinyModelSpec(hidden_size=args.hidden, intermediate_size=3 * args.hidden, num_hidden_layers=args.layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=args.seq_len)
    model = build_tiny_model(spec, tokenizer, seed=0)
    model.set_attn_implementation("sdpa" if variant == "softmax_sdpa" else "eager")
    if variant == "cog":
        apply_patches(model, [{"name": "cog"}])
    return model


def run(variant: str, args, tokenizer, train_batches, heldout_batches) -> dict:
    model = build(variant, args, tokenizer)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    times, cpu, losses = [], [], []
    for step, ids in enumerate(train_batches):
        t0, c0 = time.perf_counter(), time.thread_time()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
        cpu.append(time.thread_time() - c0)
        losses.append(loss.item())
    model.eval()
    with torch.no_grad():
        heldout = statistics.fmean(model(input_ids=ids, labels=ids).loss.item() for ids in heldout_batches)
    tail = losses[-10:]
    return {"times": times[args.warmup:], "cpu": cpu[args.warmup:], "loss": statistics.fmean(tail), "heldout": heldout,
            "first_loss": losses[0]}


def attention_op_times(args, repeats: int) -> dict[str, float]:
    """Median forward+backward time of one attention call at the bench's shapes (q/k/v post-RoPE,
    causal float mask): HF eager softmax, HF SDPA, Cog fused, Cog plain autograd formula."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import eager_mask
    from transformers.models.llama.modeling_llama import eager_attention_forward

    from rlkit.patches.cog import cog_attention, cog_attention_reference

    class Module(torch.nn.Module):
        num_key_value_groups, is_causal = 2, True

    mod = Module().train()
    b, t, d = args.batch, args.seq_len, args.hidden // 4
    g = torch.Generator().manual_seed(0)
    q0 = torch.randn(b, 4, t, d, generator=g)
    k0, v0 = torch.randn(b, 2, t, d, generator=g), torch.randn(b, 2, t, d, generator=g)
    mask = eager_mask(b, t, t, dtype=torch.float32)
    s = d ** -0.5
    ops = {
        "softmax_eager": lambda q, k, v: eager_attention_forward(mod, q, k, v, mask, scaling=s)[0],
        "softmax_sdpa": lambda q, k, v: sdpa_attention_forward(mod, q, k, v, None, scaling=s)[0],
        "cog_fused": lambda q, k, v: cog_attention(q, k, v, mask, s),
        "cog_autograd": lambda q, k, v: cog_attention_reference(q, k, v, mask, s)[0],
    }
    out: dict[str, list[float]] = {k: [] for k in ops}
    for _ in range(repeats):
        for name, op in ops.items():  # interleaved
            q, k, v = (x.clone().requires_grad_() for x in (q0, k0, v0))
            c0 = time.thread_time()
            op(q, k, v).sum().backward()
            out[name].append(time.thread_time() - c0)
    return {k: statistics.median(v) for k, v in out.items()}


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from rlkit.models import build_char_tokenizer

    tokenizer = build_char_tokenizer()
    train, heldout = load_streams(data_path(args.data), tokenizer, rows=args.rows)
    train_batches = batches(train, args.steps, args.batch, args.seq_len, seed=1)
    heldout_batches = batches(heldout, 4 if not args.smoke else 1, args.batch, args.seq_len, seed=2)
    print(f"data: {len(train)} train / {len(heldout)} held-out characters of GSM8K; model hidden {args.hidden}, "
          f"{args.layers} layers, 4 heads / 2 kv heads; batch {args.batch} x {args.seq_len}; {args.steps} steps "
          f"x {args.rounds} rounds; torch threads {torch.get_num_threads()}", flush=True)

    wall: dict[str, list[float]] = {v: [] for v in VARIANTS}
    cpu: dict[str, list[float]] = {v: [] for v in VARIANTS}
    round_ratios: list[float] = []
    first: dict[str, dict] = {}
    for r in range(args.rounds):
        order = VARIANTS[r % len(VARIANTS):] + VARIANTS[:r % len(VARIANTS)]
        this: dict[str, float] = {}
        for v in order:
            res = run(v, args, tokenizer, train_batches, heldout_batches)
            wall[v] += res["times"]
            cpu[v] += res["cpu"]
            this[v] = statistics.median(res["times"])
            first.setdefault(v, res)
            print(f"  round {r} {v:14s} median step {this[v] * 1e3:8.2f} ms (cpu "
                  f"{statistics.median(res['cpu']) * 1e3:8.2f} ms)  loss {res['loss']:.4f}  "
                  f"held-out {res['heldout']:.4f}", flush=True)
        round_ratios.append(this["cog"] / this["softmax_eager"])

    med = {v: statistics.median(wall[v]) for v in VARIANTS}
    med_cpu = {v: statistics.median(cpu[v]) for v in VARIANTS}
    ratio = med["cog"] / med["softmax_eager"]
    cpu_ratio = med_cpu["cog"] / med_cpu["softmax_eager"]
    ops = attention_op_times(args, repeats=3 if args.smoke else 15)
    for v in VARIANTS:
        print(f"{v} step time: {med[v] * 1e3:.2f} ms wall, {med_cpu[v] * 1e3:.2f} ms cpu "
              f"(median of {len(wall[v])} steps)")
    for v in VARIANTS:
        print(f"{v} loss after {args.steps} steps: train {first[v]['loss']:.4f} (first step "
              f"{first[v]['first_loss']:.4f}), held-out {first[v]['heldout']:.4f}")
    for name, t in ops.items():
        print(f"attention op fwd+bwd {name}: {t * 1e3:.3f} ms cpu (ratio to softmax_eager "
              f"{t / ops['softmax_eager']:.3f})")
    print(f"cog / eager softmax step time: {ratio:.3f} wall, {cpu_ratio:.3f} cpu, per-round "
          f"{' '.join(f'{x:.3f}' for x in round_ratios)} (target <= 1.3)")
    print(f"cog / sdpa softmax step time: {med['cog'] / med['softmax_sdpa']:.3f}")
    figures = {
        "cog_step_ratio": round(ratio, 4),
        "cog_cpu_ratio": round(cpu_ratio, 4),
        "round_ratio": round(statistics.median(round_ratios), 4),
        "cog_vs_sdpa_ratio": round(med["cog"] / med["softmax_sdpa"], 4),
        "eager_step_s": round(med["softmax_eager"], 5),
        "sdpa_step_s": round(med["softmax_sdpa"], 5),
        "cog_step_s": round(med["cog"], 5),
        "attn_op_ratio": round(ops["cog_fused"] / ops["softmax_eager"], 4),
        "attn_op_naive_ratio": round(ops["cog_autograd"] / ops["softmax_eager"], 4),
        "loss_eager": round(first["softmax_eager"]["loss"], 4),
        "loss_sdpa": round(first["softmax_sdpa"]["loss"], 4),
        "loss_cog": round(first["cog"]["loss"], 4),
        "heldout_eager": round(first["softmax_eager"]["heldout"], 4),
        "heldout_sdpa": round(first["softmax_sdpa"]["heldout"], 4),
        "heldout_cog": round(first["cog"]["heldout"], 4),
        "steps": args.steps,
    }
    if args.out:
        Path(args.out).write_text(json.dumps(figures, indent=2) + "\n")
    print_result(**figures, digits=None)  # the figures are rounded above


if __name__ == "__main__":
    main()
