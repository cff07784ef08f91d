"""``method: autocei``: Auto-CEI's whole loop as one stage (arXiv 2410.07627; released ``src/rl/curriculum.py``), and
the plain expert-iteration and R-Tuning baselines from the same code (``mode``).

The hill-climb on c1 decides at run time how many curricula and rounds there are, which a static recipe cannot
express, so this stage builds its sub-runs itself, each a normal stage run through :func:`rlkit.pipeline.run_one`
with its own folder and manifest (``sample`` -> ``autocei_data`` -> ``sft``), and evaluates every new model on the
validation data (``data.eval``, greedy, :func:`rlkit.eval.idk.evaluate_idk`). A sub-run whose manifest exists is
skipped and an evaluation whose ``eval.json`` exists is read back, so a killed run resumes where it stopped;
``state.json`` records the curricula tried, f per round and the best model.

``mode: autocei`` (the stage's model is the SFT'd initial model, e.g. an earlier ``sft`` stage):

1. evaluate the initial model: its precision is the resampling temperature tau (unless ``tau`` is set);
2. R-Tuning round(s) (``rtuning``): sample ``n_samples`` per prompt, keep the correct answers and turn wrong ones
   into IDK endings, SFT one epoch; stop after ``rtuning_rounds`` (1) or once the IDK rate passes
   ``idk_threshold`` (0.25);
3. the curriculum (c1, c2, step) from the R-Tuned model's samples (:func:`init_curriculum`), unless given;
4. hill-climb on c1 (:class:`CurriculumSearch`): for each proposed c1, up to ``max_rounds`` (3) expert-iteration
   rounds (sample at temperature 1, curriculum reward + Boltzmann resampling, SFT one epoch from the base model
   or, with ``sft_from: last``, from the model that sampled), stopping early when precision and IDK rate move by
   less than ``tol`` (:func:`ei_converged`, ``convergence``); the curriculum's best f is reported to the search;
   the next curriculum starts from the best model so far (``next_start``);
5. hand on the best model and write ``autocei_summary.json``.

``mode: ei``: plain expert iteration (correct samples only, no IDK), ``max_rounds`` rounds with the same
convergence test, best round by f. ``mode: rtuning``: the R-Tuning round(s) only. Every choice where the released
code is silent or missing is listed in ``docs/methods/autocei.md``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from ...config import RecipeError, build
from .. import register_method
from ..base import DONE_MARKER, Method, StageOutput, StageState
from .core import (DEPTH_SPLITTERS, EVAL_IDK_PHRASES, REWARD_IDK_PHRASES, RTUNING_ENDING, Curriculum,
                   CurriculumSearch, depth, ei_converged, init_curriculum, is_idk)

SFT_DEFAULTS = {"num_train_epochs": 1}
"""What every sub-SFT run gets unless ``sft:`` says otherwise (the released code: one epoch per round)."""


@dataclass
class AutoCEIConfig:
    """Settings of the ``autocei`` stage (recipe section ``args:``); defaults are the released code's."""

    mode: Literal["autocei", "ei", "rtuning"] = "autocei"
    """autocei: the whole method; ei: plain expert iteration (correct samples only); rtuning: the R-Tuning round."""
    lam: float = field(default=0.2, metadata={"alias": "lambda"})
    """lambda of the objective f = (1 - lambda) precision + lambda (1 - IDK rate) (released: 0.2)."""
    n_samples: int = 16
    """Samples per training prompt in every round (released: 16)."""
    temperature: float = 1.0
    """Sampling temperature of the rounds (released: 1.0)."""
    max_new_tokens: int = 512
    """Longest sampled completion (released: 512)."""
    max_rounds: int = 3
    """Expert-iteration rounds per curriculum at most (released: 3)."""
    tol: float = 0.003
    """Convergence: precision and IDK rate both move by less than this (released: 0.003)."""
    convergence: Literal["successive", "released"] = "successive"
    """successive: compare each round with the round before; released: with the curriculum's start (the released
    code never updates its reference values)."""
    max_curricula: int = 10
    """Curricula (values of c1) tried at most (the released loop has no cap)."""
    rtuning: bool = True
    """Run the R-Tuning round before the curricula (released: yes)."""
    rtuning_rounds: int = 1
    """R-Tuning rounds at most (released: 1)."""
    idk_threshold: float = 0.25
    """Stop the R-Tuning rounds once the validation IDK rate exceeds this (released: 0.25)."""
    rtuning_ending: str = RTUNING_ENDING
    """What replaces a wrong answer's final-answer line in the R-Tuning round (the released rtuning.py's)."""
    c1: float | None = None
    """Start the hill-climb at this c1 instead of the initialisation's."""
    c2: float | None = None
    """Use this c2 instead of the initialisation's."""
    step: float | None = None
    """Use this c1 step instead of the initialisation's."""
    tau: float | None = None
    """Resampling temperature (None: the initial model's validation precision, as released)."""
    n_draws: int | None = None
    """Boltzmann draws per prompt besides the originals (None: n_samples, as released)."""
    depth_splitter: str = "newline"
    """How d is counted: newline (one step per line; released for non-MATH tasks), period_newline (released MATH
    count), paragraph, sentence, latex_sentence."""
    reward_idk_phrases: list[str] = field(default_factory=lambda: list(REWARD_IDK_PHRASES))
    """IDK phrases of the reward and of the curriculum's initialisation (released reward_processor's list)."""
    eval_idk_phrases: list[str] = field(default_factory=lambda: list(EVAL_IDK_PHRASES))
    """IDK phrases of the validation figures (released MATH_eval.py's list)."""
    idk_first: bool = True
    """A correct answer holding an IDK phrase gets the IDK reward (released reward_processor); false: +1."""
    sft_from: Literal["base", "last"] = "base"
    """Every round's SFT starts from the base model (released, ReST-EM style) or from the model that sampled."""
    base_model: str | None = None
    """The base model of sft_from: base (None: this stage's starting model, the SFT'd initial model; the released
    code restarts from the pretrained model, e.g. meta-llama/Llama-3.1-8B-Instruct)."""
    next_start: Literal["best", "curriculum_best"] = "best"
    """Where the next curriculum samples from: the best model so far, or the best round of the curriculum just
    tried (the released code)."""
    sft: dict = field(default_factory=dict)
    """Trainer keys (TRL SFTConfig fields) of every sub-SFT run, over ``num_train_epochs: 1``."""
    sample: dict = field(default_factory=dict)
    """Settings of every sub-sample run (sample stage args: batch_size, chunk_size, backend hf|vllm, top_p, stop);
    num_samples, temperature and max_new_tokens come from this stage's keys."""
    eval_batch_size: int = 64
    """Prompts per generate call of the greedy validation evaluation."""
    eval_max_new_tokens: int | None = None
    """Longest validation completion (None: max_new_tokens)."""

    def __post_init__(self):
        if not 0.0 <= self.lam <= 1.0:
            raise ValueError(f"lambda must be in [0, 1], got {self.lam}")
        for name in ("n_samples", "max_rounds", "max_curricula", "rtuning_rounds", "max_new_tokens", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0 (the rounds sample {self.n_samples} answers per prompt)")
        if not self.tol > 0:
            raise ValueError(f"tol must be > 0, got {self.tol}")
        if self.depth_splitter not in DEPTH_SPLITTERS:
            raise ValueError(f"depth_splitter must be one of {', '.join(DEPTH_SPLITTERS)}, got {self.depth_splitter!r}")
        for name in ("reward_idk_phrases", "eval_idk_phrases"):
            if not getattr(self, name) or any(not str(p).strip() for p in getattr(self, name)):
                raise ValueError(f"{name} must be a non-empty list of non-empty phrases")
        if self.tau is not None and not self.tau > 0:
            raise ValueError(f"tau must be > 0, got {self.tau}")
        if self.c2 is not None and not self.c2 > 0:
            raise ValueError(f"c2 must be > 0, got {self.c2}")
        if self.step is not None and not self.step > 0:
            raise ValueError(f"step must be > 0, got {self.step}")
        if self.mode != "autocei" and any(v is not None for v in (self.c1, self.c2, self.step, self.tau)):
            raise ValueError(f"c1, c2, step and tau are Auto-CEI's curriculum; mode {self.mode} has none")
        if self.mode == "rtuning" and not self.rtuning:
            raise ValueError("mode rtuning with rtuning: false runs nothing; set rtuning: true")
        for key in ("num_samples", "temperature", "max_new_tokens"):
            if key in self.sample:
                raise ValueError(f"sample.{key}: set the stage's own n_samples / temperature / max_new_tokens")
        if "output_dir" in self.sft or "seed" in self.sft:
            raise ValueError("sft: output_dir and seed come from the stage (set the stage's output_dir / seed)")


# --------------------------------------------------------------------------------------------------
# Sub-runs


def _sample_args(config: AutoCEIConfig) -> dict:
    return {**config.sample, "num_samples": config.n_samples, "temperature": config.temperature,
            "max_new_tokens": config.max_new_tokens}


def _sub(run, path: str, method: str, model: str | None = None, train=None, trainer=None, args=None, lora=False):
    """A sub-run of ``run`` (same data, rewards, seed, engine) in ``<output_dir>/<path>``."""
    from ...recipe import DataSpec

    model_spec = dataclasses.replace(run.model, name=model or run.model.name, source=None,
                                     lora=run.model.lora if lora else None)
    data = DataSpec(train=train if train is not None else run.data.train, eval=run.data.eval)
    return dataclasses.replace(run, name=f"{run.name}/{path}", method=method,
                               output_dir=str(Path(run.output_dir) / path), model=model_spec, data=data,
                               trainer=dict(trainer or {}), args=dict(args or {}),
                               eval=dataclasses.replace(run.eval, enabled=False), plot=False, model_named=True,
                               own_sections=("trainer",) if trainer is not None else ("args",))


def _sft_train_spec(run, jsonl: str):
    """The SFT data of a round: the written rows, prompts in the stage's template, ``solution`` the target."""
    spec = run.data.train
    return dataclasses.replace(spec, name=f"jsonl:{jsonl}", path=None, split="train", limit=None,
                               question_column="question", answer_column="answer", solution_column="solution",
                               synthetic={}, source=None, dataset=None, where={}, balance=None)


def _log(msg: str) -> None:
    print(f"[rlkit] autocei: {msg}", flush=True)


class _Runner(StageState):
    """Runs (or skips) the stage's sub-runs and evaluations, and keeps ``state.json``."""

    def __init__(self, run, config: AutoCEIConfig):
        super().__init__(run.output_dir)
        self.run, self.config = run, config
        self.base = config.base_model or run.model.name
        self.start = run.model.name
        self._eval_rows = None

    def sub(self, sub) -> dict:
        from ...pipeline import read_manifest, run_one

        manifest = read_manifest(sub.output_dir)
        if manifest is not None:
            self.skipped.append(sub.output_dir)
            _log(f"{sub.output_dir} already finished; skipping")
            return manifest
        _log(f"running {sub.method} in {sub.output_dir} (model {sub.model.name})")
        self.ran.append(sub.output_dir)
        summary = run_one(sub, resume=True if sub.method == "sft" else None)  # a killed SFT resumes
        return summary["manifest"]

    def sample(self, path: str, model: str) -> str:
        m = self.sub(_sub(self.run, f"{path}/sample", "sample", model, args=_sample_args(self.config)))
        return m["datasets"]["samples"]

    def data(self, path: str, samples: str, args: dict) -> str:
        from ...recipe import DatasetSpec

        m = self.sub(_sub(self.run, f"{path}/data", "autocei_data", train=DatasetSpec(name=f"jsonl:{samples}"),
                          args={"depth_splitter": self.config.depth_splitter,
                                "idk_phrases": list(self.config.reward_idk_phrases),
                                "idk_first": self.config.idk_first, **args}))
        return m["datasets"]["sft_data"]

    def sft(self, path: str, data: str, sampled_from: str) -> str:
        start = sampled_from if self.config.sft_from == "last" else self.base
        sub = _sub(self.run, f"{path}/sft", "sft", start, train=_sft_train_spec(self.run, data),
                   trainer={**SFT_DEFAULTS, **self.config.sft}, lora=True)
        return self.sub(sub)["model"]

    def evaluate(self, path: str, model: str) -> dict:
        """Greedy validation figures of ``model`` (cached in ``<path>/eval.json``; a cache older than the model it
        names, e.g. a sub-SFT that ran again, is measured again)."""
        f = self.out / path / "eval.json"
        if f.is_file():
            cached = json.loads(f.read_text())
            done = Path(model) / DONE_MARKER
            if cached.get("model") == model and (not done.is_file() or done.stat().st_mtime <= f.stat().st_mtime):
                return cached
        figures = evaluate_model(self.run, self.config, model)
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(json.dumps(figures, indent=2) + "\n")
        _log(f"{path}: precision {figures['precision']:.3f}, IDK rate {figures['idk_rate']:.3f}, accuracy "
             f"{figures['accuracy']:.3f}, f {figures['f']:.4f}")
        return figures

    def round(self, path: str, model: str, data_args: dict) -> dict:
        """Sample from ``model``, build the round's SFT set, SFT, evaluate: the round's record."""
        samples = self.sample(path, model)
        data = self.data(path, samples, data_args)
        if not Path(data).read_text().strip():
            # nothing to learn from (plain EI on a model that gets nothing right): the model stays as it is, so
            # its figures repeat and the rounds converge
            _log(f"{path}: the round's SFT set is empty; the model is kept as it is")
            return {"path": path, "sampled_from": model, "model": model, "empty": True,
                    **_figures(self.evaluate(path, model))}
        trained = self.sft(path, data, model)
        return {"path": path, "sampled_from": model, "model": trained, **_figures(self.evaluate(path, trained))}


def _figures(ev: dict) -> dict:
    return {k: ev[k] for k in ("precision", "idk_rate", "accuracy", "f", "n")}


def evaluate_model(run, config: AutoCEIConfig, model: str) -> dict:
    """Greedy precision / IDK rate / accuracy / f of ``model`` on the stage's ``data.eval``."""
    import torch

    from ...data import build_dataset
    from ...eval.idk import evaluate_idk
    from ...models import BUILTIN_MODELS, builtin_path, load_model, load_tokenizer
    from ...rollout import GenerationSettings

    backend = config.sample.get("backend", "hf")
    spec = dataclasses.replace(run.model, name=model, source=None, lora=None)
    if backend == "vllm":
        lm, tokenizer = None, load_tokenizer(spec)
    else:
        lm, tokenizer = load_model(spec, seed=run.seed)
        if torch.cuda.is_available():
            lm = lm.to("cuda")
        lm.eval()
    data = dataclasses.replace(run.data.eval, limit=run.eval.limit or run.data.eval.limit)
    rows = build_dataset(data, tokenizer).to_list()
    settings = GenerationSettings(max_new_tokens=config.eval_max_new_tokens or config.max_new_tokens,
                                  batch_size=config.eval_batch_size, temperature=0.0, backend=backend,
                                  kv_cache=run.kv_cache, vllm=run.vllm, stop=list(config.sample.get("stop") or []))
    path = str(builtin_path(model)) if model in BUILTIN_MODELS else model
    try:
        summary, _ = evaluate_idk(lm, tokenizer, rows, settings, config.eval_idk_phrases, config.lam,
                                  progress=True, model_path=path)
    finally:
        if backend == "vllm":
            from ...rollout.vllm import close_engines

            close_engines()
        del lm
    return {"model": model, **{k: summary[k] for k in ("n", "pass@1", "precision", "idk_rate", "accuracy", "f")}}


def curriculum_from_samples(path: str, config: AutoCEIConfig) -> Curriculum:
    """(c1, c2, step) from a sample file's completions (the released ``test_c1``: depths of all answers and of
    the IDK ones)."""
    from ..sample import read_complete_rows

    rows = read_complete_rows(Path(path), "autocei")
    depths = [depth(r["completion"], config.depth_splitter) for r in rows]
    idk = [d for d, r in zip(depths, rows) if is_idk(r["completion"], config.reward_idk_phrases)]
    try:
        return init_curriculum(depths, idk)
    except ValueError as e:
        raise RecipeError(f"autocei: {e}; or set args.c1, args.c2 and args.step") from None


# --------------------------------------------------------------------------------------------------
# The loop


def run_autocei(run, config: AutoCEIConfig) -> StageOutput:
    r = _Runner(run, config)
    st = r.state
    r.claim_mode(config.mode)
    t0 = time.time()
    st["initial"] = {"model": r.start, **_figures(r.evaluate("init", r.start))}
    r.save()
    best = {"model": r.start, "f": st["initial"]["f"], "where": "init"}
    current = r.start

    if config.mode in ("autocei", "rtuning") and config.rtuning:
        st["rtuning"] = []
        for k in range(1, config.rtuning_rounds + 1):
            rec = r.round(f"rtuning/round_{k}", current, {"mode": "rtuning", "ending": config.rtuning_ending})
            st["rtuning"].append(rec)
            r.save()
            current = rec["model"]
            if rec["idk_rate"] > config.idk_threshold:
                _log(f"R-Tuning: IDK rate {rec['idk_rate']:.3f} > {config.idk_threshold}; stopping its rounds")
                break
        best = {"model": current, "f": st["rtuning"][-1]["f"], "where": st["rtuning"][-1]["path"]}

    if config.mode == "ei":
        records = _rounds(r, "ei", current, st["initial"], {"mode": "correct"}, st.setdefault("ei", []))
        top = max(records, key=lambda x: x["f"])
        best = {"model": top["model"], "f": top["f"], "where": top["path"]}
    elif config.mode == "autocei":
        best = _hill_climb(r, current)

    st["best"] = best
    st["wall_seconds"] = round(time.time() - t0, 1)
    r.save()
    summary = _summary(st, config)
    (r.out / "autocei_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    _log(f"done: best model {best['model']} ({best['where']}, f {best['f']:.4f}); ran {len(r.ran)} sub-runs, "
         f"skipped {len(r.skipped)}")
    return StageOutput(model=best["model"], summary={"autocei": summary, "sub_runs_ran": len(r.ran),
                                                      "sub_runs_skipped": len(r.skipped)})


def _rounds(r: _Runner, prefix: str, start: str, start_figures: dict, data_args: dict, records: list) -> list:
    """Up to ``max_rounds`` rounds from ``start``, stopping at convergence; the list of round records."""
    cfg = r.config
    history = [(start_figures["precision"], start_figures["idk_rate"])]
    records.clear()
    model = start
    for k in range(1, cfg.max_rounds + 1):
        rec = r.round(f"{prefix}/round_{k}", model, data_args)
        records.append(rec)
        r.save()
        history.append((rec["precision"], rec["idk_rate"]))
        model = rec["model"]
        if ei_converged(history, cfg.tol, cfg.convergence):
            _log(f"{prefix}: converged after round {k}")
            break
    return records


def _hill_climb(r: _Runner, rtuned: str) -> dict:
    """The hill-climb on c1 from the R-Tuned model; the best curriculum round's model, f and folder."""
    cfg, st = r.config, r.state
    tau = cfg.tau if cfg.tau is not None else st["initial"]["precision"]
    if not tau > 0:
        raise RecipeError("autocei: the initial model answers no validation problem right (precision 0), so the "
                          "resampling temperature tau = its precision is 0; set args.tau")
    # the first curriculum's first round samples from the R-Tuned model: those samples also set the curriculum
    first_samples = r.sample("c1_1/round_1", rtuned)
    if cfg.c1 is not None and cfg.c2 is not None and cfg.step is not None:
        cur = Curriculum(cfg.c1, cfg.c2, cfg.step)
    else:
        cur = curriculum_from_samples(first_samples, cfg)
        cur = Curriculum(cfg.c1 if cfg.c1 is not None else cur.c1, cfg.c2 if cfg.c2 is not None else cur.c2,
                         cfg.step if cfg.step is not None else cur.step)
    st["curriculum"] = {"c1": cur.c1, "c2": cur.c2, "step": cur.step, "tau": tau}
    _log(f"curriculum c1 {cur.c1:.3f}, c2 {cur.c2:.3f}, step {cur.step:.3f}, tau {tau:.3f}")
    search = CurriculumSearch(cur.c1, cur.step, max_curricula=cfg.max_curricula)
    start, start_fig = rtuned, (st["rtuning"][-1] if st.get("rtuning") else st["initial"])
    curricula = []
    overall = {"model": rtuned, "f": -math.inf, "where": "init"}
    k = 0
    while (c1 := search.propose()) is not None:
        k += 1
        records: list = []
        _rounds(r, f"c1_{k}", start, start_fig, {"mode": "resample", "c1": c1, "c2": cur.c2, "tau": tau,
                                                  "n_draws": cfg.n_draws}, records)
        top = max(records, key=lambda x: x["f"])
        curricula.append({"k": k, "c1": c1, "best_f": top["f"], "best_round": top["path"], "rounds": records})
        st["curricula"] = curricula
        search.report(c1, top["f"])
        if top["f"] > overall["f"]:
            overall = {"model": top["model"], "f": top["f"], "where": top["path"]}
        st["search"] = {"evaluated": {str(c): f for c, f in search.evaluated.items()}, "best_c1": search.best_c1,
                        "best_f": search.best_f}
        r.save()
        nxt = overall if cfg.next_start == "best" else top
        start, start_fig = nxt["model"], next(x for c in curricula for x in c["rounds"] if x["model"] == nxt["model"])
    return overall


def _summary(st: dict, config: AutoCEIConfig) -> dict:
    rows = [{"where": "init", **{k: st["initial"][k] for k in ("precision", "idk_rate", "accuracy", "f")}}]
    for rec in st.get("rtuning", []) + st.get("ei", []):
        rows.append({"where": rec["path"], **{k: rec[k] for k in ("precision", "idk_rate", "accuracy", "f")}})
    for c in st.get("curricula", []):
        for rec in c["rounds"]:
            rows.append({"where": rec["path"], "c1": c["c1"],
                         **{k: rec[k] for k in ("precision", "idk_rate", "accuracy", "f")}})
    return {"mode": config.mode, "lambda": config.lam, "curriculum": st.get("curriculum"), "best": st["best"],
            "curricula": [{"c1": c["c1"], "rounds": len(c["rounds"]), "best_f": c["best_f"],
                           "best_round": c["best_round"]} for c in st.get("curricula", [])],
            "evaluations": rows}


# --------------------------------------------------------------------------------------------------
# The method


@register_method
class AutoCEIMethod(Method):
    """``method: autocei`` (see the module docstring)."""

    name = "autocei"
    section = "args"
    loads_model = False
    rewards = "required"
    config = AutoCEIConfig

    def check(self, run, config: AutoCEIConfig, where: str) -> None:
        from .. import get_method
        from ..sample import SampleConfig, check_backend

        if run.data.eval is None:
            raise RecipeError(f"{where[:-4]}data.eval: autocei measures precision and IDK rate on validation data; "
                              "set data.eval (e.g. a held-out split)")
        sample_cfg = build(SampleConfig, _sample_args(config), f"{where}.sample")
        check_backend(run, sample_cfg.backend, f"{where}.sample")
        if config.sft_from == "last" and config.base_model is not None:
            raise RecipeError(f"{where}.base_model: only used with sft_from: base")
        sft = _sub(run, "check/sft", "sft", train=_sft_train_spec(run, "check.jsonl"),
                   trainer={**SFT_DEFAULTS, **config.sft}, lora=True)
        get_method("sft").make_config(sft, f"{where}.sft", device_checks=False)

    def run(self, run, ctx) -> StageOutput:
        return run_autocei(run, self.make_config(run))
