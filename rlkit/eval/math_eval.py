"""Math evaluation: greedy pass@1, sampled pass@k and maj@k, generated through :mod:`rlkit.rollout` (HF
``generate`` or vLLM).

Verdicts use ``rlkit_rewards``' math verifier (the same one the training reward uses). For sampled
evaluation with ``k`` samples per problem, ``pass@k`` is 1 when any sample is right (n = k, so the
unbiased estimator reduces to this), ``pass@1(sampled)`` is the mean over samples, and ``maj@k``
takes the most common extracted answer (answers that compare equal as numbers are pooled; ties go to
the answer seen first) and checks it.

Value-guided search (:func:`evaluate_search`, ``rlkit eval --decoder value_search``) judges the one solution
:func:`rlkit.rollout.search.value_guided_search` returns per problem, as greedy evaluation judges its
completion, and keeps the search trace in each record.

Best-of-N (``evaluate_rows(..., selector=...)``, ``rlkit eval --samples N --select SPEC``) picks one of the N
samples per problem with a :class:`rlkit.eval.select.Selector` (PRM / ORM score, majority, first) and reports
``bon@N`` (and the curve over the first n samples, n = 1, 2, 4, ...); every candidate's scores go into its record.

Reward-guided speculative decoding (:func:`evaluate_rsd`, ``rlkit eval --decoder rsd``) judges the solution
:func:`rlkit.rollout.rsd.rsd_decode` writes per problem and keeps its RSD record (steps, sources, rewards, token
counters, per-model FLOPs); the summary totals them (:func:`rlkit.rollout.rsd.summarize`).

Calibration (``evaluate_rows(..., calibration="answer"|"sequence")``, ``rlkit eval --calibration``): the greedy
completions are generated with their token log-probabilities, every greedy record gets the model's confidence in
its final answer (:func:`rlkit.eval.calibration.completion_confidence`) and the summary the ECE and the reliability
table (:func:`rlkit.eval.calibration.summarize`).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from rlkit_rewards.math import numbers_equal, verify_answer
from rlkit_rewards.text import extract_answer, parse_number

from ..rollout import GenerationSettings, generate, generate_texts, render_prompts

__all__ = ["GenerationSettings", "evaluate_rows", "evaluate_rsd", "evaluate_search", "judge", "majority",
           "render_prompts", "write_outputs"]


def _same(a: str, b: str) -> bool:
    x, y = parse_number(a), parse_number(b)
    if x is not None and y is not None:
        return numbers_equal(x, y)
    return a.strip() == b.strip()


def majority(answers: list[str | None]) -> str | None:
    """Most common answer, pooling answers that are equal numbers; None when nothing was extracted."""
    buckets: list[list[str]] = []
    for a in answers:
        if a is None:
            continue
        for b in buckets:
            if _same(b[0], a):
                b.append(a)
                break
        else:
            buckets.append([a])
    if not buckets:
        return None
    return max(buckets, key=len)[0]  # max keeps the first of equal-length buckets


def judge(completion: str, gold: str) -> tuple[str | None, bool]:
    pred = extract_answer(completion)
    return pred, bool(pred is not None and verify_answer(gold, pred))


def evaluate_rows(model, tokenizer, rows: list[dict], settings: GenerationSettings | None = None,
                  samples: int = 0, progress: bool = True, model_path: str | None = None,
                  selector=None, calibration: str | None = None, ece_bins: int = 10) -> tuple[dict, list[dict]]:
    """Evaluate ``rows`` (``prompt``, ``answer``): greedy pass@1, plus pass@k/maj@k when ``samples`` > 0.

    ``selector`` (an ``rlkit.eval.select.Selector``, with ``samples`` > 0): choose one sample per problem and
    report ``bon@{samples}`` and ``bon_curve`` (best-of-n over the first n samples); each sample's record gets
    its scores (``step_scores``, ``score``) and each problem's record the chosen index (``selected``).

    ``calibration`` (``answer`` or ``sequence``, HF backend): each greedy record gets ``confidence`` (None when
    ``answer`` finds no final answer) and ``confidence_tokens`` (the token span it multiplies), and the summary
    ``ece`` over ``ece_bins`` bins, ``mean_confidence`` and the rest of :func:`rlkit.eval.calibration.summarize`.

    Returns ``(summary, records)``; each record holds the completion(s), extracted answer(s) and verdicts.
    """
    settings = settings or GenerationSettings()
    t0 = time.time()
    prompts = render_prompts([r["prompt"] for r in rows], tokenizer)

    def gen(n, sample, desc):
        return generate_texts(model, tokenizer, prompts, settings, n, sample, progress, desc, model_path)

    if calibration is None:
        greedy = [(outs[0], None) for outs in gen(1, False, "greedy")]
    else:
        from dataclasses import replace

        from .calibration import CONFIDENCE_MODES

        if calibration not in CONFIDENCE_MODES:
            raise ValueError(f"unknown confidence {calibration!r}; use one of {', '.join(CONFIDENCE_MODES)}")
        greedy = [(outs[0].text, outs[0]) for outs in generate(
            model, tokenizer, prompts, replace(settings, logprobs=True), 1, False, progress, "greedy", model_path)]
    records = []
    correct = 0
    for row, (text, completion) in zip(rows, greedy):
        pred, ok = judge(text, row["answer"])
        correct += ok
        rec = {"question": row.get("question"), "gold": row["answer"], "completion": text, "extracted": pred,
               "correct": ok}
        if completion is not None:
            from .calibration import completion_confidence

            rec.update(completion_confidence(completion.token_ids, completion.logprobs, tokenizer, text,
                                             calibration, answer=pred))
        records.append(rec)
    summary: dict[str, Any] = {"n": len(rows), "pass@1": correct / max(1, len(rows))}
    if calibration is not None:
        from .calibration import summarize as calibration_summary

        summary.update(calibration_summary(records, calibration, ece_bins))
    if samples > 0:
        sampled = gen(samples, True, f"sample x{samples}")
        any_ok = maj_ok = mean_ok = 0.0
        for rec, outs in zip(records, sampled):
            verdicts = [judge(c, rec["gold"]) for c in outs]
            rec["samples"] = [{"completion": c, "extracted": p, "correct": ok} for c, (p, ok) in zip(outs, verdicts)]
            flags = [ok for _, ok in verdicts]
            any_ok += any(flags)
            mean_ok += sum(flags) / len(flags)
            maj = majority([p for p, _ in verdicts])
            rec["majority"] = maj
            maj_ok += bool(maj is not None and verify_answer(rec["gold"], maj))
        n = max(1, len(rows))
        summary.update({f"pass@{samples}": any_ok / n, f"maj@{samples}": maj_ok / n, "pass@1(sampled)": mean_ok / n,
                        "samples": samples, "temperature": settings.temperature})
        if selector is not None:
            summary.update(_select(selector, prompts, records, samples))
    elif selector is not None:
        raise ValueError("best-of-N selection needs samples > 0")
    summary["unparseable"] = sum(r["extracted"] is None for r in records) / max(1, len(records))
    summary["seconds"] = round(time.time() - t0, 2)
    return summary, records


def _select(selector, prompts: list[str], records: list[dict], samples: int) -> dict:
    """Score every sample, choose one per problem, and the best-of-n figures (see :func:`evaluate_rows`)."""
    from .select import best_of_n, curve_ns, select_index

    scores = selector.score(prompts, [[s["completion"] for s in rec["samples"]] for rec in records])
    problems = []
    for rec, per_sample in zip(records, scores):
        for s, sc in zip(rec["samples"], per_sample):
            s.update(sc)
        cands = [{"correct": s["correct"], "extracted": s["extracted"], "score": s.get("score")}
                 for s in rec["samples"]]
        rec["selected"] = select_index(cands, selector.rule)
        rec["bon_correct"] = bool(cands[rec["selected"]]["correct"])
        problems.append(cands)
    curve = best_of_n(problems, curve_ns(samples), selector.rule)
    return {f"bon@{samples}": curve[samples], "bon_curve": {str(k): v for k, v in curve.items()},
            "select": selector.spec}


def evaluate_search(model, tokenizer, rows: list[dict], scorer, settings=None,
                    progress: bool = True) -> tuple[dict, list[dict]]:
    """Evaluate ``rows`` (``prompt``, ``answer``) with value-guided step-level beam search steered by ``scorer``
    (``settings``: a ``SearchSettings``). ``pass@1`` judges the returned solution; each record's ``search``
    field holds the trace and counters (see ``docs/methods/value_search.md``)."""
    from ..rollout.search import SearchSettings, value_guided_search

    settings = settings or SearchSettings()
    t0 = time.time()
    prompts = render_prompts([r["prompt"] for r in rows], tokenizer)
    results = value_guided_search(model, tokenizer, prompts, scorer, settings, progress=progress)
    records = []
    for row, res in zip(rows, results):
        pred, ok = judge(res.text, row["answer"])
        records.append({"question": row.get("question"), "gold": row["answer"], "completion": res.text,
                        "extracted": pred, "correct": ok, "score": res.score,
                        "search": {"score": res.score, "finished": res.finished, "finish_reason": res.finish_reason,
                                   "rounds": res.rounds, "sampled_steps": res.sampled_steps,
                                   "generated_tokens": res.generated_tokens, "steps": res.steps,
                                   "trace": res.trace}})
    n = max(1, len(rows))
    summary: dict[str, Any] = {
        "n": len(rows), "pass@1": sum(r["correct"] for r in records) / n, "decoder": "value_search",
        "beams": settings.beams, "expansions": settings.n_expansions, "max_rounds": settings.max_rounds,
        "step_stops": list(settings.stop), "max_step_tokens": settings.max_step_tokens,
        "max_total_tokens": settings.max_total_tokens, "temperature": settings.temperature,
        "top_p": settings.top_p, "top_k": settings.top_k, "seed": settings.seed, "add_eos": settings.add_eos,
        "mean_rounds": sum(r.rounds for r in results) / n,
        "mean_sampled_steps": sum(r.sampled_steps for r in results) / n,
        "mean_generated_tokens": sum(r.generated_tokens for r in results) / n,
        "finished": sum(r.finished for r in results) / n,
    }
    summary["unparseable"] = sum(r["extracted"] is None for r in records) / n
    summary["seconds"] = round(time.time() - t0, 2)
    return summary, records


def evaluate_rsd(draft, target, rows: list[dict], scorer, settings=None,
                 progress: bool = True) -> tuple[dict, list[dict]]:
    """Evaluate ``rows`` (``prompt``, ``answer``) with reward-guided speculative decoding: ``draft`` and
    ``target`` are ``rlkit.rollout.rsd.DecodingModel`` (the prompts are rendered with the draft's tokenizer, as
    the released code renders them), ``scorer`` a step scorer, ``settings`` an ``RSDSettings``. ``pass@1`` judges
    the decoded solution; each record's ``rsd`` field is its :class:`rlkit.rollout.rsd.RSDResult`; the summary
    holds the settings, the token counters, the acceptance rate and per-model FLOPs (``summarize``)."""
    from dataclasses import asdict

    from ..rollout.rsd import RSDSettings, rsd_decode, summarize

    settings = settings or RSDSettings()
    t0 = time.time()
    prompts = render_prompts([r["prompt"] for r in rows], draft.tokenizer)
    results = rsd_decode(draft, target, scorer, prompts, settings, progress=progress)
    records = []
    for row, res in zip(rows, results):
        pred, ok = judge(res.text, row["answer"])
        records.append({"question": row.get("question"), "gold": row["answer"], "completion": res.text,
                        "extracted": pred, "correct": ok, "rsd": res.to_dict()})
    n = max(1, len(rows))
    summary: dict[str, Any] = {"n": len(rows), "pass@1": sum(r["correct"] for r in records) / n, "decoder": "rsd"}
    summary.update({k: v for k, v in asdict(settings).items() if k not in ("vllm", "backend")})
    summary.update(summarize(results))
    summary["unparseable"] = sum(r["extracted"] is None for r in records) / n
    summary["seconds"] = round(time.time() - t0, 2)
    return summary, records


def write_outputs(out_dir: str | Path, summary: dict, records: list[dict]) -> tuple[Path, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    comp = out / "completions.jsonl"
    with comp.open("w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    summ = out / "summary.json"
    summ.write_text(json.dumps(summary, indent=2) + "\n")
    return comp, summ
