"""Evaluation: math benchmarks (pass@1 / pass@k / maj@k, best-of-N selection, value-guided search, reward-guided
speculative decoding), a held-out accuracy callback and plots."""

from .callback import HeldOutAccuracyCallback
from .math_eval import GenerationSettings, evaluate_rows, evaluate_rsd, evaluate_search, majority, write_outputs

__all__ = ["GenerationSettings", "HeldOutAccuracyCallback", "evaluate_rows", "evaluate_rsd", "evaluate_search",
           "majority", "write_outputs"]
