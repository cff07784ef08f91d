"""``AuxLossMixin``: adds the auxiliary losses of patched layers (MoE load balancing) to a Trainer's loss.

Patched layers (``rlkit.patches.moe``) leave ``aux_loss`` and ``aux_loss_coef`` on themselves after each
forward pass (spec section 0: "auxiliary losses have to be stashed on the module and added by a Trainer
``compute_loss`` override"). This mixin goes before any ``transformers.Trainer`` subclass (the pretraining
lab, TRL's SFT and GRPO trainers): after the parent's ``compute_loss`` it adds ``sum(coef * aux_loss)``
over the model's modules, in training only (evaluation losses stay comparable with unpatched models),
and logs the un-weighted mean as ``aux_loss`` (averaged over the steps since the last log).

Gradient accumulation: when the parent's loss is already normalised over the whole accumulated batch
(``Trainer.loss_is_scaled_for_ga``, or a model that takes ``num_items_in_batch``, as in TRL's GRPO and
causal-LM training), the per-micro-batch auxiliary loss is divided by the accumulation steps, so the
optimizer sees its mean over the micro-batches either way. A model with no such layer is untouched
(nothing is added, nothing is logged).
"""

from __future__ import annotations

from ..patches import auxiliary_loss


class AuxLossMixin:
    _aux_log: list[float]

    def _aux_loss_scaled_for_ga(self, num_items_in_batch) -> bool:
        scaled = getattr(self, "loss_is_scaled_for_ga", None)
        if scaled is not None:
            return bool(scaled)
        return bool((getattr(self, "model_accepts_loss_kwargs", False) and num_items_in_batch is not None)
                    or getattr(self, "compute_loss_func", None) is not None)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        out = super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        if not model.training:
            return out
        weighted, raw = auxiliary_loss(self.accelerator.unwrap_model(model))
        if raw is not None:
            self.__dict__.setdefault("_aux_log", []).append(raw)
        if weighted is None:
            return out
        if self._aux_loss_scaled_for_ga(num_items_in_batch):
            weighted = weighted / self.current_gradient_accumulation_steps
        if return_outputs:
            loss, outputs = out
            return loss + weighted.to(loss.device), outputs
        return out + weighted.to(out.device)

    def log(self, logs: dict, *args, **kwargs):
        values = self.__dict__.get("_aux_log")
        if values and any(k.startswith("loss") for k in logs):
            logs = {**logs, "aux_loss": sum(values) / len(values)}
            values.clear()
        return super().log(logs, *args, **kwargs)
