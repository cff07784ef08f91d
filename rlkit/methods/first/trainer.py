"""``method: first`` (FIRST, arXiv 2408.12168) and ``method: kd`` (full-vocabulary distillation, its baseline).

**first**: the student learns the teacher's *calibrated* top-k distribution, offline. Per response token the
teacher buckets are ``p~ = calibrated_logprobs(top-k log-probs, tau, use_other)``
(:mod:`rlkit.methods.first.calibration`); the student's probabilities ``q`` on the same ids (plus, with
``use_other``, the rest of its mass) are renormalised over the buckets, and the loss is the forward KL

    L = mean_over_rows  sum_over_response_tokens  sum_b p~_b (log p~_b - log q~_b)

(the released ``distill.py``: no hard-label term, summed over the loss-mask positions, averaged over the batch).
``normalization``:

- ``linear`` (the released default): ``q~ = (q + eps) / sum(q + eps)``, eps 1e-6;
- ``softmax``: the exact renormalisation, ``log_softmax`` of the student's logits over the top-k ids (with the
  other bucket: its log-mass ``log(1 - sum q)``), i.e. ``linear`` without the eps;
- ``prob_softmax``: what the released ``--use_norm softmax`` computes, ``log_softmax(q / student_temperature)``
  over the bucket *probabilities* (a flattened distribution: its loss is not zero when the student equals the
  teacher; kept for reproduction).

The released other-token branch passes probabilities where ``F.kl_div(..., log_target=True)`` expects
log-probabilities; here both sides are log-probabilities (the math, not the bug).

**kd**: ``L = mean_rows sum_tokens KL(softmax(z_T / T) || softmax(z_S / T))`` over the full vocabulary with an
online teacher (``teacher``: a model path or ``{from: STAGE}``), the same reduction as FIRST: the full-logit
baseline of ``bench/first.py``. TRL's ``GKDTrainer`` is the alternative with on-policy data and generalised JSD.

Defaults of the released ``example_run.sh``: LR 2e-6, cosine schedule with 3% warm-up, 3 epochs, batch 8,
gradient accumulation 2, weight decay 0. See ``docs/methods/first.md``.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from transformers import Trainer, TrainingArguments

from ...config import RecipeError
from .. import register_method
from ..base import LoggedMetricsMixin, TrainerMethod
from ..collate import pad_ids
from .calibration import calibrated_logprobs, parse_tau

__all__ = ["DistillCollator", "FIRSTConfig", "FIRSTMethod", "FIRSTTrainer", "KDConfig", "KDMethod", "KDTrainer",
           "first_loss", "kd_loss", "load_topk_items", "student_bucket_logprobs"]

NORMALIZATIONS = ("linear", "softmax", "prob_softmax")


# --------------------------------------------------------------------------------------------------
# Losses


def student_bucket_logprobs(student_logits: torch.Tensor, topk_ids: torch.Tensor, *, use_other: bool,
                            normalization: str = "linear", eps: float = 1e-6,
                            student_temperature: float = 1.0) -> torch.Tensor:
    """The student's renormalised bucket log-probs ``[..., k (+1)]`` at the teacher's ids (module docstring)."""
    logits = student_logits.float()
    logq = logits.gather(-1, topk_ids.long()) - torch.logsumexp(logits, dim=-1, keepdim=True)
    if normalization == "softmax":
        if not use_other:
            return torch.log_softmax(logq, dim=-1)
        rest = (-torch.expm1(torch.logsumexp(logq, dim=-1, keepdim=True).clamp(max=0.0))).clamp(min=1e-12)
        return torch.cat([logq, rest.log()], dim=-1)
    q = logq.exp()
    if use_other:
        q = torch.cat([q, (1.0 - q.sum(-1, keepdim=True)).clamp(min=0.0)], dim=-1)
    if normalization == "linear":
        q = q + eps
        return q.log() - q.sum(-1, keepdim=True).log()
    if normalization == "prob_softmax":
        return torch.log_softmax(q / student_temperature, dim=-1)
    raise ValueError(f"normalization must be one of {', '.join(NORMALIZATIONS)}, got {normalization!r}")


def first_loss(student_logits: torch.Tensor, topk_ids: torch.Tensor, teacher_logprobs: torch.Tensor,
               mask: torch.Tensor, *, tau: float, use_other: bool, normalization: str = "linear",
               eps: float = 1e-6, student_temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(loss, per-token KL [B, T])``: forward KL from the calibrated teacher buckets to the student's
    renormalised buckets, summed over the masked tokens of each row, mean over the ``B`` rows.
    ``student_logits`` ``[B, T, V]``; ``topk_ids`` / ``teacher_logprobs`` ``[B, T, k]``; ``mask`` ``[B, T]``."""
    logp = calibrated_logprobs(teacher_logprobs, tau, use_other)
    logq = student_bucket_logprobs(student_logits, topk_ids, use_other=use_other, normalization=normalization,
                                   eps=eps, student_temperature=student_temperature)
    kl = (logp.exp() * (logp - logq)).sum(-1) * mask
    return kl.sum(-1).mean(), kl


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor,
            temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(loss, per-token KL [B, T])``: full-vocabulary forward KL(teacher || student) at ``temperature``, summed
    over the masked tokens of each row, mean over rows."""
    logp = torch.log_softmax(teacher_logits.float() / temperature, dim=-1)
    logq = torch.log_softmax(student_logits.float() / temperature, dim=-1)
    kl = (logp.exp() * (logp - logq)).sum(-1) * mask
    return kl.sum(-1).mean(), kl


# --------------------------------------------------------------------------------------------------
# Data


class DistillCollator:
    """Right-padded ``input_ids`` / ``attention_mask``; ``loss_mask`` ``[B, W-1]`` marks the logit positions that
    predict a response token; with top-k items also ``topk_ids`` / ``topk_logprobs`` ``[B, W-1, k]`` aligned with
    the logits (position t holds the teacher's top-k for token t + 1)."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, items: list[dict]) -> dict[str, torch.Tensor]:
        out = pad_ids(items, self.pad_id)
        B, width = out["input_ids"].shape
        loss_mask = torch.zeros((B, width - 1), dtype=torch.float32)
        has_topk = "topk_ids" in items[0]
        if has_topk:
            k = items[0]["topk_ids"].shape[-1]
            tids = torch.zeros((B, width - 1, k), dtype=torch.long)
            tlp = torch.zeros((B, width - 1, k), dtype=torch.float32)
        for r, x in enumerate(items):
            n, p = len(x["input_ids"]), x["prompt_length"]
            loss_mask[r, p - 1:n - 1] = 1.0
            if has_topk:
                tids[r, p - 1:n - 1] = x["topk_ids"][: n - p].long()
                tlp[r, p - 1:n - 1] = x["topk_logprobs"][: n - p].float()
        out["loss_mask"] = loss_mask
        if has_topk:
            out.update(topk_ids=tids, topk_logprobs=tlp)
        return out


def _cut(item: dict, max_length: int | None) -> dict | None:
    if max_length is None or len(item["input_ids"]) <= max_length:
        return item
    if item["prompt_length"] >= max_length:
        return None
    out = dict(item, input_ids=item["input_ids"][:max_length])
    n = max_length - item["prompt_length"]
    if "topk_ids" in out:
        out.update(topk_ids=out["topk_ids"][:n], topk_logprobs=out["topk_logprobs"][:n])
    return out


def load_topk_items(data: Any, tokenizer: Any = None, include_heldout: bool = False,
                    max_length: int | None = None) -> list[dict]:
    """Trainer items from a :class:`~rlkit.methods.first.topk.TopKData`; with ``tokenizer``, the student's
    tokenizer must encode the rows exactly as the teacher's did (one clear error otherwise)."""
    from ...data import DataError
    from .topk import encode_pair

    rows = [(i, r) for i, r in enumerate(data.rows) if include_heldout or not r["heldout"]]
    if not rows:
        raise DataError(f"first: {data.folder} has no training row (every row is held out)")
    if tokenizer is not None:
        r = rows[0][1]
        enc = encode_pair(tokenizer, r["prompt"], r["completion"], len(r["input_ids"]))
        if enc is None or enc[0] != r["input_ids"][: len(enc[0])] or enc[1] != r["prompt_length"]:
            raise DataError(f"first: the student's tokenizer does not encode {data.folder} as the teacher's did; "
                            "FIRST needs a student that shares the teacher's vocabulary")
        vocab = len(tokenizer)
        if int(data.ids.max()) >= vocab:
            raise DataError(f"first: {data.folder} holds token id {int(data.ids.max())}, outside the student's "
                            f"vocabulary ({vocab})")
    items = []
    for i, r in rows:
        ids, lp = data.row_topk(i)
        item = _cut({"input_ids": r["input_ids"], "prompt_length": r["prompt_length"], "topk_ids": ids,
                     "topk_logprobs": lp}, max_length)
        if item is not None:
            items.append(item)
    if not items:
        raise DataError(f"first: every prompt of {data.folder} reaches max_length {max_length}")
    return items


def _text_items(rows: list[dict], tokenizer: Any, max_length: int, source: str) -> list[dict]:
    from ...data import DataError
    from .topk import encode_pair, response_rows

    items = []
    for r in response_rows(rows, tokenizer, source=source):
        enc = encode_pair(tokenizer, r["prompt"], r["completion"], max_length)
        if enc is not None:
            items.append({"input_ids": enc[0], "prompt_length": enc[1]})
    if not items:
        raise DataError(f"kd: every prompt of {source} reaches max_length {max_length}")
    return items


# --------------------------------------------------------------------------------------------------
# Configs


def _released(default: Any, text: str) -> Any:
    return field(default=default, metadata={"help": text})


@dataclass
class FIRSTConfig(TrainingArguments):
    """Settings of ``method: first`` (recipe section ``trainer:``): every ``TrainingArguments`` field plus FIRST's.
    Defaults: the released ``example_run.sh``."""

    tau: str | float = "auto"
    """Teacher temperature: ``auto`` (the one the preparation chose for this bucket layout) or a number (1.0: the
    uncalibrated teacher)."""
    use_other: bool = True
    """Add the "other" bucket (1 - top-k mass) to teacher and student (the released run: yes)."""
    normalization: Literal["linear", "softmax", "prob_softmax"] = "linear"
    """How the student's probabilities on the teacher's ids are renormalised (module docstring)."""
    eps: float = 1e-6
    """The linear normalisation's epsilon (released: 1e-6)."""
    student_temperature: float = 1.0
    """The temperature of ``prob_softmax`` (released: 1)."""
    include_heldout: bool = False
    """Also train on the rows held out to choose tau."""
    max_length: int | None = None
    """Cut sequences to this many tokens (None: as prepared)."""
    teacher: str | None = None
    """Without a prepared top-k dataset: the teacher (a model path or ``{from: STAGE}``) to prepare one from the
    training data (its reference solutions) into ``output_dir/topk`` before training (reused on resume)."""
    k: int = 5
    """Top-k of an on-the-fly preparation (released: 5)."""
    heldout_fraction: float = 0.1
    """Held-out rows of an on-the-fly preparation, to choose tau."""
    tau_criterion: Literal["ece", "nll"] = "ece"
    """What an on-the-fly preparation's tau minimises on the held-out rows."""

    learning_rate: float = _released(2e-6, "Learning rate (the released script: 2e-6).")
    lr_scheduler_type: str = _released("cosine", "Schedule (the released script: cosine).")
    warmup_steps: float = _released(0.03, "Warm-up steps, or below 1 a fraction of the run (the released script: a "
                                           "3% warm-up ratio).")
    num_train_epochs: float = _released(3.0, "Epochs (the released script: 3).")
    per_device_train_batch_size: int = _released(8, "Batch per device (the released script: 8).")
    gradient_accumulation_steps: int = _released(2, "Gradient accumulation (the released script: 2).")
    weight_decay: float = _released(0.0, "Weight decay (the released script: 0).")
    remove_unused_columns: bool = _released(False, "Kept False: batches come from the method's own collator.")

    def __post_init__(self):
        parse_tau(self.tau)
        if self.normalization not in NORMALIZATIONS:
            raise ValueError(f"normalization must be one of {', '.join(NORMALIZATIONS)}, got {self.normalization!r}")
        if not self.eps >= 0 or not self.student_temperature > 0:
            raise ValueError("eps must be >= 0 and student_temperature > 0")
        if self.k < 1 or not 0.0 <= self.heldout_fraction < 1.0:
            raise ValueError("k must be >= 1 and heldout_fraction in [0, 1)")
        if self.max_length is not None and self.max_length < 2:
            raise ValueError(f"max_length must be at least 2, got {self.max_length}")
        super().__post_init__()


@dataclass
class KDConfig(TrainingArguments):
    """Settings of ``method: kd`` (recipe section ``trainer:``): full-vocabulary forward KL from an online teacher,
    with FIRST's released optimisation defaults."""

    teacher: str | None = None
    """The teacher: a model folder, hub id or built-in name, or ``{from: STAGE}`` (required)."""
    temperature: float = 1.0
    """Softmax temperature of teacher and student in the KL."""
    max_length: int = 1024
    """Cut sequences to this many tokens."""

    learning_rate: float = _released(2e-6, "Learning rate (FIRST's released script: 2e-6).")
    lr_scheduler_type: str = _released("cosine", "Schedule (FIRST's released script: cosine).")
    warmup_steps: float = _released(0.03, "Warm-up steps, or below 1 a fraction of the run (FIRST's released "
                                           "script: a 3% warm-up ratio).")
    num_train_epochs: float = _released(3.0, "Epochs (FIRST's released script: 3).")
    per_device_train_batch_size: int = _released(8, "Batch per device (FIRST's released script: 8).")
    gradient_accumulation_steps: int = _released(2, "Gradient accumulation (FIRST's released script: 2).")
    weight_decay: float = _released(0.0, "Weight decay (FIRST's released script: 0).")
    remove_unused_columns: bool = _released(False, "Kept False: batches come from the method's own collator.")

    def __post_init__(self):
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.max_length < 2:
            raise ValueError(f"max_length must be at least 2, got {self.max_length}")
        super().__post_init__()


# --------------------------------------------------------------------------------------------------
# Trainers


class _DistillTrainer(LoggedMetricsMixin, Trainer):
    def __init__(self, model: Any, args: Any, train_dataset: Any = None, processing_class: Any = None,
                 callbacks: list | None = None, **kwargs: Any):
        if processing_class is None:
            raise ValueError(f"{type(self).__name__} needs the tokenizer (processing_class)")
        tok = processing_class
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        super().__init__(model=model, args=args, data_collator=DistillCollator(pad), train_dataset=train_dataset,
                         processing_class=tok, callbacks=callbacks, **kwargs)
        self.loss_is_scaled_for_ga = False  # compute_loss returns a per-micro-batch mean: Trainer divides by GA
        self._metrics: dict[str, defaultdict] = {"train": defaultdict(list), "eval": defaultdict(list)}

    def _log_stats(self, model, kl: torch.Tensor, mask: torch.Tensor, extra: dict[str, torch.Tensor]) -> None:
        mode = "train" if model.training else "eval"
        with torch.no_grad():
            names = ["kl_per_token", *extra]
            stats = torch.stack([kl.sum() / mask.sum().clamp(min=1), *extra.values()]).float()
            stats = self.accelerator.gather_for_metrics(stats[None]).mean(0).tolist()
        for name, value in zip(names, stats):
            self._metrics[mode][name].append(value)


class FIRSTTrainer(_DistillTrainer):
    """A ``transformers.Trainer`` with FIRST's loss (module docstring). ``train_dataset``: items of
    :func:`load_topk_items`; ``tau``: the resolved teacher temperature."""

    def __init__(self, model: Any, args: FIRSTConfig, train_dataset: Any = None, processing_class: Any = None,
                 callbacks: list | None = None, tau: float | None = None, **kwargs: Any):
        if not isinstance(args, FIRSTConfig):
            raise TypeError(f"FIRSTTrainer needs a FIRSTConfig, got {type(args).__name__}")
        tau = parse_tau(args.tau) if tau is None else tau
        if tau is None:
            raise ValueError("FIRSTTrainer: tau 'auto' must be resolved from the prepared data (pass tau=)")
        self.tau = float(tau)
        super().__init__(model, args, train_dataset, processing_class, callbacks, **kwargs)

    def compute_loss(self, model, inputs, return_outputs: bool = False, num_items_in_batch=None):
        args: FIRSTConfig = self.args
        logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits[:, :-1]
        mask = inputs["loss_mask"]
        loss, kl = first_loss(logits, inputs["topk_ids"], inputs["topk_logprobs"], mask, tau=self.tau,
                              use_other=args.use_other, normalization=args.normalization, eps=args.eps,
                              student_temperature=args.student_temperature)
        with torch.no_grad():
            top1 = (logits.argmax(-1) == inputs["topk_ids"][..., 0]).float()
            agree = (top1 * mask).sum() / mask.sum().clamp(min=1)
        self._log_stats(model, kl.detach(), mask, {"top1_agreement": agree})
        return (loss, {"logits": logits}) if return_outputs else loss


class KDTrainer(_DistillTrainer):
    """A ``transformers.Trainer`` with full-vocabulary forward KL from a frozen online ``teacher``."""

    def __init__(self, model: Any, args: KDConfig, teacher: Any = None, train_dataset: Any = None,
                 processing_class: Any = None, callbacks: list | None = None, **kwargs: Any):
        if not isinstance(args, KDConfig):
            raise TypeError(f"KDTrainer needs a KDConfig, got {type(args).__name__}")
        if teacher is None:
            raise ValueError("KDTrainer needs a teacher model")
        super().__init__(model, args, train_dataset, processing_class, callbacks, **kwargs)
        self.teacher = teacher.to(self.accelerator.device).eval()
        self.teacher.requires_grad_(False)

    def compute_loss(self, model, inputs, return_outputs: bool = False, num_items_in_batch=None):
        ids, attn, mask = inputs["input_ids"], inputs["attention_mask"], inputs["loss_mask"]
        logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1]
        with torch.no_grad():
            t_logits = self.teacher(input_ids=ids, attention_mask=attn).logits[:, :-1]
        if t_logits.shape[-1] != logits.shape[-1]:
            raise ValueError(f"kd: teacher vocabulary {t_logits.shape[-1]} != student vocabulary {logits.shape[-1]}")
        loss, kl = kd_loss(logits, t_logits, mask, self.args.temperature)
        self._log_stats(model, kl.detach(), mask, {})
        return (loss, {"logits": logits}) if return_outputs else loss


# --------------------------------------------------------------------------------------------------
# Methods


def _load_teacher(run: Any, name: str) -> Any:
    from ...models import load_model

    spec = dataclasses.replace(run.model, name=name, lora=None, source=None, patches=[])
    model, tok = load_model(spec, seed=run.seed)
    model.requires_grad_(False)
    return model.eval(), tok


def _topk_path(spec: Any) -> Path | None:
    from .topk import is_topk_index

    if spec.name.startswith("jsonl:") and is_topk_index(spec.name[len("jsonl:"):]):
        return Path(spec.name[len("jsonl:"):])
    return None


def _data_rows(spec: Any, tokenizer: Any) -> tuple[list[dict], str]:
    """Rows with a prompt and a response from a dataset spec: a prepared top-k index's training rows, stage/jsonl
    rows as stored, or a benchmark's rows (prompt in the recipe's template, its reference solution)."""
    from ...data import build_dataset, is_stage_rows, load_selected_rows

    topk = _topk_path(spec)
    if topk is not None:
        from .topk import read_topk

        return [r for r in read_topk(topk).rows if not r["heldout"]], str(topk)
    if is_stage_rows(spec):
        raw, source, _ = load_selected_rows(spec)
        return (raw[: spec.limit] if spec.limit is not None else raw), source
    return list(build_dataset(spec, tokenizer)), spec.name


@register_method
class FIRSTMethod(TrainerMethod):
    """``method: first``: FIRST on a prepared top-k dataset (module docstring)."""

    name = "first"

    def config_class(self) -> type:
        return FIRSTConfig

    def check(self, run: Any, config: FIRSTConfig, where: str) -> None:
        spec = run.data.train
        if spec.source is None and not spec.name.startswith("jsonl:") and config.teacher is None:
            raise RecipeError(f"data.train: method first trains on a top-k dataset ({{from: PREPARE_STAGE, dataset: "
                              f"topk}} of a distill_prepare stage); or set {where}.teacher to prepare one from "
                              f"{spec.name!r}")

    def build_trainer(self, run: Any, ctx: Any, args: FIRSTConfig) -> FIRSTTrainer:
        from .topk import read_topk

        path = _topk_path(run.data.train)
        if path is None:
            if args.teacher is None:
                raise RecipeError(f"data.train: {run.data.train.name} is not a prepared top-k dataset; train on a "
                                  "distill_prepare stage's topk or set trainer.teacher")
            path = self._prepare(run, ctx, args)
        data = read_topk(path)
        tau = parse_tau(args.tau)
        if tau is None:
            tau = data.tau(args.use_other)
        items = load_topk_items(data, ctx.tokenizer, args.include_heldout, args.max_length)
        print(f"[rlkit] first: {len(items)} rows, {data.meta['tokens']} teacher tokens, k {data.meta['k']}, "
              f"tau {tau:g}{' (auto)' if parse_tau(args.tau) is None else ''}, use_other {args.use_other}, "
              f"normalization {args.normalization}", flush=True)
        return FIRSTTrainer(model=ctx.model, args=args, train_dataset=items, processing_class=ctx.tokenizer,
                            callbacks=ctx.callbacks, tau=tau)

    def _prepare(self, run: Any, ctx: Any, args: FIRSTConfig) -> Path:
        from accelerate import PartialState

        from .topk import INDEX_FILE, is_topk_index, prepare_topk

        out = Path(run.output_dir) / "topk"
        with PartialState().main_process_first():
            if not is_topk_index(out / INDEX_FILE):
                teacher, tok = _load_teacher(run, args.teacher)
                teacher.to(ctx.model.device)
                rows, source = _data_rows(run.data.train, tok)
                summary = prepare_topk(teacher, tok, rows, out, k=args.k,
                                       heldout_fraction=args.heldout_fraction, tau="auto",
                                       criterion=args.tau_criterion, use_other=args.use_other,
                                       max_length=args.max_length or 1024, seed=run.seed, teacher_name=args.teacher)
                print(f"[rlkit] first: prepared {summary['tokens']} top-{args.k} tokens from {source} with "
                      f"{args.teacher} into {out}", flush=True)
                del teacher
        return out / INDEX_FILE


@register_method
class KDMethod(TrainerMethod):
    """``method: kd``: full-vocabulary forward KL from an online teacher (module docstring)."""

    name = "kd"

    def config_class(self) -> type:
        return KDConfig

    def check(self, run: Any, config: KDConfig, where: str) -> None:
        if config.teacher is None:
            raise RecipeError(f"{where}.teacher: method kd needs a teacher (a model path or {{from: STAGE}})")

    def build_trainer(self, run: Any, ctx: Any, args: KDConfig) -> KDTrainer:
        from ...data import DataError

        if args.teacher is None:
            raise RecipeError("trainer.teacher: method kd needs a teacher (a model path or {from: STAGE})")
        teacher, tok = _load_teacher(run, args.teacher)
        if len(tok) != len(ctx.tokenizer) or tok.get_vocab() != ctx.tokenizer.get_vocab():
            raise DataError(f"kd: the teacher {args.teacher} has another vocabulary than the student; full-logit "
                            "distillation needs a shared tokenizer")
        rows, source = _data_rows(run.data.train, ctx.tokenizer)
        items = _text_items(rows, ctx.tokenizer, args.max_length, source)
        print(f"[rlkit] kd: {len(items)} rows from {source}, teacher {args.teacher}, temperature "
              f"{args.temperature:g}", flush=True)
        return KDTrainer(model=ctx.model, args=args, teacher=teacher, train_dataset=items,
                         processing_class=ctx.tokenizer, callbacks=ctx.callbacks)
