"""Value-guided step-level beam search (OREO's test-time search, arXiv 2412.16145 §4.4), for any step scorer.

The search keeps ``beams`` partial solutions per problem. It starts from one beam, the prompt with an empty
solution. Each round:

1. every live beam is expanded with ``expansions`` sampled continuations of **one step**. A step ends at the
   first stop string (``"\\n"`` for GSM8K-style solutions, ``"\\n"``, ``". "``, ``".$ "`` for MATH:
   :func:`step_stops`), and the stop string stays in the step text. One HF ``generate`` call covers all live
   beams of all problems of a batch (``num_return_sequences = expansions``);
2. a candidate whose generation ended with EOS, or that reached ``max_step_tokens`` for the step or
   ``max_total_tokens`` for the whole solution, is **finished** and goes to the answer pool;
3. every candidate is scored by the scorer's value at its last token: ``scorer.score_texts(prompts,
   partial_solutions)`` when the scorer has it (a :class:`rlkit.value.ValueModel`, :class:`FunctionScorer`),
   else the last prefix score of the step-scorer protocol ``scorer.score(prompt, steps)[-1]`` (a PRM);
4. the ``beams`` best unfinished candidates are kept (ties: proposal order, beam-major), the rest dropped.

The search stops after ``max_rounds`` rounds or when no beam is live; beams still live then join the pool.
The result is the pool item with the highest score (ties: the one that entered the pool first).

Where a step ends is read from the generated text, not from ``generate``'s stopping criterion (which can
overshoot the stop string by a token): the generated ids are decoded and cut just after the stop string
occurrence that ends first. The next round re-tokenises ``prompt + partial solution`` from text (as the
released code does with vLLM text prompts).

With a constant scorer every candidate ties, so the kept beams are the first unfinished candidates in
proposal order and the result is the first candidate to finish; with ``beams = expansions = 1`` the search is
plain step-by-step sampling with the same random stream. See ``docs/methods/value_search.md``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from ..config import ConfigError

STEP_STOPS: dict[str, list[str]] = {"gsm8k": ["\n"], "math": ["\n", ". ", ".$ "]}
"""The paper's step stop strings (App. A.2): one line per step for GSM8K, lines and sentences for MATH."""


def step_stops(name: str) -> list[str]:
    """The stop strings of a preset: ``gsm8k`` (``["\\n"]``) or ``math`` (``["\\n", ". ", ".$ "]``)."""
    try:
        return list(STEP_STOPS[name])
    except KeyError:
        raise ConfigError(f"unknown step-stop preset {name!r}; use one of {', '.join(STEP_STOPS)} "
                          "or give the stop strings") from None


def parse_step_stops(values: Sequence[str] | str | None, benchmark: str | None = None) -> list[str]:
    """Stop strings from CLI-style values: a preset name (``gsm8k``, ``math``) expands to its strings, anything
    else is a literal with backslash escapes read (``"\\n"`` typed in a shell is a newline). None or empty:
    the ``math`` preset for MATH-style benchmarks (``math*``, ``aime*``, ``amc*``), else ``gsm8k``."""
    import codecs

    if isinstance(values, str):
        values = [values]
    if not values:
        name = (benchmark or "").lower()
        return step_stops("math" if name.startswith(("math", "aime", "amc")) else "gsm8k")
    out: list[str] = []
    for v in values:
        if v in STEP_STOPS:
            out.extend(STEP_STOPS[v])
        else:
            try:
                lit = codecs.decode(v, "unicode_escape") if "\\" in v else v
            except UnicodeDecodeError:
                raise ConfigError(f"step stop {v!r} has a bad backslash escape") from None
            if not lit:
                raise ConfigError("a step stop string cannot be empty")
            out.append(lit)
    return list(dict.fromkeys(out))


@dataclass
class SearchSettings:
    """Settings of :func:`value_guided_search` (defaults: the released ``batch_sbs_qwen.py``)."""

    beams: int = 3
    """B: partial solutions kept per problem after each round."""
    expansions: int | None = None
    """Samples of one step per live beam each round (None: ``beams``, giving B^2 candidates)."""
    max_rounds: int = 20
    """Expansion rounds at most; beams still live after the last one join the answer pool."""
    stop: list[str] = field(default_factory=lambda: ["\n"])
    """Strings that end a step (kept in the step text); see :func:`step_stops`."""
    max_step_tokens: int = 256
    """Tokens one step may take; a step that reaches it is finished (length)."""
    max_total_tokens: int = 1024
    """Tokens a whole solution may take; a candidate that reaches it is finished (length)."""
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = 0
    """Top-k filtering (0: off; None: the model's generation-config default)."""
    seed: int | None = None
    """Seeds a forked torch RNG for the whole search (the caller's random state is untouched)."""
    add_eos: bool = False
    """Score finished candidates with EOS after them, as OREO's critic saw answers in training: through the
    scorer's ``score_texts(..., add_eos=True)`` when it takes that (a ``ValueModel`` appends the EOS id), else
    with the tokenizer's EOS text appended."""
    batch_size: int | None = None
    """Problems searched together (one ``generate`` call per round covers all their live beams); None: all."""
    generate_batch_size: int | None = None
    """Sequences per ``generate`` call (None: every input of the round in one call)."""
    score_batch_size: int = 64
    """Candidates per ``score_texts`` call."""

    def __post_init__(self) -> None:
        for name in ("beams", "max_rounds", "max_step_tokens", "max_total_tokens", "score_batch_size"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"value search: {name} must be at least 1, got {getattr(self, name)}")
        for name in ("expansions", "batch_size", "generate_batch_size"):
            value = getattr(self, name)
            if value is not None and int(value) < 1:
                raise ConfigError(f"value search: {name} must be at least 1 (or unset), got {value}")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop)
        if not self.stop or any(not isinstance(s, str) or not s for s in self.stop):
            raise ConfigError(f"value search: stop must be a list of non-empty strings, got {self.stop!r}")
        if not self.temperature > 0:
            raise ConfigError(f"value search samples steps: temperature must be > 0, got {self.temperature}")

    @property
    def n_expansions(self) -> int:
        return int(self.expansions if self.expansions is not None else self.beams)


@dataclass
class SearchResult:
    """The answer of one problem and how the search got there."""

    text: str
    """The returned solution (its steps joined)."""
    score: float
    """Its score (the value at its last token)."""
    finished: bool
    """True when it ended with EOS or a token limit; False when it was still live after the last round."""
    trace: list[dict]
    """Per round: ``{"round", "candidates": [{"beam", "step", "score", "tokens", "status", "finish",
    "next_beam"}]}`` (see ``docs/methods/value_search.md``)."""
    steps: list[str] = field(default_factory=list)
    finish_reason: str = "eos"
    """``eos``, ``length`` (a token limit) or ``rounds`` (live after ``max_rounds``)."""
    rounds: int = 0
    """Expansion rounds run for this problem."""
    sampled_steps: int = 0
    """Step samples drawn (candidates generated)."""
    generated_tokens: int = 0
    """Tokens the policy generated (all candidates, kept or not)."""


# --------------------------------------------------------------------------------------------------
# Scorers


class ConstantScorer:
    """Scores every partial solution ``value``: the search then reduces to sampling (ties keep proposal order)."""

    def __init__(self, value: float = 0.0):
        self.value = float(value)

    def score_texts(self, prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
        return [self.value] * len(completions)

    def score(self, prompt: str, steps: list[str]) -> list[float]:
        return [self.value] * len(steps)


class FunctionScorer:
    """A scorer from ``fn(prompt, partial_solution) -> float`` (an oracle, a verifier, a heuristic)."""

    def __init__(self, fn: Callable[[str, str], float]):
        self.fn = fn

    def score_texts(self, prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
        return [float(self.fn(p, c)) for p, c in zip(prompts, completions)]

    def score(self, prompt: str, steps: list[str]) -> list[float]:
        return [float(self.fn(prompt, "".join(steps[: k + 1]))) for k in range(len(steps))]


def split_at_stops(text: str, stop: Sequence[str]) -> list[str]:
    """``text`` cut after every stop-string occurrence (stop strings kept; ``"".join(result) == text``)."""
    steps, start = [], 0
    while start < len(text):
        end = _first_stop_end(text, stop, start)
        if end is None:
            steps.append(text[start:])
            break
        steps.append(text[start:end])
        start = end
    return steps


class _StepTextScorer:
    def __init__(self, scorer: Any, stop: Sequence[str]):
        self.scorer, self.stop = scorer, list(stop)

    def score_texts(self, prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
        return [float(self.scorer.score(p, split_at_stops(c, self.stop) or [""])[-1])
                for p, c in zip(prompts, completions)]

    def score(self, prompt: str, steps: list[str]) -> list[float]:
        return list(self.scorer.score(prompt, steps))


def as_text_scorer(scorer: Any, stop: Sequence[str] = ("\n",)) -> Any:
    """A ``score_texts(prompts, completions)`` scorer from a step scorer ``score(prompt, steps)``: each
    completion is split after the ``stop`` strings and scored by its last prefix score. A scorer that already
    has ``score_texts`` comes back as it is."""
    if hasattr(scorer, "score_texts"):
        return scorer
    if not hasattr(scorer, "score"):
        raise TypeError(f"{type(scorer).__name__} is not a step scorer: it has neither score_texts nor score")
    return _StepTextScorer(scorer, stop)


def _takes_add_eos(scorer: Any) -> bool:
    import inspect

    try:
        return "add_eos" in inspect.signature(scorer.score_texts).parameters
    except (TypeError, ValueError):
        return False


def _score(scorer: Any, prompts: list[str], steps: list[list[str]], eos: list[bool], eos_text: str,
           batch: int) -> list[float]:
    """The value at the last token of each ``prompt + "".join(steps)``; where ``eos`` is set, of the text with
    EOS after it (through the scorer's own ``add_eos`` when its ``score_texts`` takes one, else ``eos_text``
    appended)."""
    import torch

    out: list[float] = [0.0] * len(prompts)
    with torch.no_grad():
        if hasattr(scorer, "score_texts"):
            native = any(eos) and _takes_add_eos(scorer)
            texts = ["".join(s) + (eos_text if e and not native else "") for s, e in zip(steps, eos)]
            for flag in (False, True):
                idx = [i for i, e in enumerate(eos) if (e and native) == flag]
                for start in range(0, len(idx), batch):
                    part = idx[start:start + batch]
                    kwargs = {"add_eos": True} if flag else {}
                    values = scorer.score_texts([prompts[i] for i in part], [texts[i] for i in part], **kwargs)
                    if len(values) != len(part):
                        raise ValueError(f"the scorer returned {len(values)} scores for {len(part)} candidates")
                    for i, v in zip(part, values):
                        out[i] = float(v)
        else:
            for i, (p, s, e) in enumerate(zip(prompts, steps, eos)):
                out[i] = float(scorer.score(p, s[:-1] + [s[-1] + eos_text] if e else s)[-1])
    return [v if not math.isnan(v) else -math.inf for v in out]  # NaN never wins


# --------------------------------------------------------------------------------------------------
# Steps from generated ids


def _first_stop_end(text: str, stop: Sequence[str], start: int = 0) -> int | None:
    """The end of the stop-string occurrence (from ``start``) that ends first, or None."""
    ends = [i + len(s) for s in stop if (i := text.find(s, start)) >= 0]
    return min(ends) if ends else None


def _decode(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def parse_step(ids: list[int], tokenizer, stop: Sequence[str], eos_ids: set[int],
               limit: int) -> tuple[str, int, str | None]:
    """One generated step -> ``(text, tokens, finish)``. ``text`` ends just after the first stop string (kept);
    ``tokens`` is how many generated tokens that text took; ``finish`` is ``eos``, ``length`` (``limit``
    tokens reached without a stop string) or None (a complete step, the beam goes on)."""
    full = _decode(tokenizer, ids)
    cut = _first_stop_end(full, stop)
    if cut is not None:
        lo, hi = 1, len(ids)  # fewest tokens whose text holds the stop string
        while lo < hi:
            mid = (lo + hi) // 2
            if _first_stop_end(_decode(tokenizer, ids[:mid]), stop) is not None:
                hi = mid
            else:
                lo = mid + 1
        if lo <= limit:
            return full[:cut], lo, None
    elif ids and ids[-1] in eos_ids and len(ids) <= limit:
        return full, len(ids), "eos"
    if len(ids) >= limit or cut is not None:
        return _decode(tokenizer, ids[:limit]), min(len(ids), limit), "length"
    return full, len(ids), None  # generate stopped on a stop string the decoded text does not show


# --------------------------------------------------------------------------------------------------
# The search


@dataclass
class _Beam:
    steps: list[str]
    tokens: int = 0
    score: float = 0.0
    finish: str | None = None

    @property
    def text(self) -> str:
        return "".join(self.steps)


def _eos_ids(model, tokenizer) -> set[int]:
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    return set(eos if isinstance(eos, (list, tuple)) else [eos]) - {None}


def _search_batch(model, tokenizer, prompts: list[str], scorer, settings: SearchSettings,
                  report: Callable[[int, int], None] | None = None) -> list[SearchResult]:
    from .generation import GenerationSettings, generate_hf

    n_exp = settings.n_expansions
    eos_ids = _eos_ids(model, tokenizer)
    eos_text = tokenizer.eos_token or ""
    beams: list[list[_Beam]] = [[_Beam([])] for _ in prompts]
    pools: list[list[_Beam]] = [[] for _ in prompts]
    traces: list[list[dict]] = [[] for _ in prompts]
    rounds = [0] * len(prompts)
    sampled = [0] * len(prompts)
    generated = [0] * len(prompts)
    for r in range(settings.max_rounds):
        live = [(i, b) for i in range(len(prompts)) for b in range(len(beams[i]))]
        if not live:
            break
        inputs = [prompts[i] + beams[i][b].text for i, b in live]
        remaining = [settings.max_total_tokens - beams[i][b].tokens for i, b in live]
        gen = GenerationSettings(max_new_tokens=min(settings.max_step_tokens, max(remaining)),
                                 batch_size=settings.generate_batch_size or len(inputs),
                                 temperature=settings.temperature, top_p=settings.top_p, top_k=settings.top_k,
                                 stop=list(settings.stop), seed=None)
        outs = generate_hf(model, tokenizer, inputs, gen, num_samples=n_exp, do_sample=True, progress=False)
        cands: list[list[tuple[int, _Beam]]] = [[] for _ in prompts]  # per problem: (parent beam, candidate)
        for (i, b), left, completions in zip(live, remaining, outs):
            parent = beams[i][b]
            for comp in completions:
                text, n_tok, finish = parse_step(comp.token_ids, tokenizer, settings.stop, eos_ids,
                                                 min(settings.max_step_tokens, left))
                if finish is None and parent.tokens + n_tok >= settings.max_total_tokens:
                    finish = "length"
                cands[i].append((b, _Beam(parent.steps + [text], parent.tokens + n_tok, finish=finish)))
                sampled[i] += 1
                generated[i] += len(comp.token_ids)
        flat = [(i, c) for i in range(len(prompts)) for _, c in cands[i]]
        scores = _score(scorer, [prompts[i] for i, _ in flat], [c.steps for _, c in flat],
                        [bool(settings.add_eos and c.finish) for _, c in flat], eos_text, settings.score_batch_size)
        for (_, c), s in zip(flat, scores):
            c.score = s
        for i in range(len(prompts)):
            if not cands[i]:
                continue
            open_ = [k for k, (_, c) in enumerate(cands[i]) if c.finish is None]
            ranked = sorted(open_, key=lambda k: -cands[i][k][1].score)[: settings.beams]  # stable: ties keep order
            next_beam = {k: j for j, k in enumerate(ranked)}
            entries = []
            for k, (b, c) in enumerate(cands[i]):
                if c.finish is not None:
                    pools[i].append(c)  # pool order: round, then proposal order (the tie-break of the answer)
                status = "finished" if c.finish else "kept" if k in next_beam else "dropped"
                entries.append({"beam": b, "step": c.steps[-1], "score": c.score,
                                "tokens": c.tokens - beams[i][b].tokens, "status": status, "finish": c.finish,
                                "next_beam": next_beam.get(k)})
            traces[i].append({"round": r + 1, "candidates": entries})
            beams[i] = [cands[i][k][1] for k in ranked]
            rounds[i] = r + 1
        if report is not None:
            report(r + 1, sum(len(b) for b in beams))
    results = []
    for i in range(len(prompts)):
        for c in beams[i]:  # still live after the last round
            c.finish = "rounds"
            pools[i].append(c)
        best = pools[i][0]
        for c in pools[i][1:]:
            if c.score > best.score:
                best = c
        results.append(SearchResult(text=best.text, score=best.score, finished=best.finish != "rounds",
                                    trace=traces[i], steps=list(best.steps), finish_reason=best.finish,
                                    rounds=rounds[i], sampled_steps=sampled[i], generated_tokens=generated[i]))
    return results


def value_guided_search(model, tokenizer, prompts: list[str], scorer, settings: SearchSettings | None = None,
                        progress: bool = True) -> list[SearchResult]:
    """Step-level beam search steered by ``scorer`` (see the module docstring) for each rendered prompt.

    ``model`` is an HF causal LM (anything with a ``generate`` compatible with transformers'); ``scorer`` has
    ``score_texts(prompts, completions)`` or ``score(prompt, steps)``. Problems are searched ``batch_size``
    at a time; the progress bar counts problems done and shows the mean number of rounds."""
    from tqdm.auto import tqdm

    from .generation import seeded

    settings = settings or SearchSettings()
    if not (hasattr(scorer, "score_texts") or hasattr(scorer, "score")):
        raise TypeError(f"{type(scorer).__name__} is not a step scorer: it has neither score_texts nor score")
    prompts = list(prompts)
    size = settings.batch_size or max(1, len(prompts))
    results: list[SearchResult] = []
    bar = tqdm(total=len(prompts), desc="value search", unit="problem", disable=not progress)
    post: dict[str, Any] = {}

    def report(rnd: int, live: int) -> None:
        post.update(round=rnd, live_beams=live)
        bar.set_postfix(post)

    try:
        with seeded(settings.seed):
            for start in range(0, len(prompts), size):
                results.extend(_search_batch(model, tokenizer, prompts[start:start + size], scorer, settings,
                                             report if progress else None))
                post["mean_rounds"] = f"{sum(r.rounds for r in results) / len(results):.1f}"
                bar.set_postfix(post, refresh=False)
                bar.update(min(size, len(prompts) - start))
    finally:
        bar.close()
    return results
