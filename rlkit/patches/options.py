"""Typed options of the built-in patches, checked when a recipe is validated (before any model loads).

Each dataclass lists a patch's options with their types and defaults; :func:`rlkit.patches.check_patches`
builds it from a recipe's ``model.patches`` entry through :mod:`rlkit.config` (unknown options name the
nearest valid one, wrong types fail in one line), and :func:`rlkit.patches.apply_patches` passes the built
options to the patch function. Checks that need the model (layer indices in range, head dimensions) stay in
the patch functions. This module imports no torch, so validation stays cheap.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar


# Model-free checks shared with the patch functions (one message for a bad value, at recipe time or at apply time)

def positive_int(who: str, name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{who}: {name} must be a positive integer, got {value!r}")
    return value


def non_negative_float(who: str, name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{who}: {name} must be a finite number >= 0, got {value!r}")
    return float(value)


def flag(who: str, name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{who}: {name} must be true or false, got {value!r}")
    return value


def check_experts(who: str, num_experts: Any, top_k: Any) -> None:
    positive_int(who, "num_experts", num_experts)
    positive_int(who, "top_k", top_k)
    if top_k > num_experts:
        raise ValueError(f"{who}: top_k ({top_k}) must be <= num_experts ({num_experts})")


def check_init_std(who: str, init_std: Any) -> float:
    std = non_negative_float(who, "init_std", init_std)
    if std == 0:
        raise ValueError(f"{who}: init_std must be > 0, got {init_std!r}")
    return std


def check_moe_options(kind: str, num_experts: Any, top_k: Any, d_low: Any, expert_size: Any, match_params: Any,
                      aux_loss_coef: Any, renormalize: Any, upcycle: Any, upcycle_noise: Any, seed: Any,
                      init_std: Any) -> None:
    """The checks of the ``aoe`` / ``moe`` options that need no model."""
    who = kind
    check_experts(who, num_experts, top_k)
    non_negative_float(who, "aux_loss_coef", aux_loss_coef)
    flag(who, "renormalize", renormalize)
    flag(who, "upcycle", upcycle)
    non_negative_float(who, "upcycle_noise", upcycle_noise)
    check_init_std(who, init_std)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"{who}: seed must be an integer, got {seed!r}")
    if expert_size is not None:
        positive_int(who, "expert_size", expert_size)
    if d_low is not None:
        if kind != "aoe":
            raise ValueError(f"{who}: d_low applies to the aoe patch only")
        positive_int(who, "d_low", d_low)
    if match_params is not None:
        flag(who, "match_params", match_params)
        if match_params and kind != "aoe":
            raise ValueError(f"{who}: match_params applies to the aoe patch only")
        if match_params and upcycle:
            raise ValueError(f"{who}: match_params cannot be combined with upcycle (upcycled experts keep the dense "
                             f"intermediate size)")


def check_hope_options(train_length: Any, cutoff: Any, min_rotary_pairs: Any) -> None:
    """The checks of the ``hope`` options that need no model."""
    if train_length is not None and (isinstance(train_length, bool) or not isinstance(train_length, int)
                                     or train_length <= 0):
        raise ValueError(f"hope: train_length must be a positive integer, got {train_length!r}")
    if cutoff is not None and (cutoff < 0 or not math.isfinite(cutoff)):
        raise ValueError(f"hope: cutoff must be a finite frequency >= 0, got {cutoff!r}")
    if min_rotary_pairs < 0:
        raise ValueError(f"hope: min_rotary_pairs must be >= 0, got {min_rotary_pairs!r}")


@dataclass
class HopeOptions:
    """``hope``: remove the rotation of RoPE components slower than ``2*pi / train_length``."""

    train_length: int | None = None
    """The training context length L (None: the model config's max_position_embeddings)."""
    cutoff: float | None = None
    """An explicit frequency threshold instead of 2*pi/L."""
    min_rotary_pairs: int = 1
    """Keep at least this many rotating pairs."""

    def __post_init__(self):
        check_hope_options(self.train_length, self.cutoff, self.min_rotary_pairs)


@dataclass
class CogOptions:
    """``cog``: sign(P) * softmax(|P|) attention in the chosen layers."""

    layers: list[int] | None = None
    """Layer indices (None: all but the first and the last)."""
    kernel: str = "fused"
    """``fused``: rlkit's fused GQA kernel; ``autograd``: the reference implementation."""

    def __post_init__(self):
        if self.kernel not in ("fused", "autograd"):
            raise ValueError(f"cog: kernel must be one of fused, autograd, got {self.kernel!r}")


@dataclass
class MoEOptions:
    """``moe`` (learned-router top-K; ``AoEOptions`` for ``aoe``): the MLPs of ``layers`` become experts."""

    KIND: ClassVar[str] = "moe"

    layers: str | list[int] = "all"
    """``all`` or a list of layer indices."""
    num_experts: int = 8
    top_k: int = 2
    d_low: int | None = None
    """AoE: rank of the factorized gate (aoe only)."""
    expert_size: int | None = None
    """Intermediate width of each expert (None: matched to the dense MLP's active parameters)."""
    match_params: bool | None = None
    """AoE: match the MoE baseline's total parameters instead of the active ones (aoe only)."""
    aux_loss_coef: float = 0.0
    """Weight of the Switch load-balancing loss added to the training loss (0: logged only)."""
    renormalize: bool = True
    """Renormalize the top-K gate weights to sum to one."""
    upcycle: bool = False
    """Start every expert from the dense MLP (AoE's gate by truncated SVD)."""
    upcycle_noise: float = 0.01
    """Noise that breaks the symmetry of upcycled experts."""
    seed: int = 0
    init_std: float = 0.02

    def __post_init__(self):
        if isinstance(self.layers, str) and self.layers != "all":
            raise ValueError(f"{self.KIND}: layers must be 'all' or a non-empty list of layer indices, "
                             f"got {self.layers!r}")
        check_moe_options(self.KIND, self.num_experts, self.top_k, self.d_low, self.expert_size, self.match_params,
                          self.aux_loss_coef, self.renormalize, self.upcycle, self.upcycle_noise, self.seed,
                          self.init_std)


@dataclass
class AoEOptions(MoEOptions):
    """``aoe`` (Autonomy-of-Experts, arXiv 2501.13074): router-free experts chosen by their activation norm."""

    KIND: ClassVar[str] = "aoe"


@dataclass
class PearOptions:
    """``pear``: fold the per-head scales found by ``rlkit pear`` into ``o_proj``."""

    coefficients: list[list[int | float]] | None = None
    """``[[layer, head, alpha], ...]`` (written by ``rlkit pear``)."""


BUILTIN_OPTIONS: dict[str, type] = {
    "hope": HopeOptions,
    "cog": CogOptions,
    "aoe": AoEOptions,
    "moe": MoEOptions,
    "pear": PearOptions,
}
