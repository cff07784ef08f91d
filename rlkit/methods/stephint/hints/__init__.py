"""StepHint hint building (arXiv 2507.02841): reference chains -> m steps -> hint levels, written once as a
resumable jsonl that any number of StepHint runs reuse (``rlkit hints build``).

- :mod:`.config`: ``HintConfig``, ``GenerateConfig``, ``HintError`` and the option tuples;
- :mod:`.chains`: reference chains, candidate cuts, the adaptive / paragraph / equal splitters, hint levels;
- :mod:`.scoring`: p(end marker | prefix) from a scorer model in batched forward passes;
- :mod:`.build`: teacher chains, ``build_hints`` and ``run_build``; :mod:`.io`: the jsonl files.

Every choice made where the paper is silent is listed in ``docs/methods/stephint.md``.
"""

from .build import BuiltHints, build_hints, default_verifier, load_teacher, run_build
from .chains import (
    LINE,
    PARAGRAPH,
    SENTENCE,
    WORD,
    default_end_marker,
    hint_levels,
    reference_of,
    select_adaptive,
    split_batch,
    split_reference,
)
from .config import (
    BACKENDS,
    CANDIDATES,
    PROMPT_TEMPLATES,
    SELECTIONS,
    SPLITTERS,
    TEACHER_TEMPLATES,
    GenerateConfig,
    HintConfig,
    HintError,
)
from .io import read_hints, write_hints
from .scoring import end_marker_probs, marker_token_id

__all__ = [
    "BACKENDS", "CANDIDATES", "LINE", "PARAGRAPH", "PROMPT_TEMPLATES", "SELECTIONS", "SENTENCE", "SPLITTERS",
    "TEACHER_TEMPLATES", "WORD", "BuiltHints", "GenerateConfig", "HintConfig", "HintError", "build_hints",
    "default_end_marker", "default_verifier", "end_marker_probs", "hint_levels", "load_teacher",
    "marker_token_id", "read_hints", "reference_of", "run_build", "select_adaptive", "split_batch",
    "split_reference", "write_hints",
]
