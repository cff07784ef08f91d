"""PEAR: Position-Embedding-Agnostic attention Re-weighting (arXiv 2409.19745, WWW 2025; official code
TTArch/PEAR-RAG), the search-and-train half: ``method: pear`` in a recipe and ``rlkit pear``.

PEAR finds the attention heads that *suppress* context copying, learns one scalar per such head on a synthetic
copying task with the whole LLM frozen, and folds the scalars into ``o_proj``, so the re-weighted model has the
original architecture and costs nothing extra at inference. This module holds

- ``PearConfig`` (every option, the paper's defaults) and ``PearStageConfig`` (plus the key-value check);
- head scoring (``score_heads``: path patching or mean ablation, ``Delta`` of the centered copy logit) and
  ``select_heads`` (top K by ``Delta``);
- ``PearReweighting`` (one trainable ``alpha`` per chosen head, hooked onto ``o_proj``) and
  ``train_coefficients`` (frozen model, cross-entropy on the second copy);
- measurements: ``copy_accuracy`` and key-value retrieval from real text (``kv_retrieval_examples`` /
  ``kv_retrieval_accuracy``);
- ``run_pear`` (score -> choose -> train -> fold -> save, with a JSON report) and the registered ``PearMethod``.

The proxy sequences come from the shared copy task of ``rlkit.eval.copying``; the fold and the registered
``pear`` patch are in ``rlkit.patches.pear``. Every choice where the paper is silent or where the released
code differs, and the measured results: ``docs/methods/pear.md``.
"""

from __future__ import annotations

import json
import random
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, Sequence

import torch
from torch import nn

from ..eval.copying import ProbeError, copy_positions, copy_sequences, probe_token_ids
from ..patches.pear import (PearError, _check_coefficients, _inner, _layers, _record_patch, apply_pear,
                            folded_coefficients, head_layout)
from . import register_method
from .base import DONE_MARKER, Method, StageOutput

__all__ = [
    "PAPER_SETTINGS", "PearConfig", "PearError", "PearMethod", "PearReweighting", "PearStageConfig",
    "copy_accuracy", "kv_retrieval_accuracy", "kv_retrieval_examples", "load_texts", "run_pear", "scale_heads",
    "score_heads", "select_heads", "train_coefficients",
]

# (N samples, n tokens per copy) of the released path_llama.py
PAPER_SETTINGS: tuple[tuple[int, int], ...] = ((20, 50), (40, 25), (80, 15), (100, 10))
# released run: 40 heads on Llama-2-7B (32 layers x 32 heads)
PAPER_HEAD_FRACTION = 40 / 1024


@dataclass
class PearConfig:
    """PEAR search + training settings. Defaults are the paper's released run unless the docstring says
    otherwise (docs/methods/pear.md: the choices where the paper is silent). Checked on construction: a bad
    value raises ``PearError``."""

    heads: int | None = None
    """K, the number of heads re-weighted. Paper: 40 on Llama-2-7B. None: the paper's fraction 40/1024 of all
    heads, rounded, at least 1 (UNCONFIRMED scaling)."""
    positive_only: bool = True
    """Choose only heads with Delta > 0 (suppression heads); False: the plain top-K."""
    settings: tuple[tuple[int, int], ...] = PAPER_SETTINGS
    """Scoring context settings (N samples, n); Delta is averaged over them. Paper: (20,50),(40,25),(80,15),(100,10)."""
    scoring: Literal["path", "ablation"] = "path"
    """"path" (released code: path patching to the final residual, replayed at one position) or "ablation"
    (plain mean ablation, full forward passes)."""
    metric: Literal["relative", "difference"] = "relative"
    """"relative": Delta = (pi~ - pi)/|pi| (= paper's pi~/pi - 1 for pi > 0); "difference": pi~ - pi."""
    ablation_group: int = 8
    """scoring="ablation": heads ablated per forward pass (the batch is stacked this many times)."""
    steps: int = 2500
    """Optimizer steps. Paper: 50,000 sequences / batch 20 = 2,500 (one epoch)."""
    batch_size: int = 20
    """Sequences per optimizer step. Paper: 1 per device x 20 gradient accumulation."""
    micro_batch_size: int | None = None
    """Sequences per forward/backward (gradient accumulation up to batch_size); None = batch_size."""
    n: int = 50
    """Tokens per copy in training sequences (length 2n). Paper: 50."""
    lr: float = 5e-3
    """Peak learning rate. Paper: 5e-3."""
    warmup_steps: int = 2
    """Linear warmup steps, then linear decay to 0 at `steps`. Paper: 2."""
    max_grad_norm: float = 1.0
    """Gradient-norm clip (HF Trainer default the paper ran with)."""
    bos: bool = False
    """Prepend the tokenizer's BOS to proxy sequences. Paper: no."""
    eval_n: tuple[int, ...] = (10, 25, 50)
    """Copy lengths of the held-out copy-accuracy evaluation (our convention)."""
    eval_samples: int = 64
    """Held-out sequences per eval length."""
    eval_batch_size: int = 16
    seed: int = 0
    """Seeds the scoring (seed), training (seed+1) and held-out (seed+2) streams. Paper: 0."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check every option; raises ``PearError`` (a ``ValueError``) naming the option to change."""
        if self.heads is not None and (isinstance(self.heads, bool) or not isinstance(self.heads, int)
                                       or self.heads < 1):
            raise PearError(f"pear: heads must be a positive integer or None, got {self.heads!r}")
        if self.scoring not in ("path", "ablation"):
            raise PearError(f"pear: scoring must be 'path' or 'ablation', got {self.scoring!r}")
        if self.metric not in ("relative", "difference"):
            raise PearError(f"pear: metric must be 'relative' or 'difference', got {self.metric!r}")
        if not self.settings:
            raise PearError("pear: settings must list at least one (N samples, n) pair")
        for s in self.settings:
            if not isinstance(s, (tuple, list)) or len(s) != 2 or int(s[0]) < 2 or int(s[1]) < 2:
                raise PearError(f"pear: each scoring setting needs N >= 2 samples and n >= 2 tokens, got {s!r}")
        for name in ("steps", "batch_size", "ablation_group", "eval_samples", "eval_batch_size"):
            if int(getattr(self, name)) < 1:
                raise PearError(f"pear: {name} must be >= 1, got {getattr(self, name)!r}")
        if self.micro_batch_size is not None and not 1 <= self.micro_batch_size:
            raise PearError(f"pear: micro_batch_size must be >= 1, got {self.micro_batch_size!r}")
        if self.n < 2 or any(int(n) < 2 for n in self.eval_n):
            raise PearError("pear: n and every eval_n must be >= 2 (the second copy needs a token to predict)")
        if not self.lr > 0 or self.warmup_steps < 0 or not self.max_grad_norm > 0:
            raise PearError("pear: lr and max_grad_norm must be > 0 and warmup_steps >= 0")


@dataclass
class PearStageConfig(PearConfig):
    """PEAR's settings plus the optional key-value retrieval check on real text."""

    kv_data: str | None = None
    """jsonl of real text (e.g. gsm8k_train.jsonl) for the key-value retrieval before/after."""
    kv_texts: int = 2000
    """Rows of kv_data to draw values from."""
    kv_examples: int = 50
    """Key-value retrieval examples."""
    kv_pairs: int = 20
    """Key-value lines per example."""

    def validate(self) -> None:
        super().validate()
        for name in ("kv_texts", "kv_examples", "kv_pairs"):
            if int(getattr(self, name)) < 1:
                raise PearError(f"pear: {name} must be >= 1, got {getattr(self, name)!r}")


# --------------------------------------------------------------------------------------------------
# The unfolded coefficient model


def scale_heads(x: torch.Tensor, scales: torch.Tensor, head_dim: int) -> torch.Tensor:
    """``x[..., h*D:(h+1)*D] * scales[h]`` for every head h (``x``: ``[..., H*D]``, ``scales``: ``[H]``)."""
    return (x.unflatten(-1, (scales.shape[0], head_dim)) * scales.to(x.dtype)[:, None]).flatten(-2)


class PearReweighting(nn.Module):
    """One trainable ``alpha`` per chosen head, applied by forward pre-hooks on ``o_proj`` (the unfolded form).

    ``with PearReweighting(model, heads) as rw:`` attaches the hooks; leaving the block (or ``detach()``)
    removes them, leaving the model exactly as it was. ``fold()`` writes the current alphas into the weights
    through the ``pear`` patch."""

    def __init__(self, model: nn.Module, heads: Sequence[tuple[int, int]], alpha: Sequence[float] | None = None):
        super().__init__()
        num_layers, num_heads, head_dim = head_layout(model)
        heads = [(int(l), int(h)) for l, h in heads]
        _check_coefficients(model, [[l, h, 1.0] for l, h in heads])
        if not heads:
            raise PearError("pear: no heads to re-weight")
        init = torch.ones(len(heads)) if alpha is None else torch.as_tensor(alpha, dtype=torch.float32).clone()
        if init.shape != (len(heads),):
            raise PearError(f"pear: got {init.numel()} initial alphas for {len(heads)} heads")
        self.alpha = nn.Parameter(init)
        self.heads = heads
        self.num_heads, self.head_dim = num_heads, head_dim
        self._model = [model]  # not a submodule: keeps model parameters out of self.parameters()
        self._layout: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # layer -> (alpha index, head index)
        for layer in sorted({l for l, _ in heads}):
            idx = [i for i, (l, _) in enumerate(heads) if l == layer]
            self._layout[layer] = (torch.tensor(idx), torch.tensor([heads[i][1] for i in idx]))
        self._handles: list[Any] = []

    def scales(self, layer: int) -> torch.Tensor:
        """``[H]`` multipliers of one layer: alpha on the chosen heads, exactly 1 elsewhere (the paper's
        ``1 + (alpha - 1) * head_mask``, written so the chosen entries are alpha bit for bit)."""
        idx, head_idx = self._layout[layer]
        ones = torch.ones(self.num_heads, dtype=self.alpha.dtype, device=self.alpha.device)
        return ones.index_put((head_idx.to(self.alpha.device),), self.alpha[idx.to(self.alpha.device)])

    def attach(self) -> "PearReweighting":
        if self._handles:
            return self
        layers = _layers(self._model[0])
        for layer in self._layout:
            def hook(module, args, layer=layer):
                return (scale_heads(args[0], self.scales(layer), self.head_dim),) + tuple(args[1:])

            self._handles.append(layers[layer].self_attn.o_proj.register_forward_pre_hook(hook))
        return self

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> "PearReweighting":
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.detach()

    def coefficients(self) -> list[list]:
        return [[l, h, float(a)] for (l, h), a in zip(self.heads, self.alpha.detach().tolist())]

    def fold(self) -> list[list]:
        """Remove the hooks and fold the alphas into ``o_proj`` (composed with any PEAR already folded); the
        pear spec is recorded in ``config.rlkit_patches``. Returns the recorded coefficients."""
        self.detach()
        model = self._model[0]
        composed = folded_coefficients(model)
        for l, h, a in self.coefficients():
            composed[(l, h)] = composed.get((l, h), 1.0) * a
        record = apply_pear(model, [[l, h, a] for (l, h), a in sorted(composed.items())])
        _record_patch(model, record)
        return record


# --------------------------------------------------------------------------------------------------
# Proxy task (the shared copy task of rlkit.eval.copying)


def _token_pool(tokenizer: Any, model: nn.Module) -> torch.Tensor:
    """Ids the proxy sequences draw from: every id below ``min(len(tokenizer), output-embedding rows)`` that is
    not one of the tokenizer's special tokens."""
    size = int(model.get_output_embeddings().weight.shape[0])
    try:
        return torch.tensor(probe_token_ids(tokenizer, size), dtype=torch.long)
    except ProbeError:
        raise PearError("pear: the tokenizer has fewer than 2 non-special tokens to build copy sequences "
                        "from") from None


def _bos_id(tokenizer: Any, bos: bool) -> int | None:
    if not bos:
        return None
    if tokenizer.bos_token_id is None:
        raise PearError("pear: bos=True but the tokenizer has no BOS token")
    return int(tokenizer.bos_token_id)


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


# --------------------------------------------------------------------------------------------------
# Head scoring


def _capture_run(model: nn.Module, seqs: torch.Tensor) -> dict[str, Any]:
    """One clean forward; records at the last position each layer's input, o_proj input/output and the final
    residual (input of the final norm)."""
    layers, inner = _layers(model), _inner(model)
    cap: dict[str, Any] = {"h_in": [None] * len(layers), "z": [None] * len(layers), "attn": [None] * len(layers)}
    handles = []
    try:
        for i, layer in enumerate(layers):
            def pre(module, args, kwargs, i=i):
                h = args[0] if args else kwargs["hidden_states"]
                cap["h_in"][i] = h[:, -1].detach().clone()

            def o_hook(module, args, output, i=i):
                cap["z"][i] = args[0][:, -1].detach().clone()
                cap["attn"][i] = output[:, -1].detach().clone()

            handles.append(layer.register_forward_pre_hook(pre, with_kwargs=True))
            handles.append(layer.self_attn.o_proj.register_forward_hook(o_hook))
        norm = getattr(inner, "norm", None)
        if norm is None:
            raise PearError("pear: scoring='path' needs the final norm at `.model.norm`; use scoring='ablation'")

        def final_hook(module, args):
            cap["final"] = args[0][:, -1].detach().clone()

        handles.append(norm.register_forward_pre_hook(final_hook))
        inner(input_ids=seqs.to(_device(model)), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return cap


def _centered_readout(model: nn.Module, targets: torch.Tensor):
    """``f(h_final) -> centered logit of targets`` computed from the final residual without forming all logits."""
    lm_head = model.get_output_embeddings()
    norm = _inner(model).norm
    w = lm_head.weight
    u = w[targets.to(w.device)] - w.mean(0, keepdim=True)  # [N, d]
    bias = getattr(lm_head, "bias", None)
    c = 0.0 if bias is None else bias[targets.to(w.device)] - bias.mean()

    def readout(h: torch.Tensor) -> torch.Tensor:  # h [..., N, d] -> [..., N]
        return (norm(h) * u).sum(-1) + c

    return readout


def _mlp_step(layer: nn.Module, mid: torch.Tensor) -> torch.Tensor:
    return mid + layer.mlp(layer.post_attention_layernorm(mid))


@torch.no_grad()
def _path_patched(model: nn.Module, seqs: torch.Tensor, targets: torch.Tensor, bar=None) -> tuple[torch.Tensor, float]:
    """Released-code path patching: ``[L, H]`` batch-mean centered copy logit with each head mean-patched at the
    scored position (q/k/v of every head frozen, MLPs recomputed), and the clean value."""
    layers = _layers(model)
    for i, layer in enumerate(layers):
        if not (hasattr(layer, "mlp") and hasattr(layer, "post_attention_layernorm")):
            raise PearError(f"pear: layer {i} has no mlp/post_attention_layernorm; scoring='path' needs "
                            "Llama-shaped decoder layers, use scoring='ablation'")
    num_layers, num_heads, head_dim = head_layout(model)
    cap = _capture_run(model, seqs)
    readout = _centered_readout(model, targets)
    # the replay must reproduce the recorded clean run, or the layer is not Llama-shaped
    state = cap["h_in"][0]
    for j, layer in enumerate(layers):
        state = _mlp_step(layer, state + cap["attn"][j])
    err = (state - cap["final"]).norm() / cap["final"].norm().clamp_min(1e-12)
    tol = 1e-3 if cap["final"].dtype == torch.float32 or cap["final"].dtype == torch.float64 else 5e-2
    if not err <= tol:
        raise PearError(f"pear: replaying the MLPs does not reproduce the model's residual stream (relative error "
                        f"{float(err):.2g}): its decoder layers are not Llama-shaped; use scoring='ablation'")
    clean = float(readout(cap["final"]).float().mean())
    patched = torch.zeros(num_layers, num_heads)
    for l, layer in enumerate(layers):
        z = cap["z"][l].unflatten(-1, (num_heads, head_dim))  # [N, H, D]
        w = layer.self_attn.o_proj.weight.unflatten(1, (num_heads, head_dim))  # [d, H, D]
        delta = torch.einsum("nhe,dhe->hnd", z.mean(0, keepdim=True) - z, w)  # [H, N, d]
        state = (cap["h_in"][l] + cap["attn"][l]).unsqueeze(0) + delta
        state = _mlp_step(layer, state)
        for j in range(l + 1, num_layers):
            state = _mlp_step(layers[j], state + cap["attn"][j].unsqueeze(0))
        patched[l] = readout(state).float().mean(1).cpu()
        if bar is not None:
            bar.update(1)
    return patched, clean


def _centered_from_logits(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = logits.float()
    return logits.gather(-1, targets[:, None].to(logits.device))[:, 0] - logits.mean(-1)


@torch.no_grad()
def _mean_ablated(model: nn.Module, seqs: torch.Tensor, targets: torch.Tensor, group: int,
                  bar=None) -> tuple[torch.Tensor, float]:
    """Plain mean ablation: ``[L, H]`` batch-mean centered copy logit with each head's slice replaced by its
    batch mean at every position (full forward passes, ``group`` heads per pass), and the clean value."""
    layers = _layers(model)
    num_layers, num_heads, head_dim = head_layout(model)
    device = _device(model)
    seqs = seqs.to(device)
    n_samples = seqs.shape[0]
    clean = float(_centered_from_logits(model(input_ids=seqs, use_cache=False, logits_to_keep=1).logits[:, -1],
                                        targets).mean())
    patched = torch.zeros(num_layers, num_heads)
    for l in range(num_layers):
        for start in range(0, num_heads, group):
            heads = list(range(start, min(start + group, num_heads)))

            def hook(module, args, heads=heads):
                x = args[0].unflatten(-1, (num_heads, head_dim)).clone()  # [G*N, T, H, D]
                x = x.view(len(heads), n_samples, *x.shape[1:])
                for g, h in enumerate(heads):
                    x[g, :, :, h] = x[g, :, :, h].mean(0, keepdim=True)
                return (x.flatten(0, 1).flatten(-2),) + tuple(args[1:])

            handle = layers[l].self_attn.o_proj.register_forward_pre_hook(hook)
            try:
                out = model(input_ids=seqs.repeat(len(heads), 1), use_cache=False, logits_to_keep=1)
            finally:
                handle.remove()
            values = _centered_from_logits(out.logits[:, -1], targets.repeat(len(heads)))
            patched[l, heads] = values.view(len(heads), n_samples).mean(1).cpu()
        if bar is not None:
            bar.update(1)
    return patched, clean


def score_heads(model: nn.Module, tokenizer: Any, config: PearConfig | None = None,
                progress: bool = False) -> dict[str, Any]:
    """Delta for every head, averaged over ``config.settings``. Returns ``{"delta": [L, H] tensor,
    "per_setting": [{"samples", "n", "clean", "delta"}], "seconds": float}``."""
    from tqdm.auto import tqdm

    config = config or PearConfig()
    config.validate()
    num_layers, num_heads, _ = head_layout(model)
    token_ids = _token_pool(tokenizer, model)
    bos = _bos_id(tokenizer, config.bos)
    generator = torch.Generator().manual_seed(config.seed)
    was_training = model.training
    model.eval()
    t0 = time.perf_counter()
    per_setting, total = [], torch.zeros(num_layers, num_heads)
    bar = tqdm(total=num_layers * len(config.settings), desc="pear: score heads", disable=not progress,
               leave=False)
    try:
        for samples, n in config.settings:
            seqs = copy_sequences(token_ids, int(n), int(samples), generator, bos)
            start = 1 if bos is not None else 0
            inputs = seqs[:, :start + 2 * int(n) - 1]  # last position = the second x_{n-1}
            targets = seqs[:, start + int(n) - 1]  # x_n
            if config.scoring == "path":
                patched, clean = _path_patched(model, inputs, targets, bar)
            else:
                patched, clean = _mean_ablated(model, inputs, targets, config.ablation_group, bar)
            diff = patched - clean
            delta = diff / max(abs(clean), 1e-12) if config.metric == "relative" else diff
            per_setting.append({"samples": int(samples), "n": int(n), "clean": clean, "delta": delta})
            total += delta
    finally:
        bar.close()
        model.train(was_training)
    return {"delta": total / len(config.settings), "per_setting": per_setting,
            "seconds": time.perf_counter() - t0}


def _default_heads(num_layers: int, num_heads: int) -> int:
    return max(1, round(PAPER_HEAD_FRACTION * num_layers * num_heads))


def select_heads(delta: torch.Tensor, k: int | None = None, positive_only: bool = True) -> list[tuple[int, int]]:
    """Top-k heads by Delta (ties: lower layer, then lower head first); ``k=None``: the paper's fraction."""
    num_layers, num_heads = delta.shape
    k = _default_heads(num_layers, num_heads) if k is None else k
    order = sorted(((float(delta[l, h]), l, h) for l in range(num_layers) for h in range(num_heads)),
                   key=lambda t: (-t[0], t[1], t[2]))
    if positive_only:
        order = [t for t in order if t[0] > 0]
    return [(l, h) for _, l, h in order[:k]]


# --------------------------------------------------------------------------------------------------
# Training


def _copy_loss(model: nn.Module, seqs: torch.Tensor, n: int, start: int) -> torch.Tensor:
    """Summed cross-entropy over the second copy (first token included), logits formed for those rows only."""
    logits = model(input_ids=seqs[:, :-1], use_cache=False, logits_to_keep=n).logits
    labels = seqs[:, start + n:].to(logits.device)
    return nn.functional.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), reduction="sum")


def train_coefficients(model: nn.Module, tokenizer: Any, heads: Sequence[tuple[int, int]],
                       config: PearConfig | None = None, progress: bool = False) -> tuple[PearReweighting, list[float]]:
    """Train one alpha per head with every model parameter frozen. Returns the (detached) ``PearReweighting``
    and the loss per optimizer step (mean token cross-entropy on the second copy)."""
    from tqdm.auto import tqdm

    config = config or PearConfig()
    config.validate()
    rw = PearReweighting(model, heads).to(_device(model))
    token_ids = _token_pool(tokenizer, model)
    bos = _bos_id(tokenizer, config.bos)
    start = 1 if bos is not None else 0
    generator = torch.Generator().manual_seed(config.seed + 1)
    micro = config.micro_batch_size or config.batch_size
    optimizer = torch.optim.AdamW([rw.alpha], lr=config.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)

    def lr_lambda(step: int) -> float:  # transformers' get_linear_schedule_with_warmup
        if step < config.warmup_steps:
            return step / max(1, config.warmup_steps)
        return max(0.0, (config.steps - step) / max(1, config.steps - config.warmup_steps))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)
    flags = [(p, p.requires_grad) for p in model.parameters()]
    was_training = model.training
    losses: list[float] = []
    bar = tqdm(range(config.steps), desc="pear: train alphas", disable=not progress)
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        model.eval()
        rw.attach()
        for _ in bar:
            seqs = copy_sequences(token_ids, config.n, config.batch_size, generator, bos).to(_device(model))
            tokens = config.batch_size * config.n
            total = 0.0
            for i in range(0, config.batch_size, micro):
                loss = _copy_loss(model, seqs[i:i + micro], config.n, start) / tokens
                loss.backward()
                total += float(loss.detach())
            torch.nn.utils.clip_grad_norm_([rw.alpha], config.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(total)
            bar.set_postfix(loss=f"{total:.3f}")
    finally:
        rw.detach()
        bar.close()
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)
    return rw, losses


# --------------------------------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
def copy_accuracy(model: nn.Module, tokenizer: Any, n: int, samples: int = 64, seed: int = 2,
                  batch_size: int = 16, bos: bool = False) -> dict[str, float]:
    """Held-out copy accuracy: argmax accuracy over the second copy without its first token, and the fraction of
    sequences with all of those right."""
    if n < 2:
        raise PearError("pear: copy accuracy needs n >= 2")
    token_ids = _token_pool(tokenizer, model)
    bos_id = _bos_id(tokenizer, bos)
    start = 1 if bos_id is not None else 0
    generator = torch.Generator().manual_seed(seed)
    seqs = copy_sequences(token_ids, n, samples, generator, bos_id)
    was_training = model.training
    model.eval()
    correct = torch.zeros(0, n - 1, dtype=torch.bool)
    try:
        for i in range(0, samples, batch_size):
            chunk = seqs[i:i + batch_size].to(_device(model))
            logits = model(input_ids=chunk[:, :-1], use_cache=False, logits_to_keep=n - 1).logits
            pred = logits.argmax(-1).cpu()
            correct = torch.cat([correct, pred == chunk[:, copy_positions(n, start)].cpu()])
    finally:
        model.train(was_training)
    return {"token_acc": float(correct.float().mean()), "exact": float(correct.all(1).float().mean()),
            "n": n, "samples": samples}


def load_texts(path: str | Path, field: str | None = None, limit: int | None = None) -> list[str]:
    """Text fields of a jsonl file (``field``, else the first of question/problem/text/prompt present)."""
    path = Path(path)
    if not path.is_file():
        raise PearError(f"pear: text file {path} not found")
    texts = []
    with open(path) as fh:
        for line in fh:
            if not line.strip():
                continue
            row = json.loads(line)
            key = field or next((k for k in ("question", "problem", "text", "prompt") if k in row), None)
            if key is None or key not in row:
                raise PearError(f"pear: {path} rows have no {field or 'question/problem/text/prompt'} field")
            texts.append(str(row[key]))
            if limit is not None and len(texts) >= limit:
                break
    return texts


def _sentences(texts: Sequence[str], value_words: int) -> list[str]:
    out, seen = [], set()
    for text in texts:
        for sent in re.split(r"(?<=[.!?])\s+", text.replace("\n", " ")):
            words = sent.split()
            if len(words) < value_words:
                continue
            value = " ".join(words[:value_words]).rstrip(".,;:!?")
            if value and value not in seen and ":" not in value:
                seen.add(value)
                out.append(value)
    return out


def kv_retrieval_examples(texts: Sequence[str], tokenizer: Any, examples: int = 50, pairs: int = 20,
                          value_words: int = 6, seed: int = 0) -> list[dict[str, Any]]:
    """Key-value retrieval examples from real text (docs/methods/pear.md). Each has ``input_ids`` (prompt +
    answer), ``answer_start`` (index of the first answer token), the ``key``, ``value`` and ``position``."""
    if pairs < 1 or examples < 1 or value_words < 1:
        raise PearError("pear: kv retrieval needs examples, pairs and value_words >= 1")
    values = _sentences(texts, value_words)
    if len(values) < pairs:
        raise PearError(f"pear: the texts give {len(values)} distinct {value_words}-word sentence starts; "
                        f"need at least {pairs} for one example")
    rng = random.Random(seed)
    out = []
    for _ in range(examples):
        vals = rng.sample(values, pairs)
        keys = [str(k) for k in rng.sample(range(10000, 100000), pairs)]
        q = rng.randrange(pairs)
        prompt = "".join(f"{k}: {v}\n" for k, v in zip(keys, vals)) + f"\n{keys[q]}:"
        text = prompt + " " + vals[q]
        enc = tokenizer(text, return_offsets_mapping=True)
        offsets = enc["offset_mapping"]
        answer_start = next(i for i, (s, e) in enumerate(offsets) if e > len(prompt))
        out.append({"input_ids": list(enc["input_ids"]), "answer_start": answer_start, "key": keys[q],
                    "value": vals[q], "position": q})
    return out


@torch.no_grad()
def kv_retrieval_accuracy(model: nn.Module, tokenizer: Any, examples: Sequence[dict[str, Any]],
                          batch_size: int = 8) -> dict[str, float]:
    """Teacher-forced accuracy on the answer: ``token_acc`` over all answer tokens, ``first_token_acc`` (the
    retrieval step itself: the first value token right after ``"<key>:"``; the rest is mostly plain induction)
    and ``exact`` (every answer token is the argmax, i.e. greedy decoding reproduces the value). Batches are
    left-padded with explicit position ids, so the vocabulary projection is formed only for the last positions,
    the ones that predict answer tokens."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    was_training = model.training
    model.eval()
    device = _device(model)
    hits = tokens = exact = first = 0
    try:
        for i in range(0, len(examples), batch_size):
            chunk = examples[i:i + batch_size]
            width = max(len(e["input_ids"]) for e in chunk)
            keep = max(len(e["input_ids"]) - e["answer_start"] for e in chunk) + 1
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for r, e in enumerate(chunk):
                ids[r, width - len(e["input_ids"]):] = torch.tensor(e["input_ids"])
                mask[r, width - len(e["input_ids"]):] = 1
            positions = (mask.cumsum(1) - 1).clamp_min(0)
            pred = model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=positions.to(device),
                         use_cache=False, logits_to_keep=keep).logits.argmax(-1).cpu()  # [B, keep]
            for r, e in enumerate(chunk):
                n_answer = len(e["input_ids"]) - e["answer_start"]
                ok = pred[r, keep - 1 - n_answer:keep - 1] == ids[r, width - n_answer:]
                hits += int(ok.sum())
                tokens += int(ok.numel())
                exact += int(bool(ok.all()))
                first += int(bool(ok[0]))
    finally:
        model.train(was_training)
    n = max(1, len(examples))
    return {"token_acc": hits / max(1, tokens), "first_token_acc": first / n, "exact": exact / n,
            "examples": len(examples)}


# --------------------------------------------------------------------------------------------------
# The whole method


def _copy_eval(model, tokenizer, config: PearConfig) -> dict[str, dict]:
    return {str(n): copy_accuracy(model, tokenizer, int(n), config.eval_samples, seed=config.seed + 2,
                                  batch_size=config.eval_batch_size, bos=config.bos) for n in config.eval_n}


def run_pear(model: nn.Module, tokenizer: Any, config: PearConfig | None = None, out_dir: str | Path | None = None,
             kv_examples: Sequence[dict[str, Any]] | None = None, progress: bool = False) -> dict[str, Any]:
    """Score heads, choose K, train their alphas with the model frozen, fold them into ``o_proj``, measure copy
    accuracy (and key-value retrieval when ``kv_examples`` is given) before and after, and save the model
    (safetensors + tokenizer) and ``pear_report.json`` to ``out_dir`` when given. Returns the report."""
    config = config or PearConfig()
    config.validate()
    num_layers, num_heads, head_dim = head_layout(model)
    t_start = time.perf_counter()
    report: dict[str, Any] = {"method": "pear", "config": asdict(config),
                              "model": {"layers": num_layers, "heads": num_heads, "head_dim": head_dim}}
    report["copy_before"] = _copy_eval(model, tokenizer, config)
    if kv_examples:
        report["kv_before"] = kv_retrieval_accuracy(model, tokenizer, kv_examples, config.eval_batch_size)
    scores = score_heads(model, tokenizer, config, progress=progress)
    delta = scores["delta"]
    heads = select_heads(delta, config.heads, config.positive_only)
    if not heads:
        raise PearError("pear: no head has Delta > 0 (no copy-suppression head found); pass positive_only=False "
                        "(`rlkit pear --all-signs`) to re-weight the top-K heads anyway")
    t0 = time.perf_counter()
    rw, losses = train_coefficients(model, tokenizer, heads, config, progress=progress)
    train_s = time.perf_counter() - t0
    learned = rw.coefficients()
    recorded = rw.fold()
    report["heads"] = [{"layer": l, "head": h, "delta": float(delta[l, h]), "alpha": a} for l, h, a in learned]
    report["coefficients"] = recorded
    report["copy_after"] = _copy_eval(model, tokenizer, config)
    if kv_examples:
        report["kv_after"] = kv_retrieval_accuracy(model, tokenizer, kv_examples, config.eval_batch_size)
    report["scores"] = {"delta": delta.tolist(),
                        "per_setting": [{"samples": s["samples"], "n": s["n"], "clean_copy_logit": s["clean"]}
                                        for s in scores["per_setting"]]}
    report["train"] = {"loss_first": losses[0], "loss_last": losses[-1], "losses": losses}
    report["seconds"] = {"scoring": scores["seconds"], "training": train_s,
                         "total": time.perf_counter() - t_start}
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)
        (out / "pear_report.json").write_text(json.dumps(report, indent=2) + "\n")
        report["out_dir"] = str(out)
    return report


# --------------------------------------------------------------------------------------------------
# The registered method


@register_method
class PearMethod(Method):
    """``method: pear``: ``run_pear`` on the stage's model; the re-weighted model (and ``pear_report.json``)
    is saved to the stage's final folder."""

    name = "pear"
    section = "args"
    trains = True
    config = PearStageConfig

    def run(self, run: Any, ctx: Any) -> StageOutput:
        config = self.make_config(run)
        report = run_pear(ctx.model, ctx.tokenizer, config, out_dir=ctx.final_dir,
                          kv_examples=_kv_examples(config, ctx.tokenizer), progress=True)
        (ctx.final_dir / DONE_MARKER).write_text(time.strftime("%Y-%m-%d %H:%M:%S\n"))
        brief = {k: report[k] for k in ("copy_before", "copy_after", "kv_before", "kv_after") if k in report}
        return StageOutput(model=str(ctx.final_dir), summary={"pear": brief})


def _kv_examples(config: PearStageConfig, tokenizer: Any) -> list[dict[str, Any]] | None:
    if not config.kv_data:
        return None
    return kv_retrieval_examples(load_texts(config.kv_data, limit=config.kv_texts), tokenizer,
                                 examples=config.kv_examples, pairs=config.kv_pairs, seed=config.seed)


def pear_command(model: str, out: str, config: PearStageConfig, dtype: str = "auto",
                 progress: bool = True) -> dict[str, Any]:
    """``rlkit pear``: load ``model``, run PEAR, save the re-weighted model and ``pear_report.json`` to ``out``;
    returns the report without its per-head scores and loss curve."""
    from ..models import load_model
    from ..recipe import ModelSpec

    lm, tokenizer = load_model(ModelSpec(name=model, dtype=dtype))
    report = run_pear(lm, tokenizer, config, out_dir=out, kv_examples=_kv_examples(config, tokenizer),
                      progress=progress)
    brief = {k: v for k, v in report.items() if k not in ("scores", "train", "config")}
    brief["train"] = {k: report["train"][k] for k in ("loss_first", "loss_last")}
    return brief
