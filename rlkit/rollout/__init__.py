"""Rollout: the one generation layer (HF ``generate`` with KV-cache compression, and vLLM), step segmentation
and the step-scorer protocol. Evaluation, teachers, the ``sample`` stage and decoders generate through here.
"""

from .generation import (BACKENDS, Completion, GenerationSettings, compressed_generate, generate, generate_hf,
                         generate_texts, render_prompts, seeded)
from .steps import SPLITTERS, StepScorer, split_steps

__all__ = ["BACKENDS", "Completion", "GenerationSettings", "SPLITTERS", "StepScorer", "compressed_generate",
           "generate", "generate_hf", "generate_texts", "render_prompts", "seeded", "split_steps"]
