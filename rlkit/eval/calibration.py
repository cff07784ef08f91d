"""Calibration of a model's final answers: expected calibration error (ECE), reliability tables and diagrams,
and the confidence of a completion's final answer from the generation layer's token log-probabilities.

- :func:`ece`: equal-width bins over [0, 1] (10 by default), bin ``b`` = ``(b/B, (b+1)/B]`` with 0 in the first
  bin; ``ECE = sum_b |B_b| / n * |acc(B_b) - conf(B_b)|``, empty bins contribute nothing.
- :func:`reliability`: the per-bin counts, accuracies and mean confidences behind it;
  :func:`reliability_diagram` draws them as a PNG.
- :func:`completion_confidence`: the confidence of one generated completion (its ``Completion.logprobs`` from
  :mod:`rlkit.rollout`), ``answer`` = the probability of the tokens that spell the extracted final answer (for
  a single-token answer, e.g. a multiple-choice letter, that is the answer-token probability) or ``sequence`` =
  the probability of the whole completion.

``rlkit eval --calibration [answer|sequence] --ece-bins 10`` uses these; see ``docs/methods/calibration.md``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    import numpy as np

__all__ = ["CONFIDENCE_MODES", "answer_span", "completion_confidence", "ece", "reliability", "reliability_diagram",
           "summarize", "token_span"]

CONFIDENCE_MODES = ("answer", "sequence")
_TOL = 1e-6  # a probability computed as exp(log p) may exceed 1 by rounding


def _array(values) -> "np.ndarray":
    import numpy as np

    if hasattr(values, "detach"):  # a torch tensor, possibly on a GPU
        values = values.detach().cpu().numpy()
    return np.asarray(values, dtype=np.float64).reshape(-1)


def _check(confidences: Sequence[float], correct: Sequence, bins: int):
    import numpy as np

    if isinstance(bins, bool) or not isinstance(bins, int) or bins < 1:
        raise ValueError(f"bins must be a positive integer, got {bins!r}")
    conf = _array(confidences)
    acc = (_array(correct) != 0).astype(np.float64)
    if conf.shape != acc.shape:
        raise ValueError(f"{conf.size} confidences but {acc.size} correctness flags")
    if not conf.size:
        raise ValueError("no predictions to compute calibration over")
    bad = ~((conf >= -_TOL) & (conf <= 1 + _TOL))  # also catches NaN
    if bad.any():
        raise ValueError(f"confidences must lie in [0, 1], got {conf[bad][0]!r}")
    return np.clip(conf, 0.0, 1.0), acc


def _bin_index(conf, bins: int):
    """Bin of each confidence: ``b`` with ``b/bins < c <= (b+1)/bins``; 0 goes to the first bin. Edges are
    ``b/bins`` computed as divisions, so 0.3 falls in (0.2, 0.3] as written (0.3 * 10 rounds up past 3)."""
    import numpy as np

    b = np.clip(np.ceil(conf * bins).astype(np.int64) - 1, 0, bins - 1)
    b = np.where((b + 1 < bins) & (conf > (b + 1) / bins), b + 1, b)  # c * bins rounded down across an edge
    return np.where((b > 0) & (conf <= b / bins), b - 1, b)  # c * bins rounded up across an edge


def reliability(confidences: Sequence[float], correct: Sequence, bins: int = 10) -> list[dict]:
    """One dict per equal-width bin, in order: ``lo``, ``hi`` (the bin is ``(lo, hi]``, the first ``[0, hi]``),
    ``count``, ``accuracy`` and ``confidence`` (the mean confidence; both None for an empty bin). Inputs: sequences
    or arrays/tensors of confidences in [0, 1] and of truthy/falsy verdicts."""
    import numpy as np

    conf, acc = _check(confidences, correct, bins)
    b = _bin_index(conf, bins)
    counts = np.bincount(b, minlength=bins)
    hits = np.bincount(b, weights=acc, minlength=bins)
    sums = np.bincount(b, weights=conf, minlength=bins)
    return [{"lo": k / bins, "hi": (k + 1) / bins, "count": int(n),
             "accuracy": (float(hits[k] / n) if n else None), "confidence": (float(sums[k] / n) if n else None)}
            for k, n in enumerate(counts)]


def ece(confidences: Sequence[float], correct: Sequence, bins: int = 10) -> float:
    """Expected calibration error with ``bins`` equal-width bins (see the module docstring); ``correct`` holds
    truthy/falsy verdicts. ValueError on empty input, mismatched lengths or a confidence outside [0, 1]."""
    table = reliability(confidences, correct, bins)
    n = sum(b["count"] for b in table)
    return sum(b["count"] / n * abs(b["accuracy"] - b["confidence"]) for b in table if b["count"])


def reliability_diagram(confidences: Sequence[float], correct: Sequence, path: str | Path, bins: int = 10,
                        title: str = "") -> Path:
    """PNG at ``path``: per-bin accuracy bars against the diagonal (the gap to the bin's mean confidence shaded),
    and below them the share of predictions per bin; the title carries the ECE and n. Returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .plot import save_figure

    table = reliability(confidences, correct, bins)
    n = sum(b["count"] for b in table)
    width = 1.0 / bins
    centers = [(b["lo"] + b["hi"]) / 2 for b in table]
    fig, (ax, hx) = plt.subplots(2, 1, figsize=(5, 6), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    ax.plot([0, 1], [0, 1], "--", color="gray", label="perfect calibration")
    filled = [(x, b) for x, b in zip(centers, table) if b["count"]]
    ax.bar([x for x, _ in filled], [b["accuracy"] for _, b in filled], width=width * 0.95, color="tab:blue",
           edgecolor="black", label="accuracy")
    for k, (x, b) in enumerate(filled):
        lo, hi = sorted((b["accuracy"], b["confidence"]))
        ax.bar(x, hi - lo, bottom=lo, width=width * 0.95, color="tab:red", alpha=0.3,
               label="gap to mean confidence" if k == 0 else None)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.legend(loc="upper left")
    ax.grid(alpha=0.3)
    ax.set_title(f"{title + ': ' if title else ''}ECE {ece(confidences, correct, bins):.3f} (n={n}, {bins} bins)")
    hx.bar(centers, [b["count"] / n for b in table], width=width * 0.95, color="tab:gray", edgecolor="black")
    hx.set_xlabel("confidence")
    hx.set_ylabel("share")
    hx.grid(alpha=0.3)
    return save_figure(fig, path)


# --------------------------------------------------------------------------------------------------
# Confidence of a completion's final answer


def _answer_region(text: str) -> int:
    """Where the part of ``text`` that ``rlkit_rewards.text.extract_answer`` reads its answer from starts, with
    the same priority (last ``\\boxed{}``, last ``<answer>`` tag, last ``####``, last "answer is" trigger)."""
    from rlkit_rewards.text import _ANSWER_TAG, _ANSWER_TRIGGER, _HASHES, _answer_body, last_boxed

    if last_boxed(text) is not None:
        return max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    tags = list(_ANSWER_TAG.finditer(text))
    if tags:
        return tags[-1].start(1)
    hashes = list(_HASHES.finditer(text))
    if hashes:
        return hashes[-1].start(1)
    for trigger in reversed(list(_ANSWER_TRIGGER.finditer(text))):
        if _answer_body(text, trigger.end()):
            return trigger.end()
    return 0


def answer_span(text: str, answer: str | None = None) -> tuple[int, int] | None:
    """Character span ``(start, end)`` of the extracted final answer in ``text`` (the occurrence the extraction
    read, delimiters such as ``$`` or a closing brace excluded); None when no answer is extracted."""
    if answer is None:
        from rlkit_rewards.text import extract_answer

        answer = extract_answer(text)
    if not answer:
        return None
    start = text.find(answer, _answer_region(text))
    if start < 0:
        start = text.rfind(answer)
    return None if start < 0 else (start, start + len(answer))


def token_span(tokenizer, token_ids: Sequence[int], start: int, end: int) -> tuple[int, int]:
    """Token indices ``[first, last)`` of the generated ``token_ids`` whose decoded characters overlap the
    character span ``[start, end)`` of their decoded text (special tokens skipped, as the completion text is).
    Prefix lengths are found by binary search over decoded prefixes, so each call decodes O(log n) prefixes."""
    ids = list(token_ids)

    def length(k: int) -> int:  # characters decoded from the first k tokens
        return len(tokenizer.decode(ids[:k], skip_special_tokens=True))

    def first_reaching(chars: int) -> int:  # smallest k with length(k) >= chars
        lo, hi = 0, len(ids)
        while lo < hi:
            mid = (lo + hi) // 2
            if length(mid) >= chars:
                hi = mid
            else:
                lo = mid + 1
        return lo

    first = first_reaching(start + 1) - 1  # the token that decodes character `start`
    last = first_reaching(end)  # tokens up to this one decode the whole span
    if first < 0 or last > len(ids) or length(last) < end:
        raise ValueError(f"characters [{start}, {end}) are not in the decoded tokens")
    return first, last


def completion_confidence(token_ids: Sequence[int], logprobs: Sequence[float] | None, tokenizer, text: str,
                          mode: str = "answer", answer: str | None = None) -> dict:
    """Confidence of one completion (``token_ids`` and their ``logprobs`` from the generation layer, ``text`` its
    decoded text): ``{"confidence": p or None, "confidence_tokens": [first, last)}``.

    ``answer``: the probability of the tokens overlapping the extracted final answer (``answer``, else extracted
    from ``text``); None when there is no answer. ``sequence``: the probability of every generated token, the
    end-of-sequence token included."""
    if mode not in CONFIDENCE_MODES:
        raise ValueError(f"unknown confidence {mode!r}; use one of {', '.join(CONFIDENCE_MODES)}")
    if logprobs is None:
        raise ValueError("the completion carries no token log-probabilities (generate with "
                         "GenerationSettings(logprobs=True), HF backend)")
    if len(logprobs) != len(token_ids):
        raise ValueError(f"{len(logprobs)} log-probabilities for {len(token_ids)} tokens")
    if mode == "sequence":
        first, last = 0, len(token_ids)
    else:
        span = answer_span(text, answer)
        if span is None:
            return {"confidence": None, "confidence_tokens": None}
        first, last = token_span(tokenizer, token_ids, *span)
    return {"confidence": math.exp(sum(logprobs[first:last])), "confidence_tokens": [first, last]}


def summarize(records: list[dict], mode: str, bins: int = 10) -> dict:
    """Summary figures of records carrying ``confidence`` (None: not scored) and ``correct``: ``confidence``
    (the mode), ``ece``, ``ece_bins``, ``mean_confidence``, ``calibration_n`` (records scored),
    ``calibration_accuracy`` (their accuracy) and ``reliability`` (the per-bin table). ``ece`` and the means are
    None when no record has a confidence."""
    scored = [r for r in records if r.get("confidence") is not None]
    out = {"confidence": mode, "ece_bins": bins, "calibration_n": len(scored), "ece": None, "mean_confidence": None,
           "calibration_accuracy": None, "reliability": None}
    if scored:
        conf = [r["confidence"] for r in scored]
        ok = [r["correct"] for r in scored]
        out.update(ece=ece(conf, ok, bins), mean_confidence=sum(conf) / len(conf),
                   calibration_accuracy=sum(map(bool, ok)) / len(ok), reliability=reliability(conf, ok, bins))
    return out
