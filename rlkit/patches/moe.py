"""Mixture-of-Experts MLPs: Autonomy-of-Experts (AoE; Lv et al., arXiv 2501.13074, ICML 2025) and a standard
learned-router top-K MoE to compare it with (spec ``model-patches.md`` section 1).

Both replace a dense SwiGLU MLP by ``n`` SwiGLU experts of which every token uses ``K``: ``AoEMoE`` (patch
``"aoe"``) has no router, each expert scores itself by the L2 norm of its low-rank gate activation
``x W_down^i``; ``TopKMoE`` (patch ``"moe"``) has a learned linear router. Both share ``dispatch`` (sort by
expert, one run per expert, gather back: deterministic), the load-balancing ``aux_loss`` left on each layer
(``L = n * sum_i f_i P_i``, 1 when balanced; trainers add it through ``rlkit.patches.auxiliary_loss``), a
padding mask copied from the decoder by a pre-hook, seeded initialisation and optional upcycling from the dense
MLP (truncated SVD of the gate for AoE). Checkpoints reload through ``rlkit.models.load_model``
(``rlkit.patches.load_patch_weights``).

Helpers: ``moe_modules(model)``, ``moe_stats(model)``, ``matched_aoe_width(d, expert_size, d_low)``.

``docs/methods/moe.md`` has the math, the state-dict names, every option and default, the auxiliary-loss
convention, dispatch, numerics, padding, gradient checkpointing, upcycling, checkpoint reload, every choice
made where the paper is silent, and the measured results (``bench/aoe_vs_moe.py``).
"""

from __future__ import annotations

import inspect
import logging
import math
from typing import Any, Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from . import register_patch
from .options import check_experts as _check_experts  # the checks shared with the recipe-time options
from .options import check_init_std as _check_init_std
from .options import check_moe_options
from .options import flag as _flag
from .options import non_negative_float as _non_negative_float
from .options import positive_int as _positive_int

logger = logging.getLogger(__name__)

__all__ = ["AoEMoE", "Routing", "TopKMoE", "aoe", "dispatch", "matched_aoe_width", "moe",
           "moe_modules", "moe_stats"]


def matched_aoe_width(hidden_size: int, expert_size: int, d_low: int) -> int:
    """AoE expert width ``D_w`` with the parameter count of a standard SwiGLU expert of width ``expert_size``.

    A standard expert has ``3 d D`` parameters, an AoE expert ``d r + r D_w + 2 d D_w``; solving for ``D_w``
    gives ``(3 d D - r d) / (r + 2 d)`` (spec section 1), rounded to the nearest integer.
    """
    d = _positive_int("matched_aoe_width", "hidden_size", hidden_size)
    big = _positive_int("matched_aoe_width", "expert_size", expert_size)
    r = _positive_int("matched_aoe_width", "d_low", d_low)
    width = math.floor((3 * d * big - r * d) / (r + 2 * d) + 0.5)
    if width < 1:
        raise ValueError(f"matched_aoe_width: d_low={r} leaves no parameters for the expert body "
                         f"(3*expert_size must exceed d_low; expert_size={big})")
    return width


# --------------------------------------------------------------------------------------------------
# Routing and dispatch


class Routing(NamedTuple):
    """The routing decision of one forward on ``T`` flattened tokens."""

    scores: torch.Tensor
    """``[T, n]`` float32: AoE norms ``||C_i||`` or the router logits."""
    probs: torch.Tensor
    """``[T, n]`` float32 softmax of ``scores``."""
    weights: torch.Tensor
    """``[T, K]`` float32 combine weights (renormalized to sum 1 when ``renormalize``)."""
    experts: torch.Tensor
    """``[T, K]`` int64 selected experts, by decreasing probability."""
    cache: torch.Tensor | None = None
    """AoE only: ``C = x W_down`` as ``[T, n, r]`` in the activation dtype."""


def _stat_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _select(scores: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    probs = torch.softmax(scores, dim=-1)
    weights, experts = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return probs, weights, experts


def dispatch(x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor, num_experts: int,
             expert_fn: Callable[[int, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``y[t] = sum_k weights[t, k] * expert_fn(experts[t, k], [t])`` with one ``expert_fn`` call per used expert.

    ``x``: ``[T, d]`` (only its shape, dtype and device are used); ``experts`` / ``weights``: ``[T, K]``;
    ``expert_fn(e, tokens)`` returns expert ``e``'s output ``[len(tokens), d]`` for the flat token indices
    ``tokens`` (sorted ascending). Experts with no token are not called.
    """
    num_tokens, top_k = experts.shape
    flat = experts.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=num_experts).tolist()
    token_of = order // top_k
    outputs = []
    start = 0
    for e, count in enumerate(counts):
        if count == 0:
            continue
        outputs.append(expert_fn(e, token_of[start:start + count]))
        start += count
    if not outputs:  # no token at all
        return x.new_zeros(x.shape)
    y_sorted = torch.cat(outputs) if len(outputs) > 1 else outputs[0]
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    y = y_sorted.index_select(0, inverse).view(num_tokens, top_k, -1)
    return (y * weights.to(y.dtype).unsqueeze(-1)).sum(dim=1)


def _in_backward() -> bool:
    """True while autograd runs a forward inside a backward pass (gradient-checkpoint recomputation)."""
    current = getattr(torch._C, "_current_graph_task_id", None)
    return current is not None and current() != -1


# --------------------------------------------------------------------------------------------------
# Layers


class _MoEBase(nn.Module):
    """Shared state, forward, aux loss and statistics of ``AoEMoE`` and ``TopKMoE``."""

    def __init__(self, who: str, hidden_size: int, expert_size: int, num_experts: int, top_k: int,
                 aux_loss_coef: float, renormalize: bool, init_std: float) -> None:
        super().__init__()
        _positive_int(who, "hidden_size", hidden_size)
        _positive_int(who, "expert_size", expert_size)
        _check_experts(who, num_experts, top_k)
        self.hidden_size = hidden_size
        self.expert_size = expert_size
        self.num_experts = num_experts
        self.top_k = top_k
        self.aux_loss_coef = _non_negative_float(who, "aux_loss_coef", aux_loss_coef)
        self.renormalize = _flag(who, "renormalize", renormalize)
        self.init_std = _check_init_std(who, init_std)
        self.layer_idx: int | None = None
        self.token_mask: torch.Tensor | None = None
        self.aux_loss: torch.Tensor | None = None
        self.last_load: torch.Tensor | None = None

    # subclasses: route(x2d) -> Routing, _expert_fn(x2d, routing) -> callable for dispatch
    def route(self, x: torch.Tensor) -> Routing:
        raise NotImplementedError

    def _expert_fn(self, x: torch.Tensor, routing: Routing) -> Callable[[int, torch.Tensor], torch.Tensor]:
        raise NotImplementedError

    def _flat_mask(self, shape: torch.Size, device: torch.device) -> torch.Tensor | None:
        mask = self.token_mask
        if mask is None or len(shape) != 3 or tuple(mask.shape) != tuple(shape[:2]):
            return None
        return (mask.reshape(-1) != 0).to(device)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        routing = self.route(x)
        out = dispatch(x, routing.experts, routing.weights, self.num_experts, self._expert_fn(x, routing))
        # Computed on every call (gradient checkpointing needs the recomputation to run the same ops), stored
        # only outside backward (see the module doc).
        aux, load = self.balance_stats(routing, self._flat_mask(shape, x.device))
        if not _in_backward():
            self.aux_loss = aux
            self.last_load = load.detach()
        return out.view(shape)

    def balance_stats(self, routing: Routing, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(L_aux, f)`` for one routing decision; ``mask`` ``[T]`` (nonzero = counted) or None (all tokens)."""
        probs, experts = routing.probs, routing.experts
        n, k = self.num_experts, self.top_k
        m = torch.ones(probs.shape[0], dtype=probs.dtype, device=probs.device) if mask is None else mask.to(probs.dtype)
        real = m.sum().clamp_min(1)
        prob_mean = (probs * m.unsqueeze(-1)).sum(dim=0) / real
        counts = torch.zeros(n, dtype=probs.dtype, device=probs.device)
        counts.scatter_add_(0, experts.reshape(-1), m.repeat_interleave(k))
        load = counts / (real * k)
        return n * (load * prob_mean).sum(), load

    def __getstate__(self) -> dict[str, Any]:
        # copy.deepcopy / pickle (e.g. TRL's reference-model copy): drop the per-forward tensors, one of which
        # (aux_loss) is a non-leaf tensor that deepcopy refuses.
        state = super().__getstate__()
        state.update(aux_loss=None, token_mask=None)
        return state

    def extra_repr(self) -> str:
        return (f"hidden_size={self.hidden_size}, expert_size={self.expert_size}, num_experts={self.num_experts}, "
                f"top_k={self.top_k}, renormalize={self.renormalize}, aux_loss_coef={self.aux_loss_coef}")


class AoEMoE(_MoEBase):
    """Autonomy-of-Experts MoE MLP: router-free, experts pick themselves by ``||x W_down^i||``; see the module doc."""

    def __init__(self, hidden_size: int, expert_size: int, num_experts: int = 8, top_k: int = 2,
                 d_low: int | None = None, aux_loss_coef: float = 0.0, renormalize: bool = True,
                 init_std: float = 0.02, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__("AoEMoE", hidden_size, expert_size, num_experts, top_k, aux_loss_coef, renormalize, init_std)
        d_low = max(1, hidden_size // 3) if d_low is None else d_low
        self.d_low = _positive_int("AoEMoE", "d_low", d_low)
        kw = {"device": device, "dtype": dtype}
        n, r, dw = num_experts, self.d_low, expert_size
        self.w_down = nn.Parameter(torch.empty(hidden_size, n * r, **kw))
        self.w_up = nn.Parameter(torch.empty(n, r, dw, **kw))
        self.w_p = nn.Parameter(torch.empty(n, hidden_size, dw, **kw))
        self.w_o = nn.Parameter(torch.empty(n, dw, hidden_size, **kw))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for p in (self.w_down, self.w_up, self.w_p, self.w_o):
            nn.init.normal_(p, mean=0.0, std=self.init_std)

    def route(self, x: torch.Tensor) -> Routing:
        cache = (x @ self.w_down).view(x.shape[0], self.num_experts, self.d_low)
        scores = torch.linalg.vector_norm(cache.to(_stat_dtype(x.dtype)), dim=-1)
        probs, weights, experts = _select(scores, self.top_k, self.renormalize)
        return Routing(scores, probs, weights, experts, cache)

    def expert_forward(self, e: int, x_e: torch.Tensor, c_e: torch.Tensor) -> torch.Tensor:
        """Expert ``e`` on its tokens: ``(SiLU(C_e W_up^e) * (x_e W_p^e)) W_o^e``."""
        return (F.silu(c_e @ self.w_up[e]) * (x_e @ self.w_p[e])) @ self.w_o[e]

    def _expert_fn(self, x: torch.Tensor, routing: Routing) -> Callable[[int, torch.Tensor], torch.Tensor]:
        # The selected experts' cached activations are gathered once, in ``dispatch``'s order (assignments
        # sorted by expert, stable): one gather instead of one ``cache[tokens, e]`` per expert, whose
        # backward would fill a zero tensor of the whole cache for every expert (about 20% of the layer's
        # CPU time at the bench's size).
        n, r = self.num_experts, self.d_low
        flat = routing.experts.reshape(-1)
        order = torch.argsort(flat, stable=True)
        rows = (order // self.top_k) * n + flat[order]
        selected = routing.cache.reshape(-1, r).index_select(0, rows)
        starts = [0] + torch.bincount(flat, minlength=n).cumsum(0).tolist()

        def run(e: int, tokens: torch.Tensor) -> torch.Tensor:
            return self.expert_forward(e, x.index_select(0, tokens), selected[starts[e]:starts[e + 1]])

        return run

    def extra_repr(self) -> str:
        return super().extra_repr() + f", d_low={self.d_low}"


class TopKMoE(_MoEBase):
    """Standard top-K MoE MLP with a learned linear router and SwiGLU experts; see the module doc."""

    def __init__(self, hidden_size: int, expert_size: int, num_experts: int = 8, top_k: int = 2,
                 aux_loss_coef: float = 0.0, renormalize: bool = True, init_std: float = 0.02,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__("TopKMoE", hidden_size, expert_size, num_experts, top_k, aux_loss_coef, renormalize, init_std)
        kw = {"device": device, "dtype": dtype}
        n, dw = num_experts, expert_size
        self.w_router = nn.Parameter(torch.empty(hidden_size, n, **kw))
        self.w_g = nn.Parameter(torch.empty(n, hidden_size, dw, **kw))
        self.w_p = nn.Parameter(torch.empty(n, hidden_size, dw, **kw))
        self.w_o = nn.Parameter(torch.empty(n, dw, hidden_size, **kw))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for p in (self.w_router, self.w_g, self.w_p, self.w_o):
            nn.init.normal_(p, mean=0.0, std=self.init_std)

    def route(self, x: torch.Tensor) -> Routing:
        acc = _stat_dtype(x.dtype)
        scores = x.to(acc) @ self.w_router.to(acc)
        probs, weights, experts = _select(scores, self.top_k, self.renormalize)
        return Routing(scores, probs, weights, experts)

    def expert_forward(self, e: int, x_e: torch.Tensor) -> torch.Tensor:
        """Expert ``e`` on its tokens: ``(SiLU(x_e W_g^e) * (x_e W_p^e)) W_o^e``."""
        return (F.silu(x_e @ self.w_g[e]) * (x_e @ self.w_p[e])) @ self.w_o[e]

    def _expert_fn(self, x: torch.Tensor, routing: Routing) -> Callable[[int, torch.Tensor], torch.Tensor]:
        def run(e: int, tokens: torch.Tensor) -> torch.Tensor:
            return self.expert_forward(e, x.index_select(0, tokens))

        return run


# --------------------------------------------------------------------------------------------------
# Model-level helpers


def moe_modules(model: Any) -> list[_MoEBase]:
    """The MoE layers of ``model`` (cached on the model as ``_rlkit_moe_modules`` by the patch)."""
    cached = getattr(model, "_rlkit_moe_modules", None)
    if cached is not None:
        return cached
    found = [m for m in model.modules() if isinstance(m, _MoEBase)]
    if found:
        try:
            model._rlkit_moe_modules = found
        except AttributeError:
            pass
    return found


def moe_stats(model: Any) -> dict[str, float]:
    """Routing statistics of the last forward, averaged over the MoE layers (empty before any forward).

    ``moe/aux_loss``: the un-weighted ``L_aux`` (1 = balanced); ``moe/load_entropy``: the entropy of the
    expert load ``f`` divided by ``log n`` (1 = balanced, 0 = one expert takes everything); ``moe/load_max``:
    ``n * max_i f_i`` (1 = balanced, ``n / K`` = fully collapsed).
    """
    aux, entropy, peak = [], [], []
    for m in moe_modules(model):
        if m.aux_loss is None or m.last_load is None:
            continue
        load = m.last_load.detach().float().cpu()
        aux.append(float(m.aux_loss.detach().float().cpu()))
        n = load.numel()
        h = float(-(load * torch.log(load.clamp_min(1e-30))).sum())
        entropy.append(h / math.log(n) if n > 1 else 1.0)
        peak.append(float(load.max()) * n)
    if not aux:
        return {}
    return {"moe/aux_loss": sum(aux) / len(aux), "moe/load_entropy": sum(entropy) / len(entropy),
            "moe/load_max": sum(peak) / len(peak)}


def _store_token_mask(module: nn.Module, args: tuple, kwargs: dict) -> None:
    """Decoder forward pre-hook: hand the 2-D ``attention_mask`` to every MoE layer (None when absent)."""
    mask = kwargs.get("attention_mask")
    index = getattr(module, "_rlkit_mask_arg_index", None)
    if mask is None and index is not None and len(args) > index:
        mask = args[index]
    if not (isinstance(mask, torch.Tensor) and mask.dim() == 2):
        mask = None
    for m in getattr(module, "_rlkit_moe_modules", ()):
        m.token_mask = mask


# --------------------------------------------------------------------------------------------------
# The patches


def _decoder(model: Any, who: str) -> nn.Module:
    base = getattr(model, "model", None)
    if isinstance(base, nn.Module) and isinstance(getattr(base, "layers", None), nn.ModuleList):
        return base
    if isinstance(getattr(model, "layers", None), nn.ModuleList):
        return model
    raise ValueError(f"{who}: cannot find the decoder layers (expected model.model.layers, as in Llama / Qwen2 / "
                     f"Mistral)")


def _resolve_layers(who: str, layers: Any, count: int) -> list[int]:
    if layers == "all":
        return list(range(count))
    if isinstance(layers, (str, bool)) or not isinstance(layers, (list, tuple)) or not layers:
        raise ValueError(f"{who}: layers must be 'all' or a non-empty list of layer indices, got {layers!r}")
    out = []
    for i in layers:
        if isinstance(i, bool) or not isinstance(i, int) or not -count <= i < count:
            raise ValueError(f"{who}: layer index {i!r} is out of range for a model with {count} layers")
        out.append(i % count)
    if len(set(out)) != len(out):
        raise ValueError(f"{who}: layers lists a layer twice: {layers!r}")
    return sorted(out)


def _dense_parts(who: str, mlp: nn.Module, i: int) -> tuple[nn.Module, nn.Module, nn.Module]:
    if isinstance(mlp, _MoEBase):
        raise ValueError(f"{who}: layer {i} is already a MoE layer ({type(mlp).__name__})")
    parts = tuple(getattr(mlp, name, None) for name in ("gate_proj", "up_proj", "down_proj"))
    if any(not isinstance(getattr(p, "weight", None), torch.Tensor) for p in parts):
        raise ValueError(f"{who}: layer {i}'s mlp ({type(mlp).__name__}) is not a gated MLP with gate_proj, "
                         f"up_proj and down_proj (Llama / Qwen2 / Mistral)")
    return parts  # type: ignore[return-value]


def _noisy(value: torch.Tensor, noise: float, scale: float) -> torch.Tensor:
    """``value + noise * scale * N(0, 1)``; the draw is on the CPU (seeded) and moved to ``value``'s device."""
    if noise == 0:
        return value
    return value + noise * scale * torch.randn(value.shape, dtype=torch.float32).to(value.device)


def _upcycle(module: _MoEBase, gate: nn.Module, up: nn.Module, down: nn.Module, noise: float) -> None:
    """Copy the dense MLP into every expert (see the module doc); runs under the caller's seeded RNG."""
    g = gate.weight.detach().float().t()  # [d, D]
    p = up.weight.detach().float().t()  # [d, D]
    o = down.weight.detach().float().t()  # [D, d]
    if isinstance(module, AoEMoE):
        u, s, vh = torch.linalg.svd(gate.weight.detach().t().double(), full_matrices=False)
        r = module.d_low
        root = s[:r].sqrt()
        w_down = (u[:, :r] * root).float()
        w_up = (root.unsqueeze(-1) * vh[:r]).float()
        first = [w_down, w_up]
    else:
        first = [g]
    mats = first + [p, o]
    stds = [float(m.std()) if m.numel() > 1 else 0.0 for m in mats]
    with torch.no_grad():
        for j in range(module.num_experts):
            vals = mats if j == 0 else [_noisy(m, noise, s) for m, s in zip(mats, stds)]
            if isinstance(module, AoEMoE):
                r = module.d_low
                module.w_down[:, j * r:(j + 1) * r].copy_(vals[0])
                module.w_up[j].copy_(vals[1])
            else:
                module.w_g[j].copy_(vals[0])
            module.w_p[j].copy_(vals[-2])
            module.w_o[j].copy_(vals[-1])


def _patch(kind: str, model: Any, layers: Any, num_experts: Any, top_k: Any, d_low: Any, expert_size: Any,
           match_params: Any, aux_loss_coef: Any, renormalize: Any, upcycle: Any, upcycle_noise: Any, seed: Any,
           init_std: Any) -> None:
    who = kind
    check_moe_options(kind, num_experts, top_k, d_low, expert_size, match_params, aux_loss_coef, renormalize,
                      upcycle, upcycle_noise, seed, init_std)
    coef, noise, std = float(aux_loss_coef), float(upcycle_noise), float(init_std)

    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    act = getattr(config, "hidden_act", None)
    if act not in ("silu", "swish"):
        raise ValueError(f"{who}: the experts are SwiGLU (SiLU) but the model's hidden_act is {act!r}; "
                         f"only silu models (Llama, Qwen2, Mistral) can be patched")
    decoder = _decoder(model, who)
    chosen = _resolve_layers(who, layers, len(decoder.layers))

    plans = []  # validate every layer before touching any
    for i in chosen:
        gate, up, down = _dense_parts(who, decoder.layers[i].mlp, i)
        ffn, d = gate.weight.shape
        if upcycle:
            if any(getattr(m, "bias", None) is not None for m in (gate, up, down)):
                raise ValueError(f"{who}: cannot upcycle layer {i}: its dense MLP has biases")
            if expert_size is not None and expert_size != ffn:
                raise ValueError(f"{who}: upcycled experts copy the dense MLP, so expert_size must be the "
                                 f"intermediate size {ffn} (got {expert_size}); leave it out")
            width = ffn
        else:
            width = expert_size if expert_size is not None else ffn // top_k
            if width < 1:
                raise ValueError(f"{who}: intermediate_size {ffn} // top_k {top_k} is 0; pass expert_size")
        rank = None
        if kind == "aoe":
            if d_low is not None:
                rank = d_low
            else:
                rank = min(d, ffn) if upcycle else max(1, d // 3)
            if upcycle and rank > min(d, ffn):
                raise ValueError(f"{who}: d_low ({rank}) cannot exceed min(hidden_size, intermediate_size) = "
                                 f"{min(d, ffn)} when upcycling (the SVD of gate_proj has no more components)")
            matched = match_params if match_params is not None else (expert_size is None and not upcycle)
            if matched:
                width = matched_aoe_width(d, width, rank)
        plans.append((i, gate, up, down, d, width, rank))

    for i, gate, up, down, d, width, rank in plans:
        ref = gate.weight
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + i)
            if kind == "aoe":
                module: _MoEBase = AoEMoE(d, width, num_experts, top_k, d_low=rank, aux_loss_coef=coef,
                                          renormalize=renormalize, init_std=std)
            else:
                module = TopKMoE(d, width, num_experts, top_k, aux_loss_coef=coef, renormalize=renormalize,
                                 init_std=std)
            module.to(device=ref.device, dtype=ref.dtype)
            if upcycle:
                _upcycle(module, gate, up, down, noise)
        module.layer_idx = i
        decoder.layers[i].mlp = module
        logger.info("%s: layer %d -> %s", who, i, module.extra_repr())

    modules = [m for m in model.modules() if isinstance(m, _MoEBase)]
    model._rlkit_moe_modules = modules
    decoder._rlkit_moe_modules = modules
    if getattr(decoder, "_rlkit_moe_hook", None) is None:
        params = list(inspect.signature(decoder.forward).parameters)
        decoder._rlkit_mask_arg_index = params.index("attention_mask") if "attention_mask" in params else None
        decoder._rlkit_moe_hook = decoder.register_forward_pre_hook(_store_token_mask, with_kwargs=True)


@register_patch("aoe")
def aoe(model: Any, layers: str | list[int] = "all", num_experts: int = 8, top_k: int = 2, d_low: int | None = None,
        expert_size: int | None = None, match_params: bool | None = None, aux_loss_coef: float = 0.0,
        renormalize: bool = True, upcycle: bool = False, upcycle_noise: float = 0.01, seed: int = 0,
        init_std: float = 0.02) -> None:
    """Replace the chosen layers' MLPs by Autonomy-of-Experts layers (``AoEMoE``); options in the module doc."""
    _patch("aoe", model, layers, num_experts, top_k, d_low, expert_size, match_params, aux_loss_coef, renormalize,
           upcycle, upcycle_noise, seed, init_std)


@register_patch("moe")
def moe(model: Any, layers: str | list[int] = "all", num_experts: int = 8, top_k: int = 2, d_low: int | None = None,
        expert_size: int | None = None, match_params: bool | None = None, aux_loss_coef: float = 0.0,
        renormalize: bool = True, upcycle: bool = False, upcycle_noise: float = 0.01, seed: int = 0,
        init_std: float = 0.02) -> None:
    """Replace the chosen layers' MLPs by learned-router top-K MoE layers (``TopKMoE``); ``d_low`` and
    ``match_params`` are aoe options and are refused here (accepted as None/False so both patches share one
    signature)."""
    _patch("moe", model, layers, num_experts, top_k, d_low, expert_size, match_params, aux_loss_coef, renormalize,
           upcycle, upcycle_noise, seed, init_std)
