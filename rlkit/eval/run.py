"""``rlkit eval``: load a model, build a benchmark's prompts, evaluate, write completions and summary.

Decoders: ``greedy`` (pass@1, plus pass@k / maj@k with ``samples``) and ``value_search`` (value-guided
step-level beam search steered by a saved value model, HF backend only)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from ..data import build_dataset
from ..recipe import DatasetSpec, ModelSpec
from .math_eval import GenerationSettings, evaluate_rows, evaluate_search, write_outputs

DECODERS = ("greedy", "value_search")


def _check_decoder(decoder: str, backend: str, value_model: str | None, samples: int, kv_cache) -> None:
    from ..config import ConfigError

    if decoder not in DECODERS:
        raise ConfigError(f"unknown decoder {decoder!r}; use one of {', '.join(DECODERS)}")
    if decoder != "value_search":
        if value_model is not None:
            raise ConfigError("--value-model only applies to --decoder value_search")
        return
    if backend != "hf":
        raise ConfigError("--decoder value_search runs on the HF backend only (it generates one step at a time "
                          "with transformers generate); drop --backend vllm")
    if value_model is None:
        raise ConfigError("--decoder value_search needs --value-model DIR (a saved value model, e.g. an OREO "
                          "stage's final/critic)")
    if samples:
        raise ConfigError("--samples applies to the greedy decoder; value_search returns one solution per problem")
    if kv_cache is not None:
        raise ConfigError("--kv-cache is not supported with --decoder value_search")


def check_value_model_dir(path: str) -> None:
    """One-line ModelError unless ``path`` holds a saved value model."""
    from ..models import ModelError
    from ..value import is_value_model_dir

    if not is_value_model_dir(path):
        raise ModelError(f"--value-model {path} is not a value model folder (no rlkit value_model.json); pass the "
                         "critic folder an OREO stage writes, e.g. <run>/final/critic")


def load_value_model(path: str, tokenizer, dtype: str = "auto"):
    """The value model saved at ``path`` (on the GPU when there is one), with a tokenizer: its own if one was
    saved with it, else ``tokenizer`` (the policy's). One-line ModelError when ``path`` is not a value model."""
    import torch

    from ..value import ValueModel

    check_value_model_dir(path)
    torch_dtype = None if dtype in (None, "auto") else getattr(torch, dtype)
    vm = ValueModel.from_pretrained(path, dtype=torch_dtype, device="cuda" if torch.cuda.is_available() else None)
    if getattr(vm, "tokenizer", None) is None:
        vm.attach_tokenizer(tokenizer)
    elif vm.tokenizer.get_vocab() != tokenizer.get_vocab():
        import warnings

        warnings.warn(f"the value model at {path} has a different vocabulary from the policy's tokenizer; it "
                      "scores the text with its own tokenizer", stacklevel=2)
    vm.eval()
    return vm


def run_eval(model: str, benchmark: str, split: str = "test", limit: int | None = None, samples: int = 0,
             temperature: float | None = None, max_new_tokens: int = 512, batch_size: int = 16, backend: str = "hf",
             template: str = "auto", output_dir: str | None = None, dtype: str = "auto",
             kv_cache=None, vllm=None, path: str | None = None, decoder: str = "greedy",
             value_model: str | None = None, search=None) -> dict:
    """Evaluate ``model`` on ``benchmark``; ``kv_cache`` is an ``rlkit.kvcache.KVCacheConfig`` (HF backend),
    ``vllm`` an ``rlkit.rollout.VLLMSettings`` (vLLM backend; its dtype defaults to ``dtype``), ``path`` a local
    jsonl for a known benchmark.

    ``decoder="value_search"`` runs value-guided step-level beam search steered by the value model saved at
    ``value_model``, with ``search`` (an ``rlkit.rollout.SearchSettings``; its ``max_total_tokens`` becomes
    ``max_new_tokens``, its ``batch_size`` ``batch_size`` problems, and its ``temperature`` ``temperature`` when
    given). ``temperature`` defaults to 0.6 for sampled pass@k and to the search's (1.0) for value search."""
    from ..models import ModelError, load_model, load_tokenizer

    _check_decoder(decoder, backend, value_model, samples, kv_cache)
    if decoder == "value_search":
        check_value_model_dir(value_model)  # before the policy loads
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
    scorer = load_value_model(value_model, tokenizer, dtype) if decoder == "value_search" else None
    ds = build_dataset(DatasetSpec(name=benchmark, split=split, limit=limit, template=template, path=path),
                       tokenizer)
    if decoder == "value_search":
        from ..rollout.search import SearchSettings, parse_step_stops

        fields = dataclasses.asdict(search) if search is not None else {"stop": parse_step_stops(None, benchmark)}
        fields.update(max_total_tokens=max_new_tokens, batch_size=batch_size)
        if temperature is not None:
            fields["temperature"] = temperature
        search = SearchSettings(**fields)
        summary, records = evaluate_search(lm, tokenizer, ds.to_list(), scorer, search)
        summary["value_model"] = value_model
    else:
        settings = GenerationSettings(max_new_tokens=max_new_tokens, batch_size=batch_size,
                                      temperature=0.6 if temperature is None else temperature,
                                      backend=backend, kv_cache=kv_cache, vllm=vllm)
        try:
            summary, records = evaluate_rows(lm, tokenizer, ds.to_list(), settings, samples=samples,
                                             model_path=model_path)
        finally:
            if backend == "vllm":
                from ..rollout.vllm import close_engines

                close_engines()
        summary["decoder"] = "greedy"
    summary.update({"model": model, "benchmark": benchmark, "split": split, "backend": backend,
                    "kv_cache": kv_cache.to_dict() if kv_cache is not None else None,
                    "vllm": dataclasses.asdict(vllm) if backend == "vllm" else None})
    out = output_dir or str(Path("runs") / "eval" / f"{Path(model).name}-{benchmark.replace(':', '_').replace('/', '_')}")
    comp, summ = write_outputs(out, summary, records)
    summary["outputs"] = {"completions": str(comp), "summary": str(summ)}
    return summary
