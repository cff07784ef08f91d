"""Prompt templates.

- ``plain``: ``Question: {question}\\nAnswer: `` as raw text (base models, tiny models).
- ``chat``: a conversational prompt (optional system message, then the user turn with the question and
  an instruction to reason step by step and box the answer); TRL applies the tokenizer's chat template.
- ``think_answer``: the raw-text R1-Zero style template used by the noisy-rewards paper (no chat
  template), ending in ``Assistant: <think>`` so the model continues its reasoning.
- ``raw``: the question is the whole prompt, as it is (rows whose prompt is already rendered, e.g. a game's
  conversation so far from a ``game_demos`` stage).
"""

from __future__ import annotations

BOXED_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."

THINK_ANSWER_TEMPLATE = (
    "A conversation between User and Assistant. The User asks a question, and the Assistant solves it. "
    "The Assistant first thinks about the reasoning process in the mind and then provides the User with "
    "the answer. The reasoning process and answer are enclosed within <think> </think> and <answer> "
    "</answer> tags, respectively, i.e., <think> reasoning process here </think> <answer> answer here "
    "</answer>. User: You must put your answer inside <answer> </answer> tags, i.e., <answer> answer here "
    "</answer>. And your final answer will be extracted automatically by the \\boxed{{}} tag. {question} "
    "Assistant: <think>"
)

PLAIN_TEMPLATE = "Question: {question}\nAnswer: "

TEMPLATES = ("plain", "chat", "think_answer", "raw")


def format_prompt(question: str, template: str, system_prompt: str | None = None):
    """The ``prompt`` cell for ``question``: a string, or a list of chat messages for ``chat``."""
    if template == "plain":
        return PLAIN_TEMPLATE.format(question=question)
    if template == "raw":
        return question
    if template == "think_answer":
        return THINK_ANSWER_TEMPLATE.format(question=question)
    if template == "chat":
        messages = []
        if system_prompt:
            messages.append({"role": "system", "content": system_prompt})
        messages.append({"role": "user", "content": f"{question}\n{BOXED_INSTRUCTION}"})
        return messages
    raise ValueError(f"unknown prompt template {template!r}; choose one of {', '.join(TEMPLATES)}")
