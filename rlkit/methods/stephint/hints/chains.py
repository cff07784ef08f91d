"""StepHint reference chains and step partition (arXiv 2507.02841 Sec. 3.2.1): candidate cut sites, token-exact
cuts, the adaptive end-of-thinking-probability rule (salient / base selection), the paragraph and equal
splitters, and hint levels. The choices where the paper is silent are in ``docs/methods/stephint.md``."""

from __future__ import annotations

import re

from .config import HintConfig, HintError
from .scoring import _encode, _prompt_ids, end_marker_probs, marker_token_id

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
