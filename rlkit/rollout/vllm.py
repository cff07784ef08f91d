"""vLLM's offline engine for generation outside TRL (evaluation, teachers, the ``sample`` stage).

The one place rlkit builds a ``vllm.LLM``: :func:`engine` starts it once per (model path, settings) and keeps
it for the process, so a chunked or resumed job starts vLLM once. KV-cache compression is an HF-generate
option and is refused here.
"""

from __future__ import annotations

import json
from typing import Any

from .generation import Completion, GenerationSettings

_ENGINES: dict[str, Any] = {}


class VLLMError(RuntimeError):
    """vLLM cannot run here (not installed, no usable platform); the message says what to do instead."""


def import_vllm():
    """The ``vllm`` module, or a clear error naming the fix."""
    try:
        import vllm
    except ImportError:
        raise VLLMError("backend 'vllm' needs vLLM: pip install 'rlkit-reasoning[vllm]' (GPU); "
                        "or use backend 'hf'") from None
    import torch

    if not torch.cuda.is_available():
        raise VLLMError("backend 'vllm' needs a CUDA GPU; use backend 'hf' on CPU")
    return vllm


def engine(model_path: str, settings: GenerationSettings, **extra: Any) -> Any:
    """A cached ``vllm.LLM`` for ``model_path`` with ``settings.vllm_kwargs`` (plus ``extra``)."""
    kwargs = {**settings.vllm_kwargs, **extra}
    key = json.dumps([model_path, kwargs], sort_keys=True, default=str)
    if key not in _ENGINES:
        vllm = import_vllm()
        _ENGINES[key] = vllm.LLM(model=model_path, **kwargs)
    return _ENGINES[key]


def sampling_params(settings: GenerationSettings, num_samples: int, do_sample: bool) -> Any:
    vllm = import_vllm()
    kwargs: dict[str, Any] = dict(n=num_samples, max_tokens=settings.max_new_tokens,
                                  temperature=settings.temperature if do_sample else 0.0,
                                  top_p=settings.top_p if do_sample else 1.0)
    if do_sample and settings.top_k is not None:
        kwargs["top_k"] = settings.top_k if settings.top_k > 0 else -1
    if settings.stop:
        kwargs["stop"] = list(settings.stop)
    if settings.seed is not None:
        kwargs["seed"] = settings.seed
    return vllm.SamplingParams(**kwargs)


def generate_vllm(model_path: str, prompts: list[str], settings: GenerationSettings, num_samples: int = 1,
                  do_sample: bool = False, **engine_kwargs: Any) -> list[list[Completion]]:
    """Completions with vLLM's offline engine (``engine_kwargs`` go to ``vllm.LLM``, e.g. ``dtype``)."""
    if settings.kv_cache is not None and settings.kv_cache.kind != "none":
        raise VLLMError(f"kv_cache kind {settings.kv_cache.kind!r} applies to HF generate only; vLLM manages "
                        "its own KV cache (use backend 'hf', or kv_cache kind none)")
    llm = engine(model_path, settings, **engine_kwargs)
    outs = llm.generate(prompts, sampling_params(settings, num_samples, do_sample))
    return [[Completion(c.text, list(c.token_ids), "stop" if c.finish_reason == "stop" else "length")
             for c in o.outputs] for o in outs]
