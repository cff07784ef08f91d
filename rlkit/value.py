"""Value models: a transformer backbone with a scalar head, V(s) for every prefix of a sequence.

The OREO critic (arXiv 2412.16145; ``rlkit.methods.oreo``, ``docs/methods/oreo.md``) and the scorer of
value-guided search (``rlkit.rollout.search``). A :class:`ValueModel` is the causal LM's base model (the LM
head dropped; ``getattr(lm, lm.base_model_prefix)``) plus ``nn.Linear(hidden, 1, bias=False)``, initialised
to zero as in the released code, so every value is 0 before training. ``values[b, j] = head(h[b, j])`` is
the value of the state ``ids[b, :j+1]``: read at the position of the state's **last** token.

On disk (``save_pretrained``): the backbone as a normal ``transformers`` checkpoint (``config.json``,
``model.safetensors``), ``value_head.safetensors`` (the head's ``weight``, shape ``[1, hidden]``) and
``value_model.json`` (``{"format": "rlkit-value", ...}``). A LoRA critic (``from_causal_lm(lm,
lora={...})``) saves its frozen base weights there and the adapters in ``lora/`` (peft's format);
``from_pretrained`` re-applies them and, by default, merges them (so a loaded critic is a plain backbone).
The tokenizer is saved by the caller next to the weights; ``from_pretrained`` attaches it when it is there.

Tokenisation for scoring follows the OREO trainer's: the prompt is encoded as the generation code encodes
it (special tokens added unless the prompt already starts with the BOS text), the completion on its own
without special tokens, and the two id lists are concatenated. ``score_texts`` encodes each completion
whole (the token-level trainer's layout); ``score`` (the ``StepScorer`` protocol) encodes each step on its
own, as the step-level trainer does, so ``score(p, steps)[-1]`` equals ``score_texts([p], ["".join(steps)])``
only for tokenizers whose tokens never cross a step boundary (character-level ones, or steps ending in a
separator the tokenizer never merges).
"""

from __future__ import annotations

import contextlib
import copy as _copy
import json
import warnings
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

__all__ = ["FORMAT", "HEAD_FILE", "LORA_DIR", "META_FILE", "ValueModel", "enable_checkpointing", "encode_completion",
           "encode_prompt", "is_value_model_dir", "wrap_lora"]

FORMAT = "rlkit-value"
HEAD_FILE = "value_head.safetensors"
META_FILE = "value_model.json"
LORA_DIR = "lora"


def is_format_dir(path: str | Path, meta_file: str, fmt: str) -> bool:
    """Whether ``path/meta_file`` is a JSON object whose ``format`` is ``fmt`` (how rlkit marks saved models)."""
    meta = Path(path) / meta_file
    if not meta.is_file():
        return False
    try:
        return json.loads(meta.read_text()).get("format") == fmt
    except (json.JSONDecodeError, AttributeError):
        return False


def is_value_model_dir(path: str | Path) -> bool:
    """Whether ``path`` holds a saved :class:`ValueModel` (its ``value_model.json`` says ``rlkit-value``)."""
    return is_format_dir(path, META_FILE, FORMAT)


def encode_prompt(tokenizer: Any, prompt: str) -> list[int]:
    """Prompt ids as :func:`rlkit.rollout.generation.generate_hf` encodes them: special tokens (a BOS) are
    added unless the prompt text already starts with the BOS token (a rendered chat template)."""
    bos = getattr(tokenizer, "bos_token", None)
    add_special = not (bos and prompt.startswith(bos))
    return list(tokenizer(prompt, add_special_tokens=add_special)["input_ids"])


def encode_completion(tokenizer: Any, completion: str | Sequence[str]) -> list[int]:
    """Completion ids without special tokens; a list of steps is encoded step by step and concatenated."""
    if isinstance(completion, str):
        return list(tokenizer(completion, add_special_tokens=False)["input_ids"]) if completion else []
    ids: list[int] = []
    for step in completion:
        if step:
            ids.extend(tokenizer(step, add_special_tokens=False)["input_ids"])
    return ids


def _hidden_size(backbone: nn.Module) -> int:
    config = getattr(backbone, "config", None)
    size = getattr(config, "hidden_size", None)
    if isinstance(size, int):
        return size
    return backbone.get_input_embeddings().embedding_dim


def _is_peft(module: nn.Module) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is a dependency
        return False
    return isinstance(module, PeftModel)


class ValueModel(nn.Module):
    """A transformer backbone + a zero-initialised linear head: ``forward`` returns V for every position.

    ``values[b, j]`` is V of the state ``input_ids[b, :j+1]`` (float32, shape ``[B, L]``). Build one from a
    causal LM in memory (:meth:`from_causal_lm`) or load a saved one (:meth:`from_pretrained`). For search it
    implements the ``StepScorer`` protocol (:meth:`score`) and a batched :meth:`score_texts`; both need a
    tokenizer (:meth:`attach_tokenizer`, or saved next to the weights)."""

    def __init__(self, backbone: nn.Module, value_head: nn.Linear | None = None, lora: dict | None = None):
        super().__init__()
        self.backbone = backbone
        if value_head is None:
            base = backbone.get_base_model() if _is_peft(backbone) else backbone
            param = next(base.parameters())
            value_head = nn.Linear(_hidden_size(base), 1, bias=False, device=param.device, dtype=param.dtype)
            nn.init.zeros_(value_head.weight)
        self.value_head = value_head
        self.lora = dict(lora) if lora else None
        """The LoRA settings of a LoRA critic (``r``, ``lora_alpha``, ``target_modules``, ...), else None."""
        self.tokenizer = None
        self.score_batch_size = 16
        """Sequences per forward pass in :meth:`score_texts`."""

    # ---- construction ------------------------------------------------------------------------------
    @classmethod
    def from_causal_lm(cls, lm: nn.Module, copy: bool = True, lora: dict | None = None) -> "ValueModel":
        """A value model on ``lm``'s base model (``getattr(lm, lm.base_model_prefix)``; a deep copy unless
        ``copy=False``) with a zero head. ``lora``: wrap the backbone with a peft LoRA adapter (e.g.
        ``dict(r=64, lora_alpha=64, target_modules="all-linear")``, the paper's 7B critic): only the adapters
        and the head are trained then."""
        if _is_peft(lm):
            raise ValueError("ValueModel.from_causal_lm: pass the plain causal LM (merge its LoRA adapters first)")
        prefix = getattr(lm, "base_model_prefix", None)
        backbone = getattr(lm, prefix, None) if prefix else None
        if backbone is None:
            raise ValueError(f"ValueModel.from_causal_lm: {type(lm).__name__} has no base model "
                             f"(base_model_prefix {prefix!r})")
        if copy:
            backbone = _copy.deepcopy(backbone)
        if lora:
            backbone = wrap_lora(backbone, dict(lora))
        return cls(backbone, lora=lora)

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: Any = None, device: Any = None,
                        merge_lora: bool = True, trainable: bool = False) -> "ValueModel":
        """Load a saved value model (and its tokenizer, when one is saved in ``path``).

        ``dtype``: a torch dtype or ``"auto"`` (default: as saved). A LoRA critic's adapters are merged into
        the backbone unless ``merge_lora=False`` (then they stay adapters, trainable with ``trainable``)."""
        from safetensors.torch import load_file
        from transformers import AutoModel

        path = Path(path)
        if not is_value_model_dir(path):
            raise ValueError(f"{path} is not a saved value model (no {META_FILE} with format {FORMAT!r}); "
                             "a value model is written by ValueModel.save_pretrained, e.g. an OREO run's final/critic")
        meta = json.loads((path / META_FILE).read_text())
        backbone = AutoModel.from_pretrained(str(path), dtype=dtype if dtype is not None else "auto")
        lora = meta.get("lora")
        if lora:
            from peft import PeftModel

            with _quiet_peft():
                backbone = PeftModel.from_pretrained(backbone, str(path / LORA_DIR),
                                                     is_trainable=trainable and not merge_lora)
            if merge_lora:
                backbone = backbone.merge_and_unload()
                lora = None
        param = next(backbone.parameters())
        head_weight = load_file(str(path / HEAD_FILE))["weight"]
        head = nn.Linear(head_weight.shape[1], 1, bias=False, device=param.device, dtype=param.dtype)
        with torch.no_grad():
            head.weight.copy_(head_weight.to(param.dtype))
        model = cls(backbone, head, lora=lora)
        if device is not None:
            model.to(device)
        if (path / "tokenizer_config.json").is_file() or (path / "tokenizer.json").is_file():
            from transformers import AutoTokenizer

            model.attach_tokenizer(AutoTokenizer.from_pretrained(str(path)))
        model.eval()
        return model

    def attach_tokenizer(self, tokenizer: Any) -> "ValueModel":
        """Set the tokenizer :meth:`score` / :meth:`score_texts` encode with; returns self."""
        self.tokenizer = tokenizer
        return self

    # ---- properties -----------------------------------------------------------------------------
    @property
    def config(self):
        """The backbone's config."""
        return self._base().config

    @property
    def device(self) -> torch.device:
        return self.value_head.weight.device

    def _base(self) -> nn.Module:
        return self.backbone.get_base_model() if _is_peft(self.backbone) else self.backbone

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs: dict | None = None, **kwargs) -> None:
        """Activation (gradient) checkpointing in the backbone (what ``Trainer`` calls)."""
        enable_checkpointing(self._base(), activation_checkpointing_kwargs, **kwargs)
        if _is_peft(self.backbone) and hasattr(self._base(), "enable_input_require_grads"):
            self._base().enable_input_require_grads()  # frozen embeddings + checkpointing need grad-requiring inputs

    gradient_checkpointing_enable = activation_checkpointing_enable

    # ---- forward -----------------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``[B, L]`` float32 values: entry ``j`` is V of the prefix ``input_ids[:, :j+1]``."""
        out = self.backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        return self.value_head(hidden.to(self.value_head.weight.dtype)).squeeze(-1).float()

    # ---- scoring (search) --------------------------------------------------------------------------
    def _tok(self):
        if self.tokenizer is None:
            raise ValueError("this ValueModel has no tokenizer: call attach_tokenizer(tokenizer) first (a model "
                             "loaded with from_pretrained gets the one saved next to it)")
        return self.tokenizer

    @torch.no_grad()
    def score_ids(self, sequences: list[list[int]]) -> list[float]:
        """V at the last token of each id sequence (batched, right-padded: real tokens never attend to the
        padding after them and keep positions 0..n-1, so the values equal unpadded single-sequence ones)."""
        if any(len(s) == 0 for s in sequences):
            raise ValueError("score_ids: an empty sequence has no last token to read a value at")
        tok = self.tokenizer
        pad = getattr(tok, "pad_token_id", None) if tok is not None else None
        pad = 0 if pad is None else pad
        was_training = self.training
        self.eval()
        out: list[float] = [0.0] * len(sequences)
        order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
        try:
            for start in range(0, len(order), self.score_batch_size):
                idx = order[start:start + self.score_batch_size]
                width = max(len(sequences[i]) for i in idx)
                ids = torch.full((len(idx), width), pad, dtype=torch.long)
                mask = torch.zeros((len(idx), width), dtype=torch.long)
                for r, i in enumerate(idx):
                    ids[r, :len(sequences[i])] = torch.tensor(sequences[i], dtype=torch.long)
                    mask[r, :len(sequences[i])] = 1
                values = self(ids.to(self.device), mask.to(self.device))
                last = mask.sum(1).to(self.device) - 1
                picked = values.gather(1, last[:, None]).squeeze(1).tolist()
                for r, i in enumerate(idx):
                    out[i] = picked[r]
        finally:
            if was_training:
                self.train()
        return out

    def encode(self, prompt: str, completion: str | Sequence[str], add_eos: bool = False) -> list[int]:
        """The ids the critic sees for ``prompt`` + ``completion`` (a string, or steps encoded one by one),
        with the EOS id appended when ``add_eos``."""
        tok = self._tok()
        ids = encode_prompt(tok, prompt) + encode_completion(tok, completion)
        if add_eos:
            if tok.eos_token_id is None:
                raise ValueError("add_eos: the tokenizer has no EOS token")
            ids.append(tok.eos_token_id)
        return ids

    def score_texts(self, prompts: list[str], completions: list[str], add_eos: bool = False) -> list[float]:
        """V at the last token of each ``prompt + completion`` (each completion encoded whole).

        ``add_eos`` appends the EOS id first (the training layout ends every sequence with it) and reads V at
        the EOS position. Note: in OREO's layout (as released) the position of the final EOS is the terminal
        state, which no loss trains; the value of a finished answer is V at its last completion token (the
        state whose next action is EOS), which ``add_eos=False`` gives."""
        if len(prompts) != len(completions):
            raise ValueError(f"score_texts: {len(prompts)} prompts but {len(completions)} completions")
        return self.score_ids([self.encode(p, c, add_eos) for p, c in zip(prompts, completions)])

    def score(self, prompt: str, steps: list[str]) -> list[float]:
        """``StepScorer``: V after each step prefix ``steps[:k+1]`` (steps encoded one by one, as the
        step-level trainer encodes them)."""
        if not steps:
            return []
        return self.score_ids([self.encode(prompt, steps[:k + 1]) for k in range(len(steps))])

    # ---- saving / loading --------------------------------------------------------------------------
    def save_pretrained(self, path: str | Path, state_dict: dict | None = None, is_main_process: bool = True) -> None:
        """Write the backbone (safetensors), ``value_head.safetensors`` and ``value_model.json`` to ``path``
        (a LoRA critic: the frozen base weights there and the adapters in ``lora/``). ``state_dict``: this
        module's state dict gathered elsewhere (``backbone.*`` / ``value_head.*`` keys; ZeRO-3, FSDP)."""
        from safetensors.torch import save_file

        if state_dict is None:
            state_dict = self.state_dict()
        if not is_main_process:
            return
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        bb = {k[len("backbone."):]: v for k, v in state_dict.items() if k.startswith("backbone.")}
        head = state_dict["value_head.weight"].detach().contiguous().cpu()
        if _is_peft(self.backbone):
            base_sd = {}
            prefix = "base_model.model."
            for k, v in bb.items():
                if "lora_" in k:
                    continue
                k = k[len(prefix):] if k.startswith(prefix) else k
                base_sd[k.replace(".base_layer.", ".")] = v
            self.backbone.get_base_model().save_pretrained(str(path), state_dict=base_sd, safe_serialization=True)
            with _quiet_peft():
                self.backbone.save_pretrained(str(path / LORA_DIR), state_dict=bb, safe_serialization=True)
        else:
            self.backbone.save_pretrained(str(path), state_dict=bb, safe_serialization=True)
        save_file({"weight": head}, str(path / HEAD_FILE), metadata={"format": "pt"})
        meta = {"format": FORMAT, "version": 1, "head": "linear, no bias, zero-initialised",
                "values": "V(ids[:j+1]) read at position j (the state's last token)",
                "backbone": type(self.backbone.get_base_model() if _is_peft(self.backbone) else self.backbone).__name__,
                "hidden_size": int(head.shape[1]), "lora": self.lora}
        (path / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")

    def load_weights(self, path: str | Path) -> None:
        """Load the weights saved in ``path`` into this model in place (same structure: a LoRA critic loads
        the adapters saved in ``lora/`` into its own, a full one the backbone). Used to resume training."""
        from safetensors.torch import load_file

        path = Path(path)
        head = load_file(str(path / HEAD_FILE))["weight"]
        with torch.no_grad():
            self.value_head.weight.copy_(head.to(self.value_head.weight.dtype))
        if _is_peft(self.backbone):
            from peft import set_peft_model_state_dict

            adapter = load_file(str(path / LORA_DIR / "adapter_model.safetensors"))
            result = set_peft_model_state_dict(self.backbone, adapter)
            unexpected = getattr(result, "unexpected_keys", [])
            if unexpected:
                raise ValueError(f"{path}: adapter weights do not fit this critic ({unexpected[:3]} ...)")
            return
        from transformers.trainer_utils import load_sharded_checkpoint

        single = path / "model.safetensors"
        if single.is_file():
            sd = load_file(str(single))
            missing, unexpected = self.backbone.load_state_dict(sd, strict=False)
            tied = set(getattr(self.backbone, "_tied_weights_keys", None) or [])
            missing = [k for k in missing if k not in tied]
            if missing or unexpected:
                raise ValueError(f"{path}: backbone weights do not fit (missing {missing[:3]}, unexpected "
                                 f"{unexpected[:3]})")
        else:
            load_sharded_checkpoint(self.backbone, str(path), strict=True)


def enable_checkpointing(model: nn.Module, kwargs: dict | None = None, **extra: Any) -> None:
    """Turn on activation checkpointing of a ``PreTrainedModel`` (transformers 5's name, or the older one)."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs, **extra)
    else:  # pragma: no cover - transformers < 5
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def wrap_lora(backbone: nn.Module, lora: dict) -> nn.Module:
    """``backbone`` wrapped with a peft LoRA adapter (``lora``: ``LoraConfig`` keyword arguments)."""
    from peft import LoraConfig, get_peft_model

    try:
        config = LoraConfig(**lora)
    except TypeError as e:
        raise ValueError(f"critic LoRA settings: {e}") from None
    with _quiet_peft():
        return get_peft_model(backbone, config)


@contextlib.contextmanager
def _quiet_peft():
    """peft reads transformers' renamed checkpointing attribute (a FutureWarning that is not the user's doing)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is deprecated and will be removed in v6.*")
        yield
