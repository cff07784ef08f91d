"""Autonomy-of-Experts vs a standard top-K MoE vs the dense model: tiny pretraining on GSM8K train text.

Three variants of the same tiny char-level Llama (hidden 128, 4 layers, ``recipes/pretrain/tiny_gsm8k_aoe.yaml``)
are trained from scratch through the pretraining lab (``rlkit train``, the path users run), with the same
seed, data order, optimizer and number of steps:

- ``dense``: SwiGLU MLPs of width 384;
- ``moe``: every MLP replaced by 8 SwiGLU experts of width 192 with a learned linear router, top-2
  (``{name: moe, num_experts: 8, top_k: 2}``): the same expert parameters per token as the dense MLP;
- ``aoe``: router-free Autonomy-of-Experts (arXiv 2501.13074), 8 experts, top-2, gate factorized with
  d_low = 32 (the recipe's patch). The issue asks for equal *active* parameters: a token uses every
  expert's W_down (8 x 128 x 32) plus two experts, so the experts are width 199 and a token uses 147.5k MLP
  parameters per layer, as in the dense model and the MoE (the MoE adds its 1k router weights). The paper
  instead matched *total* parameters (each AoE expert as large as a MoE expert: width 242, 17% more
  active parameters per token than the MoE); ``--match total`` runs that setting.

No auxiliary loss is added (coefficient 0) in any variant; the load-balancing loss is still logged.

**Loss.** ``loss_*`` is the held-out loss (mean next-token NLL on 5% of the GSM8K train documents held out
by a seeded split, 32k tokens, the pretraining lab's ``eval_loss``) after the last step, averaged over the
seeds; the spread is the sample standard deviation over seeds, and the final training loss (mean of the
last 10% of logged losses) is printed too.

**Throughput.** Measured in this process, separately from the training runs (which share the cores with
each other): each variant runs forward + backward + AdamW steps on the same real 16 x 128-token batches,
in alternating order (ABC CBA ...) over several rounds, with one torch thread unless ``--threads``;
tokens/s comes from the median round. ``throughput_ratio`` = AoE tokens/s / MoE tokens/s (the paper
reports 97% at its scale; target >= 0.9).

    python bench/aoe_vs_moe.py                 # 3 seeds x 600 steps + throughput
    python bench/aoe_vs_moe.py --quick         # 1 seed x 150 steps
    python bench/aoe_vs_moe.py --smoke         # 1 seed x 3 steps on 200 documents (tests)
    python bench/aoe_vs_moe.py --steps 1000 --seeds 0 1 2 --jobs 2 --out runs/bench_aoe

Ends with ``RESULT throughput_ratio=... loss_aoe=... loss_moe=... loss_dense=... ...``.
"""

from __future__ import annotations

import copy
import json
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _runs import (ROOT, add_jobs_threads, add_out, bench_parser, data_dir, load_recipe_dict, preset_of,  # noqa: E402
                   print_result, train)

RECIPE = ROOT / "recipes" / "pretrain" / "tiny_gsm8k_aoe.yaml"
VARIANTS = ("dense", "moe", "aoe")
PRESETS = {  # seeds, steps, eval tokens, documents (None: all), throughput rounds, steps per round
    "smoke": ([0], 3, 1024, 200, 2, 1),
    "quick": ([0], 150, 16384, None, 4, 3),
    "full": ([0, 1, 2], 600, 32768, None, 8, 4),
}


def active_matched_width(d: int, dense_width: int, n: int, k: int, r: int) -> int:
    """AoE expert width at which a token uses as many MLP parameters as in the dense model (and in the
    top-K MoE with experts of width dense_width / k): every expert's W_down (n*d*r) plus K experts'
    W_up, W_p, W_o (K * (r + 2d) * width) = 3 * d * dense_width."""
    return round((3 * d * dense_width - n * d * r) / (k * (r + 2 * d)))


def variant_patches(base: dict, variant: str, match: str = "active", aux: float | None = None) -> list[dict]:
    aoe = [dict(p, **({} if aux is None else {"aux_loss_coef": aux}))
           for p in base["model"].get("patches", []) if p.get("name") == "aoe"]
    if len(aoe) != 1:
        raise SystemExit(f"{RECIPE}: expected exactly one aoe patch")
    if variant == "dense":
        return []
    if variant == "aoe":
        if match == "total":  # the paper's matching: each AoE expert has a width-(D/k) expert's parameters
            return [{k: v for k, v in aoe[0].items() if k != "expert_size"}]
        return aoe
    moe = {k: v for k, v in aoe[0].items() if k not in ("name", "d_low", "expert_size", "match_params")}
    return [{"name": "moe", **moe}]


def check_active_matching(base: dict) -> None:
    aoe = variant_patches(base, "aoe")[0]
    tiny = base["model"]["tiny"]
    want = active_matched_width(tiny["hidden_size"], tiny["intermediate_size"], aoe["num_experts"], aoe["top_k"],
                                aoe["d_low"])
    if aoe.get("expert_size") != want:
        raise SystemExit(f"{RECIPE}: the aoe patch's expert_size should be {want} for equal active parameters "
                         f"(got {aoe.get('expert_size')})")


def variant_recipe(base: dict, variant: str, steps: int, eval_tokens: int, docs: int | None, data: Path,
                   match: str, aux: float | None) -> dict:
    r = copy.deepcopy(base)
    r["model"]["patches"] = variant_patches(base, variant, match, aux)
    r["data"]["train"] = dict(r["data"]["train"], path=str(data), limit=docs)
    r["trainer"].update(max_steps=steps, eval_context_lengths=[r["trainer"]["seq_length"]], eval_max_tokens=eval_tokens,
                        save_strategy="no", logging_steps=max(1, steps // 20),
                        warmup_steps=min(r["trainer"].get("warmup_steps", 0), steps // 5))
    r["plot"] = False
    return r


def train_runs(seeds, steps, eval_tokens, docs, data: Path, out: Path, jobs: int, threads: int, match: str,
               aux_coef: float | None) -> dict:
    base = load_recipe_dict(RECIPE)

    def one(key):
        seed, variant = key
        d = out / f"seed{seed}" / variant
        if not (d / "final" / ".rlkit_done").exists():
            train(variant_recipe(base, variant, steps, eval_tokens, docs, data, match, aux_coef),
                  [f"output_dir={d}", f"seed={seed}"], out / f"{variant}_seed{seed}.log", threads)
        ppl = json.loads((d / "perplexity.json").read_text())
        history = json.loads((d / "log_history.json").read_text())
        losses = [h["loss"] for h in history if "loss" in h and "eval_loss" not in h]
        tail = losses[-max(1, len(losses) // 10):]
        aux = [h["aux_loss"] for h in history if "aux_loss" in h]
        runtime = next((h["train_runtime"] for h in history if "train_runtime" in h), None)
        return {"eval_loss": ppl["eval_loss"], "train_loss": statistics.mean(tail),
                "aux_loss_last": aux[-1] if aux else None, "train_runtime_s": runtime}

    out.mkdir(parents=True, exist_ok=True)
    keys = [(s, v) for s in seeds for v in VARIANTS]
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        return dict(zip(keys, pool.map(one, keys)))


def build_models(base: dict, match: str) -> tuple[dict, object]:
    """The three variants of the recipe's model (seed 0), and the tokenizer."""
    from rlkit.models import load_model
    from rlkit.recipe import ModelSpec, TinyModelSpec

    tiny = TinyModelSpec(**base["model"]["tiny"])
    models = {}
    for v in VARIANTS:
        models[v], tok = load_model(ModelSpec(name="tiny", tiny=tiny, patches=variant_patches(base, v, match)), seed=0)
    return models, tok


def throughput(models: dict, tok, base: dict, data: Path, docs: int | None, rounds: int, steps_per_round: int,
               threads: int) -> dict:
    """Tokens/s of forward + backward + AdamW per variant, interleaved in alternating order."""
    import torch

    from rlkit.data import load_raw_rows
    from rlkit.methods.pretrain import pack, tokenize_documents
    from rlkit.recipe import DatasetSpec

    torch.set_num_threads(threads)
    seq, batch = base["trainer"]["seq_length"], base["trainer"]["per_device_train_batch_size"]
    opts = {}
    for v, model in models.items():
        model.train()
        opts[v] = torch.optim.AdamW(model.parameters(), lr=1e-3)
    rows, _, _ = load_raw_rows(DatasetSpec(name="gsm8k", path=str(data), split="train", limit=docs or 2000))
    blocks = pack(tokenize_documents([r["question"] + "\n" + r["answer"] for r in rows], tok), seq)
    n_batches = max(1, min(8, blocks.shape[0] // batch))
    batches = [blocks[i * batch:(i + 1) * batch] for i in range(n_batches)]

    def step(v, x):
        out = models[v](input_ids=x, labels=x)
        out.loss.backward()
        opts[v].step()
        opts[v].zero_grad(set_to_none=True)

    for v in VARIANTS:  # warm-up
        step(v, batches[0])
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for r in range(rounds):
        order = VARIANTS if r % 2 == 0 else tuple(reversed(VARIANTS))
        for v in order:
            t0 = time.perf_counter()
            for k in range(steps_per_round):
                step(v, batches[(r * steps_per_round + k) % len(batches)])
            times[v].append(time.perf_counter() - t0)
    tokens = steps_per_round * batches[0].numel()
    return {v: {"tokens_per_s": tokens / statistics.median(times[v]), "round_s": times[v],
                "params": sum(p.numel() for p in models[v].parameters())} for v in VARIANTS}


def active_mlp_params(models: dict) -> dict:
    """Parameters one token uses in one MLP layer, per variant (from the patched modules' shapes)."""
    out = {}
    for v, model in models.items():
        mlp = model.model.layers[0].mlp
        if v == "dense":
            out[v] = sum(p.numel() for p in mlp.parameters())
            continue
        n, k = mlp.num_experts, mlp.top_k
        per_expert = {name: p.numel() // n for name, p in mlp.named_parameters() if p.shape[0] == n}
        shared = sum(p.numel() for name, p in mlp.named_parameters() if name not in per_expert)
        out[v] = shared + k * sum(per_expert.values())
    return out


def main(argv=None) -> int:
    p = bench_parser(__doc__, quick="1 seed x 150 steps", smoke="seconds: 3 steps on 200 documents, for tests",
                     seeds=True)
    p.add_argument("--steps", type=int)
    p.add_argument("--data", type=Path, default=None, help="GSM8K train jsonl (fields question, answer)")
    add_jobs_threads(p, threads_help="torch threads per process (and for the timing)")
    p.add_argument("--match", choices=("active", "total"), default="active",
                   help="AoE expert width: equal active parameters per token (default, the recipe's width) or "
                        "the paper's equal total parameters (each expert as large as a MoE expert)")
    p.add_argument("--aux-loss-coef", type=float, default=None,
                   help="load-balancing loss coefficient for both MoE and AoE (default: the recipe's, 0). The "
                        "paper's alpha = 0.01 is 0.02 here at top-2 (rlkit's L_aux is 1 when balanced)")
    add_out(p, "output folder (default: runs/bench_aoe_<preset>[_total][_auxC])")
    a = p.parse_args(argv)
    preset = preset_of(a)
    seeds, steps, eval_tokens, docs, rounds, per_round = PRESETS[preset]
    seeds, steps = a.seeds or seeds, a.steps or steps
    data = a.data or data_dir() / "gsm8k_train.jsonl"
    if not data.is_file():
        p.error(f"GSM8K train file {data} not found; pass --data or set RLKIT_DATA_DIR")
    if steps < 1:
        p.error("--steps must be at least 1")
    suffix = ("_total" if a.match == "total" else "") + (f"_aux{a.aux_loss_coef:g}" if a.aux_loss_coef is not None else "")
    out = Path(a.out or ROOT / "runs" / f"bench_aoe_{preset}{suffix}")
    base = load_recipe_dict(RECIPE)
    check_active_matching(base)
    print(f"AoE vs MoE vs dense ({preset}): seeds {seeds}, {steps} steps, out {out}", flush=True)

    t0 = time.time()
    models, tok = build_models(base, a.match)
    active = active_mlp_params(models)
    speed = throughput(models, tok, base, data, docs, rounds, per_round, a.threads)
    for v in VARIANTS:
        print(f"{v:>5}: {speed[v]['tokens_per_s']:8.0f} tokens/s (train step, {a.threads} thread), "
              f"{speed[v]['params']:,} parameters, {active[v]:,} MLP parameters per token per layer", flush=True)
    ratio = speed["aoe"]["tokens_per_s"] / speed["moe"]["tokens_per_s"]
    print(f"throughput AoE / MoE = {ratio:.3f}; MoE / dense = "
          f"{speed['moe']['tokens_per_s'] / speed['dense']['tokens_per_s']:.3f}", flush=True)

    res = train_runs(seeds, steps, eval_tokens, docs, data, out, a.jobs, a.threads, a.match, a.aux_loss_coef)
    fields: dict[str, float] = {"throughput_ratio": ratio}
    for v in VARIANTS:
        ev = [res[(s, v)]["eval_loss"] for s in seeds]
        tr = [res[(s, v)]["train_loss"] for s in seeds]
        fields[f"loss_{v}"] = statistics.mean(ev)
        fields[f"loss_{v}_std"] = statistics.stdev(ev) if len(ev) > 1 else 0.0
        fields[f"train_loss_{v}"] = statistics.mean(tr)
        aux = [res[(s, v)]["aux_loss_last"] for s in seeds if res[(s, v)]["aux_loss_last"] is not None]
        print(f"{v:>5}: held-out loss {fields[f'loss_{v}']:.4f} +- {fields[f'loss_{v}_std']:.4f} "
              f"(per seed {', '.join(f'{x:.4f}' for x in ev)}); final train loss {fields[f'train_loss_{v}']:.4f}"
              + (f"; last aux (load-balance) loss {statistics.mean(aux):.3f}" if aux else ""))
    diffs = [res[(s, "aoe")]["eval_loss"] - res[(s, "moe")]["eval_loss"] for s in seeds]
    fields["loss_diff_aoe_moe"] = statistics.mean(diffs)
    wins = sum(d < 0 for d in diffs)
    verdict = "beats" if fields["loss_diff_aoe_moe"] < 0 else "does not beat"
    print(f"AoE {verdict} MoE on held-out loss: mean difference {fields['loss_diff_aoe_moe']:+.4f} "
          f"(per seed {', '.join(f'{d:+.4f}' for d in diffs)}; AoE lower on {wins}/{len(seeds)} seeds)")
    for v in VARIANTS:
        fields[f"tokens_per_s_{v}"] = speed[v]["tokens_per_s"]
    (out / "results.json").write_text(json.dumps({
        "preset": preset, "match": a.match, "aux_loss_coef": a.aux_loss_coef, "seeds": seeds, "steps": steps, "fields": fields, "active_mlp_params": active,
        "throughput": speed, "runs": {f"{v}/seed{s}": r for (s, v), r in res.items()}}, indent=1) + "\n")
    print(f"wall time {time.time() - t0:.0f} s")
    order = ["throughput_ratio", "loss_aoe", "loss_moe", "loss_dense"]
    keys = order + [k for k in fields if k not in order]
    aux_coef = {} if a.aux_loss_coef is None else {"aux_loss_coef": f"{a.aux_loss_coef:g}"}
    print_result(**{k: float(fields[k]) for k in keys}, seeds=len(seeds), steps=steps, match=a.match, **aux_coef)
    return 0


if __name__ == "__main__":
    sys.exit(main())
