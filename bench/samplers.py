"""Stochastic proximal samplers vs SGLD (part a) and RTK vs DDPM diffusion inference (part b).

Part (a), the claim of Huang et al. (ICML 2024, arXiv 2405.16734): SPS-SGLD and SPS-MALA reach a given sampling
error with fewer gradient evaluations than SGLD, with the advantage growing with the dimension d.

- Target: :class:`rlkit.samplers.MixtureFiniteSum` in d = 2, 10, 50 (n = 100 terms, a symmetric double well along
  one direction, barrier about 2.4 nats, Gaussian across it; exact reference samples by rejection sampling). Every
  chain starts in one well, ``x0 ~ N(-μ, I)``, so reaching the target means crossing the barrier.
- Samplers, all with minibatches of b = 10 drawn independently per chain: SGLD; SPS-SGLD (fresh minibatch per inner
  step); SPS-MALA (one minibatch per outer step). Inner chains start at x_k; inner step ``τ = η / S``.
- Cost: per-datum gradient evaluations per chain (a minibatch of b costs b; a full gradient costs n = 100). MALA's
  energy evaluations are not charged (reported in the JSON). Every configuration gets the same budget.
- Error: MMD (RBF kernel, bandwidth = median pairwise distance of the reference samples, fixed per d) between the
  chains and 2,000 exact samples, every 100 per-datum gradients (or every outer step if that costs more); curves
  averaged over seeds; ``floor`` = the MMD of as many exact samples as chains.
- Tuning, the same for each method: a grid (SGLD: step h; SPS: outer step η x inner steps S); for each method the
  configuration that reaches the error level first is its best.
- "Same error": ``eps_d = max(2 floor, 1.1 max_method min_config min_t err)`` (after a 3-point moving average of each
  curve), a level every method's best configuration reaches; ``evals(method)`` = the cost at the first checkpoint
  where its smoothed curve is <= eps_d. ``sps_grad_ratio_d<d> = evals(SGLD) / min(evals(SPS-SGLD), evals(SPS-MALA))``;
  > 1 means an SPS variant needs fewer gradients.

Part (b) is H2's ``bench/_samplers_rtk.py`` (``run_rtk``); its keys are added to the same RESULT line.

    python bench/samplers.py            # d = 2, 10, 50, 1000 chains, 6 configurations per method, seeds 0 1
    python bench/samplers.py --quick    # 600 chains, 3 configurations per method, 1 seed (< 3 min with part b)
    python bench/samplers.py --smoke    # seconds (tests)
    python bench/samplers.py --quick --skip-rtk --noise 8   # part (a) with strong minibatch-gradient noise

Ends with ``RESULT sps_grad_ratio_d2=... sps_grad_ratio_d10=... sps_grad_ratio_d50=... sps_sgld_grad_ratio_d<d>=...
sps_mala_grad_ratio_d<d>=... eps_d<d>=... err_sgld_d<d>=... err_sps_sgld_d<d>=... err_sps_mala_d<d>=... [part b keys]
time_s=...`` (``err_*``: the best configuration's error at the full budget).
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _runs import ROOT, add_jobs_threads, add_out, bench_parser, preset_of, print_result  # noqa: E402

sys.path.insert(0, str(ROOT))

from rlkit.samplers import MixtureFiniteSum, mmd_rbf, sgld_minibatch, sps  # noqa: E402
from rlkit.samplers.metrics import _sqdist  # noqa: E402

METHODS = ("sgld", "sps_sgld", "sps_mala")
PRESETS = {
    "smoke": dict(dims=[2], chains=100, budget=400, every=50, ref=1000, seeds=[0],
                  grid={"sgld": [0.1], "sps_sgld": [(0.5, 4)], "sps_mala": [(0.5, 4)]}),
    "quick": dict(dims=[2, 10, 50], chains=600, budget=5000, every=100, ref=2000, seeds=[0],
                  grid={"sgld": [0.1, 0.2, 0.4],
                        "sps_sgld": [(0.5, 4), (1.0, 4), (2.0, 4)],
                        "sps_mala": [(0.5, 4), (1.0, 4), (2.0, 8)]}),
    "full": dict(dims=[2, 10, 50], chains=1000, budget=10000, every=100, ref=2000, seeds=[0, 1],
                 grid={"sgld": [0.05, 0.1, 0.2, 0.3, 0.4, 0.6],
                       "sps_sgld": [(0.5, 4), (1.0, 2), (1.0, 4), (2.0, 4), (2.0, 8), (4.0, 8)],
                       "sps_mala": [(0.5, 4), (1.0, 2), (1.0, 4), (2.0, 4), (2.0, 8), (4.0, 8)]}),
}
N_DATA, BATCH = 100, 10
DTYPE = torch.float32


def config_name(method: str, cfg) -> str:
    return f"h={cfg}" if method == "sgld" else f"eta={cfg[0]},S={cfg[1]}"


def run_config(target, x0, method: str, cfg, budget: int, every: int,
               seed: int) -> tuple[list[float], list, float | None]:
    """One sampler run at a per-datum gradient budget, the chains recorded about every ``every`` per-datum gradients
    (at least once per step); returns the checkpoint costs, the chains there and the MALA acceptance (or None)."""
    if method == "sgld":
        steps = budget // BATCH
        rec = max(every // BATCH, 1)
        res = sgld_minibatch(target, x0, cfg, steps, batch_size=BATCH, generator=seed, record_every=rec)
    else:
        eta, s = cfg
        per_outer = (s + (1 if method == "sps_mala" else 0)) * BATCH
        outer = max(budget // per_outer, 1)
        rec = max(every // per_outer, 1)
        res = sps(target, x0, eta, outer, inner=method[4:], inner_steps=s, inner_step=eta / s, batch_size=BATCH,
                  generator=seed, record_every=rec)
    per = res.extra["grad_data_per_step"] * rec
    costs = [per * (j + 1) for j in range(len(res.trace))]
    return costs, res.trace, res.accept_rate


def _finite(o):
    """JSON-safe copy: infinities and NaN become None."""
    if isinstance(o, float):
        return o if math.isfinite(o) else None
    if isinstance(o, dict):
        return {str(k): _finite(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_finite(v) for v in o]
    return o


def smooth(curve: list[float]) -> list[float]:
    out = []
    for j in range(len(curve)):
        w = curve[max(j - 1, 0): j + 2]
        out.append(sum(w) / len(w))
    return out


def evals_to(costs: list[float], curve: list[float], eps: float) -> float:
    for c, e in zip(costs, smooth(curve)):
        if e <= eps:
            return c
    return math.inf


def part_a(p: dict, seeds: list[int], out: Path, noise: float = 2.0) -> tuple[dict, dict]:
    figures, report = {}, {}
    for d in p["dims"]:
        t0 = time.time()
        target = MixtureFiniteSum(d, n=N_DATA, sep=2.5, spread=1.0, noise=noise, seed=0)
        ref = target.sample(p["ref"], generator=0).to(DTYPE)
        sub = ref[: min(1000, len(ref))].double()
        bw = float(torch.cdist(sub, sub)[torch.triu_indices(len(sub), len(sub), 1).unbind()].median())

        # MMD against the reference, its kernel mean computed once (the same value as
        # mmd_rbf(s, ref_sub, bandwidth=bw, max_points=len(ref_sub)); checked on a first call)
        ref_sub = ref.double()
        k_yy = torch.exp(-_sqdist(ref_sub, ref_sub) / (2 * bw * bw)).mean()

        def err(s):
            if not bool(torch.isfinite(s).all()):
                return math.inf
            s = s.double()
            k_xx = torch.exp(-_sqdist(s, s) / (2 * bw * bw)).mean()
            k_xy = torch.exp(-_sqdist(s, ref_sub) / (2 * bw * bw)).mean()
            return math.sqrt(max(float(k_xx + k_yy - 2 * k_xy), 0.0))

        check = target.sample(200, generator=99).to(DTYPE)
        assert abs(err(check) - mmd_rbf(check, ref_sub, bandwidth=bw, max_points=len(ref_sub))) < 1e-9

        floor = sum(err(target.sample(p["chains"], generator=100 + k).to(DTYPE)) for k in range(3)) / 3
        curves = {m: {} for m in METHODS}
        accept = {}
        for m in METHODS:
            for cfg in p["grid"][m]:
                per_seed, costs = [], None
                for seed in seeds:
                    g = torch.Generator().manual_seed(10_000 + seed)
                    x0 = (-target.mu).to(DTYPE) + torch.randn(p["chains"], d, generator=g, dtype=DTYPE)
                    costs, trace, acc = run_config(target, x0, m, cfg, p["budget"], p["every"], seed)
                    per_seed.append([err(s) for s in trace])
                    if acc is not None:
                        accept[f"{m}:{config_name(m, cfg)}"] = acc
                mean_curve = [sum(v) / len(v) for v in zip(*per_seed)]
                curves[m][config_name(m, cfg)] = (costs, mean_curve)
        best_min = {m: min(min(smooth(c)) for _, c in curves[m].values()) for m in METHODS}
        eps = max(2 * floor, 1.1 * max(best_min.values()))
        evals, best = {}, {}
        for m in METHODS:
            ranked = sorted(curves[m].items(), key=lambda kv: (evals_to(*kv[1], eps), smooth(kv[1][1])[-1]))
            best[m] = ranked[0][0]
            evals[m] = evals_to(*ranked[0][1], eps)
        sps_best = min(evals["sps_sgld"], evals["sps_mala"])
        figures[f"sps_grad_ratio_d{d}"] = evals["sgld"] / sps_best
        figures[f"sps_sgld_grad_ratio_d{d}"] = evals["sgld"] / evals["sps_sgld"]
        figures[f"sps_mala_grad_ratio_d{d}"] = evals["sgld"] / evals["sps_mala"]
        figures[f"eps_d{d}"] = eps
        for m in METHODS:
            figures[f"err_{m}_d{d}"] = smooth(curves[m][best[m]][1])[-1]
        report[d] = {"floor": floor, "eps": eps, "bandwidth": bw, "best": best, "evals_to_eps": evals,
                     "mala_accept": accept, "curves": curves, "seconds": time.time() - t0}
        print(f"d={d}: floor={floor:.4f} eps={eps:.4f} ({time.time() - t0:.0f}s)")
        for m in METHODS:
            costs, c = curves[m][best[m]]
            print(f"  {m:9s} best {best[m]:14s} evals_to_eps={evals[m]:8.0f}  final_err={smooth(c)[-1]:.4f}")
            for name, (cs, cv) in curves[m].items():
                print(f"      {name:14s} evals_to_eps={evals_to(cs, cv, eps):8.0f}  min={min(smooth(cv)):.4f} "
                      f"final={smooth(cv)[-1]:.4f}"
                      + (f"  accept={accept[f'{m}:{name}']:.2f}" if f"{m}:{name}" in accept else ""))
    (out / "sps_results.json").write_text(json.dumps(_finite(
        {"preset": {k: v for k, v in p.items()}, "noise": noise, "seeds": seeds, "n_data": N_DATA, "batch": BATCH,
         "figures": figures, "results": report})))
    plot(report, out / "samplers_sps.png")
    return figures, report


def plot(report: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dims = list(report)
    fig, axes = plt.subplots(1, len(dims), figsize=(4.2 * len(dims), 3.4), squeeze=False)
    colors = {"sgld": "tab:gray", "sps_sgld": "tab:blue", "sps_mala": "tab:red"}
    labels = {"sgld": "SGLD", "sps_sgld": "SPS-SGLD", "sps_mala": "SPS-MALA"}
    for ax, d in zip(axes[0], dims):
        r = report[d]
        for m in METHODS:
            for name, (costs, curve) in r["curves"][m].items():
                if name != r["best"][m]:
                    ax.plot(costs, smooth(curve), color=colors[m], alpha=0.18, lw=0.8)
            costs, curve = r["curves"][m][r["best"][m]]
            ax.plot(costs, smooth(curve), color=colors[m], lw=2, label=f"{labels[m]} ({r['best'][m]})")
        ax.axhline(r["eps"], color="k", ls="--", lw=0.8, label="eps (same error)")
        ax.axhline(r["floor"], color="k", ls=":", lw=0.8, label="exact-sample floor")
        ax.set_yscale("log")
        ax.set_title(f"d = {d}")
        ax.set_xlabel("per-datum gradient evaluations per chain")
        ax.set_ylabel("MMD to exact samples")
        ax.legend(fontsize=6.5)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def part_b(quick: bool, smoke: bool, seeds: list[int], out: Path) -> dict:
    try:
        from _samplers_rtk import run_rtk
    except ImportError as e:
        print(f"part (b) skipped: bench/_samplers_rtk.py (run_rtk) could not be imported ({e})")
        return {}
    return run_rtk(quick=quick, smoke=smoke, seeds=seeds, out=out)


def main() -> None:
    p = bench_parser(__doc__, quick="3 configurations per method, 600 chains, 1 seed (< 3 min)",
                     smoke="d = 2 only, tiny sizes (seconds; tests)", seeds=True)
    p.add_argument("--dims", type=int, nargs="+", help="dimensions for part (a) (default: the preset's)")
    p.add_argument("--noise", type=float, default=2.0,
                   help="part (a): scale of the zero-sum linear terms c_i, i.e. of the minibatch gradient noise")
    p.add_argument("--skip-rtk", action="store_true", help="run part (a) only")
    p.add_argument("--skip-sps", action="store_true", help="run part (b) only")
    add_jobs_threads(p, jobs=None)
    add_out(p, "output folder (default runs/bench_samplers[_quick|_smoke])", type=Path)
    a = p.parse_args()
    preset = preset_of(a)
    cfg = dict(PRESETS[preset])
    if a.dims:
        cfg["dims"] = a.dims
    seeds = a.seeds or cfg["seeds"]
    torch.set_num_threads(a.threads)
    out = (a.out or ROOT / "runs" / ("bench_samplers" + ("" if preset == "full" else f"_{preset}"))).resolve()
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    figures = {}
    if not a.skip_sps:
        figures.update(part_a(cfg, seeds, out, noise=a.noise)[0])
    if not a.skip_rtk:
        figures.update(part_b(preset == "quick", preset == "smoke", seeds, out))
    figures["time_s"] = time.time() - t0
    print(f"outputs in {out}")
    print_result(**figures, precision={"time_s": 1})


if __name__ == "__main__":
    main()
