"""``HeldOutAccuracyCallback``: greedy held-out accuracy every N optimizer steps during training.

Every rank runs the same evaluation (identical prompts and greedy decoding), so it is safe under
DDP/FSDP, where all ranks must take part in the same forward passes. The results go to
``state.log_history`` as ``heldout/accuracy`` and to ``self.history`` for plotting.
"""

from __future__ import annotations

from transformers import TrainerCallback

from .math_eval import GenerationSettings, evaluate_rows


class HeldOutAccuracyCallback(TrainerCallback):
    def __init__(self, rows: list[dict], tokenizer, every_steps: int, settings: GenerationSettings | None = None):
        self.rows = rows
        self.tokenizer = tokenizer
        self.every_steps = every_steps
        self.settings = settings or GenerationSettings()
        self.history: list[tuple[int, float]] = []

    def _run(self, state, model) -> None:
        if self.history and self.history[-1][0] == state.global_step:
            return
        summary, _ = evaluate_rows(model, self.tokenizer, self.rows, self.settings, progress=False)
        acc = summary["pass@1"]
        self.history.append((state.global_step, acc))
        state.log_history.append({"step": state.global_step, "heldout/accuracy": acc})
        if state.is_world_process_zero:
            print(f"[rlkit] step {state.global_step}: held-out accuracy {acc:.3f}", flush=True)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self.every_steps > 0:
            self._run(state, model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.every_steps > 0 and state.global_step % self.every_steps == 0:
            self._run(state, model)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if self.every_steps > 0:
            self._run(state, model)
