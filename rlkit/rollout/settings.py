"""Settings of the generation back ends that recipes carry (no torch or vLLM import here, so validating a
recipe stays cheap)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = ["VLLMSettings"]


@dataclass
class VLLMSettings:
    """How rlkit runs vLLM (recipe section ``vllm:``, also per stage). None: the platform's default."""

    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Engine dtype. auto: float32 on the CPU build, the model's own dtype on a GPU; a colocated engine
    follows the policy's dtype so that its log-probabilities match the trained model's."""
    enforce_eager: bool | None = None
    """Run without graph compilation (None: on for the CPU build, whose compilation costs minutes; off on GPUs)."""
    cpu_kvcache_space: int | None = None
    """GiB of memory for the KV cache of the CPU build (None: 1, unless VLLM_CPU_KVCACHE_SPACE is set)."""
    max_model_len: int | None = None
    """Longest prompt + completion the engine serves (None: the model's; smaller saves KV-cache memory)."""
    gpu_memory_utilization: float | None = None
    """Share of GPU memory for the offline engine (None: vLLM's 0.9; colocated training uses TRL's
    vllm_gpu_memory_utilization)."""
    sync_check: Literal["error", "warn", "off"] = "error"
    """After each weight sync of vLLM rollouts: compare vLLM's log-probabilities of probe tokens with the
    policy's; a gap beyond sync_tolerance raises (error), warns (warn) or is only logged (off: not probed)."""
    sync_tolerance: float | None = None
    """Largest allowed |log p_vllm - log p_policy| over the probe tokens (None: 0.05 in float32, 0.5 in 16-bit)."""
    sync_probe_tokens: int = 16
    """Tokens of the fixed probe text whose log-probabilities are compared."""

    def __post_init__(self):
        if self.cpu_kvcache_space is not None and self.cpu_kvcache_space < 1:
            raise ValueError(f"cpu_kvcache_space must be at least 1 GiB, got {self.cpu_kvcache_space}")
        if self.max_model_len is not None and self.max_model_len < 16:
            raise ValueError(f"max_model_len must be at least 16, got {self.max_model_len}")
        if self.gpu_memory_utilization is not None and not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.sync_tolerance is not None and not self.sync_tolerance > 0:
            raise ValueError(f"sync_tolerance must be > 0, got {self.sync_tolerance}")
        if self.sync_probe_tokens < 2:
            raise ValueError(f"sync_probe_tokens must be at least 2, got {self.sync_probe_tokens}")
