"""Step segmentation of a solution, and the step-scorer protocol.

One module splits reasoning into steps for every method that works at the step level (the ``sample`` stage's
optional ``steps`` column, process-reward labels, value-guided search). Splitters (``split_steps(text,
splitter)``):

- ``newline``: at every ``"\\n"`` (the OREO / ER-PRM convention for line-per-step data such as GSM8K);
- ``paragraph``: at blank lines (``"\\n\\n"``);
- ``sentence``: after ``". "`` (a period and a space);
- ``latex_sentence``: after ``".$ "`` as well as ``". "`` (MATH solutions end sentences inside inline math);
- ``stephint``: the StepHint paragraph splitter (blank lines, then lines, then sentences, nearest to equal
  lengths; no model needed), with ``max_steps`` steps.

Every splitter keeps the separators with the step they end, so ``"".join(steps) == text``: concatenated steps
rebuild the solution exactly (what a step-level trainer needs to map steps back to tokens). Empty pieces
(separator runs) are merged into the step before them.

A **step scorer** is anything with ``score(prompt, steps) -> list[float]``: one score per step prefix (a PRM's
probability that the solution is still right after step k, a value model's V(s_k), a verifier's 0/1). PRMs,
value models and verifiers implement it so that search and best-of-N code does not care which one it got.
"""

from __future__ import annotations

import re
from typing import Protocol, runtime_checkable

SPLITTERS = ("newline", "paragraph", "sentence", "latex_sentence", "stephint")

_PATTERNS = {
    "newline": re.compile(r"\n"),
    "paragraph": re.compile(r"\n\s*\n"),
    "sentence": re.compile(r"\. "),
    "latex_sentence": re.compile(r"\.\$ |\. "),
}


@runtime_checkable
class StepScorer(Protocol):
    """Scores the prefixes of a step-split solution: ``score(prompt, steps)[k]`` is the score after ``steps[k]``."""

    def score(self, prompt: str, steps: list[str]) -> list[float]:
        ...


def split_steps(text: str, splitter: str = "newline", max_steps: int = 4, tokenizer=None) -> list[str]:
    """Split ``text`` into steps with ``splitter`` (see the module docstring); ``"".join(result) == text``.

    ``stephint`` needs the policy ``tokenizer`` (its cuts must be token boundaries) and uses ``max_steps``."""
    if splitter not in SPLITTERS:
        raise ValueError(f"step splitter {splitter!r} is not one of {', '.join(SPLITTERS)}")
    if not text:
        return []
    if splitter == "stephint":
        if tokenizer is None:
            raise ValueError("the 'stephint' step splitter needs the policy tokenizer")
        from ..methods.stephint.hints import HintConfig, split_reference

        return split_reference(text, tokenizer, HintConfig(splitter="paragraph", m=max_steps))
    pieces, start = [], 0
    for m in _PATTERNS[splitter].finditer(text):
        pieces.append(text[start:m.end()])
        start = m.end()
    if start < len(text):
        pieces.append(text[start:])
    steps: list[str] = []
    for piece in pieces:
        if steps and (not piece.strip() or not steps[-1].strip()):
            steps[-1] += piece  # separator runs stay with the step they end; leading blanks join the first step
        else:
            steps.append(piece)
    return steps
