"""``method: prm``: train a process (or outcome) reward model on soft step labels (ER-PRM, arXiv 2412.11006).

The released ``prm/kl_math_reward_ce.py``: a causal LM, no extra head; at every step-tag position the logits of
the two label tokens (``'+'`` / ``'-'``) are compared by a **soft-label cross-entropy**
``-(v log p_+ + (1 - v) log p_-)`` with ``p = softmax([l_+, l_-])`` and ``v`` the step's label in [0, 1],
averaged over all step tags of the batch. The layout (step text, tag, separator) is
:func:`rlkit.process_reward.encode_tagged`, shared with the scorer, so a trained model reads back exactly as it
was trained. The run's ``final/`` is a :class:`rlkit.process_reward.ProcessRewardModel` (a causal LM checkpoint
plus ``prm.json``): a step scorer for search, best-of-N and RSD, and a reward for GRPO (``{name: prm}``).

Rows: a ``prm_label`` stage's (``prompt``, ``steps``, ``labels``; ``label_kind`` picks ``labels_er`` /
``labels_hard`` / ``labels_soft`` instead), or any jsonl with those fields (a ``completion`` is split with
``splitter`` when there is no ``steps``). ``kind: orm`` trains the ER-PRM paper's outcome baseline on the same
rows: one tag after the whole solution, labelled with its correctness (``correct``; else the final step label;
else a 0/1 ``reward``), so a ``sample`` stage's rows train an ORM directly.

Defaults of the released script: LR 5e-7, one epoch, cosine; block size 512. The script reads only the first
1,000 examples (``json.load(f)[:1000]``), which looks like a debug leftover: rlkit trains on every row.
See ``docs/methods/er_prm.md``.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from transformers import Trainer, TrainingArguments

from ...config import RecipeError
from ...process_reward import (AGGREGATES, DEFAULT_STEP_TAG, META_FILE, ProcessRewardModel, encode_tagged,
                               label_token_ids, tag_ids, two_logits, write_meta)
from .. import register_method
from ..base import LoggedMetricsMixin, StageOutput, TrainerMethod, save_final
from ..collate import pad_ids, right_pad

__all__ = ["PRMCollator", "PRMConfig", "PRMMethod", "PRMTrainer", "prm_loss", "tokenize_prm_rows"]

LABEL_COLUMNS = {"auto": "labels", "er": "labels_er", "hard": "labels_hard", "soft": "labels_soft"}


@dataclass
class PRMConfig(TrainingArguments):
    """Settings of the PRM trainer (recipe section ``trainer:``): every ``TrainingArguments`` field plus the PRM's.
    Defaults: the released ER-PRM training script."""

    kind: Literal["prm", "orm"] = "prm"
    """prm: a label at every step tag; orm: one tag after the whole solution, labelled with its correctness."""
    label_kind: Literal["auto", "er", "hard", "soft"] = "auto"
    """Which labels of a prm_label stage's rows to train on (auto: the ``labels`` column, the stage's own kind)."""
    eta: float | None = None
    """Recompute the ER labels with this eta from the rows' rollout counts (``step_correct`` / ``step_rollouts``,
    0/1 rollouts; the last step keeps the solution's correctness): an eta sweep reuses one set of rollouts.
    None: train on the labels as written (the label stage's eta)."""
    step_tag: str = DEFAULT_STEP_TAG
    """Text written after each step; the score is read at its last token (the released code: ' ки')."""
    label_tokens: list[str] = field(default_factory=lambda: ["+", "-"])
    """The positive and negative label tokens, one token each (the released code: ' +' and ' -' of Llama 3)."""
    aggregate: Literal["min", "last", "mean", "product"] = "min"
    """How the saved model turns step scores into a solution score by default (the released code: min)."""
    splitter: Literal["newline", "paragraph", "sentence", "latex_sentence"] = "newline"
    """Splits completions that come without ``steps``; saved with the model, which splits answers with it."""
    max_length: int = 512
    """Longest tagged sequence in tokens (the released block size); later tags are cut."""

    learning_rate: float = field(default=5e-7, metadata={"help": "Learning rate (the released script: 5e-7)."})
    num_train_epochs: float = field(default=1.0, metadata={"help": "Epochs (the released script: 1)."})
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "Schedule (the released script: cosine)."})
    remove_unused_columns: bool = field(default=False, metadata={"help": "Kept False: the PRM batch is built by "
                                                                         "its own collator."})

    def __post_init__(self):
        if self.kind not in ("prm", "orm"):
            raise ValueError(f"kind must be prm or orm, got {self.kind!r}")
        if self.label_kind not in LABEL_COLUMNS:
            raise ValueError(f"label_kind must be one of {', '.join(LABEL_COLUMNS)}, got {self.label_kind!r}")
        if self.aggregate not in AGGREGATES:
            raise ValueError(f"aggregate must be one of {', '.join(AGGREGATES)}, got {self.aggregate!r}")
        if not self.step_tag:
            raise ValueError("step_tag must be a non-empty string")
        if len(self.label_tokens) != 2 or self.label_tokens[0] == self.label_tokens[1]:
            raise ValueError(f"label_tokens must be two different strings, got {self.label_tokens}")
        if self.max_length < 2:
            raise ValueError(f"max_length must be at least 2, got {self.max_length}")
        if self.eta is not None and (not self.eta >= 0 or self.kind == "orm" or self.label_kind not in ("auto", "er")):
            raise ValueError("eta recomputes ER labels: it needs eta >= 0, kind prm and label_kind er (or auto)")
        super().__post_init__()


# --------------------------------------------------------------------------------------------------
# Data


def _row_label_steps(row: dict, i: int, args: PRMConfig, source: str) -> tuple[list[str], list[float]] | None:
    from ...data import DataError
    from ...rollout.steps import split_steps

    steps = row.get("steps")
    if steps is None:
        completion = row.get("completion", row.get("response"))
        if not isinstance(completion, str):
            raise DataError(f"prm: row {i} of {source} has neither steps nor a completion")
        steps = split_steps(completion, args.splitter)
    if not isinstance(steps, list) or not all(isinstance(s, str) for s in steps):
        raise DataError(f"prm: row {i} of {source}: steps must be a list of strings")
    if not steps:
        return None
    if args.kind == "orm":
        label = row.get("correct")
        if label is None and isinstance(row.get("labels"), list) and row["labels"]:
            label = row["labels"][-1]
        if label is None and row.get("reward") in (0, 1, 0.0, 1.0, True, False):
            label = float(row["reward"])
        if label is None:
            raise DataError(f"prm: row {i} of {source} has no correctness for an ORM (a `correct` column, labels, "
                            "or a 0/1 reward)")
        return ["".join(steps)], [float(label)]
    if args.eta is not None:
        return steps, _relabel(row, i, len(steps), args.eta, source)
    column = LABEL_COLUMNS[args.label_kind]
    labels = row.get(column)
    if labels is None:
        raise DataError(f"prm: row {i} of {source} has no {column!r} column; train on a prm_label stage's rows "
                        f"(data.train: {{from: label, dataset: labels}}) or set label_kind")
    if not isinstance(labels, list) or len(labels) != len(steps):
        raise DataError(f"prm: row {i} of {source}: {column} has {len(labels) if isinstance(labels, list) else '?'} "
                        f"values for {len(steps)} steps")
    values = [float(v) for v in labels]
    if any(not (0.0 <= v <= 1.0) or math.isnan(v) for v in values):
        raise DataError(f"prm: row {i} of {source}: labels must lie in [0, 1] (soft-label cross-entropy), got {values}")
    return steps, values


def _relabel(row: dict, i: int, n_steps: int, eta: float, source: str) -> list[float]:
    """ER labels with ``eta`` from a label row's rollout counts; the last step keeps the row's correctness."""
    from ...data import DataError
    from .labels import er_label_from_p

    correct, total = row.get("step_correct"), row.get("step_rollouts")
    final = row.get("correct", (row.get("labels_er") or [None])[-1])
    if not isinstance(correct, list) or not isinstance(total, list) or len(correct) != n_steps or final is None:
        raise DataError(f"prm: eta needs a prm_label stage's rows (step_correct, step_rollouts, correct); row {i} of "
                        f"{source} lacks them")
    if "step_rewards" in row:
        raise DataError(f"prm: eta recomputes labels of 0/1 rollouts; row {i} of {source} was labelled with "
                        "target: reward")
    return [er_label_from_p(c / t, eta) for c, t in zip(correct[:-1], total[:-1])] + [float(final)]


def tokenize_prm_rows(rows: list[dict], tokenizer: Any, args: PRMConfig, source: str = "dataset") -> list[dict]:
    """Rows -> ``{input_ids, tag_index, tag_label}`` (tags past ``max_length`` cut; rows with no tag left dropped,
    counted in the printout)."""
    from ...data import DataError
    from ...models import ModelError

    try:
        tag = tag_ids(tokenizer, args.step_tag)
        label_token_ids(tokenizer, args.label_tokens)
    except ValueError as e:
        raise ModelError(f"prm: {e}") from None
    out, dropped, cut = [], 0, 0
    for i, row in enumerate(rows):
        prompt = row.get("prompt")
        if not isinstance(prompt, str):
            raise DataError(f"prm: row {i} of {source} has no text prompt (a `prompt` column, as the sample stage "
                            "writes it)")
        got = _row_label_steps(row, i, args, source)
        if got is None:
            dropped += 1
            continue
        steps, labels = got
        ids, positions = encode_tagged(tokenizer, prompt, steps, args.step_tag, tag)
        keep = [k for k, p in enumerate(positions) if p < args.max_length]
        if len(keep) < len(positions):
            cut += 1
        if not keep:
            dropped += 1
            continue
        out.append({"input_ids": ids[:args.max_length], "tag_index": [positions[k] for k in keep],
                    "tag_label": [labels[k] for k in keep]})
    if not out:
        raise DataError(f"prm: no trainable row in {source} (every row was empty or longer than max_length)")
    if dropped or cut:
        print(f"[rlkit] prm: {dropped} rows dropped (no step within max_length {args.max_length}), {cut} cut",
              flush=True)
    return out


class PRMCollator:
    """Right-padded ``input_ids`` / ``attention_mask`` and ``tag_index`` / ``tag_label`` padded with -1."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, items: list[dict]) -> dict[str, torch.Tensor]:
        return {**pad_ids(items, self.pad_id), "tag_index": right_pad([x["tag_index"] for x in items], -1),
                "tag_label": right_pad([x["tag_label"] for x in items], -1.0, torch.float32)}


def prm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Soft-label cross-entropy over the two label logits ``[T, 2]`` with targets ``[v, 1 - v]``, mean over T."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(labels * logp[:, 0] + (1.0 - labels) * logp[:, 1]).mean()


# --------------------------------------------------------------------------------------------------
# Trainer


class PRMTrainer(LoggedMetricsMixin, Trainer):
    """A ``transformers.Trainer`` with the soft-label loss at the step tags (module docstring). ``train_dataset``:
    rows (dicts) or already tokenised items; checkpoints are loadable PRMs (``prm.json`` beside the weights)."""

    def __init__(self, model: Any, args: PRMConfig, train_dataset: Any = None, processing_class: Any = None,
                 callbacks: list | None = None, info: dict | None = None, **kwargs: Any):
        if processing_class is None:
            raise ValueError("PRMTrainer needs the tokenizer (processing_class)")
        if not isinstance(args, PRMConfig):
            raise TypeError(f"PRMTrainer needs a PRMConfig, got {type(args).__name__}")
        tok = processing_class
        self.label_ids = label_token_ids(tok, args.label_tokens)
        if train_dataset is not None:
            items = list(train_dataset)
            if items and "tag_index" not in items[0]:
                items = tokenize_prm_rows([dict(x) for x in items], tok, args, "train_dataset")
            train_dataset = items
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        super().__init__(model=model, args=args, data_collator=PRMCollator(pad), train_dataset=train_dataset,
                         processing_class=tok, callbacks=callbacks, **kwargs)
        self.loss_is_scaled_for_ga = False  # compute_loss returns a per-micro-batch mean: Trainer divides by GA
        self.info = dict(info or {})
        self._metrics: dict[str, defaultdict] = {"train": defaultdict(list), "eval": defaultdict(list)}

    def compute_loss(self, model, inputs, return_outputs: bool = False, num_items_in_batch=None):
        index, label = inputs["tag_index"], inputs["tag_label"]
        rows, slots = (index >= 0).nonzero(as_tuple=True)
        logits = two_logits(model, inputs["input_ids"], inputs["attention_mask"], rows, index[rows, slots],
                            self.label_ids)
        target = label[rows, slots]
        loss = prm_loss(logits, target)
        mode = "train" if model.training else "eval"
        with torch.no_grad():
            p = torch.softmax(logits, dim=-1)[:, 0]
            stats = torch.stack([((p > 0.5) == (target > 0.5)).float().mean(), p.mean(), target.mean()])
            stats = self.accelerator.gather_for_metrics(stats[None]).mean(0).tolist()
        for name, value in zip(("step_accuracy", "mean_score", "mean_label"), stats):
            self._metrics[mode][name].append(value)
        return (loss, {"logits": logits}) if return_outputs else loss

    def prm_meta(self) -> dict:
        args: PRMConfig = self.args
        return ProcessRewardModel(self.accelerator.unwrap_model(self.model), self.processing_class,
                                  step_tag=args.step_tag, label_tokens=args.label_tokens, aggregate=args.aggregate,
                                  kind=args.kind, splitter=args.splitter,
                                  info={"method": "prm", **self.info, "label_kind": args.label_kind,
                                        "global_step": self.state.global_step}).meta()

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        super()._save(output_dir, state_dict)
        if self.args.should_save:
            write_meta(Path(output_dir or self.args.output_dir), self.prm_meta())


# --------------------------------------------------------------------------------------------------
# The method


def load_prm_rows(spec: Any) -> tuple[list[dict], str]:
    """The stored rows of ``spec`` after its ``where`` / ``balance`` selection and ``limit``."""
    from ...data import load_stored_rows

    return load_stored_rows(spec, "prm")


@register_method
class PRMMethod(TrainerMethod):
    """``method: prm``: a process (or outcome) reward model from labelled rows (module docstring)."""

    name = "prm"
    evaluates_policy = False  # the held-out greedy accuracy of a policy means nothing for a reward model

    def config_class(self) -> type:
        return PRMConfig

    def check(self, run: Any, config: PRMConfig, where: str) -> None:
        spec = run.data.train
        if spec.source is None and spec.name in ("synthetic", "gsm8k", "math500", "aime24", "amc23", "math"):
            raise RecipeError(f"data.train: method prm trains on labelled rows (a prm_label stage's: "
                              f"{{from: label, dataset: labels}}, or a jsonl), not the benchmark {spec.name!r}")

    def build_trainer(self, run: Any, ctx: Any, args: PRMConfig) -> PRMTrainer:
        rows, source = load_prm_rows(run.data.train)
        items = tokenize_prm_rows(rows, ctx.tokenizer, args, source)
        info = {"start": ctx.model_path or run.model.name, "data": source, "rows": len(items),
                "eta": rows[0].get("eta"), "label_model": rows[0].get("label_model")}
        return PRMTrainer(model=ctx.model, args=args, train_dataset=items, processing_class=ctx.tokenizer,
                          callbacks=ctx.callbacks, info=info)

    def finish(self, trainer: PRMTrainer, ctx: Any) -> StageOutput:
        final = Path(ctx.final_dir)
        if trainer.accelerator.is_main_process:  # prm.json first: the done marker save_final writes comes last
            final.mkdir(parents=True, exist_ok=True)
            write_meta(final, trainer.prm_meta())
        save_final(trainer, ctx.tokenizer, final)
        losses = [x["loss"] for x in trainer.state.log_history if "loss" in x]
        return StageOutput(model=str(final), summary={"prm": str(final / META_FILE), "kind": trainer.args.kind,
                                                      "final_loss": losses[-1] if losses else None})
