"""Pretraining lab (``method: pretrain``): train a causal LM from scratch on local text, with any patches.

What it is for: controlled small-scale pretraining experiments on the model-side methods (HoPE, Cog
attention, AoE, ...) and on how copying develops ("Language Models 'Grok' to Copy", arXiv 2409.09281,
Lv et al., NAACL 2025; protocol in ``rlkit.eval.copying``). There is no single paper for the trainer
itself; it is the standard causal-LM recipe (HF ``run_clm`` style) on ``transformers.Trainer``:

- **Text.** ``data.train`` names the source: ``jsonl:PATH``, ``txt:PATH`` (the whole file is one
  document), a known benchmark (``gsm8k`` ... with ``path:`` for a local copy, else the hub),
  ``synthetic`` or a hub id. For rows, ``trainer.text_fields`` (default ``[text]``) are joined with
  ``text_separator`` (default a newline) into one document per row; a missing field is an error naming
  the row. ``data.train.limit`` caps the number of documents.
- **Packing.** Documents are tokenized without special tokens, each followed by EOS (``add_eos``),
  concatenated in order and cut into blocks of ``seq_length`` tokens; the remainder is dropped. Blocks
  cross document boundaries and attention is not reset there (standard packing); no BOS, no padding;
  labels = inputs (the model shifts them).
- **Validation.** With ``data.eval`` set, its text is the validation text and all of ``data.train``
  trains. Otherwise ``validation_split`` (0.05) of the documents, chosen by a seeded shuffle
  (``data.train.seed``), are held out; a single document (a txt file) is cut at
  ``1 - validation_split`` of its tokens instead. ``validation_split: 0`` turns evaluation off.
- **Perplexity at several context lengths.** The validation token stream, truncated to the same budget
  for every length (the largest multiple of the longest length within ``eval_max_tokens``), is cut into
  non-overlapping blocks of ``L`` tokens; ``ppl@L = exp(mean NLL over the L-1 predicted tokens of every
  block)`` (no sliding window; every token counts). Logged as ``eval_ppl_{L}`` with each evaluation
  (``eval_strategy``) and always after training, then written to ``<output_dir>/perplexity.json``.
  ``eval_context_lengths`` defaults to ``[seq_length, 2*seq_length, 4*seq_length]``; lengths beyond
  ``seq_length`` measure length extrapolation (a length beyond the model's ``max_position_embeddings``
  prints a note: for RoPE/HoPE models that value is no hard limit). ``eval_loss`` is HF's loss on the
  same tokens packed at ``seq_length``, and ``eval_ppl = exp(eval_loss)``.
- **Copying probe.** ``probe_steps: N`` runs ``rlkit.eval.copying.CopyingProbeCallback`` every N
  optimizer steps (and at step 0 and the end): copy accuracy on ``[BOS] S S`` random-token sequences and
  the per-layer/head induction scores, logged as ``probe/...`` and plotted to ``<output_dir>/probe.png``.
  Fused attention (sdpa/flash) is switched to eager for the probe's forward passes only.
- **Model.** Whatever the recipe's ``model`` section loads: ``tiny`` (built from ``model.tiny``,
  randomly initialised: from scratch) or any HF model/path, with ``model.patches`` applied by
  ``rlkit.models``. A hub checkpoint is *continued*, not re-initialised.
- Checkpoints are safetensors ``checkpoint-N`` folders (Trainer's), so ``resume_from_checkpoint``
  works; packing and the validation split are deterministic, so a resumed run sees the same blocks. The
  final model is saved by the shared tail of ``rlkit.methods.base.TrainerMethod``.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import Trainer, TrainingArguments, default_data_collator

from ..config import RecipeError
from . import register_method
from .aux_loss import AuxLossMixin
from .base import TrainerMethod


@dataclass
class PretrainConfig(TrainingArguments):
    """``transformers.TrainingArguments`` plus the pretraining lab's text, evaluation and probe fields."""

    text_fields: list[str] = field(default_factory=lambda: ["text"])
    """jsonl/hub row fields joined (in order) into one document per row. GSM8K: ``[question, answer]``."""
    text_separator: str = "\n"
    """Placed between the fields of one row."""
    add_eos: bool = True
    """Append the tokenizer's EOS after every document before packing."""
    seq_length: int = 128
    """Tokens per packed training sequence (the training context length)."""
    validation_split: float = 0.05
    """Fraction of the documents held out for validation when ``data.eval`` is not set (0: none)."""
    eval_context_lengths: list[int] | None = None
    """Context lengths for perplexity (None: seq_length, 2x and 4x; []: only ``eval_loss``)."""
    eval_max_tokens: int = 32768
    """Validation tokens evaluated (the same tokens at every context length)."""
    probe_steps: int = 0
    """Run the copying probe every N optimizer steps (0: off)."""
    probe_seq_length: int = 32
    """``n``: length of the random sequence that is repeated (input ``[BOS] S S``)."""
    probe_num_sequences: int = 64
    """``M``: random sequences per probe (the spec's suggestion is 256)."""
    probe_batch_size: int = 16
    probe_seed: int = 1234
    """Seed of the probe's sequences (the same sequences at every probe of a run)."""
    probe_threshold: float = 0.4
    """Induction score above which a head counts in ``probe/induction_heads``."""
    probe_bos: bool = True
    """Start each probe sequence with the tokenizer's BOS token."""
    prediction_loss_only: bool = field(default=True, metadata={"help": "Only the loss is needed for LM eval."})

    def __post_init__(self):
        if isinstance(self.text_fields, str):
            self.text_fields = [self.text_fields]
        if not self.text_fields or not all(isinstance(f, str) and f for f in self.text_fields):
            raise ValueError(f"text_fields must be a non-empty list of field names, got {self.text_fields!r}")
        if self.seq_length < 2:
            raise ValueError(f"seq_length must be at least 2, got {self.seq_length}")
        if not 0.0 <= self.validation_split < 1.0:
            raise ValueError(f"validation_split must be in [0, 1), got {self.validation_split}")
        if self.eval_context_lengths is None:
            self.eval_context_lengths = [self.seq_length, 2 * self.seq_length, 4 * self.seq_length]
        lengths = self.eval_context_lengths
        if not isinstance(lengths, (list, tuple)) or not all(isinstance(x, int) and x >= 2 for x in lengths):
            raise ValueError(f"eval_context_lengths must be a list of integers >= 2, got {lengths!r}")
        self.eval_context_lengths = sorted(set(lengths))
        if self.eval_max_tokens < 2:
            raise ValueError(f"eval_max_tokens must be at least 2, got {self.eval_max_tokens}")
        if self.probe_steps < 0:
            raise ValueError(f"probe_steps must be >= 0 (0: off), got {self.probe_steps}")
        if self.probe_seq_length < 2 or self.probe_num_sequences < 1 or self.probe_batch_size < 1:
            raise ValueError("probe_seq_length must be >= 2 and probe_num_sequences, probe_batch_size >= 1")
        super().__post_init__()


# --------------------------------------------------------------------------------------------------
# Text -> packed blocks


def load_documents(spec, text_fields: list[str], separator: str = "\n") -> list[str]:
    """Documents of a ``DatasetSpec``-like source (see the module docstring for the accepted names)."""
    from ..data import DataError, load_raw_rows

    name = spec.name
    if name.startswith("txt:"):
        p = Path(name[len("txt:"):])
        if not p.is_file():
            raise DataError(f"data file {str(p)!r} not found")
        text = p.read_text()
        if not text.strip():
            raise DataError(f"{p} is empty")
        return [text]
    rows, source, _ = load_raw_rows(spec)
    if spec.limit is not None:
        rows = rows[: spec.limit]
    docs = []
    for i, row in enumerate(rows):
        missing = [f for f in text_fields if row.get(f) is None]
        if missing:
            raise DataError(f"{source}: row {i} has no {missing[0]!r} field (fields: {sorted(row)}); "
                            "set trainer.text_fields")
        docs.append(separator.join(str(row[f]) for f in text_fields))
    if not docs:
        raise DataError(f"dataset {name!r} (split {spec.split!r}) has no documents")
    return docs


def tokenize_documents(docs: list[str], tokenizer, add_eos: bool = True) -> list[list[int]]:
    """Token ids of each document (no special tokens), each followed by EOS when ``add_eos``."""
    if add_eos and tokenizer.eos_token_id is None:
        raise RecipeError("trainer.add_eos: the tokenizer has no EOS token; set add_eos: false")
    ids = tokenizer(docs, add_special_tokens=False)["input_ids"]
    if add_eos:
        ids = [x + [tokenizer.eos_token_id] for x in ids]
    return ids


def pack(token_lists: list[list[int]], seq_length: int) -> torch.Tensor:
    """Concatenate the token lists and cut them into ``[N, seq_length]`` blocks (remainder dropped)."""
    flat = torch.tensor([t for x in token_lists for t in x], dtype=torch.long)
    n = flat.numel() // seq_length
    return flat[: n * seq_length].view(n, seq_length)


def split_validation(token_lists: list[list[int]], fraction: float, seed: int = 0):
    """``(train, validation)`` token lists: a seeded ``fraction`` of the documents (at least one), or the
    tail of a single document's tokens."""
    if fraction <= 0:
        return token_lists, []
    if len(token_lists) == 1:
        ids = token_lists[0]
        cut = int(len(ids) * (1 - fraction))
        return [ids[:cut]], [ids[cut:]]
    k = max(1, round(len(token_lists) * fraction))
    if k >= len(token_lists):
        raise RecipeError(f"trainer.validation_split={fraction} leaves no training documents")
    held = set(random.Random(seed).sample(range(len(token_lists)), k))
    train = [x for i, x in enumerate(token_lists) if i not in held]
    val = [x for i, x in enumerate(token_lists) if i in held]
    return train, val


class PackedDataset(torch.utils.data.Dataset):
    """Fixed-length blocks as ``{"input_ids", "labels"}`` rows."""

    def __init__(self, blocks: torch.Tensor):
        self.blocks = blocks

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def __getitem__(self, i: int) -> dict:
        x = self.blocks[i]
        return {"input_ids": x, "labels": x.clone()}


@dataclass
class PretrainData:
    train: PackedDataset
    validation_ids: torch.Tensor | None
    """The validation token stream, truncated to the evaluation budget (None: no validation)."""
    eval: PackedDataset | None
    """The same tokens packed at ``seq_length`` (Trainer's ``eval_loss``)."""
    train_tokens: int
    documents: int


def build_pretrain_data(data_spec, tokenizer, args: PretrainConfig) -> PretrainData:
    train_docs = tokenize_documents(load_documents(data_spec.train, args.text_fields, args.text_separator),
                                    tokenizer, args.add_eos)
    n_docs = len(train_docs)
    if data_spec.eval is not None:
        val_docs = tokenize_documents(load_documents(data_spec.eval, args.text_fields, args.text_separator),
                                      tokenizer, args.add_eos)
    else:
        train_docs, val_docs = split_validation(train_docs, args.validation_split, data_spec.train.seed)
    blocks = pack(train_docs, args.seq_length)
    if blocks.shape[0] == 0:
        raise RecipeError(f"trainer.seq_length={args.seq_length}: the training text has fewer tokens "
                          f"({sum(map(len, train_docs))}) than one sequence")
    val_ids, eval_ds = None, None
    if val_docs:
        stream = torch.tensor([t for x in val_docs for t in x], dtype=torch.long)
        longest = max([args.seq_length, *args.eval_context_lengths])
        budget = min(stream.numel(), args.eval_max_tokens) // longest * longest
        if budget == 0:
            raise RecipeError(f"the validation text has {stream.numel()} tokens (eval_max_tokens="
                              f"{args.eval_max_tokens}), fewer than the longest evaluated context ({longest}); "
                              "raise validation_split/eval_max_tokens or shorten eval_context_lengths")
        val_ids = stream[:budget]
        eval_ds = PackedDataset(val_ids.view(-1, args.seq_length))
    return PretrainData(PackedDataset(blocks), val_ids, eval_ds, blocks.numel(), n_docs)


# --------------------------------------------------------------------------------------------------
# Perplexity


@torch.no_grad()
def perplexity(model, ids: torch.Tensor, context_length: int, batch_size: int = 8,
               max_tokens: int | None = None) -> dict:
    """Perplexity of ``model`` on the 1-D token stream ``ids`` cut into non-overlapping blocks of
    ``context_length`` tokens: ``exp`` of the mean next-token NLL over the ``L-1`` targets of each block."""
    if max_tokens is not None:
        ids = ids[:max_tokens]
    n = ids.numel() // context_length
    if n == 0:
        raise ValueError(f"{ids.numel()} tokens are fewer than one block of {context_length}")
    blocks = ids[: n * context_length].view(n, context_length)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    try:
        for b in range(0, n, batch_size):
            x = blocks[b:b + batch_size].to(device)
            logits = model(input_ids=x).logits[:, :-1].float()
            nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1),
                                                    reduction="sum")
            total += float(nll)
            count += x[:, 1:].numel()
    finally:
        if was_training:
            model.train()
    return {"ppl": math.exp(total / count), "nll": total / count, "tokens": count, "sequences": n}


class PretrainTrainer(AuxLossMixin, Trainer):
    """``transformers.Trainer`` on packed blocks whose evaluation adds perplexity at several context
    lengths (``eval_ppl_{L}``) and ``eval_ppl``; patched layers' auxiliary losses (MoE load balancing)
    are added to the training loss (``AuxLossMixin``)."""

    def __init__(self, *args, validation_ids: torch.Tensor | None = None, **kwargs):
        kwargs.setdefault("data_collator", default_data_collator)
        super().__init__(*args, **kwargs)
        self.validation_ids = validation_ids

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                        metric_key_prefix: str = "eval"):
        out = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix)
        loss = out.metrics.get(f"{metric_key_prefix}_loss")
        if loss is not None:
            out.metrics[f"{metric_key_prefix}_ppl"] = math.exp(min(loss, 700.0))
        if self.validation_ids is not None:
            for length in self.args.eval_context_lengths:
                r = perplexity(self.model, self.validation_ids, length, self.args.per_device_eval_batch_size)
                out.metrics[f"{metric_key_prefix}_ppl_{length}"] = r["ppl"]
        return out


# --------------------------------------------------------------------------------------------------
# Method


@register_method
class PretrainMethod(TrainerMethod):
    """``method: pretrain``: the pretraining lab (see the module docstring)."""

    name = "pretrain"

    def config_class(self) -> type:
        return PretrainConfig

    def check(self, run, config, where: str) -> None:
        if run.model.name == "tiny" and config.seq_length > run.model.tiny.max_position_embeddings:
            raise RecipeError(f"{where}.seq_length={config.seq_length} is longer than "
                              f"model.tiny.max_position_embeddings={run.model.tiny.max_position_embeddings}; "
                              "raise max_position_embeddings")
        if run.model.lora is not None:
            raise RecipeError("model.lora: the pretrain method trains every weight; remove the lora section")

    def build_trainer(self, run, ctx, args):
        from ..eval.copying import CopyingProbeCallback, CopyProbeConfig

        data = build_pretrain_data(run.data, ctx.tokenizer, args)
        self._data = data
        max_pos = getattr(ctx.model.config, "max_position_embeddings", None)
        if args.process_index == 0:
            print(f"[rlkit] pretrain: {data.documents} documents, {len(data.train)} blocks of {args.seq_length} "
                  f"tokens ({data.train_tokens} tokens); validation: "
                  + (f"{data.validation_ids.numel()} tokens" if data.validation_ids is not None else "none"),
                  flush=True)
            long = [n for n in args.eval_context_lengths if max_pos and n > max_pos]
            if long and data.validation_ids is not None:
                print(f"[rlkit] note: evaluating at {long} tokens, beyond max_position_embeddings={max_pos}",
                      flush=True)
        callbacks = list(ctx.callbacks)
        if args.probe_steps > 0:
            title = Path(run.output_dir).name if run.name == "main" else run.name
            probe = CopyProbeConfig(seq_length=args.probe_seq_length, num_sequences=args.probe_num_sequences,
                                    batch_size=args.probe_batch_size, seed=args.probe_seed,
                                    threshold=args.probe_threshold, bos=args.probe_bos)
            callbacks.append(CopyingProbeCallback(ctx.tokenizer, args.probe_steps, probe, output_dir=run.output_dir,
                                                  plot=run.plot, title=f"{title} (pretrain)"))
        return PretrainTrainer(model=ctx.model, args=args, train_dataset=data.train, eval_dataset=data.eval,
                               validation_ids=data.validation_ids, processing_class=ctx.tokenizer,
                               callbacks=callbacks)

    def run(self, run, ctx):
        output = super().run(run, ctx)
        trainer, data = ctx.trainer, self._data
        if data.validation_ids is not None:
            metrics = trainer.evaluate()
            if trainer.args.process_index == 0:
                ppl = {int(k.rsplit("_", 1)[1]): v for k, v in metrics.items() if k.startswith("eval_ppl_")}
                report = {"step": trainer.state.global_step, "seq_length": trainer.args.seq_length,
                          "validation_tokens": int(data.validation_ids.numel()),
                          "eval_loss": metrics.get("eval_loss"), "ppl": {str(k): ppl[k] for k in sorted(ppl)}}
                out = Path(trainer.args.output_dir)
                out.mkdir(parents=True, exist_ok=True)
                (out / "perplexity.json").write_text(json.dumps(report, indent=2) + "\n")
                print("[rlkit] pretrain: perplexity " + ", ".join(f"@{k}: {ppl[k]:.3f}" for k in sorted(ppl)),
                      flush=True)
                output.summary["perplexity"] = report["ppl"]
        return output
