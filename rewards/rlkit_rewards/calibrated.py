"""Reward model calibrated with the Reasoning Pattern Reward, from "The Climb Carves Wisdom Deeper Than the
Summit" (Lv et al., arXiv 2505.22653, Sec. on HelpSteer3; released code ``fsdp_workers.py``
``_forward_micro_batch``).

Per completion:

    think, answer = last <think>..</think> and last <answer>..</answer>; both non-empty, think before answer
    s = RM(chat history + assistant: answer) if the format holds, else 0   # the RM sees ONLY the answer text
    if training and s < tau:                                               # tau = 0.5
        s = min(s + alpha * RPR(think + answer), 1.0)                      # alpha = 0.1, RPR = rpr_open

Only false negatives are compensated. As in the code, RPR gets ``think + answer`` (the paper text says
the thought only). Broken format scores 0 and is not calibrated.

Options: ``model`` (required): a callable ``rm(prompts, answers) -> list[float]``, or a Hugging Face model
id/path loaded lazily (first call) as a sequence classifier with one label, read as ``logits[:, 0]``, fed
the prompt's chat history plus the answer as an assistant turn through the RM tokenizer's chat template
(plain "prompt\\nanswer" when it has none); torch/transformers are imported only then. ``tau`` (0.5),
``alpha`` (0.1), ``rpr`` (name of the pattern reward: "rpr_open" default, or "rpr"), ``rpr_options``,
``prefilled_think`` (False: the prompt ends with ``<think>``, so the completion has no opening tag),
``calibrate_in_eval`` (False), ``eval_column`` ("is_eval"), ``batch_size`` and ``device`` (HF models only).
"Training" follows ``noisy``: a ``trainer_state`` column is passed and the row's ``is_eval`` is not true.
The paper's RMs (``AngLv/NoisyRewards-in-RL-RM-acc-*``) are token classifiers read at the last token; for
those pass a callable.
"""

from __future__ import annotations

from typing import Any, Callable

from .noisy import is_training
from .registry import get, register
from .text import completion_text


def split_think_answer(text: str, prefilled_think: bool = False) -> tuple[str, str] | None:
    """(think, answer) from the last think and answer blocks, or None when the format is broken."""
    if prefilled_think and "<think>" not in text:
        text = "<think>" + text
    t_start, t_end = text.rfind("<think>"), text.rfind("</think>")
    a_start, a_end = text.rfind("<answer>"), text.rfind("</answer>")
    if min(t_start, t_end, a_start, a_end) < 0 or not (t_start < t_end <= a_start < a_end):
        return None
    think = text[t_start + len("<think>") : t_end]
    answer = text[a_start + len("<answer>") : a_end]
    if not think.strip() or not answer.strip():
        return None
    return think, answer  # raw block contents (the RM gets the answer stripped; RPR gets think + answer)


def _chat(prompt: Any, answer: str) -> list[dict]:
    if isinstance(prompt, str):
        history = [{"role": "user", "content": prompt}]
    else:
        history = [dict(m) for m in prompt]
    return history + [{"role": "assistant", "content": answer}]


def hf_reward_model(model_id: str, batch_size: int = 8, device: str | None = None) -> Callable[[list, list], list[float]]:
    """A callable RM from a HF sequence-classification checkpoint, loaded on first use."""
    state: dict[str, Any] = {}

    def load():
        import torch  # noqa: F401  (only here: the package must not import torch at load)
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(model_id)
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        model = AutoModelForSequenceClassification.from_pretrained(model_id, num_labels=1)
        if model.config.pad_token_id is None:
            model.config.pad_token_id = tok.pad_token_id
        dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
        state.update(tok=tok, model=model.to(dev).eval(), device=dev)

    def rm(prompts: list, answers: list[str]) -> list[float]:
        if not state:
            load()
        import torch

        tok, model = state["tok"], state["model"]
        texts = []
        for prompt, answer in zip(prompts, answers, strict=True):
            if getattr(tok, "chat_template", None):
                texts.append(tok.apply_chat_template(_chat(prompt, answer), tokenize=False))
            else:
                history = prompt if isinstance(prompt, str) else "\n".join(str(m.get("content", "")) for m in prompt)
                texts.append(f"{history}\n{answer}")
        scores: list[float] = []
        for i in range(0, len(texts), batch_size):
            enc = tok(texts[i : i + batch_size], return_tensors="pt", padding=True, truncation=True)
            enc = {k: v.to(state["device"]) for k, v in enc.items()}
            with torch.no_grad():
                logits = model(**enc).logits
            scores.extend(float(x) for x in logits[:, 0].float().cpu())
        return scores

    return rm


def _check_calibrated(model: Any = None, tau: float = 0.5, alpha: float = 0.1, rpr: str = "rpr_open",
                      rpr_options: dict | None = None, batch_size: int = 8, **_: Any) -> None:
    """The options of ``calibrated_rm``, checked without loading its reward model."""
    if model is None:
        raise ValueError("calibrated_rm needs option model: a callable rm(prompts, answers) -> list[float] "
                         "or a Hugging Face sequence-classification model id")
    if not (isinstance(model, str) or callable(model)):
        raise ValueError(f"calibrated_rm: model must be callable or a model id string, got {type(model).__name__}")
    if rpr not in ("rpr", "rpr_open"):
        raise ValueError(f"calibrated_rm: rpr must be 'rpr_open' or 'rpr', got {rpr!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"calibrated_rm: batch_size must be a positive integer, got {batch_size!r}")
    from .registry import check

    check(rpr, **(rpr_options or {}))


@register("calibrated_rm", check=_check_calibrated)
def calibrated_rm(model: Callable[[list, list], list[float]] | str | None = None, tau: float = 0.5,
                  alpha: float = 0.1, rpr: str = "rpr_open", rpr_options: dict | None = None,
                  prefilled_think: bool = False, calibrate_in_eval: bool = False, eval_column: str = "is_eval",
                  batch_size: int = 8, device: str | None = None):
    """RM score of the ``<answer>`` text, plus ``alpha`` * RPR when below ``tau`` (see the module docstring)."""
    if model is None:
        raise ValueError("calibrated_rm needs option model: a callable rm(prompts, answers) -> list[float] "
                         "or a Hugging Face sequence-classification model id")
    if rpr not in ("rpr", "rpr_open"):
        raise ValueError(f"calibrated_rm: rpr must be 'rpr_open' or 'rpr', got {rpr!r}")
    rm = hf_reward_model(model, batch_size, device) if isinstance(model, str) else model
    if not callable(rm):
        raise ValueError(f"calibrated_rm: model must be callable or a model id string, got {type(model).__name__}")
    pattern = get(rpr, **(rpr_options or {}))

    def calibrated_rm_reward(prompts: list, completions: list, **columns: Any) -> list[float | None]:
        parts = [split_think_answer(completion_text(c), prefilled_think) for c in completions]
        ok = [i for i, p in enumerate(parts) if p is not None]
        scores: list[float | None] = [0.0] * len(completions)
        if not ok:
            return scores
        rm_scores = list(rm([prompts[i] for i in ok], [parts[i][1].strip() for i in ok]))
        if len(rm_scores) != len(ok):
            raise ValueError(f"calibrated_rm: the reward model returned {len(rm_scores)} scores for {len(ok)} answers")
        low = []
        for i, s in zip(ok, rm_scores):
            scores[i] = float(s)
            if float(s) < tau and (calibrate_in_eval or is_training(columns, i, eval_column)):
                low.append(i)
        if low:
            texts = [parts[i][0] + parts[i][1] for i in low]
            bonus = pattern(prompts=[prompts[i] for i in low], completions=texts)
            for i, b in zip(low, bonus):
                scores[i] = min(scores[i] + alpha * float(b or 0.0), 1.0)
        return scores

    return calibrated_rm_reward
