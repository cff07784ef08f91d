"""StepHint scorer side of the adaptive rule: p(end marker | prompt + chain prefix) read at every candidate cut
of a chain in one batched forward pass. See ``docs/methods/stephint.md``."""

from __future__ import annotations

import inspect

from .config import HintError


def _encode(tokenizer, texts: list[str]) -> list[list[int]]:
    if not texts:
        return []
    out = tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
    return [list(x) for x in out]


# --------------------------------------------------------------------------------------------------
# Scoring


def marker_token_id(tokenizer, end_marker: str) -> int:
    """The token whose probability stands for ``end_marker``: its first token (without special tokens)."""
    ids = _encode(tokenizer, [end_marker])[0] if end_marker else []
    if not ids:
        raise HintError(f"end_marker {end_marker!r} tokenizes to nothing")
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is not None and ids[0] == unk:
        raise HintError(f"end_marker {end_marker!r} starts with an unknown token for this tokenizer")
    return ids[0]


def _device(model):
    import torch

    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError, TypeError):
        return getattr(model, "device", None) or torch.device("cpu")


def _accepts_logits_to_keep(model) -> bool:
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False
    return "logits_to_keep" in params


def end_marker_probs(scorer, sequences: list[list[int]], read_at: list[list[int]], marker_id: int,
                     batch_size: int = 8, pad_id: int = 0, progress: bool = False) -> list[list[float]]:
    """``p(marker_id | sequence[: i + 1])`` for every ``i`` in ``read_at[r]`` (the next-token distribution
    after position ``i``), in one forward pass per batch of ``batch_size`` sequences (right padding; only the
    requested positions are projected onto the vocabulary when the model takes a ``logits_to_keep`` mask)."""
    import torch
    from tqdm.auto import tqdm

    if len(sequences) != len(read_at):
        raise HintError("sequences and read_at differ in length")
    out: list[list[float]] = [[] for _ in sequences]
    todo = [i for i in range(len(sequences)) if read_at[i]]
    order = sorted(todo, key=lambda i: len(sequences[i]))
    device = _device(scorer)
    use_mask = _accepts_logits_to_keep(scorer)
    was_training = getattr(scorer, "training", False)
    if hasattr(scorer, "eval"):
        scorer.eval()
    bar = tqdm(total=len(order), desc="score", disable=not progress, leave=False)
    try:
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                idx = order[start : start + batch_size]
                width = max(len(sequences[i]) for i in idx)
                ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
                att = torch.zeros((len(idx), width), dtype=torch.long)
                keep = torch.zeros((len(idx), width), dtype=torch.bool)
                for row, i in enumerate(idx):
                    seq = sequences[i]
                    ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
                    att[row, : len(seq)] = 1
                    pos = sorted(set(read_at[i]))
                    if pos[0] < 0 or pos[-1] >= len(seq):
                        raise HintError(f"read position out of range for a sequence of {len(seq)} tokens")
                    keep[row, pos] = True
                ids, att, keep = ids.to(device), att.to(device), keep.to(device)
                logits = None
                if use_mask:
                    try:
                        logits = _logits(scorer(input_ids=ids, attention_mask=att, logits_to_keep=keep))
                    except (TypeError, IndexError):
                        logits = None
                if logits is None:
                    logits = _logits(scorer(input_ids=ids, attention_mask=att))
                if logits.dim() == 3:
                    logits = logits[keep]
                if logits.dim() != 2 or logits.shape[0] != int(keep.sum()):
                    raise HintError(f"the scorer returned logits of shape {tuple(logits.shape)}; expected one row "
                                    f"per read position ({int(keep.sum())})")
                probs = []
                for chunk in logits.split(512):
                    chunk = chunk.float()
                    probs.append((chunk[:, marker_id] - torch.logsumexp(chunk, dim=-1)).exp())
                flat = torch.cat(probs).tolist()
                at = 0
                for row, i in enumerate(idx):
                    pos = sorted(set(read_at[i]))
                    table = dict(zip(pos, flat[at : at + len(pos)]))
                    at += len(pos)
                    out[i] = [table[p] for p in read_at[i]]
                bar.update(len(idx))
    finally:
        bar.close()
        if was_training and hasattr(scorer, "train"):
            scorer.train()
    return out


def _logits(output):
    logits = getattr(output, "logits", None)
    if logits is None:
        logits = output[0]
    return logits


def _prompt_ids(tokenizer, prompt) -> list[int]:
    if prompt is None:
        bos = getattr(tokenizer, "bos_token_id", None)
        return [bos] if bos is not None else []
    if not isinstance(prompt, str):
        from ....rollout import render_prompts

        prompt = render_prompts([prompt], tokenizer)[0]
    bos = getattr(tokenizer, "bos_token", None)
    add_special = not (bos and prompt.startswith(bos))
    return list(tokenizer(prompt, add_special_tokens=add_special, verbose=False)["input_ids"])
