"""Rollout: the one generation layer (HF ``generate`` with KV-cache compression, and vLLM), step segmentation,
the step-scorer protocol, value-guided step-level beam search (:mod:`.search`) and reward-guided speculative
decoding (:mod:`.rsd`). Evaluation, teachers, the ``sample`` stage and decoders generate through here.
Submodules load on first use (``rlkit.rollout.generation`` imports torch; recipes only need the settings).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "BACKENDS": "generation", "Completion": "generation", "GenerationSettings": "generation",
    "compressed_generate": "generation", "generate": "generation", "generate_hf": "generation",
    "generate_from_ids": "generation",
    "generate_texts": "generation", "render_prompts": "generation", "seeded": "generation",
    "ConstantScorer": "search", "FunctionScorer": "search", "STEP_STOPS": "search", "SearchResult": "search",
    "SearchSettings": "search", "as_text_scorer": "search", "step_stops": "search", "value_guided_search": "search",
    "DecodingModel": "rsd", "RSDResult": "rsd", "RSDSettings": "rsd", "best_of_n_cost": "rsd",
    "rsd_decode": "rsd", "step_decode": "rsd",
    "SPLITTERS": "steps", "StepScorer": "steps", "split_steps": "steps",
    "VLLMSettings": "settings",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
