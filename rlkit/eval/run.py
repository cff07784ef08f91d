"""``rlkit eval``: load a model, build a benchmark's prompts, evaluate, write completions and summary."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from ..data import build_dataset
from ..recipe import DatasetSpec, ModelSpec
from .math_eval import GenerationSettings, evaluate_rows, write_outputs


def run_eval(model: str, benchmark: str, split: str = "test", limit: int | None = None, samples: int = 0,
             temperature: float = 0.6, max_new_tokens: int = 512, batch_size: int = 16, backend: str = "hf",
             template: str = "auto", output_dir: str | None = None, dtype: str = "auto",
             kv_cache=None, vllm=None, path: str | None = None) -> dict:
    """Evaluate ``model`` on ``benchmark``; ``kv_cache`` is an ``rlkit.kvcache.KVCacheConfig`` (HF backend),
    ``vllm`` an ``rlkit.rollout.VLLMSettings`` (vLLM backend; its dtype defaults to ``dtype``), ``path`` a local
    jsonl for a known benchmark."""
    from ..models import ModelError, load_model, load_tokenizer

    if model == "tiny":
        raise ModelError("--model tiny is an untrained random model; pass a trained checkpoint folder instead")
    mspec = ModelSpec(name=model, dtype=dtype)
    if backend == "vllm":
        from ..models import BUILTIN_MODELS, builtin_path
        from ..rollout.settings import VLLMSettings
        from ..rollout.vllm import platform

        platform()  # a clear error now if vLLM cannot run here, before anything loads
        if vllm is None:
            vllm = VLLMSettings(dtype=dtype)
        tokenizer, lm = load_tokenizer(mspec), None
        model_path = str(builtin_path(model)) if model in BUILTIN_MODELS else model
    else:
        lm, tokenizer = load_model(mspec)
        import torch

        if torch.cuda.is_available():
            lm = lm.to("cuda")
        model_path = model
    ds = build_dataset(DatasetSpec(name=benchmark, split=split, limit=limit, template=template, path=path),
                       tokenizer)
    settings = GenerationSettings(max_new_tokens=max_new_tokens, batch_size=batch_size, temperature=temperature,
                                  backend=backend, kv_cache=kv_cache, vllm=vllm)
    try:
        summary, records = evaluate_rows(lm, tokenizer, ds.to_list(), settings, samples=samples,
                                         model_path=model_path)
    finally:
        if backend == "vllm":
            from ..rollout.vllm import close_engines

            close_engines()
    summary.update({"model": model, "benchmark": benchmark, "split": split, "backend": backend,
                    "kv_cache": kv_cache.to_dict() if kv_cache is not None else None,
                    "vllm": dataclasses.asdict(vllm) if backend == "vllm" else None})
    out = output_dir or str(Path("runs") / "eval" / f"{Path(model).name}-{benchmark.replace(':', '_').replace('/', '_')}")
    comp, summ = write_outputs(out, summary, records)
    summary["outputs"] = {"completions": str(comp), "summary": str(summ)}
    return summary
