"""Outcome rewards that live in rlkit, not in the light ``rlkit_rewards``: a reward model loaded by hub id or path,
and any Python callable named ``module:attr``. Both have TRL's reward signature and run in the caller's process
(``in_process``: model rewards never go to the reward engine's workers); recipes name them like any reward::

    rewards:
      - name: reward_model           # AutoModelForSequenceClassification, its scalar score
        options: {path: RLHFlow/ArmoRM-Llama3-8B-v0.1, trust_remote_code: true}
      - name: callable               # f(prompts, completions, **columns) -> list[float | None]
        options: {function: my_pkg.rewards:score}

BOLT's outcome scorer (arXiv 2502.03860) is one of these or ``math_accuracy``; its stages hand the reward the
solution part of a response only (``rlkit.methods.bolt``).
"""

from __future__ import annotations

import importlib
from typing import Any, Callable

__all__ = ["CallableReward", "RewardModelReward", "resolve_callable"]


def _text(completion: Any) -> str:
    from rlkit_rewards.text import completion_text

    return completion_text(completion)


class RewardModelReward:
    """A sequence-classification reward model's scalar score of (question, response) (recipe: ``{name:
    reward_model, options: {path: ...}}``).

    The pair is written as a chat, ``[user: question, assistant: response]``, through the reward model's own chat
    template (``"question\\nresponse"`` when it has none); the question is the row's ``prompt_column`` (default
    ``question``: the raw query, not the policy's rendered prompt), else the prompt. The score is the output's
    ``score`` field when the model returns one (ArmoRM's custom head: its preference score), else ``logits[:, 0]``
    (``output`` forces either). Loaded on the first call, on the GPU when there is one; custom-code models need
    ``trust_remote_code: true``."""

    in_process = True
    example = "{path: RLHFlow/ArmoRM-Llama3-8B-v0.1, trust_remote_code: true}"

    def __init__(self, path: str, trust_remote_code: bool = False, prompt_column: str = "question",
                 batch_size: int = 8, dtype: str = "auto", max_length: int | None = None, output: str = "auto"):
        self.check_options(path=path, batch_size=batch_size, dtype=dtype, output=output)
        self.path, self.trust_remote_code, self.prompt_column = str(path), bool(trust_remote_code), prompt_column
        self.batch_size, self.dtype, self.max_length, self.output = int(batch_size), dtype, max_length, output
        self.__name__ = "reward_model"
        self._loaded: tuple | None = None

    @staticmethod
    def check_options(path: str = "", batch_size: int = 8, dtype: str = "auto", output: str = "auto", **_: Any) -> None:
        if not isinstance(path, str) or not path:
            raise ValueError("reward reward_model: option path must be a hub id or a folder")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"reward reward_model: batch_size must be a positive integer, got {batch_size!r}")
        if dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"reward reward_model: dtype must be auto, float32, bfloat16 or float16, got {dtype!r}")
        if output not in ("auto", "score", "logits"):
            raise ValueError(f"reward reward_model: output must be auto, score or logits, got {output!r}")

    def _load(self) -> tuple:
        if self._loaded is None:
            import torch
            from transformers import AutoModelForSequenceClassification, AutoTokenizer

            tok = AutoTokenizer.from_pretrained(self.path, trust_remote_code=self.trust_remote_code)
            if tok.pad_token is None:
                tok.pad_token = tok.eos_token
            kwargs = {} if self.dtype == "auto" else {"dtype": getattr(torch, self.dtype)}
            model = AutoModelForSequenceClassification.from_pretrained(
                self.path, trust_remote_code=self.trust_remote_code, **kwargs)
            if model.config.pad_token_id is None:
                model.config.pad_token_id = tok.pad_token_id
            device = "cuda" if torch.cuda.is_available() else "cpu"
            self._loaded = (tok, model.to(device).eval(), device)
        return self._loaded

    def texts(self, prompts: list, completions: list, columns: dict) -> list[str]:
        """The texts the reward model reads (the chat of each question and response)."""
        tok = self._load()[0]
        questions = columns.get(self.prompt_column) or prompts
        out = []
        for q, c in zip(questions, completions, strict=True):
            history = [{"role": "user", "content": q}] if isinstance(q, str) else [dict(m) for m in q]
            answer = _text(c)
            if getattr(tok, "chat_template", None):
                out.append(tok.apply_chat_template(history + [{"role": "assistant", "content": answer}],
                                                   tokenize=False))
            else:
                out.append("\n".join(str(m.get("content", "")) for m in history) + "\n" + answer)
        return out

    def __call__(self, prompts: list, completions: list, **columns: Any) -> list[float]:
        import torch

        tok, model, device = self._load()
        texts = self.texts(prompts, completions, columns)
        special = not getattr(tok, "chat_template", None)  # a chat template writes its own special tokens
        scores: list[float] = []
        for i in range(0, len(texts), self.batch_size):
            enc = tok(texts[i:i + self.batch_size], return_tensors="pt", padding=True, add_special_tokens=special,
                      truncation=self.max_length is not None, max_length=self.max_length)
            with torch.no_grad():
                out = model(**{k: v.to(device) for k, v in enc.items()})
            value = getattr(out, "score", None) if self.output in ("auto", "score") else None
            if value is None:
                if self.output == "score":
                    raise ValueError(f"reward reward_model: {self.path} returns no `score`; use output: logits")
                value = out.logits[:, 0]
            scores.extend(float(x) for x in value.reshape(len(enc["input_ids"]), -1)[:, 0].float().cpu())
        return scores


def resolve_callable(spec: str) -> Callable:
    """The object ``module:attr`` names (``attr`` may be dotted); one-line ValueError otherwise."""
    if not isinstance(spec, str) or spec.count(":") != 1 or not all(spec.split(":")):
        raise ValueError(f"reward callable: function must look like 'package.module:name', got {spec!r}")
    module, attr = spec.split(":")
    try:
        obj: Any = importlib.import_module(module)
    except ImportError as e:
        raise ValueError(f"reward callable: cannot import {module!r} ({e})") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"reward callable: {module!r} has no {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"reward callable: {spec} is not callable")
    return obj


class CallableReward:
    """Any Python reward function by reference (recipe: ``{name: callable, options: {function: pkg.mod:f}}``):
    ``f(prompts, completions, **columns) -> list[float | None]``, TRL's signature; with ``options: {...}``, ``f`` is
    a factory called once with them that returns such a function. It runs in the caller's process (it may load a
    model), without the reward engine's deadline."""

    in_process = True
    example = "{function: my_package.rewards:score}"

    def __init__(self, function: str, options: dict | None = None):
        self.check_options(function, options)
        self.function, self.options = function, options
        obj = resolve_callable(function)
        self._func = obj(**options) if options is not None else obj
        if not callable(self._func):
            raise ValueError(f"reward callable: {function}(**options) did not return a function")
        self.__name__ = function.split(":")[1].split(".")[-1]

    @staticmethod
    def check_options(function: str = "", options: dict | None = None) -> None:
        if options is not None and not isinstance(options, dict):
            raise ValueError(f"reward callable: options must be a mapping of the factory's arguments, got {options!r}")
        resolve_callable(function)

    def __call__(self, prompts: list, completions: list, **columns: Any) -> list[float | None]:
        out = list(self._func(prompts=prompts, completions=completions, **columns))
        if len(out) != len(completions):
            raise ValueError(f"reward callable {self.function}: {len(out)} scores for {len(completions)} completions")
        return out
