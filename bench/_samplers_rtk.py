"""Part (b) of ``bench/samplers.py`` (issue 21): diffusion inference with a given score, DDPM vs DDIM vs RTK-MALA vs
RTK-ULD, error against score evaluations (NFE) per chain, on a 2-D Gaussian mixture (8 components on a ring of radius
3, standard deviation 0.3) with (1) the exact score of every p_t (closed form) and (2) a learned score: a small MLP
trained by denoising score matching on draws from the same mixture (``rlkit.samplers.score_net``).

Protocol. OU forward process, T = 4, every sampler stops at t_end = 1e-3 and starts from the same N(0, I) draws. The
error is the total variation between 2-D histograms (24 x 24 bins) of the chains and of exact draws from p_{t_end};
its sampling-noise floor (an exact set of the same size) is reported. Sliced Wasserstein-2 (64 directions) is
plotted too, but at these sample sizes it sits at its own noise floor (the mode weights of a finite sample dominate
it), so the RESULT figures use TV only. At each NFE budget every method gets a small
grid, tuned on a separate seed and then run on the reported seeds (mean over seeds):

- DDPM: scheme in {exponential integrator, ancestral} x time-grid exponent rho in {1, 2, 3};
- DDIM: rho in {1, 2, 3};
- RTK-MALA (score only: energy differences by the free trapezoid line integral of the score, ball projection of
  radius 5 sqrt(d sigma2), inner chain started at the previous point): segments K in {2, 4, 8} x inner step in
  {1/16, 1/8, 1/4} (units of sigma2) x segment grid rho in {1 (the paper's equal segments), 3};
- RTK-ULD: the same grid (step in units of sqrt(sigma2)), friction 2;
- RTK-MALA K=5 / RTK-ULD K=5: the paper's experimental layout (five equal segments), only the inner step tuned.

RTK's inner steps S are the largest that fit the budget (``rtk_nfe``). ``rtk_nfe_ratio_<case>_<inner>`` = DDPM NFE /
RTK NFE to reach the same error eps*, where eps* is the smallest error both methods reach on the budget grid (the larger
of their best errors, plus 5%), and each method's NFE at eps* is read off its running-minimum error curve by linear
interpolation in log NFE (inf: RTK reaches eps* and DDPM never does; nan: not computable).
The ``_loose`` keys compare at 1.5 x eps* (moderate accuracy, where the curves are steep). ``rtk_nfe_ratio`` is the
exact-score case with the better of the two tuned RTK variants; the ``_k5`` keys are the paper-layout variants.

Run by ``bench/samplers.py`` (``from _samplers_rtk import run_rtk``); standalone: ``python bench/_samplers_rtk.py
--quick``."""

from __future__ import annotations

import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _runs import ROOT, add_out, bench_parser, preset_of, print_result  # noqa: E402

sys.path.insert(0, str(ROOT))

from rlkit.samplers.diffusion import OUMixture, ddim, ddpm  # noqa: E402
from rlkit.samplers.metrics import sliced_wasserstein, tv_histogram  # noqa: E402
from rlkit.samplers.rtk import rtk, rtk_nfe  # noqa: E402
from rlkit.samplers.score_net import train_score_net  # noqa: E402

T, T_END, BINS = 4.0, 1e-3, 24
LOOSE = 1.5   # the ``_loose`` ratios compare at 1.5 x eps*
METHODS = ("ddpm", "ddim", "rtk_mala", "rtk_uld", "rtk_mala_k5", "rtk_uld_k5")
LABELS = {"ddpm": "DDPM", "ddim": "DDIM", "rtk_mala": "RTK-MALA", "rtk_uld": "RTK-ULD",
          "rtk_mala_k5": "RTK-MALA K=5", "rtk_uld_k5": "RTK-ULD K=5"}
PRESETS = {
    "smoke": dict(budgets=[8, 16], n_tune=300, n_eval=500, n_ref=2000, segments=[4], steps=[0.125], rho=[1.0],
                  rtk_rho=[1.0], train=dict(steps=60, batch_size=128), n_train=2000),
    "quick": dict(budgets=[8, 16, 32, 64], n_tune=400, n_eval=2500, n_ref=20000, segments=[2, 4, 8],
                  steps=[0.0625, 0.125, 0.25], rho=[1.0, 2.0, 3.0], rtk_rho=[1.0, 3.0],
                  train=dict(steps=3000, batch_size=512, time_limit_s=90.0), n_train=20000),
    "full": dict(budgets=[8, 16, 32, 64, 128], n_tune=1000, n_eval=8000, n_ref=40000, segments=[2, 4, 8, 16],
                 steps=[0.0625, 0.125, 0.25], rho=[1.0, 2.0, 3.0], rtk_rho=[1.0, 3.0],
                 train=dict(steps=10000, batch_size=512, time_limit_s=300.0), n_train=40000),
}


def ring_mixture(k: int = 8, radius: float = 3.0, std: float = 0.3) -> OUMixture:
    ang = torch.arange(k, dtype=torch.float64) * 2 * math.pi / k
    return OUMixture(radius * torch.stack([ang.cos(), ang.sin()], 1), std ** 2)


def configs(method: str, budget: int, p: dict) -> list[dict]:
    """The tuning grid of ``method`` at ``budget`` score evaluations per chain (configs that fit the budget)."""
    if method == "ddpm":
        return [dict(scheme=s, rho=r) for s in ("ei", "ancestral") for r in p["rho"]]
    if method == "ddim":
        return [dict(rho=r) for r in p["rho"]]
    inner = method.split("_")[1]
    paper = method.endswith("_k5")
    out = []
    for k in ([5] if paper else p["segments"]):
        s = (budget // k - 1) if inner == "mala" else budget // k
        if s >= 1:
            assert rtk_nfe(k, inner, s) <= budget
            out += [dict(n_segments=k, inner_steps=s, inner_step=h, rho=r)
                    for h in p["steps"] for r in ([1.0] if paper else p["rtk_rho"])]
    return out


def run_method(method: str, cfg: dict, score_fn, budget: int, x_T: torch.Tensor, seed: int):
    if method == "ddpm":
        return ddpm(score_fn, x_T, T, budget, t_end=T_END, generator=seed, **cfg)
    if method == "ddim":
        return ddim(score_fn, x_T, T, budget, t_end=T_END, **cfg)
    return rtk(score_fn, x_T, T, inner=method.split("_")[1], t_end=T_END, generator=seed, **cfg)


def nfe_at(budgets: list[int], errors: list[float], level: float) -> float:
    """Smallest NFE at which the running-minimum error curve reaches ``level`` (log-linear interpolation); inf if
    it never does."""
    best = []
    for e in errors:
        best.append(min(e, best[-1]) if best else e)
    if best[0] <= level:
        return float(budgets[0])
    for i in range(1, len(best)):
        if best[i] <= level:
            e0, e1 = best[i - 1], best[i]
            frac = 1.0 if e0 == e1 else (e0 - level) / (e0 - e1)
            return math.exp(math.log(budgets[i - 1]) + frac * (math.log(budgets[i]) - math.log(budgets[i - 1])))
    return math.inf


def nfe_ratio(budgets: list[int], err_ddpm: list[float], err_rtk: list[float],
              loose: float = 1.0) -> tuple[float, float]:
    """(DDPM NFE / RTK NFE at the level, the level) with the level ``loose`` x eps*, eps* = 1.05 x the larger of the
    two best errors."""
    level = loose * 1.05 * max(min(err_ddpm), min(err_rtk))
    n_d, n_r = nfe_at(budgets, err_ddpm, level), nfe_at(budgets, err_rtk, level)
    if math.isinf(n_r):
        return math.nan, level
    return n_d / n_r, level


def run_case(name: str, score_fn, mix: OUMixture, p: dict, seeds: list[int], log) -> dict:
    """Tune each method per budget on a separate seed, then evaluate on ``seeds``; returns errors and choices."""
    ref = mix.sample(p["n_ref"], T_END, generator=777).float()
    tune_seed = 10_000 + seeds[0]
    x_tune = torch.randn(p["n_tune"], 2, generator=torch.Generator().manual_seed(tune_seed))

    def err(x: torch.Tensor) -> float:
        if not bool(torch.isfinite(x).all()):
            return 1.0
        return tv_histogram(x, ref, bins=BINS)

    out = {"budgets": p["budgets"], "tv": {}, "tv_sd": {}, "sw": {}, "choice": {}, "accept": {}}
    for m in METHODS:
        for key in ("tv", "tv_sd", "sw", "choice", "accept"):
            out[key][m] = []
        for b in p["budgets"]:
            grid = configs(m, b, p)
            if not grid:
                for key in ("tv", "tv_sd", "sw"):
                    out[key][m].append(math.nan)
                out["choice"][m].append(None)
                out["accept"][m].append(None)
                continue
            scored = []
            for cfg in grid:
                res = run_method(m, cfg, score_fn, b, x_tune, tune_seed)
                assert res.n_grad <= b, (m, cfg, res.n_grad, b)
                scored.append((err(res.samples), cfg))
            best_cfg = min(scored, key=lambda s: s[0])[1]
            tvs, sws, accs, proj = [], [], [], []
            for s in seeds:
                x_T = torch.randn(p["n_eval"], 2, generator=torch.Generator().manual_seed(s))
                res = run_method(m, best_cfg, score_fn, b, x_T, s)
                tvs.append(err(res.samples))
                sws.append(sliced_wasserstein(res.samples, ref, n_proj=64, generator=s)
                           if bool(torch.isfinite(res.samples).all()) else math.inf)
                accs.append(res.accept_rate)
                proj.append(res.extra.get("projected", 0.0))
            out["tv"][m].append(sum(tvs) / len(tvs))
            out["tv_sd"][m].append(statistics.stdev(tvs) if len(tvs) > 1 else 0.0)
            out["sw"][m].append(sum(sws) / len(sws))
            out["choice"][m].append(best_cfg)
            out["accept"][m].append(None if accs[0] is None else sum(accs) / len(accs))
            log(f"[rtk bench] {name:7s} {LABELS[m]:8s} NFE {b:4d}: TV {out['tv'][m][-1]:.4f} "
                f"(sd {out['tv_sd'][m][-1]:.4f})  SW2 {out['sw'][m][-1]:.4f}  {best_cfg}"
                + ("" if accs[0] is None else f"  accept {out['accept'][m][-1]:.2f}  projected {max(proj):.4f}"))
    exact = [mix.sample(p["n_eval"], T_END, generator=900 + s).float() for s in seeds]
    out["floor"] = sum(tv_histogram(x, ref, bins=BINS) for x in exact) / len(seeds)
    out["sw_floor"] = sum(sliced_wasserstein(x, ref, n_proj=64, generator=s) for x, s in zip(exact, seeds)) / len(seeds)
    for m in METHODS[2:]:
        ok = [(b, e) for b, e in zip(p["budgets"], out["tv"][m]) if not math.isnan(e)]
        d_ok = [e for b, e in zip(p["budgets"], out["tv"]["ddpm"]) if b in {x[0] for x in ok}]
        ratio, level = nfe_ratio([b for b, _ in ok], d_ok, [e for _, e in ok]) if ok else (math.nan, math.nan)
        out[f"ratio_{m}"], out[f"level_{m}"] = ratio, level
        out[f"ratio_loose_{m}"] = nfe_ratio([b for b, _ in ok], d_ok, [e for _, e in ok], LOOSE)[0] if ok else math.nan
    return out


def plot(cases: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(cases), figsize=(5.2 * len(cases), 7.6), squeeze=False)
    styles = {"ddpm": ("k", "o", "-"), "ddim": ("0.5", "s", "-"), "rtk_mala": ("tab:blue", "^", "-"),
              "rtk_uld": ("tab:red", "v", "-"), "rtk_mala_k5": ("tab:blue", "^", "--"),
              "rtk_uld_k5": ("tab:red", "v", "--")}
    for j, (name, c) in enumerate(cases.items()):
        for i, (key, floor, ylabel) in enumerate((("tv", "floor", f"TV (2-D histogram, {BINS}x{BINS})"),
                                                  ("sw", "sw_floor", "sliced Wasserstein-2"))):
            ax = axes[i][j]
            for m in METHODS:
                col, mk, ls = styles[m]
                ax.plot(c["budgets"], c[key][m], color=col, marker=mk, ls=ls, label=LABELS[m])
            ax.axhline(c[floor], color="0.6", ls=":", label="noise floor")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("score evaluations per sample (NFE)")
            ax.set_ylabel(ylabel)
            ax.set_title(f"8-Gaussian ring, {name} score")
            ax.grid(alpha=0.3, which="both")
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_rtk(quick: bool, smoke: bool, seeds: list[int], out: Path, log=print) -> dict[str, float]:
    """Run part (b) and return its RESULT figures; writes ``samplers_rtk.png`` and ``rtk_results.json`` (every curve,
    the chosen configuration per budget, acceptance rates, floors and ratios) into ``out``."""
    p = PRESETS["smoke" if smoke else "quick" if quick else "full"]
    seeds = list(seeds) or [0]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        start = time.perf_counter()
        mix = ring_mixture()
        cases = {"exact": run_case("exact", mix.score, mix, p, seeds, log)}
        t_exact = time.perf_counter() - start
        data = mix.sample(p["n_train"], 0.0, generator=4242)
        learned = train_score_net(data, T=T, t_min=T_END, seed=seeds[0], **p["train"])
        log(f"[rtk bench] score net: {learned.steps} steps in {learned.train_seconds:.1f}s, final DSM loss "
            f"{learned.losses[-1] if learned.losses else float('nan'):.4f}")
        t1 = time.perf_counter()
        cases["learned"] = run_case("learned", learned, mix, p, seeds, log)
        t_learned = time.perf_counter() - t1
        plot(cases, out / "samplers_rtk.png")
        (out / "rtk_results.json").write_text(json.dumps(cases, indent=1))
    finally:
        torch.set_num_threads(threads)
    res: dict[str, float] = {}
    ex = cases["exact"]
    best = [r for r in (ex["ratio_rtk_mala"], ex["ratio_rtk_uld"]) if not math.isnan(r)]
    res["rtk_nfe_ratio"] = max(best) if best else math.nan
    for case, c in cases.items():
        for m in METHODS[2:]:
            res[f"rtk_nfe_ratio_{case}_{m[4:]}"] = c[f"ratio_{m}"]
            res[f"rtk_err_level_{case}_{m[4:]}"] = c[f"level_{m}"]
            if not m.endswith("_k5"):
                res[f"rtk_nfe_ratio_{case}_{m[4:]}_loose"] = c[f"ratio_loose_{m}"]
        b = 32 if 32 in c["budgets"] else c["budgets"][-1]
        i = c["budgets"].index(b)
        for m in METHODS[:4]:
            res[f"rtk_tv_{case}_{m}_nfe{b}"] = c["tv"][m][i]
        res[f"rtk_tv_{case}_floor"] = c["floor"]
    res["rtk_score_train_s"] = learned.train_seconds
    res["rtk_exact_s"] = t_exact
    res["rtk_learned_s"] = t_learned
    return res


if __name__ == "__main__":
    ap = bench_parser(__doc__, quick="the quick preset", smoke="seconds", seeds=True)
    add_out(ap, "folder for samplers_rtk.png (default: a temporary folder)")
    args = ap.parse_args()
    import tempfile

    preset = preset_of(args)
    figures = run_rtk(preset == "quick", preset == "smoke", args.seeds or [0, 1],
                      Path(args.out) if args.out else Path(tempfile.mkdtemp()))
    print_result(**figures)
