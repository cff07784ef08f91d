"""``method: dricl``: many-shot in-context fine-tuning with differentiated and reweighting objectives (DR-ICL /
DrICL, arXiv 2501.04070, ACL 2025).

A training row is one many-shot episode in the ICL-50 format: ``{"messages": [{"role", "content", "loss"}, ...]}``,
the instruction in the first user turn, one demonstration per user/assistant pair, ``"loss": 1`` on the answers
that carry loss. Every supervised answer ``y_k`` gets two negative log-likelihoods:

- ``L_many``: the ordinary causal NLL, every earlier demonstration visible;
- ``L_zero``: the same tokens with every earlier demonstration hidden: a query after the end of answer ``i`` sees
  no column ``0..end_i`` (the released code's PCW mask). The mask is a 4D additive float mask handed to the model as
  its ``attention_mask``, which transformers' mask creation (``masking_utils``) passes through unchanged to the
  attention function (eager adds it to the scores, sdpa hands it to ``scaled_dot_product_attention``); no
  modelling file is copied or patched.

and the released objective (``train_type: dynamic-shot``, ``schema: all``) is
``L = 1/2 [(1 + alpha) L_many' + (1 - alpha) L_zero]`` with alpha 0.2, where ``L_many'`` reweights the per-answer
mean losses ``l_k``: ``L_many' = 1/K sum_k exp(A_k / gamma) l_k``, gamma 11, ``A_k = l_k - b_k`` with the baseline
``b_k`` picked by the p/q importance score over a window of W = 10 earlier losses, the weights detached
(:func:`reweight`, which follows the released loop exactly, window slice included). ``schema: global`` drops the
reweighting, ``local`` keeps only ``L_many'``; ``train_type: many-shot`` is plain NLL, ``zero-shot`` the masked NLL
only. See ``docs/methods/dricl.md`` for every choice where the paper and the released code are silent.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Literal, Sequence

import torch
from transformers import Trainer, TrainingArguments

from ..config import RecipeError
from . import register_method
from .base import LoggedMetricsMixin, StageOutput, TrainerMethod, save_final
from .collate import pad_ids, right_pad

__all__ = ["DrICLCollator", "DrICLConfig", "DrICLMethod", "DrICLTrainer", "combine_losses", "encode_episodes",
           "importance_score", "reweight", "zero_shot_allowed", "zero_shot_mask"]

TRAIN_TYPES = ("zero-shot", "many-shot", "dynamic-shot")
SCHEMAS = ("global", "local", "all")
# attention implementations that take an arbitrary 4D mask; flash kernels only take padding
_NO_4D_MASK = ("flash_attention_2", "flash_attention_3", "flex_attention")


@dataclass
class DrICLConfig(TrainingArguments):
    """Settings of the DR-ICL trainer (recipe section ``trainer:``): every ``TrainingArguments`` field plus DR-ICL's.
    Defaults: the released ``supervised_finetuning.py`` and ``train.sh``."""

    train_type: Literal["zero-shot", "many-shot", "dynamic-shot"] = "dynamic-shot"
    """zero-shot: the masked NLL only; many-shot: plain NLL; dynamic-shot: DR-ICL (``schema`` picks the terms)."""
    schema: Literal["global", "local", "all"] = "all"
    """The released ``aicl_schema``: global = 1/2[(1+a) L_many + (1-a) L_zero] (no reweighting); local = L_many'
    (reweighting only); all = 1/2[(1+a) L_many' + (1-a) L_zero]. Used by train_type dynamic-shot only."""
    alpha: float = 0.2
    """Weight of the many-shot term against the zero-shot term (the released code hard-codes 0.2)."""
    gamma: float = 11.0
    """Temperature of the demonstration weights exp(A_k / gamma) (the released code hard-codes 11)."""
    window_size: int | None = 10
    """W, the window of earlier demonstration losses the baseline is drawn from (train.sh: 10; None: the whole
    history, the released dataclass default)."""
    max_length: int = 8192
    """Longest encoded episode in tokens (the released model_max_length, 8192); longer episodes keep their first
    whole demonstrations that fit."""

    learning_rate: float = field(default=2e-5, metadata={"help": "Learning rate (the released script: 2e-5)."})
    num_train_epochs: float = field(default=2.0, metadata={"help": "Epochs (the released script: 2)."})
    lr_scheduler_type: str = field(default="constant", metadata={"help": "Schedule (the released script: constant)."})
    adam_beta2: float = field(default=0.98, metadata={"help": "Adam beta2 (the released script: 0.98)."})
    adam_epsilon: float = field(default=5e-8, metadata={"help": "Adam epsilon (the released script: 5e-8)."})
    weight_decay: float = field(default=1e-4, metadata={"help": "Weight decay (the released script: 1e-4)."})
    per_device_train_batch_size: int = field(default=1, metadata={"help": "Episodes per device and step (the "
                                                                          "released script: 1)."})
    gradient_accumulation_steps: int = field(default=8, metadata={"help": "Accumulation steps (the released "
                                                                          "script: 8)."})
    remove_unused_columns: bool = field(default=False, metadata={"help": "Kept False: the DR-ICL batch is built by "
                                                                         "its own collator."})

    def __post_init__(self):
        if self.train_type not in TRAIN_TYPES:
            raise ValueError(f"train_type must be one of {', '.join(TRAIN_TYPES)}, got {self.train_type!r}")
        if self.schema not in SCHEMAS:
            raise ValueError(f"schema must be one of {', '.join(SCHEMAS)}, got {self.schema!r}")
        if not -1.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must lie in [-1, 1] (both terms keep a non-negative weight), got {self.alpha}")
        if not self.gamma > 0:
            raise ValueError(f"gamma must be > 0, got {self.gamma}")
        if self.window_size is not None and self.window_size < 1:
            raise ValueError(f"window_size must be >= 1 or null (the whole history), got {self.window_size}")
        if self.max_length < 2:
            raise ValueError(f"max_length must be at least 2, got {self.max_length}")
        super().__post_init__()


# --------------------------------------------------------------------------------------------------
# The reweighting (released loop)


def importance_score(loss: float) -> float:
    """p(l) / q(l) with p(x) = 0.3 e^{-0.2x} + 0.7 e^{-0.8x} and q(x) = e^{-x}: the score that ranks earlier losses
    as baseline candidates (increasing in l, so the top-1 is the largest loss)."""
    return (0.3 * math.exp(-0.2 * loss) + 0.7 * math.exp(-0.8 * loss)) / math.exp(-loss)


def reweight(losses: Sequence[float], window: int | None = 10, gamma: float = 11.0) -> tuple[list[float], list[float]]:
    """The released per-demonstration weights of one episode: ``(weights, advantages)`` for the losses ``l_0..l_{K-1}``
    in sequence order.

    The released loop keeps a history list: it appends ``l_k`` first; for ``k > 0`` with a window it then replaces
    the history by its slice ``[W*s, W*(s+1))`` with ``s = int(k/W) - 1`` (Python slicing, so ``s = -1`` gives the
    empty slice ``[-W:0]``), takes as baseline the history loss with the highest :func:`importance_score` (top-1),
    or, when the history is empty, the previous loss ``l_{k-1}``; ``A_0 = 0``, ``A_k = l_k - b_k`` and
    ``w_k = exp(A_k / gamma)``. As the history is replaced in place, this works out (for W >= 2) as:
    ``b_k = l_{k-1}`` for ``1 <= k < W`` and ``k > 2W``; ``b_k = max(l_W..l_k)`` for ``W <= k < 2W`` (the current
    loss included, so ``A_k <= 0`` there); ``b_{2W} = l_{2W}``. Without a window: ``b_k = max(l_0..l_k)``.
    ``docs/methods/dricl.md`` discusses this reading."""
    history: list[float] = []
    weights, advantages = [], []
    previous = None
    for k, loss in enumerate(float(x) for x in losses):
        history.append(loss)
        if k == 0:
            advantage = 0.0
        else:
            if window is not None:
                s = int(k / window) - 1
                history = history[window * s: window * (s + 1)]
            baseline = max(history, key=importance_score) if history else previous
            advantage = loss - baseline
        advantages.append(advantage)
        weights.append(math.exp(advantage / gamma))
        previous = loss
    return weights, advantages


# --------------------------------------------------------------------------------------------------
# Episodes -> tokens


def encode_episodes(rows: Sequence[dict], tokenizer: Any, args: DrICLConfig, source: str = "dataset") -> list[dict]:
    """Episodes -> ``{input_ids, labels, span_ids}`` items: the layout and labels of
    :func:`rlkit.data.manyshot.encode_episode` (the one the many-shot evaluation renders: the chat template, or the
    plain ``role: content`` lines; an answer's tokens and its end-of-turn text carry loss), ``span_ids`` the answer
    index 0..K-1 of each supervised token and -1 elsewhere. Longer episodes than ``max_length`` keep their first
    whole demonstrations; an episode whose first demonstration alone is too long is dropped (counted)."""
    from ..data import DataError
    from ..data.manyshot import EpisodeError, encode_episode, validate_episode

    if not getattr(tokenizer, "is_fast", False):
        raise DataError("dricl needs a fast tokenizer (character offsets place the answers)")
    out, dropped, cut = [], 0, 0
    for i, row in enumerate(rows):
        try:
            validate_episode(row, f"dricl: row {i} of {source}")
        except EpisodeError as e:
            raise DataError(str(e)) from None
        messages = row["messages"]
        if not any(m.get("loss", 0) == 1 for m in messages):
            raise DataError(f"dricl: row {i} of {source} has no answer with loss 1")
        try:
            enc = encode_episode(messages, tokenizer, max_tokens=args.max_length)
        except EpisodeError:
            dropped += 1
            continue
        spans = [-1] * len(enc.input_ids)
        k = 0
        for start, end in enc.answer_spans:
            tokens = [t for t in range(start, end) if enc.labels[t] != -100]
            for t in tokens:
                spans[t] = k
            k += bool(tokens)
        if k == 0:
            dropped += 1
            continue
        cut += k < sum(m.get("loss", 0) == 1 for m in messages)
        out.append({"input_ids": list(enc.input_ids), "labels": list(enc.labels), "span_ids": spans})
    if not out:
        raise DataError(f"dricl: no episode of {source} has a whole demonstration within max_length {args.max_length}")
    if dropped or cut:
        print(f"[rlkit] dricl: {dropped} episodes dropped (first demonstration beyond max_length {args.max_length}), "
              f"{cut} cut to their first demonstrations", flush=True)
    return out


class DrICLCollator:
    """Right-padded ``input_ids`` / ``attention_mask``, ``labels`` padded with -100 and ``span_ids`` with -1."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, items: list[dict]) -> dict[str, torch.Tensor]:
        return {**pad_ids(items, self.pad_id), "labels": right_pad([x["labels"] for x in items], -100),
                "span_ids": right_pad([x["span_ids"] for x in items], -1)}


# --------------------------------------------------------------------------------------------------
# The zero-shot mask


def zero_shot_allowed(span_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """``[B, T, T]`` booleans, True where query q may see key k: causal, not padding, and not at or before the end of
    any answer that ends before q (so every answer sees only its own demonstration). A padding query sees itself
    (no row is empty)."""
    b, t = span_ids.shape
    pos = torch.arange(t, device=span_ids.device)
    nxt = torch.cat([span_ids[:, 1:], torch.full_like(span_ids[:, :1], -1)], dim=1)
    ends = torch.where((span_ids >= 0) & (nxt != span_ids), pos, torch.full_like(pos, -1).expand(b, t))
    last = torch.cummax(ends, dim=1).values  # last answer end at or before each position
    hidden_upto = torch.cat([torch.full_like(last[:, :1], -1), last[:, :-1]], dim=1)  # ... strictly before q
    allowed = (pos[None, None, :] <= pos[None, :, None]) & (pos[None, None, :] > hidden_upto[:, :, None])
    if attention_mask is not None:
        allowed = allowed & attention_mask.bool()[:, None, :]
    return allowed | torch.eye(t, dtype=torch.bool, device=span_ids.device)[None]


def zero_shot_mask(span_ids: torch.Tensor, attention_mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """The zero-shot (PCW) mask as transformers takes a prepared mask: ``[B, 1, T, T]`` additive floats, 0 where
    attention is allowed and the dtype's lowest value elsewhere."""
    allowed = zero_shot_allowed(span_ids, attention_mask)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=span_ids.device)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min)[:, None]


# --------------------------------------------------------------------------------------------------
# Losses


def _token_nll(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token NLL of the supervised targets ``[N]`` and the flat index ``[N]`` of their predicting positions
    (row * (T-1) + t); logits only at the positions that predict a supervised token."""
    target = labels[:, 1:]
    keep = (target != -100).any(dim=0).nonzero(as_tuple=True)[0]  # positions predicting a label in some row
    out = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=keep, use_cache=False)
    logits = out.logits  # [B, P, V]
    tgt = target[:, keep]
    sel = tgt != -100
    nll = torch.nn.functional.cross_entropy(logits[sel].float(), tgt[sel], reduction="none")
    rows, cols = sel.nonzero(as_tuple=True)
    return nll, rows * target.shape[1] + keep[cols]


def combine_losses(args: DrICLConfig, many: torch.Tensor | None, zero: torch.Tensor | None,
                   demo_losses: list[torch.Tensor] | None) -> tuple[torch.Tensor, dict]:
    """The released combination of the terms for ``args.train_type`` / ``args.schema``: ``many`` and ``zero`` are the
    token-mean NLLs, ``demo_losses`` the per-answer mean NLLs of each episode (many-shot pass). Returns the loss and
    the figures to log (``mean_weight``...)."""
    stats: dict[str, float] = {}
    if args.train_type == "zero-shot":
        return zero, stats
    if args.train_type == "many-shot":
        return many, stats
    many_term = many
    if args.schema != "global":
        per_episode, ws = [], []
        for losses in demo_losses:
            weights, _ = reweight([x.item() for x in losses], args.window_size, args.gamma)
            w = torch.tensor(weights, dtype=losses.dtype, device=losses.device)  # detached floats, as released
            per_episode.append((w * losses).sum() / len(losses))
            ws.extend(weights)
        many_term = torch.stack(per_episode).mean()
        stats = {"mean_weight": sum(ws) / len(ws), "max_weight": max(ws), "min_weight": min(ws)}
    if args.schema == "local":
        return many_term, stats
    return 0.5 * ((1 + args.alpha) * many_term + (1 - args.alpha) * zero), stats


def _demo_losses(nll: torch.Tensor, flat_pos: torch.Tensor, span_ids: torch.Tensor) -> list[torch.Tensor]:
    """Per episode, the mean NLL of each answer in sequence order."""
    spans = span_ids[:, 1:].reshape(-1)[flat_pos]
    rows = flat_pos // (span_ids.shape[1] - 1)
    out = []
    for r in range(span_ids.shape[0]):
        here = rows == r
        if not here.any():
            continue
        k = spans[here]
        n = int(k.max()) + 1
        sums = torch.zeros(n, dtype=nll.dtype, device=nll.device).index_add(0, k, nll[here])
        counts = torch.zeros(n, dtype=nll.dtype, device=nll.device).index_add(0, k, torch.ones_like(nll[here]))
        present = counts > 0
        out.append(sums[present] / counts[present])
    return out


# --------------------------------------------------------------------------------------------------
# Trainer


class DrICLTrainer(LoggedMetricsMixin, Trainer):
    """A ``transformers.Trainer`` with the DR-ICL loss (module docstring). ``train_dataset``: episodes (dicts with
    ``messages``) or already encoded items (``input_ids``, ``labels``, ``span_ids``)."""

    def __init__(self, model: Any, args: DrICLConfig, train_dataset: Any = None, processing_class: Any = None,
                 callbacks: list | None = None, **kwargs: Any):
        if processing_class is None:
            raise ValueError("DrICLTrainer needs the tokenizer (processing_class)")
        if not isinstance(args, DrICLConfig):
            raise TypeError(f"DrICLTrainer needs a DrICLConfig, got {type(args).__name__}")
        impl = getattr(getattr(model, "config", None), "_attn_implementation", None) or ""
        if args.train_type != "many-shot" and not (args.train_type == "dynamic-shot" and args.schema == "local") \
                and (impl in _NO_4D_MASK or impl.startswith(("flash", "paged"))):
            raise ValueError(f"dricl: the zero-shot term needs an attention that takes a 4D mask (eager or sdpa); "
                             f"the model uses {impl!r}: set model.attn_implementation: sdpa")
        tok = processing_class
        if train_dataset is not None:
            items = list(train_dataset)
            if items and "span_ids" not in items[0]:
                items = encode_episodes([dict(x) for x in items], tok, args, "train_dataset")
            train_dataset = items
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        super().__init__(model=model, args=args, data_collator=DrICLCollator(pad), train_dataset=train_dataset,
                         processing_class=tok, callbacks=callbacks, **kwargs)
        self.loss_is_scaled_for_ga = False  # compute_loss returns a per-micro-batch mean: Trainer divides by GA
        self._metrics: dict[str, defaultdict] = {"train": defaultdict(list), "eval": defaultdict(list)}

    def terms(self, model: Any, inputs: dict) -> tuple[torch.Tensor, dict]:
        """The loss and its logged parts for one batch."""
        args: DrICLConfig = self.args
        ids, am, labels, spans = inputs["input_ids"], inputs["attention_mask"], inputs["labels"], inputs["span_ids"]
        need_many = args.train_type != "zero-shot"
        need_zero = args.train_type == "zero-shot" or (args.train_type == "dynamic-shot" and args.schema != "local")
        many = zero = demos = None
        figures: dict[str, float] = {}
        if need_many:
            nll, pos = _token_nll(model, ids, am, labels)
            many = nll.mean()
            figures["loss_many"] = many.item()
            if args.train_type == "dynamic-shot" and args.schema != "global":
                demos = _demo_losses(nll, pos, spans)
                figures["demos"] = sum(len(d) for d in demos) / len(demos)
        if need_zero:
            dtype = next(model.parameters()).dtype
            nll0, _ = _token_nll(model, ids, zero_shot_mask(spans, am, dtype), labels)
            zero = nll0.mean()
            figures["loss_zero"] = zero.item()
        loss, stats = combine_losses(args, many, zero, demos)
        figures.update(stats)
        return loss, figures

    def compute_loss(self, model, inputs, return_outputs: bool = False, num_items_in_batch=None):
        loss, figures = self.terms(model, inputs)
        mode = "train" if model.training else "eval"
        for name, value in figures.items():
            self._metrics[mode][name].append(value)
        return (loss, {}) if return_outputs else loss


# --------------------------------------------------------------------------------------------------
# The method


def load_episodes(spec: Any) -> tuple[list[dict], str]:
    """The stored rows of ``spec`` (its ``where`` selection and ``limit`` applied)."""
    from ..data import load_stored_rows

    return load_stored_rows(spec, "dricl")


@register_method
class DrICLMethod(TrainerMethod):
    """``method: dricl``: many-shot fine-tuning with the DR-ICL objective (module docstring)."""

    name = "dricl"

    def config_class(self) -> type:
        return DrICLConfig

    def check(self, run: Any, config: DrICLConfig, where: str) -> None:
        spec = run.data.train
        if spec.source is None and spec.name in ("synthetic", "gsm8k", "math500", "aime24", "amc23", "math"):
            raise RecipeError(f"data.train: method dricl trains on many-shot episodes (ICL-50 rows with `messages`: "
                              f"a jsonl, or {{from: STAGE, dataset: episodes}}), not the benchmark {spec.name!r}")
        impl = getattr(run.model, "attn_implementation", None) or ""
        if config.train_type != "many-shot" and (impl in _NO_4D_MASK or impl.startswith("flash")):
            raise RecipeError(f"model.attn_implementation: dricl's zero-shot term passes a 4D mask, which {impl} "
                              "cannot take; use sdpa or eager")

    def build_trainer(self, run: Any, ctx: Any, args: DrICLConfig) -> DrICLTrainer:
        rows, source = load_episodes(run.data.train)
        items = encode_episodes(rows, ctx.tokenizer, args, source)
        self.info = {"data": source, "episodes": len(items),
                     "demonstrations": sum(max(x["span_ids"]) + 1 for x in items),
                     "tokens": sum(len(x["input_ids"]) for x in items)}
        return DrICLTrainer(model=ctx.model, args=args, train_dataset=items, processing_class=ctx.tokenizer,
                            callbacks=ctx.callbacks)

    def finish(self, trainer: DrICLTrainer, ctx: Any) -> StageOutput:
        model = save_final(trainer, ctx.tokenizer, ctx.final_dir)
        losses = [x["loss"] for x in trainer.state.log_history if "loss" in x]
        args: DrICLConfig = trainer.args
        return StageOutput(model=model, summary={**getattr(self, "info", {}), "train_type": args.train_type,
                                                 "schema": args.schema, "final_loss": losses[-1] if losses else None})
