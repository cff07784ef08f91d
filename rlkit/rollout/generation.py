"""Generation back ends: HF ``generate`` (with the KV-cache compression option) and vLLM, behind one call.

Evaluation, the StepHint teacher, the ``sample`` stage and any method that generates outside TRL's loop go
through :func:`generate` (completions with their token ids) or :func:`generate_texts` (texts only). TRL's own
rollouts stay in TRL; the GRPO trainer only wraps them in :func:`compressed_generate` when a KV-cache
compression is configured.

- **HF** (:func:`generate_hf`): left padding, prompts sorted by length into batches of ``batch_size``,
  ``num_samples`` return sequences per prompt; greedy unless ``do_sample``. ``top_k=None`` keeps the model's
  generation-config default (as before this layer existed). ``seed`` seeds a forked torch RNG, so the
  caller's random state is untouched. ``stop`` strings end a completion (the text is cut before the first
  stop string, as vLLM does; the token ids keep what was generated). With ``settings.logprobs`` each
  completion also carries its tokens' log-probabilities under the model's own distribution (raw logits,
  temperature 1, no filtering), e.g. for calibration in ``rlkit eval``.
- **vLLM** (:mod:`.vllm`): the offline engine, built once per model path and reused.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from tqdm.auto import tqdm

BACKENDS = ("hf", "vllm")


@dataclass
class GenerationSettings:
    """How completions are generated (shared by evaluation, sampling and teachers)."""

    max_new_tokens: int = 256
    batch_size: int = 32
    """Prompts per HF ``generate`` call."""
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None
    """Top-k filtering when sampling (None: the model's generation-config default; 0: off)."""
    stop: list[str] = field(default_factory=list)
    """Strings that end a completion (cut from the text)."""
    seed: int | None = None
    """Sampling seed (HF: a forked torch RNG; vLLM: the request seed). None: not seeded."""
    backend: str = "hf"
    """``hf`` (transformers generate) or ``vllm``."""
    vllm_kwargs: dict = field(default_factory=dict)
    """Extra ``vllm.LLM(...)`` arguments (e.g. ``tensor_parallel_size``)."""
    vllm: Any = None
    """An ``rlkit.rollout.vllm.VLLMSettings`` (dtype, eager mode, CPU KV-cache size...); None: the defaults."""
    kv_cache: Any = None
    """An ``rlkit.kvcache.KVCacheConfig`` (PolarQuant / ThinK key-cache compression for HF generate), or None."""
    logprobs: bool = False
    """Also return each generated token's log-probability in ``Completion.logprobs``: under the model's own
    distribution (raw logits at temperature 1, before any sampling filter), whether decoding is greedy or sampled.
    HF backend only for now; the vLLM backend refuses it."""

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"unknown generation backend {self.backend!r}; use 'hf' or 'vllm'")


@dataclass
class Completion:
    """One generated completion."""

    text: str
    token_ids: list[int]
    """The generated token ids (special tokens included, padding removed)."""
    finish_reason: str = "length"
    """``stop`` (EOS or a stop string) or ``length`` (``max_new_tokens`` reached)."""
    logprobs: list[float] | None = None
    """A log-probability per generated token where the back end reports it: a trainer's vLLM (the sampling
    log-probability), or HF generation with ``GenerationSettings.logprobs`` (the model's raw distribution)."""


def render_prompts(prompts: list, tokenizer) -> list[str]:
    """Prompts as text: chat-message prompts go through the tokenizer's chat template."""
    out = []
    for p in prompts:
        if isinstance(p, str):
            out.append(p)
        else:
            out.append(tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True))
    return out


@contextlib.contextmanager
def compressed_generate(model: Any, kv_cache: Any) -> Iterator[Any]:
    """Within the block every ``model.generate`` call gets a fresh compressed key cache (``kv_cache``: a
    ``KVCacheConfig``; kind ``none`` or None changes nothing)."""
    if kv_cache is None or kv_cache.kind == "none":
        yield model
        return
    from ..kvcache import kv_compression

    with kv_compression(model, kv_cache):
        yield model


@contextlib.contextmanager
def seeded(seed: int | None) -> Iterator[None]:
    """Seed torch's RNG (CPU and the current GPU) for the block only; None: no change."""
    if seed is None:
        yield
        return
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def _cut(text: str, stop: list[str]) -> tuple[str, bool]:
    hits = [text.find(s) for s in stop if s and s in text]
    return (text[: min(hits)], True) if hits else (text, False)


def _generated_ids(row: torch.Tensor, pad_id: int | None, eos_ids: set[int]) -> tuple[list[int], bool]:
    ids = row.tolist()
    for k, t in enumerate(ids):
        if t in eos_ids:
            return ids[: k + 1], True
    if pad_id is not None:
        while ids and ids[-1] == pad_id:
            ids.pop()
    return ids, False


def _token_logprobs(step_logits: tuple, tokens: torch.Tensor) -> list[list[float]]:
    """log p(token) of every generated token (rows of ``tokens``) under the raw logits of its step
    (``generate(..., output_logits=True)``), one step at a time so no (batch, steps, vocab) tensor is built."""
    cols = [torch.log_softmax(step.float(), -1).gather(1, tokens[:, s : s + 1].to(step.device))[:, 0]
            for s, step in enumerate(step_logits)]
    if not cols:
        return [[] for _ in range(tokens.shape[0])]
    return torch.stack(cols, 1).cpu().tolist()


@torch.no_grad()
def generate_hf(model, tokenizer, prompts: list[str], settings: GenerationSettings, num_samples: int = 1,
                do_sample: bool = False, progress: bool = True, desc: str = "generate") -> list[list[Completion]]:
    """``num_samples`` completions per prompt with ``model.generate`` (see the module docstring)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    results: list[list[Completion]] = [[] for _ in prompts]
    add_special = not any(tokenizer.bos_token and p.startswith(tokenizer.bos_token) for p in prompts[:1])
    eos = model.generation_config.eos_token_id if model.generation_config.eos_token_id is not None \
        else tokenizer.eos_token_id
    eos_ids = set(eos if isinstance(eos, (list, tuple)) else [eos]) - {None}
    stack = contextlib.ExitStack()
    stack.enter_context(compressed_generate(model, settings.kv_cache))  # a fresh compressed cache per generate
    stack.enter_context(seeded(settings.seed))
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
                if settings.top_k is not None:
                    gen_kwargs["top_k"] = settings.top_k
            else:
                gen_kwargs.update(temperature=None, top_p=None, top_k=None)
            if settings.stop:
                gen_kwargs.update(stop_strings=list(settings.stop), tokenizer=tokenizer)
            token_lps = None
            if settings.logprobs:
                gen_kwargs.update(output_logits=True, return_dict_in_generate=True)
                res = model.generate(**enc, **gen_kwargs)
                out = res.sequences[:, enc["input_ids"].shape[1]:]
                token_lps = _token_logprobs(res.logits, out)
                del res
            else:
                out = model.generate(**enc, **gen_kwargs)[:, enc["input_ids"].shape[1]:]
            texts = tokenizer.batch_decode(out, skip_special_tokens=True)
            for j, i in enumerate(idx):
                for k in range(j * num_samples, (j + 1) * num_samples):
                    ids, ended = _generated_ids(out[k], tokenizer.pad_token_id, eos_ids)
                    text, stopped = _cut(texts[k], settings.stop)
                    lps = token_lps[k][: len(ids)] if token_lps is not None else None
                    results[i].append(Completion(text, ids, "stop" if ended or stopped else "length", logprobs=lps))
            bar.update(len(idx))
        bar.close()
    finally:
        stack.close()
        tokenizer.padding_side = side
        if was_training:
            model.train()
    return results


def generate(model, tokenizer, prompts: list[str], settings: GenerationSettings, num_samples: int = 1,
             do_sample: bool = False, progress: bool = True, desc: str = "generate",
             model_path: str | None = None) -> list[list[Completion]]:
    """``num_samples`` completions for each (already rendered) prompt with the settings' back end. vLLM loads
    the model from ``model_path`` (default ``model.name_or_path``); HF uses ``model``."""
    if settings.backend == "vllm":
        from .vllm import generate_vllm

        if settings.logprobs:
            from .errors import VLLMError

            raise VLLMError("token log-probabilities (GenerationSettings.logprobs) are not wired for the vLLM "
                            "backend yet; use backend 'hf'")

        return generate_vllm(model_path or model.name_or_path, prompts, settings, num_samples, do_sample,
                             vllm=settings.vllm)
    return generate_hf(model, tokenizer, prompts, settings, num_samples, do_sample, progress, desc)


def generate_texts(model, tokenizer, prompts: list[str], settings: GenerationSettings, num_samples: int = 1,
                   do_sample: bool = False, progress: bool = True, desc: str = "generate",
                   model_path: str | None = None) -> list[list[str]]:
    """Like :func:`generate`, texts only."""
    return [[c.text for c in outs] for outs in generate(model, tokenizer, prompts, settings, num_samples, do_sample,
                                                         progress, desc, model_path)]


@torch.no_grad()
def generate_from_ids(model, tokenizer, sequences: list[list[int]], max_new_tokens: int, do_sample: bool = True,
                      batch_size: int = 32, sampling: dict | None = None,
                      generation_config: Any = None) -> list[Completion]:
    """One completion per token-id sequence, continuing exactly those ids (no re-tokenisation): the multi-turn
    environments (:mod:`rlkit.envs`) grow one conversation per episode and must train on the very tokens the
    policy saw. Left padding, sequences sorted by length into batches of ``batch_size``; ``sampling`` holds
    ``generate`` keywords (temperature, top_p, top_k, min_p, repetition_penalty); ``generation_config`` (e.g. TRL's)
    is passed through when given. Texts are decoded without special tokens."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos = model.generation_config.eos_token_id if model.generation_config.eos_token_id is not None \
        else tokenizer.eos_token_id
    eos_ids = set(eos if isinstance(eos, (list, tuple)) else [eos]) - {None}
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    results: list[Completion | None] = [None] * len(sequences)
    kwargs: dict[str, Any] = {"max_new_tokens": max_new_tokens, "do_sample": do_sample, "pad_token_id": pad}
    if do_sample:
        kwargs.update({k: v for k, v in (sampling or {}).items() if v is not None})
    else:
        kwargs.update(temperature=None, top_p=None, top_k=None)
    if generation_config is not None:
        kwargs["generation_config"] = generation_config
    try:
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            width = max(len(sequences[i]) for i in idx)
            ids = torch.full((len(idx), width), pad, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for row, i in enumerate(idx):
                seq = sequences[i]
                ids[row, width - len(seq):] = torch.tensor(seq, dtype=torch.long)
                mask[row, width - len(seq):] = 1
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), **kwargs)[:, width:]
            for row, i in enumerate(idx):
                new, ended = _generated_ids(out[row], pad, eos_ids)
                text = tokenizer.decode(new, skip_special_tokens=True)
                results[i] = Completion(text, new, "stop" if ended else "length")
    finally:
        if was_training:
            model.train()
    return results  # type: ignore[return-value]
