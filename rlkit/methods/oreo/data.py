"""OREO's offline data: scored (prompt, completion, reward) rows -> token ids, action and state positions.

Rows: a ``sample`` stage's jsonl rows (``prompt``: the rendered text the model saw, ``completion``, ``reward``)
or the released format (``prompt``, ``response``, ``reward``). The raw reward must be 0 or 1 (a correctness
reward); the trainer maps it to ``R = reward * rew_mul + rew_add`` (default R in {0, 1}, the released math
scripts; ``rew_mul 2, rew_add -1`` gives the released ``train_pcl.py`` defaults, R in {-1, +1}). A bad row
(no reward, a reward outside {0, 1}, no completion) raises one :class:`rlkit.data.DataError` naming the row and
what to change.

Tokenisation (:func:`tokenize_example`): ``ids = prompt_ids + completion_ids + [eos_id]``. The prompt is
encoded as generation encodes it (special tokens unless the text already starts with BOS;
:func:`rlkit.value.encode_prompt`), the completion on its own without special tokens. The released code
tokenises ``prompt + response + " " + eos_token`` as text; we append the EOS *id* (no extra space), which is
exactly what a generated sequence that stopped on EOS looks like. At the token level the completion is encoded
whole; at the step level it is split with the configured splitter (:func:`rlkit.rollout.steps.split_steps`)
and each step is encoded on its own, so a step boundary is always a token boundary (for BPE tokenizers the ids
can differ slightly from encoding the completion whole). EOS belongs to the last step.

Truncation to ``max_length`` cuts the end of the response (the EOS too, when it does not fit; the row keeps its
reward); a row whose prompt alone leaves no room for one completion token is dropped (counted and printed).

Positions (logps index space, see :mod:`.losses`): token level, the states ``j = P-1 .. len-2``; step level,
``j = start - 1`` for the first token ``start`` of each step. The collator pads on the **right** (the released
code pads on the left; with the per-row masks below the padding side does not change any loss).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from ...rollout.steps import split_steps
from ...value import encode_completion, encode_prompt

__all__ = ["OREOCollator", "OREOExample", "load_oreo_rows", "normalize_rows", "tokenize_example", "tokenize_rows"]

REWARDS = (0.0, 1.0)


@dataclass
class OREOExample:
    """One tokenised row."""

    input_ids: list[int]
    action_mask: list[int]
    """1 for the completion tokens (EOS included)."""
    states: list[int]
    """State indices j (logps index space) that enter the losses."""
    reward: float
    """R, already mapped."""
    prompt_length: int
    truncated: bool = False


def load_oreo_rows(spec: Any) -> tuple[list[dict], str]:
    """The stored rows of ``spec`` (a ``DatasetSpec``) after its ``where`` filter, its ``balance`` selection
    and ``limit`` (no column normalisation), and the source's name."""
    from ... import data

    loader = getattr(data, "load_selected_rows", None)
    if loader is not None:
        raw, source, _ = loader(spec)
    else:  # pragma: no cover - older rlkit.data without the balance option
        raw, source, _ = data.load_raw_rows(spec)
        raw = data.select_rows(raw, getattr(spec, "where", None), source)
    if spec.limit is not None:
        raw = raw[: spec.limit]
    if not raw:
        where = f" matches where {spec.where}" if getattr(spec, "where", None) else ""
        raise data.DataError(f"oreo: dataset {spec.name!r} has no row{where}")
    return raw, source


def normalize_rows(rows: list[dict], source: str = "dataset", tokenizer: Any = None) -> list[dict]:
    """``[{prompt, completion, reward}]`` from ``sample``-stage or released-format rows; the first bad row
    raises one ``DataError`` that names it and says what to change. Chat-message prompts are rendered with
    ``tokenizer``'s chat template (without a tokenizer they are only checked)."""
    from ...data import DataError

    fix_source = ("train OREO on the rows of a `sample` stage (data.train: {from: STAGE, dataset: samples}) or a "
                  "jsonl with prompt, completion (or response) and a 0/1 reward")
    out = []
    for i, r in enumerate(rows):
        where = f"oreo: {source} row {i}" + (f" (prompt_index {r['prompt_index']})" if "prompt_index" in r else "")
        if "reward" not in r:
            raise DataError(f"{where} has no 'reward' field (fields: {', '.join(sorted(r))}); {fix_source}")
        completion = r.get("completion", r.get("response"))
        if "completion" not in r and "response" not in r:
            raise DataError(f"{where} has no 'completion' (or 'response') field (fields: {', '.join(sorted(r))}); "
                            f"{fix_source}")
        if not isinstance(completion, str):
            raise DataError(f"{where}: the completion is {type(completion).__name__}, not text; {fix_source}")
        prompt = r.get("prompt")
        if isinstance(prompt, list) and tokenizer is not None:  # chat messages: the chat template renders them
            from ...rollout import render_prompts

            prompt = render_prompts([prompt], tokenizer)[0]
        if not isinstance(prompt, (str, list)) or (isinstance(prompt, list) and tokenizer is not None):
            raise DataError(f"{where} has no text 'prompt' field (the rendered prompt the model saw); {fix_source}")
        reward = r["reward"]
        if reward is None or isinstance(reward, bool) or not isinstance(reward, (int, float)) \
                or (isinstance(reward, float) and math.isnan(reward)):
            raise DataError(f"{where} has reward {reward!r}: OREO needs a 0/1 correctness reward on every row "
                            "(a null reward means no gold answer: drop such rows with data.train.where, e.g. "
                            "{status: [ok, wrong]})")
        if float(reward) not in REWARDS:
            raise DataError(f"{where} has reward {reward!r}, outside {{0, 1}}: OREO reads the raw reward as "
                            "correct (1) / wrong (0) and maps it with trainer.rew_mul / rew_add; score the samples "
                            "with one 0/1 reward (e.g. math_accuracy alone, weight 1)")
        out.append({"prompt": prompt, "completion": completion, "reward": float(reward)})
    return out


def tokenize_example(tokenizer: Any, prompt: str, completion: str, reward: float, *, level: str = "token",
                     splitter: str = "newline", max_length: int = 1024) -> OREOExample | None:
    """Ids, action mask and state indices of one row (module docstring); None when the prompt leaves no room
    for a completion token within ``max_length``. ``reward`` is R (already mapped)."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("oreo: the tokenizer has no EOS token (every training sequence ends with it)")
    prompt_ids = encode_prompt(tokenizer, prompt)
    P = len(prompt_ids)
    if P < 1 or P >= max_length:
        return None
    if level == "step":
        steps = split_steps(completion, splitter) if completion else []
        pieces = [encode_completion(tokenizer, s) for s in steps]
        pieces = [p for p in pieces if p]
        starts, pos = [], P
        for p in pieces:
            starts.append(pos)
            pos += len(p)
        completion_ids = [t for p in pieces for t in p]
        if not starts:
            starts = [P]  # an empty completion: the one action is EOS
    else:
        completion_ids = encode_completion(tokenizer, completion)
        starts = []
    ids = prompt_ids + completion_ids + [eos]
    truncated = len(ids) > max_length
    ids = ids[:max_length]
    L = len(ids)
    action = [0] * P + [1] * (L - P)
    if level == "step":
        states = [s - 1 for s in starts if s <= L - 1]
    else:
        states = list(range(P - 1, L - 1))
    return OREOExample(ids, action, states, float(reward), P, truncated)


def tokenize_rows(rows: list[dict], tokenizer: Any, *, level: str = "token", splitter: str = "newline",
                  max_length: int = 1024, rew_mul: float = 1.0, rew_add: float = 0.0,
                  log: bool = True) -> list[OREOExample]:
    """:func:`tokenize_example` over normalised rows (``R = reward * rew_mul + rew_add``); rows whose prompt
    is too long are dropped and counted, truncated ones counted."""
    from ...data import DataError

    examples, dropped, truncated = [], 0, 0
    for r in rows:
        ex = tokenize_example(tokenizer, r["prompt"], r["completion"], r["reward"] * rew_mul + rew_add,
                              level=level, splitter=splitter, max_length=max_length)
        if ex is None:
            dropped += 1
            continue
        truncated += ex.truncated
        examples.append(ex)
    if log and (dropped or truncated):
        print(f"[rlkit] oreo: {dropped} row(s) dropped (prompt alone reaches max_length {max_length}), "
              f"{truncated} truncated (response cut at max_length)", flush=True)
    if not examples:
        raise DataError(f"oreo: every one of the {len(rows)} rows has a prompt of max_length {max_length} tokens or "
                        "more; raise trainer.max_length")
    return examples


class OREODataset(torch.utils.data.Dataset):
    """A list of :class:`OREOExample` as a map-style dataset."""

    def __init__(self, examples: list[OREOExample]):
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> OREOExample:
        return self.examples[i]


class OREOCollator:
    """Right-pads a list of :class:`OREOExample` into the batch the trainer reads: ``input_ids``,
    ``attention_mask``, ``action_mask`` ``[B, L]``; ``state_mask`` ``[B, L-1]``; ``rewards``, ``lengths``,
    ``prompt_lengths`` ``[B]``."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, examples: list[OREOExample]) -> dict[str, torch.Tensor]:
        B = len(examples)
        L = max(len(e.input_ids) for e in examples)
        ids = torch.full((B, L), self.pad_token_id, dtype=torch.long)
        attn = torch.zeros((B, L), dtype=torch.long)
        action = torch.zeros((B, L), dtype=torch.long)
        state = torch.zeros((B, max(L - 1, 1)), dtype=torch.long)
        for b, e in enumerate(examples):
            n = len(e.input_ids)
            ids[b, :n] = torch.tensor(e.input_ids)
            attn[b, :n] = 1
            action[b, :n] = torch.tensor(e.action_mask)
            if e.states:
                state[b, torch.tensor(e.states)] = 1
        return {"input_ids": ids, "attention_mask": attn, "action_mask": action, "state_mask": state[:, :L - 1],
                "rewards": torch.tensor([e.reward for e in examples], dtype=torch.float32),
                "lengths": attn.sum(1), "prompt_lengths": torch.tensor([e.prompt_length for e in examples])}
