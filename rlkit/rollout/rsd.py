"""Reward-guided speculative decoding (RSD; Liao et al., arXiv 2501.19324, ICML 2025; released code
``BaohaoLiao/RSD``, ``main_online.py``).

A small **draft** model proposes each reasoning step; a process reward model (any step scorer) scores it; the
step is kept when the reward passes a weighting rule, else it is discarded and the large **target** model
writes the step from the same prefix instead. Per problem, each round:

1. the draft generates one step from ``prompt + accepted text``; a step ends just after the first occurrence
   of the separator (default ``"\\n\\n"``, the paper's ``step_word``), which stays in the step text, or at EOS
   or a token limit. One ``generate`` call covers every live problem of the batch;
2. the scorer scores the problem's steps so far plus the draft step; the reward ``r`` is the score of the
   **last** step (``scorer.score_batch(prompts, steps_lists)`` when the scorer has it, else
   ``scorer.score(prompt, steps)[-1]``);
3. the step is accepted with probability ``omega(r)`` (:func:`weight`): binary ``1[r >= delta]`` (the paper's
   code and default, no randomness), constant ``p``, clipped ``min(1, max(0, r))``, sigmoidal
   ``max(0, r / (1 + r))``, logistic ``1 / (1 + exp(-alpha (r - delta)))``; a rejected step's tokens count as
   discarded and the target generates the step from the same prefix (one call for all rejected problems);
   the target's step is not re-scored (as released);
4. a problem ends when its step ended with EOS, when its solution reaches ``max_total_tokens`` tokens (or a
   step reaches ``max_step_tokens`` without a separator), or after ``max_steps`` steps.

The draft and the target exchange steps as text (they may have different tokenizers); each re-tokenises
``prompt + accepted text`` every round, as the released code's text prompts to vLLM servers do.

Cost accounting (the paper's FLOPs formula is not published; see ``docs/methods/rsd.md``): every model -- draft,
target and PRM -- counts the **tokens it processes**, as a server with a prefix cache (the paper serves each
model with vLLM and prefix caching) would: on each call a model prefills only the context tokens beyond the
longest common prefix with what it processed before for that problem (so a discarded draft step invalidates
the draft's cache beyond the prefix it was generated from), plus every token it generates. FLOPs = 2 x
parameters x tokens processed. Tokens generated past the end of a step (HF's stop-string check can overshoot by
a token; one batched call uses the largest remaining budget) are not counted: an engine that stops each
request exactly (vLLM) does not generate them.

:func:`step_decode` decodes with one model through the same step loop and the same counting (the draft-only
and target-only baselines); :func:`best_of_n_cost` counts best-of-N sampling plus PRM scoring the same way;
:func:`summarize` totals a list of results. See ``docs/methods/rsd.md``.
"""

from __future__ import annotations

import json
import math
import random
import struct
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

from ..config import ConfigError

WEIGHTINGS = ("binary", "constant", "clipped", "sigmoidal", "logistic")
ROLES = ("draft", "target", "prm")


# --------------------------------------------------------------------------------------------------
# Settings


@dataclass
class RSDSettings:
    """Settings of :func:`rsd_decode` (defaults: the released ``main_online.py`` and ``scripts/math_eval.sh``)."""

    threshold: float = 0.7
    """delta: the reward a draft step needs (binary weighting) or the centre of the logistic (paper: 0.7)."""
    weighting: str = "binary"
    """omega(r): ``binary`` 1[r >= delta] (the paper's code and its optimal rule), ``constant`` p, ``clipped``
    min(1, max(0, r)), ``sigmoidal`` max(0, r / (1 + r)), ``logistic`` 1 / (1 + exp(-alpha (r - delta))) (paper
    Table 1). Non-binary weights accept the draft step with probability omega(r) (the paper's code has binary
    only)."""
    constant_p: float = 0.5
    """p of the ``constant`` weighting (the paper gives no value; 0.5 is rlkit's choice)."""
    logistic_alpha: float = 10.0
    """alpha of the ``logistic`` weighting (the paper gives no value; 10 is rlkit's choice)."""
    step_separator: str = "\n\n"
    """The string that ends a step, kept in the step text (the paper's ``step_word``, ``"\\n\\n"``)."""
    max_step_tokens: int = 4096
    """Tokens one step may take; a step that reaches it without a separator ends the problem (the released
    code's ``max_tokens`` per call)."""
    max_total_tokens: int = 4096
    """Tokens a solution may take (the steps' tokens, each counted in the tokenizer of the model that wrote it);
    reaching it ends the problem (paper: 4096)."""
    max_steps: int = 100
    """Steps at most per problem (paper: 100)."""
    draft_temperature: float = 0.0
    """Draft sampling temperature; 0 is greedy (the paper's code)."""
    target_temperature: float = 0.0
    """Target sampling temperature; 0 is greedy (the paper's code)."""
    top_p: float = 1.0
    """Nucleus filtering when a temperature is above 0 (paper: 1)."""
    seed: int | None = 0
    """Seeds the acceptance draws of non-binary weightings (one stream per problem, so batching does not
    change them) and the sampling of both models; None: not seeded."""
    batch_size: int | None = None
    """Problems decoded together (one draft and at most one target ``generate`` call per round for all of
    them); None: all at once."""
    backend: str = "hf"
    """``hf`` (transformers generate) or ``vllm`` (each model loads by its path)."""
    vllm: Any = None
    """An ``rlkit.rollout.VLLMSettings`` for the vLLM backend (None: the defaults; on a GPU both engines then
    get ``gpu_memory_utilization`` 0.35 so that they fit side by side)."""

    def __post_init__(self) -> None:
        if self.weighting not in WEIGHTINGS:
            raise ConfigError(f"rsd: unknown weighting {self.weighting!r}; use one of {', '.join(WEIGHTINGS)}")
        if not isinstance(self.threshold, (int, float)) or math.isnan(self.threshold):
            raise ConfigError(f"rsd: threshold must be a number, got {self.threshold!r}")
        if not 0.0 <= self.constant_p <= 1.0:
            raise ConfigError(f"rsd: constant_p is a probability, in [0, 1]; got {self.constant_p}")
        if not self.logistic_alpha > 0:
            raise ConfigError(f"rsd: logistic_alpha must be > 0, got {self.logistic_alpha}")
        if not isinstance(self.step_separator, str) or not self.step_separator:
            raise ConfigError("rsd: step_separator must be a non-empty string, e.g. '\\n\\n'")
        for name in ("max_step_tokens", "max_total_tokens", "max_steps"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"rsd: {name} must be at least 1, got {getattr(self, name)}")
        if self.batch_size is not None and int(self.batch_size) < 1:
            raise ConfigError(f"rsd: batch_size must be at least 1 (or unset), got {self.batch_size}")
        for name in ("draft_temperature", "target_temperature"):
            if getattr(self, name) < 0:
                raise ConfigError(f"rsd: {name} must be >= 0 (0 is greedy), got {getattr(self, name)}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"rsd: top_p must be in (0, 1], got {self.top_p}")
        if self.backend not in ("hf", "vllm"):
            raise ConfigError(f"rsd: unknown backend {self.backend!r}; use 'hf' or 'vllm'")


def parse_separator(value: str) -> str:
    """A step separator typed on a command line: backslash escapes are read (``"\\n\\n"`` is two newlines)."""
    import codecs

    try:
        sep = codecs.decode(value, "unicode_escape") if "\\" in value else value
    except UnicodeDecodeError:
        raise ConfigError(f"rsd: step separator {value!r} has a bad backslash escape") from None
    if not sep:
        raise ConfigError("rsd: the step separator cannot be empty")
    return sep


def weight(reward: float, settings: RSDSettings) -> float:
    """omega(r) of ``settings.weighting`` (see :class:`RSDSettings`), in [0, 1]. A NaN reward weighs 0.

    ``sigmoidal`` is ``max(0, r / (1 + r))`` on ``r > -1`` and 0 below (where the formula has a pole)."""
    r = float(reward)
    if math.isnan(r):
        return 0.0
    kind = settings.weighting
    if kind == "binary":
        return 1.0 if r >= settings.threshold else 0.0
    if kind == "constant":
        return float(settings.constant_p)
    if kind == "clipped":
        return min(1.0, max(0.0, r))
    if kind == "sigmoidal":
        return max(0.0, r / (1.0 + r)) if r > 0 else 0.0
    z = settings.logistic_alpha * (r - settings.threshold)
    return 1.0 / (1.0 + math.exp(-z)) if z >= 0 else math.exp(z) / (1.0 + math.exp(z))


# --------------------------------------------------------------------------------------------------
# Models and parameter counts


@dataclass
class DecodingModel:
    """A model the decoder generates with: an HF causal LM (None for the vLLM backend), its tokenizer, the
    path vLLM loads it from (default ``model.name_or_path``) and its parameter count (None: counted, from the
    HF model or the checkpoint's safetensors headers)."""

    model: Any
    tokenizer: Any
    path: str | None = None
    parameters: int | None = None

    def resolved_path(self) -> str | None:
        return self.path or getattr(self.model, "name_or_path", None)

    def num_parameters(self) -> int:
        if self.parameters is not None:
            return int(self.parameters)
        counted = count_parameters(self.model)
        if counted is not None:
            return counted
        path = self.resolved_path()
        if path is None:
            raise ConfigError("rsd: a model given without weights needs a path (or an explicit parameter count)")
        return safetensors_parameters(path)


def _as_model(x: Any) -> DecodingModel:
    if isinstance(x, DecodingModel):
        return x
    if isinstance(x, (tuple, list)) and len(x) == 2:
        return DecodingModel(x[0], x[1])
    raise TypeError(f"expected a DecodingModel or a (model, tokenizer) pair, got {type(x).__name__}")


def count_parameters(obj: Any) -> int | None:
    """Parameters of a model object: ``obj.num_parameters()`` (HF models, ``ProcessRewardModel``), else the
    unique parameters of a torch module (``ValueModel``), else None."""
    if obj is None:
        return None
    if hasattr(obj, "num_parameters"):
        return int(obj.num_parameters())
    params = getattr(obj, "parameters", None)
    if callable(params):
        seen: dict[int, int] = {}
        for p in params():
            seen[id(p)] = p.numel()
        return sum(seen.values())
    return None


def safetensors_parameters(path: str | Path) -> int:
    """Parameters stored in a checkpoint, read from the safetensors headers alone (no weights load): a folder's
    ``model.safetensors`` or the shards its ``model.safetensors.index.json`` lists, or one ``.safetensors`` file.
    Tied weights stored once count once (as ``num_parameters()`` does)."""
    from ..models import BUILTIN_MODELS, ModelError, builtin_path

    p = Path(builtin_path(str(path))) if str(path) in BUILTIN_MODELS else Path(path)
    if p.is_dir():
        index = p / "model.safetensors.index.json"
        if index.is_file():
            files = sorted({p / f for f in json.loads(index.read_text())["weight_map"].values()})
        else:
            files = sorted(p.glob("model*.safetensors"))
    else:
        files = [p] if p.suffix == ".safetensors" and p.is_file() else []
    if not files:
        raise ModelError(f"no safetensors weights found at {path} to count parameters from; give the parameter "
                         "count explicitly")
    total = 0
    for f in files:
        with open(f, "rb") as fh:
            (size,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(size))
        for name, info in header.items():
            if name != "__metadata__":
                total += math.prod(info["shape"])
    return total


# --------------------------------------------------------------------------------------------------
# Results and cost counting


@dataclass
class ModelCost:
    """What one model processed for one problem (or in total)."""

    parameters: int | None = None
    calls: int = 0
    """Sequences it was run on (a generation or a scoring of one sequence)."""
    prefill_tokens: int = 0
    """Context tokens it processed (beyond the prefix it had processed before)."""
    generated_tokens: int = 0
    """Tokens it generated (0 for the PRM)."""

    @property
    def tokens_processed(self) -> int:
        return self.prefill_tokens + self.generated_tokens

    @property
    def flops(self) -> float | None:
        """2 x parameters x tokens processed (None when the parameter count is unknown)."""
        return None if self.parameters is None else 2.0 * self.parameters * self.tokens_processed

    def to_dict(self) -> dict:
        return {"parameters": self.parameters, "calls": self.calls, "prefill_tokens": self.prefill_tokens,
                "generated_tokens": self.generated_tokens, "tokens_processed": self.tokens_processed,
                "flops": self.flops}


@dataclass
class RSDResult:
    """One problem's RSD decode."""

    text: str
    """The solution (its steps joined)."""
    steps: list[str]
    sources: list[str]
    """Per step: ``draft`` (an accepted draft step) or ``target``."""
    scores: list[float | None]
    """Per step: the reward of the draft step proposed there (for a ``target`` step, of the discarded draft
    step it replaced); None where nothing was scored (single-model decoding)."""
    finish_reason: str
    """``eos``, ``length`` (a token limit) or ``steps`` (``max_steps`` reached)."""
    draft_accepted_tokens: int = 0
    draft_discarded_tokens: int = 0
    target_tokens: int = 0
    prm_calls: int = 0
    models: dict[str, ModelCost] = field(default_factory=dict)
    """``draft``, ``target``, ``prm`` (those that ran): parameters, tokens processed, FLOPs."""
    trace: list[dict] = field(default_factory=list)
    """Per step: ``{"source", "reward", "weight", "tokens", "draft_tokens", "discarded"}`` (``discarded``: the
    rejected draft step's text, or None)."""

    @property
    def draft_tokens(self) -> int:
        return self.draft_accepted_tokens + self.draft_discarded_tokens

    @property
    def acceptance_rate(self) -> float | None:
        """Accepted draft tokens / all draft tokens (None when the draft generated nothing)."""
        return self.draft_accepted_tokens / self.draft_tokens if self.draft_tokens else None

    @property
    def tokens(self) -> int:
        """Tokens of the solution (accepted draft + target)."""
        return self.draft_accepted_tokens + self.target_tokens

    @property
    def flops(self) -> float | None:
        """All models' FLOPs (None when a model's parameter count is unknown)."""
        values = [c.flops for c in self.models.values()]
        return None if any(v is None for v in values) else float(sum(values))

    def to_dict(self) -> dict:
        out = {k: v for k, v in asdict(self).items() if k != "models"}
        out.update(models={k: c.to_dict() for k, c in self.models.items()}, draft_tokens=self.draft_tokens,
                   acceptance_rate=self.acceptance_rate, tokens=self.tokens, flops=self.flops)
        return out


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    k = 0
    while k < n and a[k] == b[k]:
        k += 1
    return k


class _PrefixCache:
    """The token ids a model processed last for one problem: a new context costs the tokens beyond the longest
    common prefix with them. (Within the step loop a context only grows by accepted steps, so the last
    sequence always holds the longest match; older branches need not be kept.)"""

    def __init__(self) -> None:
        self.ids: list[int] = []

    def new_tokens(self, context: list[int]) -> int:
        return len(context) - _common_prefix(self.ids, context)


def summarize(results: Sequence[RSDResult]) -> dict:
    """Totals over problems: token counters, the acceptance rate (accepted / all draft tokens, pooled), PRM
    calls, and per model the parameters, tokens processed and FLOPs, plus means per problem."""
    n = max(1, len(results))
    accepted = sum(r.draft_accepted_tokens for r in results)
    discarded = sum(r.draft_discarded_tokens for r in results)
    out: dict[str, Any] = {
        "draft_accepted_tokens": accepted, "draft_discarded_tokens": discarded,
        "target_tokens": sum(r.target_tokens for r in results), "prm_calls": sum(r.prm_calls for r in results),
        "acceptance_rate": accepted / (accepted + discarded) if accepted + discarded else None,
        "steps": sum(len(r.steps) for r in results),
        "draft_steps": sum(s == "draft" for r in results for s in r.sources),
        "target_steps": sum(s == "target" for r in results for s in r.sources),
        "finish_reasons": {k: sum(r.finish_reason == k for r in results) for k in ("eos", "length", "steps")},
    }
    models: dict[str, dict] = {}
    for role in ROLES:
        costs = [r.models[role] for r in results if role in r.models]
        if not costs:
            continue
        total = ModelCost(parameters=costs[0].parameters, calls=sum(c.calls for c in costs),
                          prefill_tokens=sum(c.prefill_tokens for c in costs),
                          generated_tokens=sum(c.generated_tokens for c in costs))
        models[role] = total.to_dict()
    out["models"] = models
    flops = [m["flops"] for m in models.values()]
    out["flops"] = None if any(f is None for f in flops) else float(sum(flops))
    out["mean_flops"] = None if out["flops"] is None else out["flops"] / n
    out["mean_tokens"] = sum(r.tokens for r in results) / n
    return out


def best_of_n_cost(prompt_ids: Sequence[int], completion_ids: Sequence[Sequence[int]], parameters: int,
                   prm_prompt_ids: Sequence[int] | None = None,
                   prm_completion_ids: Sequence[Sequence[int]] | None = None,
                   prm_parameters: int | None = None) -> dict:
    """Tokens processed and FLOPs of best-of-N for one problem, counted as :func:`rsd_decode` counts: the policy
    prefills the prompt once (the N samples share it, as ``n=N`` requests to a prefix-cached engine do) and
    generates every sample's tokens; the PRM (when ``prm_prompt_ids`` is given, in its own tokenizer) processes
    the prompt once and every candidate's completion tokens. Returns ``{"models": {"policy": ..., "prm": ...},
    "flops"}`` with :class:`ModelCost` dicts (the policy under ``policy``; FLOPs = 2 x parameters x tokens)."""
    policy = ModelCost(parameters=int(parameters), calls=len(completion_ids), prefill_tokens=len(prompt_ids),
                       generated_tokens=sum(len(c) for c in completion_ids))
    models = {"policy": policy}
    if prm_prompt_ids is not None:
        if prm_completion_ids is None or len(prm_completion_ids) != len(completion_ids):
            raise ValueError("best_of_n_cost: give the PRM's ids of every completion (prm_completion_ids)")
        models["prm"] = ModelCost(parameters=None if prm_parameters is None else int(prm_parameters),
                                  calls=len(prm_completion_ids),
                                  prefill_tokens=len(prm_prompt_ids) + sum(len(c) for c in prm_completion_ids))
    flops = [m.flops for m in models.values()]
    return {"models": {k: m.to_dict() for k, m in models.items()},
            "flops": None if any(f is None for f in flops) else float(sum(flops))}


# --------------------------------------------------------------------------------------------------
# Scoring


def scorer_ids(scorer: Any, prompt: str, steps: list[str]) -> list[int] | None:
    """The token ids the scorer reads for ``prompt`` + ``steps``: ``scorer.encode(prompt, steps)`` when it has
    one (``ValueModel``: the ids; ``ProcessRewardModel``: ids and tag positions, the ids taken), else the prompt
    and each step encoded with ``scorer.tokenizer`` (special tokens for the prompt only); None for a scorer
    without a tokenizer (its tokens are not counted)."""
    if hasattr(scorer, "encode"):
        encoded = scorer.encode(prompt, steps)
        if isinstance(encoded, tuple):
            encoded = encoded[0]
        return list(encoded)
    tok = getattr(scorer, "tokenizer", None)
    if tok is None:
        return None
    from ..value import encode_completion, encode_prompt

    return encode_prompt(tok, prompt) + encode_completion(tok, steps)


def last_step_scores(scorer: Any, prompts: list[str], steps_lists: list[list[str]]) -> list[float]:
    """The score of each solution's **last** step: ``scorer.score_batch(prompts, steps_lists)`` when the scorer
    has it; for a value model (``encode`` + ``score_ids``) the value after the last step directly (equal to
    ``score(prompt, steps)[-1]`` without scoring every prefix); else ``scorer.score(prompt, steps)[-1]``."""
    import torch

    if not prompts:
        return []
    with torch.no_grad():
        if hasattr(scorer, "score_batch"):
            rows = scorer.score_batch(list(prompts), [list(s) for s in steps_lists])
            if len(rows) != len(prompts):
                raise ValueError(f"the scorer returned {len(rows)} score lists for {len(prompts)} solutions")
            return [float(r[-1]) for r in rows]
        if hasattr(scorer, "score_ids") and hasattr(scorer, "encode"):
            return [float(v) for v in scorer.score_ids([scorer.encode(p, s) for p, s in zip(prompts, steps_lists)])]
        if hasattr(scorer, "score"):
            return [float(scorer.score(p, s)[-1]) for p, s in zip(prompts, steps_lists)]
    raise TypeError(f"{type(scorer).__name__} is not a step scorer: it has neither score_batch nor score")


# --------------------------------------------------------------------------------------------------
# The step loop


@dataclass
class _State:
    index: int
    steps: list[str] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)
    scores: list[float | None] = field(default_factory=list)
    trace: list[dict] = field(default_factory=list)
    tokens: int = 0
    finish: str | None = None
    accepted: int = 0
    discarded: int = 0
    target_tokens: int = 0
    prm_calls: int = 0
    caches: dict[str, _PrefixCache] = field(default_factory=dict)
    costs: dict[str, ModelCost] = field(default_factory=dict)

    @property
    def text(self) -> str:
        return "".join(self.steps)


def _eos_ids(model: Any, tokenizer: Any) -> set[int]:
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    return set(eos if isinstance(eos, (list, tuple)) else [eos]) - {None}


class _Slot:
    """A generating model in the loop: its role, generation settings and bookkeeping helpers."""

    def __init__(self, role: str, lm: DecodingModel, settings: RSDSettings, temperature: float):
        self.role, self.lm, self.settings, self.temperature = role, lm, settings, temperature
        self.eos = _eos_ids(lm.model, lm.tokenizer)
        self.parameters = lm.num_parameters()

    def context_ids(self, text: str) -> list[int]:
        from ..value import encode_prompt

        return encode_prompt(self.lm.tokenizer, text)

    def generate(self, contexts: list[str], limits: list[int], seed: int | None) -> list[tuple]:
        """One step for each context: ``(text, tokens, finish, ids)`` (see :func:`parse_step`)."""
        from .generation import GenerationSettings, generate
        from .search import parse_step

        s = self.settings
        gen = GenerationSettings(max_new_tokens=max(limits), batch_size=len(contexts),
                                 temperature=self.temperature or 1.0, top_p=s.top_p, top_k=0,
                                 stop=[s.step_separator], seed=seed, backend=s.backend, vllm=s.vllm)
        outs = generate(self.lm.model, self.lm.tokenizer, contexts, gen, num_samples=1,
                        do_sample=self.temperature > 0, progress=False, model_path=self.lm.resolved_path())
        steps = []
        for (comp,), limit in zip(outs, limits):
            text, n, finish = parse_step(comp.token_ids, self.lm.tokenizer, [s.step_separator], self.eos, limit)
            if finish is None and s.step_separator not in text:
                # generation ended without a separator the text shows: an end-of-sequence id the tokenizer does
                # not list as EOS (vLLM stops on the generation config's ids), or a budget cut
                finish = "eos" if comp.finish_reason == "stop" and n < limit else "length"
            steps.append((text, n, finish, list(comp.token_ids[:n])))
        return steps

    def account(self, state: _State, context: str, ids: list[int]) -> None:
        """Count a generation from ``context`` that produced ``ids`` (prefix-cache semantics)."""
        cache = state.caches.setdefault(self.role, _PrefixCache())
        cost = state.costs.setdefault(self.role, ModelCost(parameters=self.parameters))
        ctx = self.context_ids(context)
        cost.prefill_tokens += cache.new_tokens(ctx)
        cost.generated_tokens += len(ids)
        cost.calls += 1
        cache.ids = ctx + ids


def _call_seed(seed: int | None, rnd: int, role: str) -> int | None:
    return None if seed is None else (int(seed) * 1_000_003 + 2 * rnd + (role == "target")) % (2 ** 31)


def _decode_batch(states: list[_State], prompts: list[str], scorer_prompts: list[str], draft: _Slot | None,
                  target: _Slot | None, scorer: Any, scorer_parameters: int | None, settings: RSDSettings,
                  rngs: list[random.Random]) -> None:
    s = settings
    for rnd in range(s.max_steps):
        live = [k for k, st in enumerate(states) if st.finish is None]
        if not live:
            break
        limits = {k: min(s.max_step_tokens, s.max_total_tokens - states[k].tokens) for k in live}
        contexts = {k: prompts[k] + states[k].text for k in live}
        chosen: dict[int, tuple[str, str, int, str | None, float | None, float | None, int, str | None]] = {}
        rejected = list(live)
        if draft is not None:
            outs = draft.generate([contexts[k] for k in live], [limits[k] for k in live],
                                  _call_seed(s.seed, rnd, "draft"))
            for k, (_, _, _, ids) in zip(live, outs):
                draft.account(states[k], contexts[k], ids)
            if target is None:  # the draft alone: every step kept
                for k, (text, n, finish, _) in zip(live, outs):
                    chosen[k] = ("draft", text, n, finish, None, None, n, None)
                rejected = []
            else:
                steps_lists = [states[k].steps + [outs[j][0]] for j, k in enumerate(live)]
                rewards = last_step_scores(scorer, [scorer_prompts[k] for k in live], steps_lists)
                rejected = []
                for j, k in enumerate(live):
                    st = states[k]
                    st.prm_calls += 1
                    cost = st.costs.setdefault("prm", ModelCost(parameters=scorer_parameters))
                    cost.calls += 1
                    ids = scorer_ids(scorer, scorer_prompts[k], steps_lists[j])
                    if ids is not None:
                        cache = st.caches.setdefault("prm", _PrefixCache())
                        cost.prefill_tokens += cache.new_tokens(ids)
                        cache.ids = ids
                    text, n, finish, _ = outs[j]
                    w = weight(rewards[j], s)
                    u = rngs[k].random()
                    if u < w:
                        chosen[k] = ("draft", text, n, finish, rewards[j], w, n, None)
                    else:
                        st.discarded += n
                        chosen[k] = ("target", "", 0, None, rewards[j], w, n, text)
                        rejected.append(k)
        if rejected and target is not None:
            outs = target.generate([contexts[k] for k in rejected], [limits[k] for k in rejected],
                                   _call_seed(s.seed, rnd, "target"))
            for k, (text, n, finish, ids) in zip(rejected, outs):
                target.account(states[k], contexts[k], ids)
                _, _, _, _, reward, w, n_draft, discarded = chosen.get(k, (None,) * 4 + (None, None, 0, None))
                chosen[k] = ("target", text, n, finish, reward, w, n_draft, discarded)
        for k in live:
            st = states[k]
            source, text, n, finish, reward, w, n_draft, discarded = chosen[k]
            st.steps.append(text)
            st.sources.append(source)
            st.scores.append(reward)
            st.trace.append({"source": source, "reward": reward, "weight": w, "tokens": n,
                             "draft_tokens": n_draft if draft is not None else 0, "discarded": discarded})
            if source == "draft":
                st.accepted += n
            else:
                st.target_tokens += n
            st.tokens += n
            if finish is not None:
                st.finish = finish
            elif st.tokens >= s.max_total_tokens:
                st.finish = "length"
            elif len(st.steps) >= s.max_steps:
                st.finish = "steps"


def _run(draft: Any, target: Any, scorer: Any, prompts: Sequence[str], settings: RSDSettings | None,
         scorer_prompts: Sequence[str] | None, scorer_parameters: int | None, progress: bool,
         desc: str) -> list[RSDResult]:
    from tqdm.auto import tqdm

    settings = settings or RSDSettings()
    prompts = list(prompts)
    scorer_prompts = list(scorer_prompts) if scorer_prompts is not None else prompts
    if len(scorer_prompts) != len(prompts):
        raise ValueError(f"rsd: {len(scorer_prompts)} scorer prompts for {len(prompts)} prompts")
    if scorer is not None and not any(hasattr(scorer, a) for a in ("score_batch", "score")):
        raise TypeError(f"{type(scorer).__name__} is not a step scorer: it has neither score_batch nor score")
    if settings.backend == "vllm" and draft is not None and target is not None:
        settings = _two_engine_settings(settings)
    slots = {}
    for role, lm, temp in (("draft", draft, settings.draft_temperature),
                           ("target", target, settings.target_temperature)):
        if lm is not None:
            lm = _as_model(lm)
            if settings.backend == "hf" and lm.model is None:
                raise ConfigError(f"rsd: the {role} model has no weights loaded; the hf backend needs the model")
            if settings.backend == "vllm" and lm.resolved_path() is None:
                raise ConfigError(f"rsd: the vLLM backend loads the {role} model by path; give DecodingModel.path")
            slots[role] = _Slot(role, lm, settings, temp)
    if scorer is not None and scorer_parameters is None:
        scorer_parameters = count_parameters(scorer)
        if scorer_parameters is None:  # a wrapper around a model (e.g. a scorer holding ``.model``)
            scorer_parameters = count_parameters(getattr(scorer, "model", None))
    size = settings.batch_size or max(1, len(prompts))
    results: list[RSDResult] = []
    bar = tqdm(total=len(prompts), desc=desc, unit="problem", disable=not progress)
    try:
        for start in range(0, len(prompts), size):
            idx = list(range(start, min(len(prompts), start + size)))
            states = [_State(i) for i in idx]
            rngs = [random.Random(None if settings.seed is None else int(settings.seed) * 1_000_003 + i)
                    for i in idx]
            _decode_batch(states, [prompts[i] for i in idx], [scorer_prompts[i] for i in idx],
                          slots.get("draft"), slots.get("target"), scorer if len(slots) == 2 else None,
                          scorer_parameters, settings, rngs)
            for st in states:
                models = {role: st.costs.get(role, ModelCost(parameters=slot.parameters))
                          for role, slot in slots.items()}
                if len(slots) == 2:
                    models["prm"] = st.costs.get("prm", ModelCost(parameters=scorer_parameters))
                results.append(RSDResult(
                    text=st.text, steps=list(st.steps), sources=list(st.sources), scores=list(st.scores),
                    finish_reason=st.finish or "steps", draft_accepted_tokens=st.accepted,
                    draft_discarded_tokens=st.discarded, target_tokens=st.target_tokens,
                    prm_calls=st.prm_calls, models=models, trace=st.trace))
            bar.update(len(idx))
            done = [r for r in results if r.draft_tokens]
            if done:
                acc = sum(r.draft_accepted_tokens for r in done) / sum(r.draft_tokens for r in done)
                bar.set_postfix(acceptance=f"{acc:.2f}", refresh=False)
    finally:
        bar.close()
    return results


def _two_engine_settings(settings: RSDSettings) -> RSDSettings:
    """On a GPU, two vLLM engines in one process need a memory share each (vLLM's default takes 90%)."""
    import dataclasses

    from .settings import VLLMSettings
    from .vllm import platform

    vllm = settings.vllm or VLLMSettings()
    if vllm.gpu_memory_utilization is None and platform() == "cuda":
        vllm = dataclasses.replace(vllm, gpu_memory_utilization=0.35)
    return dataclasses.replace(settings, vllm=vllm)


def rsd_decode(draft: Any, target: Any, scorer: Any, prompts: Sequence[str], settings: RSDSettings | None = None,
               scorer_prompts: Sequence[str] | None = None, scorer_parameters: int | None = None,
               progress: bool = True) -> list[RSDResult]:
    """Reward-guided speculative decoding of each rendered prompt (see the module docstring).

    ``draft`` and ``target``: :class:`DecodingModel` (or ``(model, tokenizer)`` pairs for the HF backend; for
    vLLM the model may be None and the path is loaded). ``scorer``: a step scorer (``score_batch(prompts,
    steps_lists)`` or ``score(prompt, steps)``; a ``ProcessRewardModel``, a ``ValueModel``, a
    ``FunctionScorer``). ``scorer_prompts``: what the scorer sees as each problem's prompt (default: the
    rendered prompts). ``scorer_parameters``: the PRM's parameter count for FLOPs (default: counted from the
    scorer's model; unknown for a model-free scorer, whose FLOPs are then None)."""
    return _run(draft, target, scorer, prompts, settings, scorer_prompts, scorer_parameters, progress, "rsd")


def step_decode(model: Any, prompts: Sequence[str], settings: RSDSettings | None = None, role: str = "target",
                progress: bool = True) -> list[RSDResult]:
    """Decode with one model through the RSD step loop and its counting (no scorer): the draft-only
    (``role="draft"``: every step counts as an accepted draft step) and target-only (``role="target"``)
    baselines. With greedy settings the text is the model's plain greedy output when re-tokenising the text
    reproduces the generated ids (always for character-level tokenizers)."""
    if role not in ("draft", "target"):
        raise ValueError(f"step_decode: role must be 'draft' or 'target', got {role!r}")
    pair = {"draft": model if role == "draft" else None, "target": model if role == "target" else None}
    return _run(pair["draft"], pair["target"], None, prompts, settings, None, None, progress, f"{role} only")
