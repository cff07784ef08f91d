"""StepHint hint building (Zhang et al., "StepHint: Multi-level Stepwise Hints Enhance Reinforcement Learning
to Reason", arXiv 2507.02841, ACL 2026): reference chains -> m steps -> hint levels, written once as a jsonl
data set that any number of StepHint runs reuse (``rlkit hints build``).

What this module implements
---------------------------
1. **Reference chains** (``reference_of`` / ``build_hints``): the data set's own worked solution (GSM8K
   ``answer`` with its ``<<48/2=24>>`` calculator annotations removed and the final ``#### x`` line kept;
   MATH ``solution`` with its ``\\boxed{}``), or chains sampled from a stronger *teacher* model (HF
   ``generate`` or vLLM), keeping per problem the first sample whose final answer verifies against the gold
   ``answer`` (``rlkit_rewards.text.extract_answer`` + ``rlkit_rewards.math.verify_answer``), as in the
   paper's App. D ("valid" = final-answer-correct chains of DAPO-Qwen-32B / QwQ-32B / R1-Distill-32B).
2. **Step partition** (``split_reference`` / ``split_batch``), the paper's adaptive rule (Sec. 3.2.1):
   candidate cut points G_1..G_K; q_i = p_scorer(end_marker | prompt + C[:G_i]); boundary set
   B = {G_i : q_i > q_{i+1}}; m-1 cuts chosen from B with a minimum step length l; all q_i of a chain come
   from ONE forward pass (the next-token distribution is read at every candidate position from the logits;
   ``logits_to_keep`` is handed a boolean mask so only those rows of the vocabulary projection are formed),
   over ``batch_size`` chains at a time. Alternatives: ``paragraph`` and ``equal`` splits (no model).
3. **Hint levels** (``hint_levels``): hint_j = S_1 + ... + S_j for j = 1..m-1; the last step (holding the
   final answer) is never part of a hint.

Choices made where the paper is silent (spec 1.2 marks them UNCONFIRMED); each is an option
------------------------------------------------------------------------------------------
- **Candidate cut points** (``HintConfig.candidates``, default ``"sentence"``): ends of lines and of
  sentences. A *line end* cuts after the newline(s) (the newlines stay with the earlier step); when the
  tokenizer merges newlines into the next token, the latest newline position in the run that is
  splittable is used (byte-level GPT-2 style BPE keeps ``"\\n"`` apart, Llama-3/Qwen style keeps
  ``"\\n\\n"`` whole). A *sentence end* is ``.``, ``!`` or ``?`` (plus closing quotes, brackets or a
  closing ``$``, as in MATH's ``= 3.$  Also``) followed by a space or tab; the cut goes right after the
  punctuation, so the space opens the next step (byte-level BPE attaches the space to the next word,
  ``" The"``). Not candidates: list enumerators (``"1. "``), common abbreviations (``e.g.``, ``i.e.``,
  ``Dr.`` ...), anything inside display math (``$$..$$``, ``\\[..\\]``, ``\\(..\\)``,
  ``\\begin{env}..\\end{env}``), code fences or ``[asy]`` blocks, and anything at or after the first
  ``end_marker`` in the chain (the answer part of a ``<think>..</think>`` chain, or GSM8K's ``#### x``).
  Inline ``$..$`` is not masked because GSM8K uses ``$`` for money. ``"line"`` keeps only line ends;
  ``"paragraph"`` only blank-line (``\\n\\n``) ends.
- **Token-exact cuts**: a cut at character ``p`` is kept only if it is *splittable*:
  ``tok(C[:p]) + tok(C[p:]) == tok(C)`` with ``add_special_tokens=False``. The StepHint trainer puts the
  hint's token ids at the start of the completion and lets the policy continue, so decoding and
  re-tokenizing hint + continuation gives the same ids. Under byte-level BPE (SmolLM2, and BPEs with the
  GPT-2 and Llama-3 pre-tokenizer rules, the schemes of GPT-2, Llama-3 and Qwen2.5) and the char tokenizer
  every line and sentence end of GSM8K test and MATH-500 was splittable in our checks. Tokenizers that
  prefix every call with a space marker (SentencePiece ``Metaspace``: Llama-2, Mistral v1) lose the cuts
  at line starts (the continuation would gain a ``"▁"``) and keep those at sentence ends, so
  line-per-step data such as GSM8K gets few steps under them.
- **The end-marker probability**: the probability of the *first* token of ``tokenizer(end_marker)``
  (``</think>`` is one token for Qwen3/R1-style vocabularies, several for others, e.g. SmolLM2 reads
  ``"</"``). For plain-format data use a marker the data really ends with, e.g. ``"####"`` for GSM8K
  (``rlkit hints build`` defaults to ``####`` for ``--data gsm8k`` and ``</think>`` otherwise).
- **The last candidate** G_K has no next candidate: it is compared with the end of the thinking part
  (q_{K+1} = p(end_marker | C[:T]) where T is the first occurrence of ``end_marker``, or the end of C).
  The end of thinking itself is never a cut. Equal probabilities are not a drop (strict ``>``).
- **Scorer** (policy, teacher or a fixed LM: UNCONFIRMED): any causal LM that shares the tokenizer's
  vocabulary; it sees ``prompt + chain`` where the prompt is the question in ``HintConfig.prompt_template``
  (``"auto"``: the chat template when the tokenizer has one, else ``Question: ..\\nAnswer: ``; ``"none"``:
  BOS + chain only).
- **Minimum step length l** (``min_step_tokens``, default 8): every step, the first and the last
  included, spans at least l tokens of the tokenized chain (cuts are splittable, so that is also the
  length of the step tokenized on its own). Spacing is enforced while cuts are chosen (a salient drop is
  not lost to a weak boundary just before it), not by a left-to-right pre-filter.
- **Choosing m-1 cuts among B** (``selection``): ``"salient"`` takes the largest drops q_i - q_{i+1}
  (in probability, not log-probability) in decreasing order; ``"base"`` takes, for each equal-length
  target j*N/m (N = tokens of the chain), the boundary nearest to it. The paper reports the two as
  comparable (App. G.2).
- **Too few boundaries** (``fill``, default True): when B (after spacing) yields fewer than m-1 cuts,
  the remaining cuts come from the other candidates (highest q first for salient, nearest to the targets
  for base). With ``fill=False`` the chain keeps only the cuts B gives. A chain that is too short
  (fewer than m-1 valid cuts at least l tokens apart) returns fewer than m steps, at least one; a row with
  one step has no hints (it still carries its ``reference`` for the trainer's full-reference member).
- **Paragraph splitter**: blank-line ends, falling back to line ends and then sentence ends when there are
  too few, choosing the cut nearest to each equal-length target. **Equal splitter**: word boundaries
  (before a space, after a newline) nearest to the equal-length token targets.
- **Generated chains**: sampled with ``temperature=0.6, top_p=0.95`` by default (R1 style), the chain is
  the teacher's completion text (stripped of surrounding whitespace), ``samples`` per problem, the first
  verifying one is kept; with ``fallback_to_dataset`` a problem with no verifying sample uses the data
  set's solution instead (``hint_source="dataset"``), otherwise it is dropped and counted.
- **Output**: jsonl, one row per problem = the input row + ``reference``, ``steps``, ``hints``,
  ``hint_source``. ``rlkit hints build`` appends and skips questions already in the file, so an interrupted
  build resumes; the settings are kept in ``<out>.meta.json`` and a resume with different settings is an
  error (a half-written last line is dropped with a warning).

For the trainer: tokenize a hint with ``tokenizer(hint, add_special_tokens=False)`` (the same tokenizer as
was given here) and append the ids after the prompt's ids (after the chat template's assistant header);
those ids equal the first ids of ``tokenizer(reference, add_special_tokens=False)``. Hints never end in the
space before a sentence (that space belongs to the next step) and keep the newline of a line end.
"""

from __future__ import annotations

import inspect
import json
import logging
import re
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Literal

log = logging.getLogger(__name__)

SPLITTERS = ("adaptive", "paragraph", "equal")
SELECTIONS = ("salient", "base")
CANDIDATES = ("sentence", "line", "paragraph")
PROMPT_TEMPLATES = ("auto", "plain", "chat", "think_answer", "none")
TEACHER_TEMPLATES = ("auto", "plain", "chat", "think_answer")
BACKENDS = ("hf", "vllm")


class HintError(ValueError):
    """A hint-building problem the user can fix (bad option, missing scorer, unreadable output file)."""


# --------------------------------------------------------------------------------------------------
# Configuration


@dataclass
class HintConfig:
    """How reference chains are split into steps (StepHint Sec. 3.2.1; paper defaults where known)."""

    splitter: Literal["adaptive", "paragraph", "equal"] = "adaptive"
    """``adaptive``: the paper's end-of-thinking-probability rule (needs a scorer model); ``paragraph``:
    blank lines, then lines, then sentences nearest to equal-length positions; ``equal``: word boundaries
    nearest to equal token lengths."""
    m: int = 4
    """Number of steps (paper: m = 4); hint levels are j = 1..m-1."""
    min_step_tokens: int = 8
    """The paper's l: every step (first and last included) spans at least this many tokens of the
    tokenized chain. UNCONFIRMED semantics and value."""
    end_marker: str = "</think>"
    """End-of-thinking text whose probability is read; if it is several tokens the first token's
    probability is used. Candidates lie before its first occurrence in the chain. Use ``####`` for
    GSM8K-style solutions."""
    selection: Literal["salient", "base"] = "salient"
    """How the m-1 cuts are picked from the boundary set: ``salient`` = largest drops q_i - q_{i+1};
    ``base`` = the boundaries nearest to the equal-length positions j*N/m. UNCONFIRMED (paper App. G.2)."""
    batch_size: int = 8
    """Chains per scorer forward pass."""
    candidates: Literal["sentence", "line", "paragraph"] = "sentence"
    """Candidate cut points for the adaptive rule: ``sentence`` = ends of sentences and lines; ``line`` =
    line ends; ``paragraph`` = blank-line ends. UNCONFIRMED granularity."""
    fill: bool = True
    """When the boundary set gives fewer than m-1 cuts, take the rest from the other candidates (highest
    q for salient, nearest to equal positions for base). False: keep only boundary-set cuts."""
    prompt_template: Literal["auto", "plain", "chat", "think_answer", "none"] = "auto"
    """Prompt the scorer sees before the chain (``build_hints``): the row's question in this template;
    ``auto`` = chat template when the tokenizer has one, else plain; ``none`` = no prompt."""

    def __post_init__(self):
        if self.splitter not in SPLITTERS:
            raise HintError(f"splitter {self.splitter!r} is not one of {', '.join(SPLITTERS)}")
        if self.selection not in SELECTIONS:
            raise HintError(f"selection {self.selection!r} is not one of {', '.join(SELECTIONS)}")
        if self.candidates not in CANDIDATES:
            raise HintError(f"candidates {self.candidates!r} is not one of {', '.join(CANDIDATES)}")
        if self.prompt_template not in PROMPT_TEMPLATES:
            raise HintError(f"prompt_template {self.prompt_template!r} is not one of {', '.join(PROMPT_TEMPLATES)}")
        if not isinstance(self.m, int) or self.m < 2:
            raise HintError(f"m must be an integer >= 2 (steps; hint levels are 1..m-1), got {self.m!r}")
        if not isinstance(self.min_step_tokens, int) or self.min_step_tokens < 1:
            raise HintError(f"min_step_tokens must be an integer >= 1, got {self.min_step_tokens!r}")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise HintError(f"batch_size must be an integer >= 1, got {self.batch_size!r}")
        if self.splitter == "adaptive" and not self.end_marker:
            raise HintError("the adaptive splitter needs a non-empty end_marker (e.g. '</think>' or '####')")

    def settings(self) -> dict:
        """The options that change the output (recorded beside a hints file)."""
        d = asdict(self)
        d.pop("batch_size")
        return d


@dataclass
class GenerateConfig:
    """Reference chains generated by a stronger teacher model, kept only when the final answer verifies."""

    teacher: str | None = None
    """Teacher model: hub id, local path, built-in name (``smollm2-135m-instruct``) or ``tiny``."""
    backend: Literal["hf", "vllm"] = "hf"
    """``hf`` (transformers ``generate``, works on CPU) or ``vllm`` (GPU, imported only when used)."""
    samples: int = 4
    """Chains sampled per problem; the first that verifies is kept."""
    max_new_tokens: int = 4096
    temperature: float = 0.6
    """Sampling temperature (0: greedy, needs ``samples == 1``)."""
    top_p: float = 0.95
    template: Literal["auto", "plain", "chat", "think_answer"] = "auto"
    """Teacher prompt template (``rlkit.data.templates``); ``auto`` = chat when the teacher has one."""
    system_prompt: str | None = None
    batch_size: int = 8
    """Prompts per HF ``generate`` call."""
    dtype: str = "auto"
    fallback_to_dataset: bool = False
    """Use the data set's solution when no sample verifies (``hint_source="dataset"``) instead of dropping."""
    seed: int | None = None
    """Seed for sampling (HF: a forked torch RNG; vLLM: the engine seed). None: not seeded."""
    vllm_kwargs: dict = field(default_factory=dict)
    """Extra ``vllm.LLM(...)`` arguments (e.g. ``tensor_parallel_size``, ``gpu_memory_utilization``)."""
    verifier: Callable[[str, str], bool] | None = None
    """``(completion, gold) -> bool``; default: ``rlkit_rewards`` math accuracy."""
    model: Any = field(default=None, repr=False)
    """An already-loaded teacher model (HF backend); overrides ``teacher``."""
    tokenizer: Any = field(default=None, repr=False)
    """The teacher's tokenizer (with ``model``)."""
    engine: Any = field(default=None, repr=False)
    """A cached ``vllm.LLM`` (filled on first use so that chunked builds start vLLM once)."""

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise HintError(f"generate backend {self.backend!r} is not one of {', '.join(BACKENDS)}")
        if self.template not in TEACHER_TEMPLATES:
            raise HintError(f"generate template {self.template!r} is not one of {', '.join(TEACHER_TEMPLATES)}")
        if not isinstance(self.samples, int) or self.samples < 1:
            raise HintError(f"samples must be an integer >= 1, got {self.samples!r}")
        if self.max_new_tokens < 1:
            raise HintError(f"max_new_tokens must be >= 1, got {self.max_new_tokens!r}")
        if self.temperature < 0:
            raise HintError(f"temperature must be >= 0, got {self.temperature!r}")
        if self.temperature == 0 and self.samples > 1:
            raise HintError("samples > 1 needs temperature > 0 (greedy decoding gives the same chain every time)")
        if self.teacher is None and self.model is None and self.engine is None:
            raise HintError("generate needs a teacher model (--teacher MODEL)")
        if self.backend == "hf" and self.model is not None and self.tokenizer is None:
            raise HintError("GenerateConfig.model needs its tokenizer in GenerateConfig.tokenizer")

    def settings(self) -> dict:
        return {k: getattr(self, k) for k in ("teacher", "backend", "samples", "max_new_tokens", "temperature",
                                              "top_p", "template", "system_prompt", "fallback_to_dataset")}


# --------------------------------------------------------------------------------------------------
# Reference chains

_CALCULATOR = re.compile(r"<<[^<>\n]*=[^<>\n]*>>")


def reference_of(row: dict) -> str | None:
    """The reference chain of a normalized row, or None if it has none: its ``reference`` column when
    present (a chain known to be correct, e.g. the synthetic task's exact solution), else its ``solution``.

    GSM8K solutions lose their calculator annotations (``48/2 = <<48/2=24>>24`` -> ``48/2 = 24``) and keep
    the final ``#### x`` line; MATH solutions are kept as they are (with their ``\\boxed{}``). Surrounding
    whitespace is stripped.
    """
    text = row.get("reference") or row.get("solution")
    if text is None:
        return None
    text = _CALCULATOR.sub("", str(text)).strip()
    return text or None


def hint_levels(steps: list[str]) -> list[str]:
    """Cumulative prefixes: level j = steps[0] + ... + steps[j-1] for j = 1..len(steps)-1."""
    out, acc = [], ""
    for s in steps[:-1]:
        acc += s
        out.append(acc)
    return out


def default_end_marker(data: str) -> str:
    """``####`` for GSM8K-style data (its solutions end in ``#### x``), ``</think>`` otherwise."""
    return "####" if data.split(":")[0] == "gsm8k" else "</think>"


# --------------------------------------------------------------------------------------------------
# Candidate cut points

_NEWLINE_RUN = re.compile(r"(?:\r?\n)+")
_SENTENCE_END = re.compile(r"[.!?](?:[\"'\u2019\u201d)\]*$])*(?=[ \t])"
                           r"|[\u3002\uff01\uff1f][\u201d\u2019\u300d\u300f\uff09]*")
_SPACE_RUN = re.compile(r"[ \t]+")
_MASKED = re.compile(r"\$\$.*?\$\$|\\\[.*?\\\]|\\\(.*?\\\)|\\begin\{([^{}]*)\}.*?\\end\{\1\}"
                     r"|```.*?```|\[asy\].*?\[/asy\]", re.S)
_ENUMERATOR = re.compile(r"[ \t]*(?:\d+|[A-Za-z]|[ivxlcdmIVXLCDM]+|\(\w+\))")
_ABBREVIATION = re.compile(r"(?:\b(?:e\.g|i\.e|etc|vs|cf|Mr|Mrs|Ms|Dr|St|Fig|Eq|No|approx))$", re.I)

PARAGRAPH, LINE, SENTENCE, WORD = 0, 1, 2, 3
_LEVEL = {"paragraph": PARAGRAPH, "line": LINE, "sentence": SENTENCE}


def _masked_spans(text: str) -> list[tuple[int, int]]:
    return [(m.start(), m.end()) for m in _MASKED.finditer(text)]


def _inside(p: int, spans: list[tuple[int, int]]) -> bool:
    return any(a < p < b for a, b in spans)


def _sites(text: str, end: int, words: bool = False) -> list[tuple[int, list[int]]]:
    """Candidate sites ``(level, positions in order of preference)`` strictly inside ``(0, end)``."""
    spans = _masked_spans(text)
    sites: list[tuple[int, int, list[int]]] = []

    def add(level: int, positions: list[int]):
        ok = [p for p in positions if 0 < p < end and not _inside(p, spans)]
        if ok:
            sites.append((ok[0], level, ok))

    for m in _NEWLINE_RUN.finditer(text):
        after = [i + 1 for i in range(m.start(), m.end()) if text[i] == "\n"]
        add(PARAGRAPH if len(after) >= 2 else LINE, after[::-1])
    for m in _SENTENCE_END.finditer(text):
        line_start = text.rfind("\n", 0, m.start()) + 1
        if _ENUMERATOR.fullmatch(text, line_start, m.start()):
            continue
        if text[m.start()] == "." and _ABBREVIATION.search(text, max(0, m.start() - 8), m.start()):
            continue
        positions = [m.end()]
        sp = _SPACE_RUN.match(text, m.end())
        if sp and sp.end() < len(text) and text[sp.end()] not in "\r\n":
            positions.append(sp.end())
        add(SENTENCE, positions)
    if words:
        for m in _SPACE_RUN.finditer(text):
            if m.start() > 0 and text[m.start() - 1] not in "\r\n" and m.end() < len(text) \
                    and text[m.end()] not in "\r\n":
                add(WORD, [m.start(), m.end()])
    sites.sort()
    return [(level, positions) for _, level, positions in sites]


def _encode(tokenizer, texts: list[str]) -> list[list[int]]:
    if not texts:
        return []
    out = tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
    return [list(x) for x in out]


class _Chain:
    """One reference chain: its ids, the end of its thinking part, and memoized splittability checks."""

    def __init__(self, text: str, tokenizer, end_marker: str):
        if not isinstance(text, str) or not text:
            raise HintError("a reference chain must be a non-empty string")
        self.text = text
        self.tokenizer = tokenizer
        self.ids = _encode(tokenizer, [text])[0]
        self.n = len(self.ids)
        pos = text.find(end_marker) if end_marker else -1
        self.end = pos if pos >= 0 else len(text)
        self._k: dict[int, int | None] = {len(text): self.n, 0: 0}
        self.cuts: list[tuple[int, int, int]] = []  # (char position, token index, level)

    def check(self, positions) -> None:
        todo = sorted({p for p in positions if p not in self._k})
        if not todo:
            return
        pre = _encode(self.tokenizer, [self.text[:p] for p in todo])
        suf = _encode(self.tokenizer, [self.text[p:] for p in todo])
        for p, a, b in zip(todo, pre, suf):
            self._k[p] = len(a) if (a + b == self.ids and 0 < len(a) < self.n) else None

    def k(self, p: int) -> int | None:
        self.check([p])
        return self._k[p]

    def resolve(self, sites: list[tuple[int, list[int]]]) -> None:
        """Keep, per site, the first splittable position; fills ``self.cuts`` (sorted, distinct tokens)."""
        self.check([p for _, ps in sites for p in ps])
        seen, cuts = set(), []
        for level, ps in sites:
            for p in ps:
                k = self._k[p]
                if k is not None:
                    if k not in seen:
                        seen.add(k)
                        cuts.append((p, k, level))
                    break
        self.cuts = sorted(cuts)

    def end_token(self) -> int:
        """Token count of the thinking part C[:T] (exact when T is splittable, else its own tokenization)."""
        if self.end == len(self.text):
            return self.n
        k = self.k(self.end)
        if k is None:
            k = len(_encode(self.tokenizer, [self.text[: self.end]])[0])
        return min(max(k, 1), self.n)

    def steps(self, ks: list[int]) -> tuple[list[str], list[int]]:
        by_k = {k: p for p, k, _ in self.cuts}
        bounds = [0] + [by_k[k] for k in sorted(ks)] + [len(self.text)]
        kb = [0] + sorted(ks) + [self.n]
        steps = [self.text[a:b] for a, b in zip(bounds, bounds[1:])]
        return steps, [b - a for a, b in zip(kb, kb[1:])]


# --------------------------------------------------------------------------------------------------
# Choosing cuts


def _fits(k: int, chosen: list[int], n: int, l: int) -> bool:
    return l <= k <= n - l and all(abs(k - c) >= l for c in chosen)


def _greedy(order: list[int], chosen: list[int], n: int, l: int, want: int) -> None:
    for k in order:
        if len(chosen) >= want:
            return
        if _fits(k, chosen, n, l):
            chosen.append(k)


def _near_targets(pool: list[int], chosen: list[int], open_targets: list[float], n: int, l: int) -> list[float]:
    """For each open target, the nearest pool cut that fits; returns the targets left open."""
    left = []
    for t in open_targets:
        fits = [k for k in pool if k not in chosen and _fits(k, chosen, n, l)]
        if fits:
            chosen.append(min(fits, key=lambda k: (abs(k - t), k)))
        else:
            left.append(t)
    return left


def _targets(n: int, m: int) -> list[float]:
    return [j * n / m for j in range(1, m)]


def select_adaptive(ks: list[int], q: list[float], q_end: float, n: int, config: HintConfig) -> list[int]:
    """Token cut indices chosen by the adaptive rule from candidates ``ks`` (sorted) with end-marker
    probabilities ``q`` and ``q_end`` = the probability at the end of the thinking part."""
    nxt = list(q[1:]) + [q_end]
    boundary = [i for i in range(len(ks)) if q[i] > nxt[i]]
    rest = [i for i in range(len(ks)) if q[i] <= nxt[i]]
    want, l = config.m - 1, config.min_step_tokens
    chosen: list[int] = []
    if config.selection == "salient":
        _greedy([ks[i] for i in sorted(boundary, key=lambda i: (-(q[i] - nxt[i]), i))], chosen, n, l, want)
        if config.fill:
            _greedy([ks[i] for i in sorted(rest, key=lambda i: (-q[i], i))], chosen, n, l, want)
    else:
        left = _near_targets([ks[i] for i in boundary], chosen, _targets(n, config.m), n, l)
        if config.fill and left:
            _near_targets([ks[i] for i in rest], chosen, left, n, l)
    return sorted(chosen)


def _split_plain(chain: _Chain, config: HintConfig) -> list[int]:
    n, m, l = chain.n, config.m, config.min_step_tokens
    if config.splitter == "paragraph":
        chain.resolve(_sites(chain.text, chain.end))
        best: list[int] = []
        for level in (PARAGRAPH, LINE, SENTENCE):
            chosen: list[int] = []
            _near_targets([k for _, k, lv in chain.cuts if lv <= level], chosen, _targets(n, m), n, l)
            if len(chosen) > len(best):
                best = chosen
            if len(best) == m - 1:
                break
        return sorted(best)
    # equal: word boundaries nearest to equal token positions, checked lazily around each target
    if n < 2 * l:
        return []
    sites = _sites(chain.text, chain.end, words=True)
    targets = _targets(n, m)
    offsets = _char_offsets(chain)
    chosen: list[int] = []
    found: dict[int, int] = {}
    for t in targets:
        tc = offsets[min(int(round(t)), n - 1)] if offsets else t * len(chain.text) / max(n, 1)
        ranked = sorted(sites, key=lambda s: abs(s[1][0] - tc))
        best_k, start, size = None, 0, 2
        while start < len(ranked):  # nearest sites first, in growing batches (2, 4, 8, ...)
            batch = ranked[start : start + size]
            start, size = start + size, min(2 * size, 64)
            chain.check([p for _, ps in batch for p in ps])
            for _, ps in batch:
                k = next((chain._k[p] for p in ps if chain._k[p] is not None), None)
                if k is not None and k not in chosen and _fits(k, chosen, n, l):
                    found[k] = next(p for p in ps if chain._k[p] == k)
                    if best_k is None or abs(k - t) < abs(best_k - t):
                        best_k = k
            if best_k is not None:
                break
        if best_k is not None:
            chosen.append(best_k)
    chain.cuts = sorted((p, k, WORD) for k, p in found.items())
    return sorted(chosen)


def _char_offsets(chain: _Chain) -> list[int] | None:
    """Start character of every token of the chain (fast tokenizers), else None."""
    try:
        enc = chain.tokenizer(chain.text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    except (NotImplementedError, TypeError, ValueError):
        return None
    offs = enc.get("offset_mapping")
    if not offs or len(offs) != chain.n:
        return None
    return [a for a, _ in offs]


# --------------------------------------------------------------------------------------------------
# Scoring


def marker_token_id(tokenizer, end_marker: str) -> int:
    """The token whose probability stands for ``end_marker``: its first token (without special tokens)."""
    ids = _encode(tokenizer, [end_marker])[0] if end_marker else []
    if not ids:
        raise HintError(f"end_marker {end_marker!r} tokenizes to nothing")
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is not None and ids[0] == unk:
        raise HintError(f"end_marker {end_marker!r} starts with an unknown token for this tokenizer")
    return ids[0]


def _device(model):
    import torch

    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError, TypeError):
        return getattr(model, "device", None) or torch.device("cpu")


def _accepts_logits_to_keep(model) -> bool:
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False
    return "logits_to_keep" in params


def end_marker_probs(scorer, sequences: list[list[int]], read_at: list[list[int]], marker_id: int,
                     batch_size: int = 8, pad_id: int = 0, progress: bool = False) -> list[list[float]]:
    """``p(marker_id | sequence[: i + 1])`` for every ``i`` in ``read_at[r]`` (the next-token distribution
    after position ``i``), in one forward pass per batch of ``batch_size`` sequences (right padding; only the
    requested positions are projected onto the vocabulary when the model takes a ``logits_to_keep`` mask)."""
    import torch
    from tqdm.auto import tqdm

    if len(sequences) != len(read_at):
        raise HintError("sequences and read_at differ in length")
    out: list[list[float]] = [[] for _ in sequences]
    todo = [i for i in range(len(sequences)) if read_at[i]]
    order = sorted(todo, key=lambda i: len(sequences[i]))
    device = _device(scorer)
    use_mask = _accepts_logits_to_keep(scorer)
    was_training = getattr(scorer, "training", False)
    if hasattr(scorer, "eval"):
        scorer.eval()
    bar = tqdm(total=len(order), desc="score", disable=not progress, leave=False)
    try:
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                idx = order[start : start + batch_size]
                width = max(len(sequences[i]) for i in idx)
                ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
                att = torch.zeros((len(idx), width), dtype=torch.long)
                keep = torch.zeros((len(idx), width), dtype=torch.bool)
                for row, i in enumerate(idx):
                    seq = sequences[i]
                    ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
                    att[row, : len(seq)] = 1
                    pos = sorted(set(read_at[i]))
                    if pos[0] < 0 or pos[-1] >= len(seq):
                        raise HintError(f"read position out of range for a sequence of {len(seq)} tokens")
                    keep[row, pos] = True
                ids, att, keep = ids.to(device), att.to(device), keep.to(device)
                logits = None
                if use_mask:
                    try:
                        logits = _logits(scorer(input_ids=ids, attention_mask=att, logits_to_keep=keep))
                    except (TypeError, IndexError):
                        logits = None
                if logits is None:
                    logits = _logits(scorer(input_ids=ids, attention_mask=att))
                if logits.dim() == 3:
                    logits = logits[keep]
                if logits.dim() != 2 or logits.shape[0] != int(keep.sum()):
                    raise HintError(f"the scorer returned logits of shape {tuple(logits.shape)}; expected one row "
                                    f"per read position ({int(keep.sum())})")
                probs = []
                for chunk in logits.split(512):
                    chunk = chunk.float()
                    probs.append((chunk[:, marker_id] - torch.logsumexp(chunk, dim=-1)).exp())
                flat = torch.cat(probs).tolist()
                at = 0
                for row, i in enumerate(idx):
                    pos = sorted(set(read_at[i]))
                    table = dict(zip(pos, flat[at : at + len(pos)]))
                    at += len(pos)
                    out[i] = [table[p] for p in read_at[i]]
                bar.update(len(idx))
    finally:
        bar.close()
        if was_training and hasattr(scorer, "train"):
            scorer.train()
    return out


def _logits(output):
    logits = getattr(output, "logits", None)
    if logits is None:
        logits = output[0]
    return logits


def _prompt_ids(tokenizer, prompt) -> list[int]:
    if prompt is None:
        bos = getattr(tokenizer, "bos_token_id", None)
        return [bos] if bos is not None else []
    if not isinstance(prompt, str):
        from .eval.math_eval import render_prompts

        prompt = render_prompts([prompt], tokenizer)[0]
    bos = getattr(tokenizer, "bos_token", None)
    add_special = not (bos and prompt.startswith(bos))
    return list(tokenizer(prompt, add_special_tokens=add_special, verbose=False)["input_ids"])


# --------------------------------------------------------------------------------------------------
# Splitting


def _split_all(references: list[str], tokenizer, config: HintConfig, scorer=None, prompts=None,
               progress: bool = False) -> list[tuple[list[str], list[int]]]:
    if not isinstance(config, HintConfig):
        raise HintError("config must be a HintConfig")
    if prompts is not None and len(prompts) != len(references):
        raise HintError(f"{len(prompts)} prompts for {len(references)} references")
    if config.splitter == "adaptive" and scorer is None:
        raise HintError("splitter 'adaptive' needs a scorer model (a causal LM sharing the tokenizer's vocabulary; "
                        "CLI: --scorer MODEL), or use splitter 'paragraph' or 'equal'")
    chains = [_Chain(r, tokenizer, config.end_marker) for r in references]
    if config.splitter != "adaptive":
        return [c.steps(_split_plain(c, config)) for c in chains]

    level = _LEVEL[config.candidates]
    marker = marker_token_id(tokenizer, config.end_marker)
    vocab = getattr(getattr(scorer, "config", None), "vocab_size", None)
    if vocab is not None and marker >= vocab:
        raise HintError(f"end-marker token id {marker} is outside the scorer's vocabulary ({vocab}); "
                        "the scorer must share the tokenizer's vocabulary")
    seqs, reads = [], []
    for i, c in enumerate(chains):
        c.resolve([s for s in _sites(c.text, c.end) if s[0] <= level])
        if not c.cuts:
            seqs.append([])
            reads.append([])
            continue
        pids = _prompt_ids(tokenizer, prompts[i] if prompts is not None else None)
        off = len(pids)
        seqs.append(pids + c.ids)
        # q_i is read from the logits after the chain's first k_i tokens (cuts have k_i >= 1)
        reads.append([off + k - 1 for _, k, _ in c.cuts] + [off + c.end_token() - 1])
    pad = getattr(tokenizer, "pad_token_id", None)
    probs = end_marker_probs(scorer, seqs, reads, marker, config.batch_size, pad if pad is not None else 0, progress)
    out = []
    for c, q in zip(chains, probs):
        if not c.cuts:
            out.append(c.steps([]))
            continue
        ks = [k for _, k, _ in c.cuts]
        out.append(c.steps(select_adaptive(ks, q[:-1], q[-1], c.n, config)))
    return out


def split_batch(references: list[str], tokenizer, config: HintConfig, scorer=None, prompts=None,
                progress: bool = False) -> list[list[str]]:
    """Steps of every chain; the adaptive rule scores ``config.batch_size`` chains per forward pass of
    ``scorer``. ``prompts`` (rendered text or chat messages, one per chain) condition the scorer."""
    return [steps for steps, _ in _split_all(references, tokenizer, config, scorer, prompts, progress)]


def split_reference(reference: str, tokenizer, config: HintConfig, scorer=None, prompt: str | None = None) -> list[str]:
    """The steps of one chain: ``"".join(steps) == reference``, no empty step, at most ``config.m`` steps
    (fewer when the chain is too short), every cut splittable under ``tokenizer``."""
    return split_batch([reference], tokenizer, config, scorer, None if prompt is None else [prompt])[0]


# --------------------------------------------------------------------------------------------------
# Generation of reference chains


def default_verifier(completion: str, gold: str) -> bool:
    """``rlkit_rewards`` math accuracy: the completion's extracted final answer equals ``gold``."""
    from rlkit_rewards.math import verify_answer
    from rlkit_rewards.text import extract_answer

    pred = extract_answer(completion)
    return bool(pred is not None and verify_answer(str(gold), pred))


def load_teacher(gen: GenerateConfig) -> GenerateConfig:
    """``gen`` with its teacher loaded through ``rlkit.models`` (HF: model + tokenizer; vLLM: tokenizer)."""
    from .models import load_model, load_tokenizer
    from .recipe import ModelSpec

    if gen.backend == "hf" and gen.model is not None:
        return gen
    spec = ModelSpec(name=gen.teacher, dtype=gen.dtype)
    if gen.backend == "vllm":
        if gen.teacher == "tiny":
            raise HintError("backend 'vllm' cannot run the built-in 'tiny' model; use --backend hf")
        _import_vllm()
        return replace(gen, tokenizer=gen.tokenizer or load_tokenizer(spec))
    model, tok = load_model(spec)
    import torch

    if torch.cuda.is_available():
        model = model.to("cuda")
    return replace(gen, model=model, tokenizer=tok)


def _import_vllm():
    try:
        import vllm  # noqa: F401
    except ImportError:
        raise HintError("backend 'vllm' needs vLLM (GPU only): pip install 'rlkit-reasoning[vllm]'; "
                        "or use backend 'hf'") from None
    import torch

    if not torch.cuda.is_available():
        raise HintError("backend 'vllm' needs a CUDA GPU; use backend 'hf' on CPU")
    return vllm


def _teacher_completions(rows: list[dict], gen: GenerateConfig, progress: bool) -> list[list[str]]:
    from .data import format_prompt, resolve_template
    from .eval.math_eval import GenerationSettings, generate_hf, render_prompts

    if (gen.backend == "hf" and gen.model is None) or (gen.backend == "vllm" and gen.tokenizer is None):
        gen = load_teacher(gen)
    template = resolve_template(gen.template, gen.tokenizer)
    if template == "chat" and not getattr(gen.tokenizer, "chat_template", None):
        raise HintError("template 'chat' needs a teacher tokenizer with a chat template; use 'plain' or 'think_answer'")
    prompts = render_prompts([format_prompt(r["question"], template, gen.system_prompt) for r in rows], gen.tokenizer)
    do_sample = gen.temperature > 0
    if gen.backend == "hf":
        import torch

        settings = GenerationSettings(max_new_tokens=gen.max_new_tokens, batch_size=gen.batch_size,
                                      temperature=gen.temperature, top_p=gen.top_p, backend="hf")
        if gen.seed is None:
            return generate_hf(gen.model, gen.tokenizer, prompts, settings, gen.samples, do_sample, progress, "teacher")
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(gen.seed)
            return generate_hf(gen.model, gen.tokenizer, prompts, settings, gen.samples, do_sample, progress, "teacher")
    vllm = _import_vllm()
    if gen.engine is None:
        from .models import BUILTIN_MODELS, builtin_path

        path = str(builtin_path(gen.teacher)) if gen.teacher in BUILTIN_MODELS else gen.teacher
        kwargs = dict(gen.vllm_kwargs)
        if gen.seed is not None:
            kwargs.setdefault("seed", gen.seed)
        if gen.dtype != "auto":
            kwargs.setdefault("dtype", gen.dtype)
        gen.engine = vllm.LLM(model=path, **kwargs)
    params = vllm.SamplingParams(n=gen.samples, max_tokens=gen.max_new_tokens,
                                 temperature=gen.temperature if do_sample else 0.0,
                                 top_p=gen.top_p if do_sample else 1.0)
    return [[c.text for c in o.outputs] for o in gen.engine.generate(prompts, params)]


# --------------------------------------------------------------------------------------------------
# Building hint rows


class BuiltHints(list):
    """The output rows of ``build_hints`` (a list), plus ``dropped`` (reason -> count of input rows left
    out: ``no_reference``, ``no_gold``, ``unverified``) and ``step_tokens`` (token length of every step)."""

    def __init__(self, rows=(), dropped: Counter | None = None, step_tokens: list[int] | None = None):
        super().__init__(rows)
        self.dropped = Counter(dropped or {})
        self.step_tokens = list(step_tokens or [])


def _scorer_prompt(row: dict, tokenizer, config: HintConfig):
    if config.prompt_template == "none":
        return None
    from .data import format_prompt, resolve_template

    template = resolve_template(config.prompt_template, tokenizer)
    if template == "chat" and not getattr(tokenizer, "chat_template", None):
        raise HintError("prompt_template 'chat' needs a tokenizer with a chat template; use 'plain' or 'none'")
    return format_prompt(row["question"], template)


def build_hints(rows: list[dict], tokenizer, config: HintConfig, scorer=None, generate: GenerateConfig | None = None,
                progress: bool = True) -> BuiltHints:
    """Hint rows for ``rows`` (normalized: ``question``, ``answer``, ``solution``?): each kept row is the input
    row plus ``reference``, ``steps``, ``hints`` and ``hint_source`` (``dataset`` | ``generated``). Rows with
    no usable reference are dropped; ``result.dropped`` counts them by reason (also logged)."""
    if not isinstance(config, HintConfig):
        raise HintError("config must be a HintConfig")
    if config.splitter == "adaptive" and scorer is None:
        raise HintError("splitter 'adaptive' needs a scorer model (CLI: --scorer MODEL), or use 'paragraph'/'equal'")
    dropped: Counter = Counter()
    generated: list[list[str]] | None = None
    if generate is not None:
        generated = _teacher_completions(rows, generate, progress) if rows else []
        verify = generate.verifier or default_verifier
    kept, refs, sources = [], [], []
    for i, row in enumerate(rows):
        if "question" not in row:
            raise HintError(f"row {i} has no 'question' (columns: {sorted(row)})")
        ref, source = None, "dataset"
        if generated is not None:
            gold = row.get("answer")
            if gold is None or str(gold).strip() == "":
                reason = "no_gold"
            else:
                reason = "unverified"
                ref = next((c.strip() for c in generated[i] if c.strip() and verify(c, str(gold))), None)
                source = "generated"
            if ref is None and generate.fallback_to_dataset:
                ref, source = reference_of(row), "dataset"
        else:
            reason = "no_reference"
            ref = reference_of(row)
        if ref is None:
            dropped[reason] += 1
            continue
        kept.append(row)
        refs.append(ref)
        sources.append(source)
    prompts = [_scorer_prompt(r, tokenizer, config) for r in kept] if config.splitter == "adaptive" else None
    split = _split_all(refs, tokenizer, config, scorer, prompts, progress)
    out = BuiltHints(dropped=dropped)
    for row, ref, source, (steps, lens) in zip(kept, refs, sources, split):
        out.append({**row, "reference": ref, "steps": steps, "hints": hint_levels(steps), "hint_source": source})
        out.step_tokens.extend(lens)
    if dropped:
        log.info("build_hints: dropped %d of %d rows (%s)", sum(dropped.values()), len(rows), dict(dropped))
    return out


# --------------------------------------------------------------------------------------------------
# Files


def write_hints(path, rows: list[dict], append: bool = False) -> None:
    """Write ``rows`` as jsonl (``append``: add to the end of an existing file)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with p.open("a" if append else "w") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
        f.flush()


_REQUIRED = ("question", "reference", "steps", "hints")


def read_hints(path) -> list[dict]:
    """Rows of a hints jsonl file. A half-written last line (an interrupted build) is skipped with a warning;
    any other bad line, or a row missing ``question``/``reference``/``steps``/``hints``, is an error."""
    p = Path(path)
    if not p.is_file():
        raise HintError(f"hints file {str(p)!r} not found")
    text = p.read_text()
    lines = text.split("\n")
    rows = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            if i == len(lines) - 1:  # no newline after it: an interrupted write
                log.warning("%s: ignoring the half-written last line", p)
                continue
            raise HintError(f"{p}: line {i + 1} is not valid JSON ({e})") from None
        missing = [k for k in _REQUIRED if not isinstance(row, dict) or k not in row]
        if missing:
            raise HintError(f"{p}: line {i + 1} is not a hints row (missing {', '.join(missing)})")
        rows.append(row)
    return rows


def _repair_tail(p: Path) -> None:
    """Drop a half-written last line so that appending continues a valid jsonl file."""
    if not p.is_file() or p.stat().st_size == 0:
        return
    data = p.read_bytes()
    if data.endswith(b"\n"):
        return
    cut = data.rfind(b"\n") + 1
    try:
        json.loads(data[cut:])
        p.write_bytes(data + b"\n")
    except ValueError:
        log.warning("%s: dropping a half-written last line", p)
        print(f"rlkit hints: dropping a half-written last line of {p}", file=sys.stderr)
        p.write_bytes(data[:cut])


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _meta_path(out: Path) -> Path:
    return out.with_name(out.name + ".meta.json")


def run_build(data: str, out, config: HintConfig, split: str = "train", path: str | None = None,
              limit: int | None = None, tokenizer: str | None = None, scorer: str | None = None,
              generate: GenerateConfig | None = None, dtype: str = "auto", chunk_size: int = 64,
              progress: bool = True) -> dict:
    """``rlkit hints build``: load rows, tokenizer and models, build hints in chunks appended to ``out``
    (skipping questions already there), and return a summary."""
    from tqdm.auto import tqdm

    from .data import load_rows
    from .models import load_model, load_tokenizer
    from .recipe import DatasetSpec, ModelSpec

    if chunk_size < 1:
        raise HintError("chunk_size must be >= 1")
    if config.splitter == "adaptive" and not scorer:
        raise HintError("--splitter adaptive needs --scorer MODEL (a causal LM sharing the tokenizer's vocabulary); "
                        "or use --splitter paragraph|equal")
    if config.splitter != "adaptive" and scorer:
        raise HintError(f"--scorer is only used by --splitter adaptive (got --splitter {config.splitter})")
    tok_name = tokenizer or scorer
    if not tok_name:
        raise HintError("pass --tokenizer MODEL: the policy model's tokenizer, under which every cut must be "
                        "splittable")
    t0 = time.time()
    out = Path(out)
    meta = {"hint_config": config.settings(), "tokenizer": tok_name, "scorer": scorer, "data": data, "split": split,
            "generate": generate.settings() if generate is not None else None}
    meta = json.loads(json.dumps(meta))
    meta_file = _meta_path(out)
    if out.is_file() and out.stat().st_size > 0 and meta_file.is_file():
        old, new = _flat(json.loads(meta_file.read_text())), _flat(meta)
        diff = [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new))
                if old.get(k) != new.get(k)]
        if diff:
            raise HintError(f"{out} was built with different settings ({'; '.join(diff)}); "
                            "resume with the same options or write to a new --out")
    rows = load_rows(DatasetSpec(name=data, split=split, path=path, limit=limit))
    _repair_tail(out)
    done = {r["question"] for r in read_hints(out)} if out.is_file() else set()
    todo, seen = [], set(done)
    for r in rows:
        if r["question"] not in seen:
            seen.add(r["question"])
            todo.append(r)
    skipped = len(rows) - len(todo)

    scorer_model, tok = None, None
    if scorer and todo:
        scorer_model, tok = load_model(ModelSpec(name=scorer, dtype=dtype))
        if tokenizer and tokenizer != scorer:
            tok = load_tokenizer(ModelSpec(name=tokenizer))
            other = load_tokenizer(ModelSpec(name=scorer))
            if tok.get_vocab() != other.get_vocab():
                raise HintError(f"the scorer {scorer!r} and the tokenizer {tokenizer!r} have different vocabularies; "
                                "the scorer must share the policy tokenizer's vocabulary")
        import torch

        if torch.cuda.is_available():
            scorer_model = scorer_model.to("cuda")
    elif todo:
        tok = load_tokenizer(ModelSpec(name=tok_name))
    if generate is not None and todo:
        generate = load_teacher(generate)

    out.parent.mkdir(parents=True, exist_ok=True)
    meta_file.write_text(json.dumps(meta, indent=2) + "\n")
    if not out.exists():
        out.touch()
    dropped: Counter = Counter()
    written, steps_total, step_tokens, full, sources = 0, 0, [], 0, Counter()
    bar = tqdm(total=len(todo), desc="hints", disable=not progress)
    for start in range(0, len(todo), chunk_size):
        chunk = todo[start : start + chunk_size]
        built = build_hints(chunk, tok, config, scorer_model, generate, progress=False)
        write_hints(out, built, append=True)
        dropped.update(built.dropped)
        written += len(built)
        steps_total += sum(len(r["steps"]) for r in built)
        full += sum(len(r["hints"]) == config.m - 1 for r in built)
        sources.update(r["hint_source"] for r in built)
        step_tokens.extend(built.step_tokens)
        bar.update(len(chunk))
        bar.set_postfix(written=written, dropped=sum(dropped.values()))
    bar.close()
    return {
        "out": str(out),
        "rows_in": len(rows),
        "skipped_existing": skipped,
        "written": written,
        "dropped": sum(dropped.values()),
        "dropped_by_reason": dict(dropped),
        "rows_in_file": len(done) + written,
        "rows_with_all_levels": full,
        "mean_steps": round(steps_total / written, 3) if written else None,
        "mean_tokens_per_step": round(sum(step_tokens) / len(step_tokens), 2) if step_tokens else None,
        "hint_source": dict(sources),
        "splitter": config.splitter,
        "m": config.m,
        "end_marker": config.end_marker,
        "seconds": round(time.time() - t0, 2),
    }
