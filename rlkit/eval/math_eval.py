"""Math evaluation: greedy pass@1, sampled pass@k and maj@k, with HF ``generate`` or vLLM.

Verdicts use ``rlkit_rewards``' math verifier (the same one the training reward uses). For sampled
evaluation with ``k`` samples per problem, ``pass@k`` is 1 when any sample is right (n = k, so the
unbiased estimator reduces to this), ``pass@1(sampled)`` is the mean over samples, and ``maj@k``
takes the most common extracted answer (answers that compare equal as numbers are pooled; ties go to
the answer seen first) and checks it.
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from rlkit_rewards.math import numbers_equal, verify_answer
from rlkit_rewards.text import extract_answer, parse_number


@dataclass
class GenerationSettings:
    max_new_tokens: int = 256
    batch_size: int = 32
    temperature: float = 1.0
    top_p: float = 1.0
    backend: str = "hf"
    """``hf`` (transformers generate) or ``vllm``."""
    vllm_kwargs: dict = field(default_factory=dict)
    kv_cache: Any = None
    """An ``rlkit.kvcache.KVCacheConfig`` (PolarQuant / ThinK key-cache compression for HF generate), or None."""


def render_prompts(prompts: list, tokenizer) -> list[str]:
    """Prompts as text: chat-message prompts go through the tokenizer's chat template."""
    out = []
    for p in prompts:
        if isinstance(p, str):
            out.append(p)
        else:
            out.append(tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True))
    return out


@torch.no_grad()
def generate_hf(model, tokenizer, prompts: list[str], settings: GenerationSettings, num_samples: int = 1,
                do_sample: bool = False, progress: bool = True, desc: str = "generate") -> list[list[str]]:
    """``num_samples`` completions per prompt with ``model.generate`` (left padding, length-sorted batches)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    results: list[list[str]] = [[] for _ in prompts]
    add_special = not any(tokenizer.bos_token and p.startswith(tokenizer.bos_token) for p in prompts[:1])
    compress = settings.kv_cache is not None and settings.kv_cache.kind != "none"
    stack = contextlib.ExitStack()
    if compress:
        from ..kvcache import kv_compression

        stack.enter_context(kv_compression(model, settings.kv_cache))  # a fresh compressed cache per generate
    try:
        bar = tqdm(total=len(prompts), desc=desc, disable=not progress, leave=False)
        for start in range(0, len(order), settings.batch_size):
            idx = order[start : start + settings.batch_size]
            enc = tokenizer([prompts[i] for i in idx], return_tensors="pt", padding=True,
                            add_special_tokens=add_special).to(device)
            gen_kwargs: dict[str, Any] = dict(max_new_tokens=settings.max_new_tokens, do_sample=do_sample,
                                              num_return_sequences=num_samples, pad_token_id=tokenizer.pad_token_id)
            if do_sample:
                gen_kwargs.update(temperature=settings.temperature, top_p=settings.top_p)
            else:
                gen_kwargs.update(temperature=None, top_p=None, top_k=None)
            out = model.generate(**enc, **gen_kwargs)
            texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
            for j, i in enumerate(idx):
                results[i] = texts[j * num_samples : (j + 1) * num_samples]
            bar.update(len(idx))
        bar.close()
    finally:
        stack.close()
        tokenizer.padding_side = side
        if was_training:
            model.train()
    return results


def generate_vllm(model_path: str, prompts: list[str], settings: GenerationSettings, num_samples: int = 1,
                  do_sample: bool = False) -> list[list[str]]:
    """Completions with vLLM's offline engine (needs the ``vllm`` extra and a GPU)."""
    try:
        from vllm import LLM, SamplingParams
    except ImportError:
        raise RuntimeError("backend 'vllm' needs vLLM: pip install 'rlkit-reasoning[vllm]' (GPU only); "
                           "or use --backend hf") from None
    if not torch.cuda.is_available():
        raise RuntimeError("backend 'vllm' needs a CUDA GPU; use --backend hf on CPU")
    if settings.kv_cache is not None and settings.kv_cache.kind != "none":
        raise RuntimeError(f"kv_cache kind {settings.kv_cache.kind!r} applies to HF generate only; vLLM manages "
                           "its own KV cache (use --backend hf, or kv_cache kind none)")
    llm = LLM(model=model_path, **settings.vllm_kwargs)
    params = SamplingParams(n=num_samples, max_tokens=settings.max_new_tokens,
                            temperature=settings.temperature if do_sample else 0.0,
                            top_p=settings.top_p if do_sample else 1.0)
    outs = llm.generate(prompts, params)
    return [[c.text for c in o.outputs] for o in outs]


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
                  samples: int = 0, progress: bool = True, model_path: str | None = None) -> tuple[dict, list[dict]]:
    """Evaluate ``rows`` (``prompt``, ``answer``): greedy pass@1, plus pass@k/maj@k when ``samples`` > 0.

    Returns ``(summary, records)``; each record holds the completion(s), extracted answer(s) and verdicts.
    """
    settings = settings or GenerationSettings()
    t0 = time.time()
    prompts = render_prompts([r["prompt"] for r in rows], tokenizer)

    def gen(n, sample, desc):
        if settings.backend == "vllm":
            return generate_vllm(model_path or model.name_or_path, prompts, settings, n, sample)
        if settings.backend != "hf":
            raise ValueError(f"unknown generation backend {settings.backend!r}; use 'hf' or 'vllm'")
        return generate_hf(model, tokenizer, prompts, settings, n, sample, progress, desc)

    greedy = gen(1, False, "greedy")
    records = []
    correct = 0
    for row, outs in zip(rows, greedy):
        pred, ok = judge(outs[0], row["answer"])
        correct += ok
        records.append({"question": row.get("question"), "gold": row["answer"], "completion": outs[0],
                        "extracted": pred, "correct": ok})
    summary: dict[str, Any] = {"n": len(rows), "pass@1": correct / max(1, len(rows))}
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
    summary["unparseable"] = sum(r["extracted"] is None for r in records) / max(1, len(records))
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
