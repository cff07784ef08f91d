"""``method: dfc``: Divide-Fuse-Conquer (arXiv 2505.16401) as one orchestrating stage, and the joint-training and
group-specialist baselines from the same recipe (``mode``).

DFC trains multi-turn game policies (TextArena games, :mod:`rlkit.envs`) in groups instead of all at once. No code
was released and the full text could not be read (``../shared/specs``: the abstract and one detailed review), so
the schedule below is the reviewed method with every unconfirmed choice made an option; ``docs/methods/dfc.md``
lists them. With groups G_1..G_K (given, or formed by the paper's heuristics from a base-model evaluation):

1. **divide**: a specialist pi_k = GRPO(start_k, G_k) per group, start_k the stage's model (``specialist_start:
   base``, default) or the model fused so far (``fused``: UNCONFIRMED either way);
2. theta_1 = pi_1; for k = 2..K: **fuse** fused_k = (1 - w) theta_{k-1} + w pi_k (``fuse_weight`` w = 1/2: the
   paper's theta_k = 1/2 (theta_{k-1} + theta_group)), then **conquer** theta_k = GRPO(fused_k, G_1 u .. u G_k),
   the games balanced or the new group's weighted up (``conquer_sampling``);
3. hand on theta_K.

``mode: joint`` runs one GRPO on all games for the same number of steps (K * divide_steps + (K - 1) *
conquer_steps, or ``joint_steps``): the paper's baseline. ``mode: specialists`` trains the group specialists only
and hands on no model (the pipeline keeps the stage's model).

Every sub-run is a normal ``grpo`` stage run through :func:`rlkit.pipeline.run_one` in its own folder
(``divide/group_k``, ``conquer/group_k``, ``joint``) with the stage's ``env`` restricted to its games; fused models
are written to ``fuse/group_k``. A sub-run whose manifest exists is skipped (a killed GRPO run resumes from its
last checkpoint), unless the model it started from was written after it finished (then it and what follows it run
again); ``state.json`` records the groups, their order and each phase's model and evaluation, so a restarted
recipe skips finished groups. Each phase's model is evaluated on its games with
:func:`rlkit.eval.games.evaluate_games` (``eval_episodes`` per game; 0: none), cached in ``<phase>/games_eval.json``;
``dfc_summary.json`` holds the figures.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from ..config import RecipeError
from . import register_method
from .base import DONE_MARKER, Method, StageOutput, StageState

AUTO_CRITERIA = ("wins", "players", "start")


@dataclass
class DFCConfig:
    """Settings of the ``dfc`` stage (recipe section ``args:``). The paper's status of each is in its docstring;
    UNCONFIRMED: the paper (as far as it could be read) does not say, this is rlkit's choice."""

    mode: Literal["dfc", "joint", "specialists"] = "dfc"
    """dfc: divide, fuse, conquer; joint: one GRPO on all games for the same total steps (the paper's baseline);
    specialists: the divide step only (one GRPO per group), hands on no model."""
    groups: list[list[str]] | Literal["auto"] = "auto"
    """The groups of games (TextArena ids), or ``auto``: grouped by the paper's heuristics (``auto_by``) from an
    evaluation of the stage's model on ``env.games``. The paper's own 18-game grouping is UNCONFIRMED."""
    auto_by: list[str] = field(default_factory=lambda: list(AUTO_CRITERIA))
    """What ``auto`` groups by, games agreeing on all of them forming a group: ``wins`` (the base model wins some
    evaluation episode, win rate > 0, or never), ``players`` (single- vs multi-player, ``rlkit.envs.games.
    num_players``), ``start`` (random vs fixed initial state, ``rlkit.envs.games.random_start``). The paper names
    these criteria (and "rules and difficulty"); how it combines them is UNCONFIRMED."""
    order: Literal["given", "easy_first"] = "given"
    """Order of the groups: as given (``auto``: by the first game of each group in ``env.games``), or
    ``easy_first``: by the base model's mean win rate over the group, highest first (UNCONFIRMED: a curriculum
    reading of the paper's "curriculum learning")."""
    fuse_weight: float = 0.5
    """w in fused_k = (1 - w) theta_{k-1} + w pi_k (paper: 1/2, a plain average)."""
    specialist_start: Literal["base", "fused"] = "base"
    """Where each specialist starts: the stage's model (base) or the model fused and conquered so far (fused).
    UNCONFIRMED; base keeps the specialists independent (they can be reused by ``mode: specialists``)."""
    conquer_sampling: Literal["balanced", "priority"] = "balanced"
    """How a conquer run samples its games: balanced (every game the same number of training rows) or priority
    (the newly added group's games get ``priority_weight`` times the rows, through ``env.game_weights``). The
    paper names "mixed priority sampling" without its form: UNCONFIRMED."""
    priority_weight: float = 2.0
    """Row weight of the newly added group's games under ``conquer_sampling: priority`` (UNCONFIRMED)."""
    divide_steps: int | None = None
    """``max_steps`` of each specialist's GRPO run (None: ``grpo.max_steps``). The paper's are UNCONFIRMED."""
    conquer_steps: int | None = None
    """``max_steps`` of each conquer GRPO run (None: ``grpo.max_steps``)."""
    joint_steps: int | None = None
    """``max_steps`` of the joint run (None: K * divide_steps + (K - 1) * conquer_steps, DFC's total)."""
    grpo: dict = field(default_factory=dict)
    """Trainer keys (TRL ``GRPOConfig`` fields) of every sub-GRPO run; ``max_steps`` here is the default of the
    step counts above."""
    eval_episodes: int = 32
    """Evaluation episodes per game of the base model and of each phase's model (0: no evaluation; ``auto``
    groups and ``easy_first`` need it)."""
    eval_temperature: float = 0.0
    """Sampling temperature of the evaluation (0: greedy)."""
    eval_opponent: str | None = None
    """Who the evaluation plays against (``random``, ``rule``, ``model:PATH``; None: ``env.opponent``). Set it when
    training uses ``self``-play: an evaluation against itself says little."""
    eval_seed_offset: int = 100_000
    """``env.seed_offset`` of the evaluation, so it plays initial states training never saw."""
    eval_fused: bool = False
    """Also evaluate each fused model (before its conquer run) on the union of its groups' games."""

    def __post_init__(self):
        if self.groups != "auto":
            if not self.groups or any(not g for g in self.groups):
                raise ValueError("groups must be `auto` or a non-empty list of non-empty lists of game ids")
            seen: dict[str, int] = {}
            for i, group in enumerate(self.groups):
                for game in group:
                    if game in seen:
                        raise ValueError(f"groups: {game!r} is in group {seen[game] + 1} and group {i + 1}; a game "
                                         "belongs to one group")
                    seen[game] = i
        if not self.auto_by or any(c not in AUTO_CRITERIA for c in self.auto_by) or \
                len(set(self.auto_by)) != len(self.auto_by):
            raise ValueError(f"auto_by must be a non-empty list of distinct criteria from {', '.join(AUTO_CRITERIA)}, "
                             f"got {self.auto_by}")
        if not 0.0 < self.fuse_weight < 1.0:
            raise ValueError(f"fuse_weight must be in (0, 1) (the paper's average: 0.5), got {self.fuse_weight}")
        if not self.priority_weight > 0:
            raise ValueError(f"priority_weight must be > 0, got {self.priority_weight}")
        for name in ("divide_steps", "conquer_steps", "joint_steps"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ValueError(f"{name} must be at least 1, got {v}")
        if "max_steps" in self.grpo and not (isinstance(self.grpo["max_steps"], int) and self.grpo["max_steps"] >= 1):
            raise ValueError(f"grpo.max_steps must be a positive integer, got {self.grpo['max_steps']!r}")
        for key in ("output_dir", "seed", "resume_from_checkpoint"):
            if key in self.grpo:
                raise ValueError(f"grpo.{key}: set by the stage for every sub-run (output_dir / seed of the stage; "
                                 "sub-runs always resume)")
        if self.eval_episodes < 0:
            raise ValueError(f"eval_episodes must be >= 0, got {self.eval_episodes}")
        if self.eval_opponent is not None:
            from ..envs.config import EnvConfig

            EnvConfig(opponent=self.eval_opponent)  # the same check as env.opponent
        if self.eval_temperature < 0:
            raise ValueError(f"eval_temperature must be >= 0, got {self.eval_temperature}")
        if self.eval_episodes == 0 and (self.groups == "auto" or self.order == "easy_first"):
            raise ValueError("groups: auto and order: easy_first use the base model's win rates: set eval_episodes "
                             ">= 1 (or give groups and order: given)")
        if self.divide_steps is None and "max_steps" not in self.grpo:
            raise ValueError("set divide_steps (or grpo.max_steps): the length of each specialist's GRPO run")
        if self.mode == "dfc" and self.conquer_steps is None and "max_steps" not in self.grpo:
            raise ValueError("set conquer_steps (or grpo.max_steps): the length of each conquer GRPO run")

    @property
    def steps(self) -> tuple[int, int]:
        """(divide steps, conquer steps)."""
        default = self.grpo.get("max_steps")
        return (self.divide_steps or default, self.conquer_steps or default or 0)

    def total_steps(self, k: int) -> int:
        """RL steps of the DFC schedule over k groups (the joint run's default length)."""
        divide, conquer = self.steps
        return self.joint_steps or k * divide + (k - 1) * conquer


# --------------------------------------------------------------------------------------------------
# Grouping and sub-runs


def group_label(game: str, criteria: list[str], base_eval: dict) -> str:
    """The ``auto`` group key of ``game``, e.g. ``wins+two_player+random_start``."""
    from ..envs.games import num_players, random_start

    parts = []
    for c in criteria:
        if c == "wins":
            parts.append("wins" if _win(base_eval, game) > 0 else "no_wins")
        elif c == "players":
            parts.append("single_player" if num_players(game) == 1 else "multi_player")
        else:
            parts.append("random_start" if random_start(game) else "fixed_start")
    return "+".join(parts)


def auto_groups(games: list[str], base_eval: dict, criteria: list[str]) -> tuple[list[list[str]], list[str]]:
    """``(groups, labels)``: the games that agree on every criterion form a group; groups in the order of their first
    game in ``games``, games in their order there."""
    by_label: dict[str, list[str]] = {}
    for game in games:
        by_label.setdefault(group_label(game, criteria, base_eval), []).append(game)
    return list(by_label.values()), list(by_label)


def _win(ev: dict | None, game: str) -> float:
    return float(((ev or {}).get("games") or {}).get(game, {}).get("win", 0.0))


def _mean_win(ev: dict | None, games: list[str]) -> float:
    return sum(_win(ev, g) for g in games) / len(games) if games else 0.0


def _sub(run, path: str, model: str, games: list[str], weights: dict, steps: int, grpo: dict):
    """A ``grpo`` sub-run of ``run`` in ``<output_dir>/<path>``: ``model`` on ``games`` for ``steps`` steps."""
    model_spec = dataclasses.replace(run.model, name=model, source=None)
    env = dataclasses.replace(run.env, games=list(games), game_weights={g: float(w) for g, w in weights.items()})
    return dataclasses.replace(run, name=f"{run.name}/{path}", method="grpo", output_dir=str(Path(run.output_dir) / path),
                               model=model_spec, env=env, trainer={**grpo, "max_steps": steps}, args={},
                               eval=dataclasses.replace(run.eval, enabled=False), model_named=True,
                               own_sections=("trainer",))


def _newer(model: str, than: Path) -> bool:
    """Whether the saved model ``model`` was written after the file ``than`` (so what ``than`` marks is stale)."""
    marker = Path(model) / DONE_MARKER
    return marker.is_file() and than.is_file() and marker.stat().st_mtime > than.stat().st_mtime


def _log(msg: str) -> None:
    print(f"[rlkit] dfc: {msg}", flush=True)


def evaluate_model(run, config: DFCConfig, model: str, games: list[str], out: Path) -> dict:
    """Win / draw / loss rates of ``model`` on ``games`` (``eval_episodes`` each, the stage's opponents and shaping,
    initial states shifted by ``eval_seed_offset``); every episode goes to ``out``."""
    import torch

    from ..eval.games import evaluate_games
    from ..models import load_model

    spec = dataclasses.replace(run.model, name=model, source=None, lora=None)
    lm, tokenizer = load_model(spec, seed=run.seed)
    if torch.cuda.is_available():
        lm = lm.to("cuda")
    lm.eval()
    env = dataclasses.replace(run.env, games=list(games), game_weights={}, seed_offset=config.eval_seed_offset,
                              opponent=config.eval_opponent or run.env.opponent)
    try:
        return evaluate_games(lm, tokenizer, env, config.eval_episodes, seed=run.seed,
                              temperature=config.eval_temperature, out=out, progress=True)
    finally:
        del lm


class _Runner(StageState):
    """Runs (or skips) the stage's sub-runs, fusions and evaluations, and keeps ``state.json``."""

    def __init__(self, run, config: DFCConfig):
        super().__init__(run.output_dir)
        self.run, self.config = run, config
        self.start = run.model.name
        self.fused: list[str] = []

    def grpo(self, path: str, model: str, games: list[str], weights: dict, steps: int) -> str:
        """The model of a GRPO sub-run (run now, resumed, or read back from its manifest)."""
        from ..pipeline import MANIFEST, read_manifest, run_one

        sub = _sub(self.run, path, model, games, weights, steps, self.config.grpo)
        manifest = read_manifest(sub.output_dir)
        if manifest is not None and manifest.get("model"):
            if not _newer(model, Path(sub.output_dir) / MANIFEST):
                self.skipped.append(path)
                _log(f"{path} already finished; skipping")
                return manifest["model"]
            _log(f"{path}: its start model {model} was written after it finished; running it again")
            shutil.rmtree(sub.output_dir)
        _log(f"{path}: GRPO from {model} on {', '.join(games)} for {steps} steps")
        self.ran.append(path)
        model_out = run_one(sub, resume=True)["manifest"]["model"]  # a killed run resumes from its checkpoint
        if not model_out:
            raise RecipeError(f"dfc: the sub-run {sub.output_dir} produced no model")
        return model_out

    def fuse(self, path: str, previous: str, specialist: str) -> str:
        from .fuse import fuse_models

        out = self.out / path
        marker = out / DONE_MARKER
        if marker.is_file() and not _newer(previous, marker) and not _newer(specialist, marker):
            _log(f"{path} already fused; skipping")
            return str(out)
        w = self.config.fuse_weight
        _log(f"{path}: fusing {previous} ({1 - w:g}) and {specialist} ({w:g})")
        self.fused.append(path)
        return fuse_models([previous, specialist], [1.0 - w, w], out)

    def evaluate(self, path: str, model: str, games: list[str]) -> dict | None:
        """Evaluation figures of ``model`` on ``games`` (cached in ``<path>/games_eval.json``; a cache of another
        model, other games or older than the model it names is measured again); None with ``eval_episodes: 0``."""
        n = self.config.eval_episodes
        if n == 0:
            return None
        opponent = self.config.eval_opponent or self.run.env.opponent
        f = self.out / path / "games_eval.json"
        if f.is_file():
            cached = json.loads(f.read_text())
            if cached.get("model") == model and cached.get("games_evaluated") == list(games) and \
                    cached.get("episodes") == n and cached.get("opponent") == opponent and not _newer(model, f):
                return cached
        f.parent.mkdir(parents=True, exist_ok=True)
        result = evaluate_model(self.run, self.config, model, list(games), self.out / path / "games_eval.jsonl")
        figures = {"model": model, "games_evaluated": list(games), "episodes": n, "opponent": opponent, **result}
        tmp = f.with_suffix(".tmp")
        tmp.write_text(json.dumps(figures, indent=2) + "\n")
        tmp.replace(f)
        _log(f"{path}: mean win {_mean_win(figures, games):.3f} over {', '.join(games)} ({n} episodes each)")
        return figures


def _weights(run, games: list[str], priority: list[str] | None = None, factor: float = 1.0) -> dict:
    """``env.game_weights`` for a sub-run on ``games``: the stage's own weights, times ``factor`` for ``priority``."""
    out = {g: float(run.env.game_weights.get(g, 1.0)) for g in games}
    for g in priority or []:
        out[g] *= factor
    return {g: w for g, w in out.items() if w != 1.0}


def _record(path: str, games: list[str], model: str | None, ev: dict | None, **extra) -> dict:
    rec = {"path": path, "games": list(games), "model": model, **extra}
    if ev is not None:
        rec["win"] = {g: _win(ev, g) for g in games}
        rec["mean_win"] = round(_mean_win(ev, games), 4)
    return rec


# --------------------------------------------------------------------------------------------------
# The schedule


def _all_games(run, config: DFCConfig) -> list[str]:
    if config.groups == "auto":
        return list(run.env.games)
    return [g for group in config.groups for g in group]


def run_dfc(run, config: DFCConfig) -> StageOutput:
    r = _Runner(run, config)
    st = r.state
    r.claim_mode(config.mode)
    t0 = time.time()
    games = _all_games(run, config)
    base = r.evaluate("base", r.start, games)
    if config.groups == "auto":
        groups, labels = auto_groups(games, base, config.auto_by)
    else:
        groups, labels = [list(g) for g in config.groups], [f"group_{i + 1}" for i in range(len(config.groups))]
    if config.order == "easy_first":
        ranked = sorted(range(len(groups)), key=lambda i: -_mean_win(base, groups[i]))  # stable: ties keep order
        groups, labels = [groups[i] for i in ranked], [labels[i] for i in ranked]
    if "groups" in st and st["groups"] != groups:
        raise RecipeError(f"{r.out} holds a run with groups {st['groups']}; this recipe gives {groups}: use another "
                          "output_dir (or delete that one)")
    st["groups"], st["labels"], st["order"] = groups, labels, config.order
    st["start"] = r.start
    if base is not None:
        st["base"] = _record("base", games, r.start, base)
    divide, conquer = config.steps
    k_groups = len(groups)
    st["steps"] = {"divide": divide, "conquer": conquer if config.mode == "dfc" else None,
                   "total": config.total_steps(k_groups) if config.mode != "specialists" else k_groups * divide}
    r.save()
    _log(f"mode {config.mode}, {k_groups} groups: " + "; ".join(f"{lab} = {', '.join(g)}" for lab, g in zip(labels, groups)))

    phases = st.setdefault("phases", {})
    specialists: dict[int, str] = {}

    def specialist(k: int, start: str) -> str:
        path = f"divide/group_{k}"
        model = r.grpo(path, start, groups[k - 1], _weights(run, groups[k - 1]), divide)
        phases[path] = _record(path, groups[k - 1], model, r.evaluate(path, model, groups[k - 1]), start=start,
                               label=labels[k - 1])
        r.save()
        specialists[k] = model
        return model

    final: str | None
    if config.mode == "joint":
        steps = config.total_steps(k_groups)
        model = r.grpo("joint", r.start, games, _weights(run, games), steps)
        phases["joint"] = _record("joint", games, model, r.evaluate("joint", model, games), start=r.start, steps=steps)
        final, final_path = model, "joint"
    elif config.mode == "specialists" or config.specialist_start == "base":
        for k in range(1, k_groups + 1):
            specialist(k, r.start)
        final, final_path = (None, None) if config.mode == "specialists" else (specialists[1], "divide/group_1")
    else:
        final, final_path = specialist(1, r.start), "divide/group_1"
    if config.mode == "dfc":
        for k in range(2, k_groups + 1):
            pi_k = specialists[k] if k in specialists else specialist(k, final)
            union = [g for group in groups[:k] for g in group]
            fpath = f"fuse/group_{k}"
            fused = r.fuse(fpath, final, pi_k)
            phases[fpath] = _record(fpath, union, fused, r.evaluate(fpath, fused, union) if config.eval_fused else None,
                                    inputs=[final, pi_k], weights=[1 - config.fuse_weight, config.fuse_weight])
            weights = _weights(run, union, groups[k - 1] if config.conquer_sampling == "priority" else None,
                               config.priority_weight)
            cpath = f"conquer/group_{k}"
            final = r.grpo(cpath, fused, union, weights, conquer)
            phases[cpath] = _record(cpath, union, final, r.evaluate(cpath, final, union), start=fused,
                                    game_weights=weights)
            final_path = cpath
            r.save()
    st["final"] = {"model": final, "phase": final_path}
    st["wall_seconds"] = round(time.time() - t0, 1)
    r.save()
    summary = _summary(st, config, games, groups)
    (r.out / "dfc_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    _log(f"done: {config.mode} hands on {final}; ran {len(r.ran)} GRPO sub-runs, skipped {len(r.skipped)}, fused "
         f"{len(r.fused)}" + (f"; mean win {summary['mean_win']:.3f}" if summary.get("mean_win") is not None else ""))
    return StageOutput(model=final, summary={"dfc": summary, "sub_runs_ran": len(r.ran),
                                              "sub_runs_skipped": len(r.skipped)})


def _summary(st: dict, config: DFCConfig, games: list[str], groups: list[list[str]]) -> dict:
    """Per-game win rates of the base, the specialists (each game by its group's) and the final model."""
    phases = st.get("phases", {})
    out = {"mode": config.mode, "groups": groups, "labels": st["labels"], "order": config.order,
           "fuse_weight": config.fuse_weight, "specialist_start": config.specialist_start,
           "conquer_sampling": config.conquer_sampling, "steps": st["steps"], "final": st["final"],
           "phases": list(phases.values()), "games": games}
    if "base" in st and "win" in st["base"]:
        out["win_base"] = st["base"]["win"]
    spec = {g: phases[f"divide/group_{k}"]["win"][g] for k, group in enumerate(groups, 1) for g in group
            if "win" in phases.get(f"divide/group_{k}", {})}
    if spec:
        out["win_specialists"] = spec
    final_phase = phases.get(st["final"].get("phase") or "")
    if final_phase and "win" in final_phase and set(final_phase["games"]) == set(games):
        out["win"] = final_phase["win"]
    elif config.mode == "specialists" and len(spec) == len(games):
        out["win"] = spec
    out["mean_win"] = round(sum(out["win"].values()) / len(games), 4) if "win" in out else None
    return out


# --------------------------------------------------------------------------------------------------
# The method


@register_method
class DFCMethod(Method):
    """``method: dfc`` (see the module docstring)."""

    name = "dfc"
    section = "args"
    loads_model = False
    rewards = "optional"
    config = DFCConfig

    def check(self, run, config: DFCConfig, where: str) -> None:
        from . import get_method

        prefix = where[: -len("args")] if where.endswith("args") else ""
        if config.groups == "auto":
            if not run.env.games:
                raise RecipeError(f"{prefix}env.games: groups: auto groups the stage's games; list them in env.games "
                                  "(or give args.groups)")
        elif run.env.games:
            listed, grouped = list(run.env.games), _all_games(run, config)
            missing = [g for g in listed if g not in grouped]
            extra = [g for g in grouped if g not in listed]
            if missing or extra:
                what = f"{missing[0]!r} is in env.games but in no group" if missing else \
                    f"{extra[0]!r} is in a group but not in env.games"
                raise RecipeError(f"{where}.groups: {what}; the groups must hold exactly env.games (or leave "
                                  "env.games empty)")
        games = _all_games(run, config)
        divide, conquer = config.steps
        grpo = get_method("grpo")
        # every sub-run is a grpo run on (some of) these games: its config (both step counts) and checks (games
        # offline, scripted opponents, vLLM settings, ...) apply here, before any model loads. The checks do not
        # depend on the step count, so they run once (each one makes every game and plays one)
        for label, steps in (("divide", divide), ("conquer", conquer or divide)):
            sub = _sub(run, f"check/{label}", run.model.name, games, {}, steps, config.grpo)
            sub_config = grpo.make_config(sub, f"{where}.grpo", device_checks=False)
        grpo.check(sub, sub_config, f"{where}.grpo")
        if config.eval_episodes and config.eval_opponent:
            from ..envs.episode import check_scripted_opponent

            try:  # the evaluation's scripted opponent must have a move list for every two-player game
                check_scripted_opponent(dataclasses.replace(run.env, games=games, opponent=config.eval_opponent))
            except ValueError as e:
                raise RecipeError(f"{where}.eval_opponent: {e}") from None

    def run(self, run, ctx) -> StageOutput:
        return run_dfc(run, self.make_config(run))
