"""FIRST's offline teacher data: the teacher's top-k next-token distribution over every response token.

The teacher reads (prompt, response) pairs (the dataset's reference solutions, or responses it generates itself
through :func:`rlkit.rollout.generate`) and, at every response token, keeps the ``k`` most likely next-token ids
and their log-probabilities under the full softmax (the released ``generate.py``: ``torch.topk(log_softmax(logits),
5)``). The "other" bucket is not stored: its mass is ``1 - sum(top-k probabilities)``, computed from the stored
log-probs when needed.

Storage (one folder, :func:`prepare_topk` writes it, :func:`read_topk` reads it):

- ``topk.jsonl``: one line per row: ``prompt`` (rendered text), ``completion``, ``input_ids`` (prompt + response
  + EOS, the teacher's tokenizer), ``prompt_length``, ``start`` / ``end`` (the row's slice in the tensors below),
  ``heldout`` (true for the rows kept aside to choose the temperature);
- ``topk.safetensors``: ``ids`` int32 ``[N, k]`` and ``logprobs`` float32 ``[N, k]`` for the N response tokens
  of all rows, in row order (row ``r``'s token ``j`` predicts ``input_ids[prompt_length + j]``);
- ``topk_meta.json``: k, vocabulary size, teacher, token count, bytes of the stored tensors against full fp32
  and bf16 logits of the same tokens, and the temperature chosen by :func:`rlkit.methods.first.calibration.choose_tau`
  for each bucket layout (``tau``: ``{"topk": ..., "other": ...}``) with the criterion and its grid values.

Public entry point for the CLI (``rlkit distill prepare``)::

    prepare_topk(model, tokenizer, rows, out_dir, k=5, *, responses="dataset", heldout_fraction=0.1,
                 tau="auto", criterion="ece", use_other=True, max_length=1024, batch_size=16,
                 max_new_tokens=256, do_sample=False, temperature=1.0, seed=0, ece_bins=10,
                 teacher_name=None) -> dict

``rows``: dicts with a ``prompt`` (text, or chat messages rendered with the tokenizer's chat template) and, for
``responses="dataset"``, the response in ``completion``, ``response`` or ``solution``. Returns the summary
written to ``topk_meta.json`` (plus ``path``: the ``topk.jsonl``). See ``docs/methods/first.md``.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

__all__ = ["INDEX_FILE", "META_FILE", "TENSOR_FILE", "TopKData", "encode_pair", "is_topk_index", "prepare_topk",
           "read_topk", "response_rows", "teacher_topk"]

INDEX_FILE = "topk.jsonl"
TENSOR_FILE = "topk.safetensors"
META_FILE = "topk_meta.json"
RESPONSE_KEYS = ("completion", "response", "solution")


def encode_pair(tokenizer: Any, prompt: str, completion: str, max_length: int) -> tuple[list[int], int] | None:
    """``(prompt_ids + completion_ids + [eos], prompt_length)`` cut to ``max_length``, or None when the prompt
    leaves no room for one response token. The prompt is encoded as generation encodes it, the completion
    without special tokens (:mod:`rlkit.value`), the EOS appended as an id (what a generation that stopped looks
    like), so the last response token the teacher is read at is the EOS."""
    from ...value import encode_completion, encode_prompt

    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no EOS token (every response ends with it)")
    prompt_ids = encode_prompt(tokenizer, prompt)
    if not prompt_ids or len(prompt_ids) >= max_length:
        return None
    ids = (prompt_ids + encode_completion(tokenizer, completion) + [eos])[:max_length]
    return ids, len(prompt_ids)


def response_rows(rows: Sequence[dict], tokenizer: Any, need_response: bool = True,
                  source: str = "rows") -> list[dict]:
    """``[{prompt (text), completion}]`` from rows with a ``prompt`` and a response column (the first of
    ``completion``, ``response``, ``solution``); chat prompts are rendered with the chat template. With
    ``need_response`` False a missing response is kept as None (responses the teacher will generate)."""
    from ...data import DataError
    from ...rollout import render_prompts

    out = []
    for i, r in enumerate(rows):
        prompt = r.get("prompt")
        if isinstance(prompt, list):
            prompt = render_prompts([prompt], tokenizer)[0]
        if not isinstance(prompt, str):
            raise DataError(f"distill: row {i} of {source} has no prompt (a text or chat-message `prompt` field)")
        completion = next((r[k] for k in RESPONSE_KEYS if isinstance(r.get(k), str)), None)
        if completion is None and need_response:
            raise DataError(f"distill: row {i} of {source} has no response (a `completion`, `response` or "
                            "`solution` text); set responses: generate to have the teacher write them")
        out.append({"prompt": prompt, "completion": completion})
    if not out:
        raise DataError(f"distill: {source} has no row")
    return out


def _right_pad(seqs: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for r, s in enumerate(seqs):
        ids[r, :len(s)] = torch.tensor(s, dtype=torch.long)
        mask[r, :len(s)] = 1
    return ids, mask


@torch.no_grad()
def teacher_topk(model: Any, tokenizer: Any, items: list[tuple[list[int], int]], k: int = 5,
                 batch_size: int = 16) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per item ``(ids, prompt_length)``: the teacher's top-``k`` next-token ids (int32) and log-probs (float32),
    each ``[len(ids) - prompt_length, k]``, sorted by decreasing probability; row ``j`` is read at position
    ``prompt_length + j - 1`` and predicts token ``prompt_length + j``."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out: list[tuple[torch.Tensor, torch.Tensor]] = [None] * len(items)  # type: ignore[list-item]
    try:
        order = sorted(range(len(items)), key=lambda i: len(items[i][0]))
        for s in range(0, len(order), batch_size):
            idx = order[s:s + batch_size]
            ids, mask = _right_pad([items[i][0] for i in idx], pad)
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
            if k > logits.shape[-1]:
                raise ValueError(f"k {k} is larger than the teacher's vocabulary ({logits.shape[-1]})")
            for row, i in enumerate(idx):
                seq, p = items[i]
                lp = torch.log_softmax(logits[row, p - 1:len(seq) - 1], dim=-1)
                values, top = torch.topk(lp, k, dim=-1)
                out[i] = (top.to(torch.int32).cpu(), values.cpu())
    finally:
        if was_training:
            model.train()
    return out


@dataclass
class TopKData:
    """A prepared folder read back: ``rows`` (the index lines), ``ids`` / ``logprobs`` ``[N, k]`` and ``meta``."""

    rows: list[dict]
    ids: torch.Tensor
    logprobs: torch.Tensor
    meta: dict
    folder: Path

    def row_topk(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        r = self.rows[i]
        return self.ids[r["start"]:r["end"]], self.logprobs[r["start"]:r["end"]]

    def tau(self, use_other: bool) -> float:
        """The temperature chosen at preparation for the bucket layout (with or without the other bucket)."""
        tau = self.meta.get("tau") or {}
        value = tau.get("other" if use_other else "topk")
        if value is None:
            raise ValueError(f"{self.folder / META_FILE} holds no chosen temperature (prepared with a fixed tau or "
                             "without held-out rows); set tau to a number")
        return float(value)


def is_topk_index(path: str | Path) -> bool:
    """Whether ``path`` is a prepared ``topk.jsonl`` (its sidecar tensors and meta lie beside it)."""
    p = Path(path)
    return p.name == INDEX_FILE and (p.parent / TENSOR_FILE).is_file() and (p.parent / META_FILE).is_file()


def read_topk(path: str | Path) -> TopKData:
    """Read a prepared folder (or its ``topk.jsonl``)."""
    from safetensors.torch import load_file

    from ...data import DataError

    p = Path(path)
    folder = p if p.is_dir() else p.parent
    if not is_topk_index(folder / INDEX_FILE):
        raise DataError(f"{folder} is not a prepared top-k folder ({INDEX_FILE}, {TENSOR_FILE} and {META_FILE}); "
                        "write one with a distill_prepare stage or `rlkit distill prepare`")
    rows = [json.loads(line) for line in (folder / INDEX_FILE).read_text().splitlines() if line.strip()]
    tensors = load_file(str(folder / TENSOR_FILE))
    meta = json.loads((folder / META_FILE).read_text())
    return TopKData(rows, tensors["ids"], tensors["logprobs"], meta, folder)


def _teacher_rows(model, tokenizer, rows: list[dict], max_new_tokens: int, do_sample: bool, temperature: float,
                  batch_size: int, seed: int) -> list[str]:
    from ...rollout import GenerationSettings, generate

    settings = GenerationSettings(max_new_tokens=max_new_tokens, batch_size=batch_size, temperature=temperature,
                                  seed=seed)
    outs = generate(model, tokenizer, [r["prompt"] for r in rows], settings, do_sample=do_sample,
                    desc="teacher responses")
    return [o[0].text for o in outs]


def prepare_topk(model: Any, tokenizer: Any, rows: Sequence[dict], out_dir: str | Path, k: int = 5, *,
                 responses: str = "dataset", heldout_fraction: float = 0.1, tau: str | float = "auto",
                 criterion: str = "ece", use_other: bool = True, max_length: int = 1024, batch_size: int = 16,
                 max_new_tokens: int = 256, do_sample: bool = False, temperature: float = 1.0, seed: int = 0,
                 ece_bins: int = 10, teacher_name: str | None = None) -> dict:
    """Run the teacher over ``rows`` and write the top-``k`` folder ``out_dir`` (module docstring); return its
    summary (the meta, plus ``path``).

    ``responses``: ``dataset`` (the rows' own responses) or ``generate`` (the teacher writes one per training row;
    greedy unless ``do_sample``). ``heldout_fraction`` of the rows (at least one when ``tau`` is ``auto``,
    drawn with ``seed``) are kept aside with their *reference* responses to choose the temperature
    (:func:`rlkit.methods.first.calibration.choose_tau` with ``criterion`` ``ece`` or ``nll``): scoring the teacher
    on its own samples would make it look calibrated by construction. ``tau``: ``auto`` or a number recorded as
    the temperature of both layouts. ``use_other`` is the layout whose tau the summary reports first; both are
    chosen."""
    from safetensors.torch import save_file

    from ...data import DataError
    from .calibration import choose_tau, parse_tau

    if responses not in ("dataset", "generate"):
        raise ValueError(f"responses must be 'dataset' or 'generate', got {responses!r}")
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    if not 0.0 <= heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction must be in [0, 1), got {heldout_fraction}")
    fixed_tau = parse_tau(tau)
    norm = response_rows(rows, tokenizer, need_response=responses == "dataset")
    n_held = int(round(heldout_fraction * len(norm)))
    if fixed_tau is None:
        n_held = max(n_held, 1)
        if n_held >= len(norm):
            raise DataError(f"distill: {len(norm)} row(s): too few to keep held-out rows for tau auto; give more rows "
                            "or a fixed tau")
    order = list(range(len(norm)))
    random.Random(seed).shuffle(order)
    held = set(order[:n_held])
    if responses == "generate":
        train_idx = [i for i in range(len(norm)) if i not in held]
        texts = _teacher_rows(model, tokenizer, [norm[i] for i in train_idx], max_new_tokens, do_sample, temperature,
                              batch_size, seed)
        for i, text in zip(train_idx, texts):
            norm[i]["completion"] = text
        missing = [i for i in held if norm[i]["completion"] is None]
        if missing:
            raise DataError(f"distill: held-out row {missing[0]} has no reference response to choose tau on; give "
                            "rows with a solution or a fixed tau")

    items, kept, dropped = [], [], 0
    for i, r in enumerate(norm):
        enc = encode_pair(tokenizer, r["prompt"], r["completion"], max_length)
        if enc is None:
            dropped += 1
            continue
        items.append(enc)
        kept.append(i)
    if not items:
        raise DataError(f"distill: every prompt reaches max_length {max_length}; raise max_length")
    tops = teacher_topk(model, tokenizer, items, k=k, batch_size=batch_size)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    index, start = [], 0
    for i, (seq, p), (ids, _) in zip(kept, items, tops):
        end = start + ids.shape[0]
        index.append({"prompt": norm[i]["prompt"], "completion": norm[i]["completion"], "input_ids": seq,
                      "prompt_length": p, "start": start, "end": end, "heldout": i in held})
        start = end
    all_ids = torch.cat([t[0] for t in tops])
    all_lp = torch.cat([t[1] for t in tops])

    vocab = int(model.get_output_embeddings().weight.shape[0]) if model.get_output_embeddings() is not None \
        else len(tokenizer)
    n_tok = int(all_ids.shape[0])
    stored = all_ids.numel() * 4 + all_lp.numel() * 4
    meta: dict[str, Any] = {
        "k": k, "vocab_size": vocab, "teacher": teacher_name or getattr(model, "name_or_path", None),
        "responses": responses, "rows": len(index), "heldout_rows": sum(r["heldout"] for r in index),
        "dropped_rows": dropped, "tokens": n_tok, "storage": {"ids": "int32", "logprobs": "float32"},
        "bytes_topk": stored, "bytes_full_fp32": n_tok * vocab * 4, "bytes_full_bf16": n_tok * vocab * 2,
        "bytes_ratio_fp32": stored / max(n_tok * vocab * 4, 1), "bytes_ratio_bf16": stored / max(n_tok * vocab * 2, 1),
        "topk_mass": float(all_lp.exp().sum(-1).mean()) if n_tok else None,
        "criterion": criterion, "ece_bins": ece_bins, "use_other": use_other,
    }
    held_rows = [j for j, r in enumerate(index) if r["heldout"]]
    if fixed_tau is not None:
        meta["tau"] = {"topk": fixed_tau, "other": fixed_tau}
        meta["tau_source"] = "fixed"
    else:
        ids_h = torch.cat([tops[j][0] for j in held_rows])
        lp_h = torch.cat([tops[j][1] for j in held_rows])
        nxt = torch.cat([torch.tensor(items[j][0][items[j][1]:], dtype=torch.long) for j in held_rows])
        meta["tau"], meta["tau_search"] = {}, {}
        for layout, other in (("topk", False), ("other", True)):
            best, table = choose_tau(lp_h, ids_h, nxt, use_other=other, criterion=criterion, bins=ece_bins)
            meta["tau"][layout] = best
            meta["tau_search"][layout] = table
        meta["tau_source"] = f"auto ({criterion} on {len(held_rows)} held-out rows, {int(nxt.numel())} tokens)"
    save_file({"ids": all_ids.contiguous(), "logprobs": all_lp.contiguous()}, str(out / TENSOR_FILE))
    with (out / INDEX_FILE).open("w") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in index)
    (out / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")  # written last: a folder with it is complete
    summary = {k_: v for k_, v in meta.items() if k_ != "tau_search"}
    summary["path"] = str(out / INDEX_FILE)
    summary["tau_chosen"] = meta["tau"]["other" if use_other else "topk"]
    if not math.isfinite(summary["tau_chosen"]):
        summary["tau_chosen"] = str(summary["tau_chosen"])
    return summary
