"""PolarQuant for the key cache (Wu, Lv, ..., Yan; arXiv 2502.00527, NeurIPS 2025): the pure math.

Observation behind the method: the channel outliers of post-RoPE keys usually sit in one dim of a RoPE pair,
and in 2D each pair traces a smooth circle. PolarQuant therefore quantizes every RoPE pair ``(x, y)`` of a
key in polar form: the radius ``rho = hypot(x, y)`` and the angle ``phi = atan2(y, x)`` mapped to
``[0, 2*pi)`` get ``rbits`` and ``tbits`` bits each, with an asymmetric zero-point/scale per
``(batch, kv head, token group, pair)``. This is *not* Google's PolarQuant (arXiv 2502.02617: random
preconditioning, recursive polar transform, fixed codebooks, no per-block scale).

This module holds the tensor-level functions; the cache layers that use them live in
:mod:`rlkit.kvcache.cache` (``PolarKeyLayer`` is importable from here too) and the table-lookup attention
in :mod:`rlkit.kvcache.attention`.

- :func:`polar_quantize` ``(keys[B, H, T, D]) -> PolarCodes`` and :func:`polar_dequantize`.
- :func:`polar_lut_scores` ``(query[B, Hq, L, D], codes, num_key_value_groups) -> [B, Hq, L, T]``: the QK
  product read from the codes by table lookups (spec section 4, "Decode"), equal to
  ``query @ polar_dequantize(codes)^T`` up to float32 rounding.

Layout and math (spec section 4, [code + paper]):

- Pairs are the ones HF's ``rotate_half`` RoPE rotates together, ``(k[j], k[j + D/2])`` for ``j < D/2``
  (the official code: ``view(B, N, L/G, G, 2, D/2)``); ``D`` must be even. ``x`` is the first half of the
  head, ``y`` the second.
- Groups are ``group_size`` consecutive tokens (default 128); ``T`` must be a multiple of it here (the
  cache keeps the incomplete tail in full precision).
- Per (b, head, group, pair) and per component ``v`` (``rho`` or ``phi``): ``z = min v``,
  ``s = (max v - z) / 2**bits`` (divided by ``2**bits`` as the official code, not ``2**bits - 1``),
  ``code = clamp(floor((v - z) / s), 0, 2**bits - 1)``, dequantized to the bin centre
  ``(code + 0.5) * s + z``; then ``x = rho cos phi``, ``y = rho sin phi``. A constant component
  (``max == min``) gets ``s = 0``: its codes are 0 and it dequantizes to ``z`` exactly (the division uses
  ``s = 1`` in that case instead of producing NaN).
- Codes are packed ``(rho_code << tbits) | theta_code`` in one ``uint8`` when ``rbits + tbits <= 8`` (the
  default 4 + 4 is one byte per pair = 4 bits per key element), else in ``int16`` (up to 15 bits) or
  ``int32``. Bit widths below 8 are *not* packed further: 3 + 3 still takes one byte per pair in memory
  (byte accounting in :mod:`rlkit.kvcache.cache` reports the bytes actually held).

Choices made where the paper and the official code are silent or differ:

- **Parameter dtype.** The four parameters ``(s_rho, z_rho, s_theta, z_theta)`` are stored in the key dtype
  (``param_dtype`` overrides): bf16/fp16 for a 16-bit model (the official code keeps them in the model's
  half dtype, giving 4 x 16 bits per pair per group = +0.25 bit/element at ``group_size`` 128), fp32 for an
  fp32 model (the byte accounting can normalise those to 16 bits). All arithmetic runs in float32.
- **Rounding of the parameters.** When the parameters are stored in a narrower dtype than float32, the
  zero-point is rounded *down* and the scale *up* (one ``nextafter`` step when round-to-nearest went the
  wrong way) and the codes are computed from the stored values, so every value still lies inside its bin:
  the bin-centre bounds ``|rho - rho_hat| <= s_rho / 2`` and ``|phi - phi_hat| <= s_theta / 2`` hold with
  the stored scales (up to float32 rounding), whatever the storage dtype.
- The angle is not wrapped around the circle before taking min/max (the range of a group is the plain
  interval ``[min phi, max phi]`` inside ``[0, 2*pi)``), as in the official code; ``atan2`` values that
  round to exactly ``2*pi`` after the shift are mapped to 0.
- Reconstruction error per pair, from the two bounds: ``|k_pair - k_pair_hat| <= s_rho / 2 +
  rho * s_theta / 2`` (radius error plus the chord of the angle error at the true radius).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch

__all__ = ["PolarCodes", "polar_quantize", "polar_dequantize", "polar_lut_scores",
           "split_pairs", "TWO_PI"]

TWO_PI = 2 * math.pi


def __getattr__(name: str) -> Any:
    # The cache layer lives in rlkit.kvcache.cache (which imports this module); re-exported lazily here.
    if name == "PolarKeyLayer":
        from .cache import PolarKeyLayer

        return PolarKeyLayer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass
class PolarCodes:
    """Polar-quantized keys of ``num_groups`` complete token groups.

    ``codes`` is ``[B, H, G, group_size, D/2]`` (packed ``rho << tbits | theta``); the four parameters are
    ``[B, H, G, D/2]``; ``dtype`` is the dtype :func:`polar_dequantize` returns (the original key dtype).
    """

    codes: torch.Tensor
    rho_scale: torch.Tensor
    rho_zero: torch.Tensor
    theta_scale: torch.Tensor
    theta_zero: torch.Tensor
    rbits: int
    tbits: int
    dtype: torch.dtype

    @property
    def group_size(self) -> int:
        return self.codes.shape[3]

    @property
    def num_groups(self) -> int:
        return self.codes.shape[2]

    @property
    def num_tokens(self) -> int:
        return self.codes.shape[2] * self.codes.shape[3]

    @property
    def head_dim(self) -> int:
        return 2 * self.codes.shape[4]

    def params(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.rho_scale, self.rho_zero, self.theta_scale, self.theta_zero

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> PolarCodes:
        """The same codes with ``fn`` applied to every tensor (batch selection, device moves, group slices)."""
        return PolarCodes(fn(self.codes), fn(self.rho_scale), fn(self.rho_zero), fn(self.theta_scale),
                          fn(self.theta_zero), self.rbits, self.tbits, self.dtype)

    def groups(self, start: int, stop: int | None = None) -> PolarCodes:
        """Groups ``start:stop`` (dim 2 of every tensor)."""
        return self.map(lambda t: t[:, :, start:stop])

    def cat(self, other: PolarCodes) -> PolarCodes:
        """These groups followed by ``other``'s (same batch, heads, pairs and bit widths)."""
        if (other.rbits, other.tbits, other.group_size) != (self.rbits, self.tbits, self.group_size):
            raise ValueError("PolarCodes.cat: bit widths or group sizes differ")
        return PolarCodes(*(torch.cat([a, b], dim=2) for a, b in zip(
            (self.codes, *self.params()), (other.codes, *other.params()))), self.rbits, self.tbits, self.dtype)

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.codes, *self.params())

    def nbytes(self, reference_bits: int | None = None) -> int:
        """Bytes held: codes as stored, parameters as stored or at ``reference_bits`` per element."""
        n = self.codes.numel() * self.codes.element_size()
        for p in self.params():
            n += p.numel() * (p.element_size() if reference_bits is None else reference_bits / 8)
        return int(n)


def split_pairs(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x, y)`` halves of the last dim: the ``rotate_half`` RoPE pairs ``(t[j], t[j + D/2])``."""
    d = t.shape[-1]
    if d % 2:
        raise ValueError(f"PolarQuant needs an even head dimension, got {d}")
    return t[..., : d // 2], t[..., d // 2:]


def _code_dtype(bits: int) -> torch.dtype:
    if bits <= 8:
        return torch.uint8
    return torch.int16 if bits <= 15 else torch.int32


def _round_down(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x`` (float32) in ``dtype``, never above ``x``."""
    r = x.to(dtype)
    if dtype == x.dtype:
        return r
    over = r.float() > x
    return torch.where(over, torch.nextafter(r, torch.full_like(r, -math.inf)), r)


def _round_up(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x`` (float32) in ``dtype``, never below ``x``."""
    r = x.to(dtype)
    if dtype == x.dtype:
        return r
    under = r.float() < x
    return torch.where(under, torch.nextafter(r, torch.full_like(r, math.inf)), r)


def _quantize_component(v: torch.Tensor, bits: int, param_dtype: torch.dtype
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric group quantization of ``v[B, H, G, g, P]`` along dim 3: ``(codes, scale, zero)``."""
    levels = 2 ** bits
    zero = _round_down(v.amin(dim=3), param_dtype)                      # [B, H, G, P]
    scale = _round_up((v.amax(dim=3) - zero.float()) / levels, param_dtype)
    s = scale.float()
    safe = torch.where(s > 0, s, torch.ones_like(s))
    codes = torch.floor((v - zero.float().unsqueeze(3)) / safe.unsqueeze(3)).clamp_(0, levels - 1)
    return codes.to(torch.int32), scale, zero


def polar_angles(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rho, phi)`` in float32 with ``phi`` in ``[0, 2*pi)``."""
    x, y = x.float(), y.float()
    rho = torch.hypot(x, y)
    phi = torch.atan2(y, x)
    phi = torch.where(phi < 0, phi + TWO_PI, phi)
    phi = torch.where(phi >= TWO_PI, phi - TWO_PI, phi)
    return rho, phi


def polar_quantize(keys: torch.Tensor, group_size: int = 128, rbits: int = 4, tbits: int = 4,
                   param_dtype: torch.dtype | None = None) -> PolarCodes:
    """Quantize ``keys[B, H, T, D]`` (``T`` a multiple of ``group_size``) pair-wise in polar form."""
    if keys.dim() != 4:
        raise ValueError(f"polar_quantize expects keys [B, H, T, D], got shape {tuple(keys.shape)}")
    b, h, t, d = keys.shape
    if group_size < 1 or t % group_size:
        raise ValueError(f"polar_quantize: T={t} is not a multiple of group_size={group_size}")
    for name, bits in (("rbits", rbits), ("tbits", tbits)):
        if not 1 <= bits <= 8:
            raise ValueError(f"polar_quantize: {name} must be in 1..8, got {bits}")
    param_dtype = param_dtype or keys.dtype
    x, y = split_pairs(keys)
    rho, phi = polar_angles(x, y)
    shape = (b, h, t // group_size, group_size, d // 2)
    rho_codes, rho_scale, rho_zero = _quantize_component(rho.reshape(shape), rbits, param_dtype)
    theta_codes, theta_scale, theta_zero = _quantize_component(phi.reshape(shape), tbits, param_dtype)
    packed = ((rho_codes << tbits) | theta_codes).to(_code_dtype(rbits + tbits))
    return PolarCodes(packed, rho_scale, rho_zero, theta_scale, theta_zero, rbits, tbits, keys.dtype)


def unpack_codes(codes: PolarCodes) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rho_code, theta_code)`` as int64 tensors ``[B, H, G, g, P]``."""
    packed = codes.codes.long()
    return packed >> codes.tbits, packed & (2 ** codes.tbits - 1)


def polar_components(codes: PolarCodes) -> tuple[torch.Tensor, torch.Tensor]:
    """Dequantized ``(rho_hat, phi_hat)`` in float32, ``[B, H, G, g, P]`` (bin centres)."""
    rc, tc = unpack_codes(codes)
    rho = (rc.float() + 0.5) * codes.rho_scale.float().unsqueeze(3) + codes.rho_zero.float().unsqueeze(3)
    phi = (tc.float() + 0.5) * codes.theta_scale.float().unsqueeze(3) + codes.theta_zero.float().unsqueeze(3)
    return rho, phi


def polar_dequantize(codes: PolarCodes, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Keys ``[B, H, T, D]`` rebuilt from the bin centres, in ``dtype`` (default: the original key dtype)."""
    rho, phi = polar_components(codes)
    b, h, g, n, p = rho.shape
    keys = torch.cat([rho * torch.cos(phi), rho * torch.sin(phi)], dim=-1)
    return keys.reshape(b, h, g * n, 2 * p).to(dtype or codes.dtype)


def polar_lut_scores(query: torch.Tensor, codes: PolarCodes, num_key_value_groups: int = 1) -> torch.Tensor:
    """``query[B, Hq, L, D] @ dequantized_keys^T`` read from the codes by table lookups, float32 ``[B, Hq, L, T]``.

    Per query, KV head, group and pair ``j`` the two tables of the spec are built:
    ``TP[j, t] = q_x[j] cos(phi_t) + q_y[j] sin(phi_t)`` for the ``2**tbits`` angle centres
    ``phi_t = (t + 0.5) s_theta + z_theta``, and ``Rad[j, r] = (r + 0.5) s_rho + z_rho`` for the
    ``2**rbits`` radius centres; then ``score[n] = sum_j Rad[j, rho_code[n, j]] * TP[j, theta_code[n, j]]``
    (two ``gather``). GQA: query head ``h`` reads KV head ``h // num_key_value_groups`` (HF's ``repeat_kv``
    order); no key is repeated, and the query rows are processed one at a time so the largest intermediate
    has the size of the keys (float32).
    """
    b, hq, length, d = query.shape
    h = codes.codes.shape[1]
    if hq != h * num_key_value_groups:
        raise ValueError(f"polar_lut_scores: {hq} query heads != {h} KV heads x {num_key_value_groups}")
    if d != codes.head_dim:
        raise ValueError(f"polar_lut_scores: query dim {d} != key dim {codes.head_dim}")
    g, n, p = codes.codes.shape[2:]
    m = num_key_value_groups * length
    qx, qy = split_pairs(query.float().reshape(b, h, m, d))                      # [B, H, M, P]
    # angle table TP[b, h, m, g, p, t]
    centres_t = torch.arange(2 ** codes.tbits, device=query.device, dtype=torch.float32) + 0.5
    phi_t = codes.theta_zero.float().unsqueeze(-1) + centres_t * codes.theta_scale.float().unsqueeze(-1)
    tp = (qx[:, :, :, None, :, None] * torch.cos(phi_t)[:, :, None]
          + qy[:, :, :, None, :, None] * torch.sin(phi_t)[:, :, None])        # [B, H, M, G, P, 2^t]
    # radius table Rad[b, h, g, p, r]
    centres_r = torch.arange(2 ** codes.rbits, device=query.device, dtype=torch.float32) + 0.5
    rad = codes.rho_zero.float().unsqueeze(-1) + centres_r * codes.rho_scale.float().unsqueeze(-1)
    rc, tc = unpack_codes(codes)                                                   # [B, H, G, n, P]
    rad_v = rad.unsqueeze(3).expand(b, h, g, n, p, rad.shape[-1]).gather(-1, rc.unsqueeze(-1)).squeeze(-1)
    tc = tc.unsqueeze(-1)
    # One query row at a time: the gathered angle terms are [B, H, G, n, P], the size of the keys, instead of
    # num_key_value_groups * L times that.
    rows = [(tp[:, :, i].unsqueeze(3).expand(b, h, g, n, p, tp.shape[-1]).gather(-1, tc).squeeze(-1)
             * rad_v).sum(-1) for i in range(m)]                                  # M x [B, H, G, n]
    return torch.stack(rows, dim=2).reshape(b, hq, length, g * n)
