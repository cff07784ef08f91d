"""Refusal-aware figures (Auto-CEI, arXiv 2410.07627; the released ``MATH_eval.py``): an answer is an IDK ("I don't
know") answer when it contains one of a list of phrases; ``precision`` = correct / non-IDK answers, ``idk_rate`` =
IDK / all, ``accuracy`` = correct / all, an IDK answer never counting as correct, and Auto-CEI's objective
``f = (1 - lambda) precision + lambda (1 - idk_rate)``.

As in the released evaluator, an answer whose extracted final answer says "no answer" (R-Tuning's ``#### No
answer.``) is an IDK answer too, whatever the list. ``rlkit eval --idk-phrases eval|reward|"a;b"`` adds these
figures to any decoder's summary; :func:`evaluate_idk` is the greedy evaluation the ``autocei`` stage runs on its
validation split. Phrase lists: ``eval`` = :data:`EVAL_IDK_PHRASES` (``MATH_eval.py``), ``reward`` =
:data:`REWARD_IDK_PHRASES` (the reward's ``reward_processor``), or phrases separated by ``;``.
"""

from __future__ import annotations

from typing import Sequence

from ..methods.autocei.core import EVAL_IDK_PHRASES, REWARD_IDK_PHRASES, idk_metrics, is_idk, objective

__all__ = ["EVAL_IDK_PHRASES", "REWARD_IDK_PHRASES", "evaluate_idk", "idk_summary", "parse_idk_phrases"]

PHRASE_LISTS = {"eval": EVAL_IDK_PHRASES, "reward": REWARD_IDK_PHRASES}


def parse_idk_phrases(spec: str | Sequence[str]) -> tuple[str, ...]:
    """``eval`` / ``reward`` (the released lists), ``"phrase1;phrase2"``, or a list of phrases."""
    if isinstance(spec, str):
        phrases = PHRASE_LISTS.get(spec.strip()) or tuple(p.strip() for p in spec.split(";"))
    else:
        phrases = tuple(str(p).strip() for p in spec)
    phrases = tuple(p for p in phrases if p)
    if not phrases:
        raise ValueError("IDK phrases: give `eval`, `reward` or phrases separated by `;` (e.g. \"I don't know;sorry\")")
    return phrases


def answer_is_idk(completion: str, extracted: str | None, phrases: Sequence[str]) -> bool:
    """The released evaluator's IDK test: a phrase in the completion, or "no answer" as the final answer."""
    return is_idk(completion, phrases) or (extracted is not None and "no answer" in extracted.lower())


def idk_summary(records: list[dict], phrases: Sequence[str], lam: float = 0.2) -> dict:
    """Mark each record (``completion``, ``extracted``, ``correct``) with ``idk`` and return ``precision``,
    ``idk_rate``, ``accuracy`` (IDK answers never correct) and ``f`` (lambda ``lam``)."""
    idk = [answer_is_idk(r["completion"], r.get("extracted"), phrases) for r in records]
    for r, flag in zip(records, idk):
        r["idk"] = flag
    m = idk_metrics([bool(r["correct"]) and not flag for r, flag in zip(records, idk)], idk)
    return {**m, "f": objective(m["precision"], m["idk_rate"], lam), "lambda": lam, "idk_phrases": list(phrases)}


def evaluate_idk(model, tokenizer, rows: list[dict], settings, phrases: Sequence[str] = EVAL_IDK_PHRASES,
                 lam: float = 0.2, progress: bool = True, model_path: str | None = None) -> tuple[dict, list[dict]]:
    """Greedy evaluation of ``rows`` (``prompt``, ``answer``) with the IDK figures: ``(summary, records)``;
    ``summary`` holds ``pass@1``, ``precision``, ``idk_rate``, ``accuracy`` and ``f``."""
    from .math_eval import evaluate_rows

    summary, records = evaluate_rows(model, tokenizer, rows, settings, samples=0, progress=progress,
                                     model_path=model_path)
    summary.update(idk_summary(records, phrases, lam))
    return summary, records
