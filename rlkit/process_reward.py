"""Process (and outcome) reward models: a causal LM read at step tags, p('+') per step.

The ER-PRM (arXiv 2412.11006) and Math-Shepherd convention, as the released ER-PRM code trains and reads it: the
solution's steps are written with a **step tag** after each one (the released `` ки``), and at every tag
position the LM's logits of two **label tokens** (``'+'`` / ``'-'``) are compared: the step's score is
``softmax([l_plus, l_minus])[0]``, the probability that the solution is still on a right track after that
step. No head is added: the PRM is a plain causal LM checkpoint plus ``prm.json`` (what it was trained with).
``rlkit.methods.prm`` trains one (``method: prm``); ``docs/methods/er_prm.md`` has the details.

Layout (:func:`encode_tagged`, shared by the trainer and the scorer so they always agree): the prompt is
encoded as generation encodes it (:func:`rlkit.value.encode_prompt`); then for each step, its text without the
trailing whitespace, the tag, and the trailing whitespace (the step separator), each encoded on its own. So
``"3+4=7\\n"`` becomes ``"3+4=7" + tag + "\\n"`` (the released format: ``"Step 1 ... ки\\nStep 2 ... ки"``). The
score of step k is read at the **last token of the k-th tag** (that position predicts the label token).

A **solution score** aggregates the step scores: ``min`` (the released code and the paper's best-of-N), ``last``,
``mean`` or ``product``. An **outcome** reward model (``kind: orm``, the ER-PRM paper's ORM baseline) is the same
model trained with one tag after the whole solution: it scores a list of steps as one step.

:class:`ProcessRewardModel` implements the step-scorer protocol (``score(prompt, steps)``), a batched
``score_batch``, ``solution_scores`` and ``score_texts`` (for value-guided search and best-of-N), so decoders
(value-guided search, reward-guided speculative decoding) and selectors take it like any step scorer.
:func:`load_step_scorer` loads a saved PRM or an OREO value model from a folder.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

import torch

from .value import encode_prompt, is_format_dir

__all__ = ["AGGREGATES", "FORMAT", "META_FILE", "ProcessRewardModel", "aggregate_scores", "encode_tagged",
           "is_prm_dir", "label_token_ids", "load_step_scorer", "tag_ids"]

FORMAT = "rlkit-prm"
META_FILE = "prm.json"
AGGREGATES = ("min", "last", "mean", "product")
DEFAULT_STEP_TAG = " ки"


def is_prm_dir(path: str | Path) -> bool:
    """Whether ``path`` holds a saved :class:`ProcessRewardModel` (its ``prm.json`` says ``rlkit-prm``)."""
    return is_format_dir(path, META_FILE, FORMAT)


def aggregate_scores(scores: Sequence[float], how: str = "min") -> float:
    """One solution score from its step scores: ``min``, ``last``, ``mean`` or ``product``."""
    if how not in AGGREGATES:
        raise ValueError(f"unknown aggregate {how!r}; use one of {', '.join(AGGREGATES)}")
    if not scores:
        raise ValueError("aggregate_scores: a solution with no step has no score")
    if how == "min":
        return float(min(scores))
    if how == "last":
        return float(scores[-1])
    if how == "mean":
        return float(sum(scores) / len(scores))
    return float(math.prod(scores))


def _unk_id(tokenizer: Any) -> int | None:
    return getattr(tokenizer, "unk_token_id", None)


def tag_ids(tokenizer: Any, step_tag: str) -> list[int]:
    """The ids of the step tag (encoded on its own, no special tokens); one-line ValueError when the tokenizer
    cannot write it (no ids, or an unknown-token id)."""
    ids = list(tokenizer(step_tag, add_special_tokens=False)["input_ids"]) if step_tag else []
    unk = _unk_id(tokenizer)
    if not ids or (unk is not None and unk in ids):
        raise ValueError(f"step_tag {step_tag!r}: this tokenizer cannot write it (no ids or an unknown token); "
                         "choose a tag in its vocabulary, e.g. ' @' for a character-level tokenizer")
    return ids


def label_token_ids(tokenizer: Any, label_tokens: Sequence[str]) -> tuple[int, int]:
    """The ids of the positive and negative label tokens; each must be exactly one known token."""
    if len(label_tokens) != 2 or label_tokens[0] == label_tokens[1]:
        raise ValueError(f"label_tokens must be two different strings (positive, negative), got {list(label_tokens)}")
    out = []
    unk = _unk_id(tokenizer)
    for t in label_tokens:
        ids = list(tokenizer(t, add_special_tokens=False)["input_ids"])
        if len(ids) != 1 or (unk is not None and ids[0] == unk):
            raise ValueError(f"label token {t!r} is {len(ids)} tokens (or unknown) for this tokenizer; each label "
                             "token must be exactly one token (e.g. '+' and '-')")
        out.append(ids[0])
    return out[0], out[1]


def encode_tagged(tokenizer: Any, prompt: str, steps: Sequence[str], step_tag: str,
                  tag: list[int] | None = None) -> tuple[list[int], list[int]]:
    """``(ids, positions)``: the prompt, then per step its text, the tag and its trailing whitespace (see the
    module docstring); ``positions[k]`` is the index of the k-th tag's last token."""
    tag = tag if tag is not None else tag_ids(tokenizer, step_tag)
    ids = encode_prompt(tokenizer, prompt)
    positions = []
    for step in steps:
        body = step.rstrip()
        sep = step[len(body):]
        if body:
            ids.extend(tokenizer(body, add_special_tokens=False)["input_ids"])
        ids.extend(tag)
        positions.append(len(ids) - 1)
        if sep:
            ids.extend(tokenizer(sep, add_special_tokens=False)["input_ids"])
    return ids, positions


def two_logits(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, rows: torch.Tensor,
               cols: torch.Tensor, label_ids: tuple[int, int]) -> torch.Tensor:
    """``[T, 2]`` logits of the two label tokens at positions ``(rows[t], cols[t])``.

    Runs the backbone and multiplies only the picked hidden states by the two label rows of the LM head (the
    full-vocabulary logits are never formed); models whose logits are post-processed (soft-capping, a logit
    scale) go through the full forward instead."""
    config = getattr(model, "config", None)
    special = any(getattr(config, k, None) for k in ("final_logit_softcapping", "logit_scale", "logits_scaling"))
    prefix = getattr(model, "base_model_prefix", None)
    base = getattr(model, prefix, None) if prefix else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if special or base is None or head is None or not hasattr(head, "weight"):
        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        return logits[rows, cols][:, list(label_ids)].float()
    hidden = base(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    hidden = hidden.last_hidden_state if hasattr(hidden, "last_hidden_state") else hidden[0]
    picked = hidden[rows, cols]
    idx = torch.tensor(label_ids, device=picked.device)
    out = picked @ head.weight[idx].T
    if getattr(head, "bias", None) is not None:
        out = out + head.bias[idx]
    return out.float()


class ProcessRewardModel:
    """A causal LM read at step tags (see the module docstring). Build one around a model in memory or load a
    saved one with :meth:`from_pretrained`."""

    def __init__(self, model: Any, tokenizer: Any, step_tag: str = DEFAULT_STEP_TAG,
                 label_tokens: Sequence[str] = ("+", "-"), aggregate: str = "min", kind: str = "prm",
                 splitter: str = "newline", info: dict | None = None):
        if aggregate not in AGGREGATES:
            raise ValueError(f"aggregate must be one of {', '.join(AGGREGATES)}, got {aggregate!r}")
        if kind not in ("prm", "orm"):
            raise ValueError(f"kind must be prm or orm, got {kind!r}")
        from .rollout.steps import SPLITTERS

        if splitter not in SPLITTERS or splitter == "stephint":
            raise ValueError(f"splitter must be one of newline, paragraph, sentence, latex_sentence, got {splitter!r}")
        self.model = model
        self.tokenizer = tokenizer
        self.step_tag = step_tag
        self.label_tokens = tuple(label_tokens)
        self.aggregate = aggregate
        self.kind = kind
        self.splitter = splitter
        self.info = dict(info or {})
        """What the PRM was trained with (``prm.json``): label kind, eta, data, ..."""
        self.tag = tag_ids(tokenizer, step_tag)
        self.label_ids = label_token_ids(tokenizer, self.label_tokens)
        self.batch_size = 16
        """Sequences per forward pass."""

    # ---- loading / saving ----------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: Any = None, device: Any = None) -> "ProcessRewardModel":
        """Load a PRM saved by :meth:`save_pretrained` (a ``method: prm`` run's ``final/``)."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = Path(path)
        if not is_prm_dir(path):
            raise ValueError(f"{path} is not a saved process reward model (no {META_FILE} with format {FORMAT!r}); "
                             "one is written by a `method: prm` stage (its final/ folder)")
        meta = json.loads((path / META_FILE).read_text())
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype if dtype is not None else "auto")
        if device is not None:
            model.to(device)
        model.eval()
        tokenizer = AutoTokenizer.from_pretrained(str(path))
        return cls(model, tokenizer, step_tag=meta["step_tag"], label_tokens=meta["label_tokens"],
                   aggregate=meta.get("aggregate", "min"), kind=meta.get("kind", "prm"),
                   splitter=meta.get("splitter", "newline"), info=meta.get("info", {}))

    def meta(self) -> dict:
        """The ``prm.json`` content."""
        return {"format": FORMAT, "step_tag": self.step_tag, "label_tokens": list(self.label_tokens),
                "aggregate": self.aggregate, "kind": self.kind, "splitter": self.splitter, "info": self.info}

    def save_pretrained(self, path: str | Path) -> None:
        """The LM (safetensors) and tokenizer in ``path``, plus ``prm.json``."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(path, safe_serialization=True)
        self.tokenizer.save_pretrained(path)
        write_meta(path, self.meta())

    # ---- properties ----------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def num_parameters(self) -> int:
        return int(sum(p.numel() for p in self.model.parameters()))

    def split(self, text: str) -> list[str]:
        """``text`` in steps with the splitter the PRM was trained with."""
        from .rollout.steps import split_steps

        return split_steps(text, self.splitter)

    def encode(self, prompt: str, steps: Sequence[str]) -> tuple[list[int], list[int]]:
        """Ids and tag positions (an ORM sees the steps as one)."""
        if self.kind == "orm":
            steps = ["".join(steps)]
        return encode_tagged(self.tokenizer, prompt, steps, self.step_tag, self.tag)

    # ---- scoring -------------------------------------------------------------------------------------
    @torch.no_grad()
    def score_encoded(self, encoded: list[tuple[list[int], list[int]]]) -> list[list[float]]:
        """p('+') at every tag of each ``(ids, positions)`` (batched, right-padded: the scores equal unpadded
        single-sequence ones)."""
        pad = getattr(self.tokenizer, "pad_token_id", None)
        pad = 0 if pad is None else pad
        was_training = self.model.training
        self.model.eval()
        out: list[list[float]] = [[] for _ in encoded]
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i][0]))
        device = self.device
        try:
            for start in range(0, len(order), self.batch_size):
                idx = [i for i in order[start:start + self.batch_size] if encoded[i][1]]
                if not idx:
                    continue
                width = max(len(encoded[i][0]) for i in idx)
                ids = torch.full((len(idx), width), pad, dtype=torch.long)
                mask = torch.zeros((len(idx), width), dtype=torch.long)
                rows, cols = [], []
                for r, i in enumerate(idx):
                    seq, pos = encoded[i]
                    ids[r, :len(seq)] = torch.tensor(seq, dtype=torch.long)
                    mask[r, :len(seq)] = 1
                    rows.extend([r] * len(pos))
                    cols.extend(pos)
                logits = two_logits(self.model, ids.to(device), mask.to(device), torch.tensor(rows, device=device),
                                    torch.tensor(cols, device=device), self.label_ids)
                probs = torch.softmax(logits, dim=-1)[:, 0].tolist()
                k = 0
                for i in idx:
                    n = len(encoded[i][1])
                    out[i] = probs[k:k + n]
                    k += n
        finally:
            if was_training:
                self.model.train()
        return out

    def score_batch(self, prompts: Sequence[str], steps_lists: Sequence[Sequence[str]]) -> list[list[float]]:
        """Step scores (p('+') after each step) of every ``(prompt, steps)`` pair; an ORM gives one score."""
        if len(prompts) != len(steps_lists):
            raise ValueError(f"score_batch: {len(prompts)} prompts but {len(steps_lists)} step lists")
        return self.score_encoded([self.encode(p, s) if s else ([], []) for p, s in zip(prompts, steps_lists)])

    def score(self, prompt: str, steps: list[str]) -> list[float]:
        """``StepScorer``: the score after each step prefix. For a PRM one forward pass gives all of them (the tag
        of step k sees only steps 1..k); an ORM scores each prefix as a whole solution."""
        if not steps:
            return []
        if self.kind == "orm":
            return [s[0] for s in self.score_batch([prompt] * len(steps), [steps[:k + 1] for k in range(len(steps))])]
        return self.score_batch([prompt], [steps])[0]

    def solution_scores(self, prompts: Sequence[str], steps_lists: Sequence[Sequence[str]],
                        aggregate: str | None = None) -> list[float]:
        """One score per solution: its step scores aggregated (default: the PRM's ``aggregate``, min)."""
        how = aggregate or self.aggregate
        return [aggregate_scores(s, how) if s else 0.0 for s in self.score_batch(prompts, steps_lists)]

    def score_texts(self, prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
        """Solution scores of whole completions, split with the PRM's splitter (value-guided search, best-of-N)."""
        return self.solution_scores(prompts, [self.split(c) for c in completions])


def write_meta(path: Path, meta: dict) -> None:
    (Path(path) / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")


def load_step_scorer(path: str | Path, tokenizer: Any = None, dtype: str | None = "auto") -> Any:
    """The step scorer saved at ``path``: a :class:`ProcessRewardModel` (a ``method: prm`` run's ``final/``) or an
    OREO :class:`rlkit.value.ValueModel` (``final/critic``; ``tokenizer`` is attached when it has none). On the GPU
    when there is one. One-line ``ModelError`` for anything else."""
    from .models import ModelError
    from .value import ValueModel, is_value_model_dir

    torch_dtype = None if dtype in (None, "auto") else getattr(torch, dtype)
    device = "cuda" if torch.cuda.is_available() else None
    if is_prm_dir(path):
        return ProcessRewardModel.from_pretrained(path, dtype=torch_dtype, device=device)
    if is_value_model_dir(path):
        vm = ValueModel.from_pretrained(path, dtype=torch_dtype, device=device)
        if vm.tokenizer is None:
            if tokenizer is None:
                raise ModelError(f"the value model at {path} has no tokenizer saved with it; pass the policy's")
            vm.attach_tokenizer(tokenizer)
        return vm.eval()
    raise ModelError(f"{path} is neither a process reward model (a `method: prm` stage's final/) nor a value model "
                     "(an OREO stage's final/critic)")


class PRMReward:
    """A saved PRM (or ORM) as a GRPO / StepHint reward function with TRL's signature (recipe:
    ``rewards: [{name: prm, options: {path: DIR}}]``): the completion is split with the PRM's splitter and scored
    ``aggregate`` (default: the PRM's own, min) over its steps, in [0, 1].

    A model-based reward: it runs in the trainer's process (on the GPU when there is one), batched, never in the
    reward engine's worker processes (``in_process``); the model loads on the first call. Chat prompts are
    rendered with the PRM's tokenizer's chat template and chat completions reduced to their text."""

    in_process = True

    def __init__(self, path: str, aggregate: str | None = None, batch_size: int = 16, dtype: str = "auto"):
        if aggregate is not None and aggregate not in AGGREGATES:
            raise ValueError(f"aggregate must be one of {', '.join(AGGREGATES)}, got {aggregate!r}")
        self.path, self.aggregate, self.batch_size, self.dtype = str(path), aggregate, int(batch_size), dtype
        self.__name__ = "prm"
        self._prm: ProcessRewardModel | None = None

    def _model(self) -> ProcessRewardModel:
        if self._prm is None:
            scorer = load_step_scorer(self.path, dtype=self.dtype)
            if not isinstance(scorer, ProcessRewardModel):
                raise ValueError(f"reward prm: {self.path} is a value model, not a PRM/ORM")
            scorer.batch_size = self.batch_size
            self._prm = scorer
        return self._prm

    def __call__(self, prompts: list, completions: list, **kwargs: Any) -> list[float]:
        prm = self._model()
        texts_p = [p if isinstance(p, str) else prm.tokenizer.apply_chat_template(p, tokenize=False,
                                                                                  add_generation_prompt=True)
                   for p in prompts]
        texts_c = [c if isinstance(c, str) else "".join(m.get("content", "") for m in c) for c in completions]
        return prm.solution_scores(texts_p, [prm.split(c) for c in texts_c], self.aggregate)
