"""OREO: Offline REasoning Optimization (arXiv 2412.16145), ``method: oreo``.

OREO trains a policy and a value function (critic) together on offline (prompt, completion, 0/1 reward) data
by the soft Bellman equation of the KL-regularised objective: the critic regresses
``V(s_t) = R - beta * sum_{i>=t} log pi/pi_ref`` (Eq. 8) and the policy makes each action's log-ratio consistent
with the critic (Eq. 9, token level; a step-level and a response-level variant), plus ``alpha`` times a KL
regulariser to the frozen reference. The losses, in the released code's tensor layout, are in :mod:`.losses`;
the data layout in :mod:`.data`; equations, defaults and every choice where the paper and code are silent in
``docs/methods/oreo.md``.

- :class:`OREOConfig`: ``transformers.TrainingArguments`` plus OREO's settings (TRL style), with the paper's
  defaults (beta 0.03, alpha by level, LR 5e-6, cosine with 3% warm-up, Adam betas (0.9, 0.95), no weight decay,
  clipping 1.0).
- :class:`OREOTrainer`: a ``transformers.Trainer`` whose model is :class:`OREOModel` (policy + critic; the frozen
  reference is held outside the optimizer). One optimizer with two parameter groups (policy LR, critic LR): the
  policy loss uses the critic's values detached and the value loss the policy's log-ratios detached, so one
  combined step updates every parameter exactly as the released order (critic step, then actor forward and
  step, two Adam optimizers) does; a test checks it. Gradients are clipped per model (policy and critic
  separately, as two DeepSpeed engines do). Checkpoints hold the policy (the folder) and the critic
  (``critic/``, a :class:`rlkit.value.ValueModel`); resume restores both and the optimizer, scheduler and RNG.
- :class:`OREOMethod` (``method: oreo``): rows of a ``sample`` stage (or a jsonl) -> :class:`OREOTrainer`; the
  run's ``final/`` is the policy, ``final/critic`` the critic, ``final/oreo.json`` what the run used.
"""

from __future__ import annotations

import copy
import json
import os
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from transformers import Trainer, TrainingArguments

from ...config import RecipeError
from ...value import ValueModel, enable_checkpointing, is_value_model_dir
from .. import register_method
from ..base import DONE_MARKER, LoggedMetricsMixin, StageOutput, TrainerMethod
from . import losses as L
from .data import OREOCollator, OREODataset, OREOExample, load_oreo_rows, normalize_rows, tokenize_rows

__all__ = ["DEFAULT_ALPHA", "OREOConfig", "OREOMethod", "OREOModel", "OREOTrainer", "OREO_INFO", "CRITIC_DIR"]

DEFAULT_ALPHA = {"token": 0.01, "step": 0.1, "response": 0.3}
STEP_SPLITTERS = ("newline", "paragraph", "sentence", "latex_sentence")
CRITIC_DIR = "critic"
OREO_INFO = "oreo.json"


@dataclass
class OREOConfig(TrainingArguments):
    """Settings of the OREO trainer (recipe section ``trainer:``): every ``TrainingArguments`` field, plus
    OREO's own. Defaults are the paper's (A.3) and the released scripts'."""

    beta: float = 0.03
    """KL coefficient of the soft Bellman equation (the paper: 0.03)."""
    alpha: float | None = None
    """Weight of the KL regulariser to the reference (None: 0.01 token level, 0.1 step level, 0.3 response level,
    the paper's)."""
    loss_level: Literal["token", "step", "response"] = "token"
    """Policy loss: token (Eq. 9, default), step (an action is a whole reasoning step) or response (Eq. 10)."""
    kl_estimator: Literal["exact", "k3"] = "exact"
    """KL regulariser: exact full-vocabulary KL (the released scripts' --unbiased_kl) or the k3 estimator at the
    taken token (needs no full reference log-softmax)."""
    critic_learning_rate: float | None = None
    """Critic learning rate (None: learning_rate; the paper uses 1e-4 with a LoRA critic)."""
    critic_lora: dict | None = None
    """LoRA critic (e.g. {r: 64, lora_alpha: 64, target_modules: all-linear}, the paper's 7B setting); None: the
    critic is trained fully."""
    rew_mul: float = 1.0
    """R = reward * rew_mul + rew_add for the raw 0/1 reward (1, 0: R in {0, 1}, the released math scripts)."""
    rew_add: float = 0.0
    """See rew_mul (2, -1: R in {-1, +1}, the defaults of the released train_pcl.py)."""
    step_splitter: Literal["newline", "paragraph", "sentence", "latex_sentence"] = "newline"
    """How completions are split into steps for loss_level step ("newline" for GSM8K-style data,
    "latex_sentence" for MATH: "\\n", ". ", ".$ ")."""
    max_length: int = 1024
    """Longest prompt + completion + EOS in tokens (the response end is cut; the paper: 2048 for math)."""
    reference: Literal["start", "inherit"] = "start"
    """Frozen reference: start (the stage's starting model: in iterative OREO the reference resets every round)
    or inherit (when the starting model is an earlier OREO stage's output, keep the reference it recorded)."""
    critic_init: Literal["auto", "model"] = "auto"
    """auto: continue from the starting model's critic/ when it has one (an earlier OREO round), else start from
    the model with a zero head; model: always a fresh critic from the starting model."""

    learning_rate: float = field(default=5e-6, metadata={"help": "Policy learning rate (the paper: 5e-6)."})
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "Learning-rate schedule (the paper: cosine)."})
    warmup_steps: float = field(default=0.03, metadata={"help": "Warm-up steps, or a fraction of the run below 1 "
                                                                 "(the paper: 3%)."})
    adam_beta2: float = field(default=0.95, metadata={"help": "Adam beta2 (the released code: 0.95)."})
    weight_decay: float = field(default=0.0, metadata={"help": "Weight decay (the released code: 0)."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping, per model (policy and critic "
                                                                 "each; the released code: 1.0)."})
    remove_unused_columns: bool = field(default=False, metadata={"help": "Kept False: the OREO batch is built by "
                                                                         "its own collator."})

    def __post_init__(self):
        if self.beta < 0:
            raise ValueError(f"beta must be >= 0, got {self.beta}")
        if self.loss_level not in DEFAULT_ALPHA:
            raise ValueError(f"loss_level must be one of token, step, response, got {self.loss_level!r}")
        if self.kl_estimator not in ("exact", "k3"):
            raise ValueError(f"kl_estimator must be exact or k3, got {self.kl_estimator!r}")
        if self.step_splitter not in STEP_SPLITTERS:
            raise ValueError(f"step_splitter must be one of {', '.join(STEP_SPLITTERS)}, got {self.step_splitter!r}")
        if self.reference not in ("start", "inherit"):
            raise ValueError(f"reference must be start or inherit, got {self.reference!r}")
        if self.critic_init not in ("auto", "model"):
            raise ValueError(f"critic_init must be auto or model, got {self.critic_init!r}")
        if self.alpha is None:
            self.alpha = DEFAULT_ALPHA[self.loss_level]
        if self.alpha < 0:
            raise ValueError(f"alpha must be >= 0, got {self.alpha}")
        if self.max_length < 2:
            raise ValueError(f"max_length must be at least 2, got {self.max_length}")
        if self.critic_learning_rate is not None and self.critic_learning_rate < 0:
            raise ValueError(f"critic_learning_rate must be >= 0, got {self.critic_learning_rate}")
        if self.critic_lora is not None:
            from peft import LoraConfig

            try:
                LoraConfig(**self.critic_lora)
            except TypeError as e:
                raise ValueError(f"critic_lora: {e}") from None
        super().__post_init__()

    @property
    def critic_lr(self) -> float:
        return self.learning_rate if self.critic_learning_rate is None else self.critic_learning_rate


class OREOModel(nn.Module):
    """The trained pair: ``policy`` (a causal LM) and ``critic`` (a :class:`ValueModel`). ``forward`` runs both on
    the same ids (one call, so DDP sees every trained parameter); generation goes to the policy, so held-out
    evaluation of the trainer's model evaluates the policy."""

    def __init__(self, policy: nn.Module, critic: ValueModel):
        super().__init__()
        self.policy = policy
        self.critic = critic

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        logits = self.policy(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        values = self.critic(input_ids, attention_mask)
        return {"logits": logits, "values": values}

    def generate(self, *args, **kwargs):
        return self.policy.generate(*args, **kwargs)

    @property
    def generation_config(self):
        return self.policy.generation_config

    @property
    def config(self):
        return self.policy.config

    @property
    def name_or_path(self) -> str:
        return getattr(self.policy, "name_or_path", "")

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs: dict | None = None, **kwargs) -> None:
        enable_checkpointing(self.policy, activation_checkpointing_kwargs, **kwargs)
        self.critic.activation_checkpointing_enable(activation_checkpointing_kwargs, **kwargs)


class OREOTrainer(LoggedMetricsMixin, Trainer):
    """OREO on a ``transformers.Trainer`` (module docstring).

    ``model``: the policy (trained in place); ``ref_model``: the frozen reference (default: a deep copy of the
    policy); ``critic``: a :class:`ValueModel` (default: from the policy, zero head, LoRA per
    ``args.critic_lora``). ``train_dataset``: rows with ``prompt``, ``completion`` (or ``response``) and a 0/1
    ``reward`` (a list of dicts or a ``datasets.Dataset``), or already tokenised :class:`OREOExample` items; an
    ``eval_dataset`` the same (``evaluate`` reports the losses on it). ``info``: extra facts written to
    ``oreo.json`` with every save."""

    def __init__(self, model: nn.Module, args: OREOConfig, train_dataset: Any = None, processing_class: Any = None,
                 ref_model: nn.Module | None = None, critic: ValueModel | None = None, data_collator: Any = None,
                 callbacks: list | None = None, info: dict | None = None, **kwargs: Any):
        if processing_class is None:
            raise ValueError("OREOTrainer needs the tokenizer (processing_class)")
        if not isinstance(args, OREOConfig):
            raise TypeError(f"OREOTrainer needs an OREOConfig, got {type(args).__name__}")
        tokenizer = processing_class
        if ref_model is None:
            ref_model = copy.deepcopy(model)
        if critic is None:
            critic = ValueModel.from_causal_lm(model, lora=args.critic_lora)
        if critic.tokenizer is None:
            critic.attach_tokenizer(tokenizer)
        if train_dataset is not None:
            train_dataset = self._prepare_dataset(train_dataset, tokenizer, args)
        if kwargs.get("eval_dataset") is not None:  # evaluation reports the same losses on held-out rows
            eval_dataset = kwargs["eval_dataset"]
            kwargs["eval_dataset"] = {k: self._prepare_dataset(v, tokenizer, args) for k, v in eval_dataset.items()} \
                if isinstance(eval_dataset, dict) else self._prepare_dataset(eval_dataset, tokenizer, args)
        if data_collator is None:
            pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
            data_collator = OREOCollator(pad)
        super().__init__(model=OREOModel(model, critic), args=args, data_collator=data_collator,
                         train_dataset=train_dataset, processing_class=tokenizer, callbacks=callbacks, **kwargs)
        self.loss_is_scaled_for_ga = False  # compute_loss returns a per-micro-batch mean: Trainer divides by GA
        ref_model.requires_grad_(False)
        ref_model.eval()
        self.ref_model = ref_model.to(self.accelerator.device)
        self.info = dict(info or {})
        self._metrics: dict[str, defaultdict] = {"train": defaultdict(list), "eval": defaultdict(list)}

    # ---- data --------------------------------------------------------------------------------------
    @staticmethod
    def _prepare_dataset(dataset: Any, tokenizer: Any, args: OREOConfig) -> OREODataset:
        if isinstance(dataset, OREODataset):
            return dataset
        items = list(dataset) if not isinstance(dataset, list) else dataset
        if items and all(isinstance(x, OREOExample) for x in items):
            return OREODataset(items)
        rows = normalize_rows([dict(x) for x in items], "train_dataset", tokenizer)
        return OREODataset(tokenize_rows(rows, tokenizer, level=args.loss_level, splitter=args.step_splitter,
                                         max_length=args.max_length, rew_mul=args.rew_mul, rew_add=args.rew_add))

    # ---- optimizer: one, with a policy and a critic parameter group ------------------------------------
    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        if self.optimizer is not None:
            return self.optimizer
        opt_model = self.accelerator.unwrap_model(self.model if model is None else model)
        decay = set(self.get_decay_parameter_names(opt_model))
        groups = []
        for part, lr in (("policy", self.args.learning_rate), ("critic", self.args.critic_lr)):
            named = [(n, p) for n, p in opt_model.named_parameters() if n.startswith(part + ".") and p.requires_grad]
            for wd, pick in ((self.args.weight_decay, True), (0.0, False)):
                params = [p for n, p in named if (n in decay) == pick]
                if params:
                    groups.append({"params": params, "weight_decay": wd, "lr": lr})
        optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
        optimizer_kwargs = {k: v for k, v in optimizer_kwargs.items() if k not in ("lr", "params", "model")}
        self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        return self.optimizer

    # ---- gradient clipping: per model ----------------------------------------------------------------
    def _clip_grad_norm(self, model: nn.Module):
        """Clip the policy's and the critic's gradients each to ``max_grad_norm`` (two engines in the released
        code); returns the norm of all gradients before clipping. Under DeepSpeed / FSDP the joint clipping of
        the framework applies (documented)."""
        from accelerate.utils import DistributedType

        if self.accelerator.distributed_type in (DistributedType.DEEPSPEED, DistributedType.FSDP,
                                                 DistributedType.XLA) or self._has_mixed_mesh_grads(model):
            return super()._clip_grad_norm(model)
        self.accelerator.unscale_gradients()
        unwrapped = self.accelerator.unwrap_model(model)
        norms = []
        for part in ("policy", "critic"):
            params = [p for p in getattr(unwrapped, part).parameters() if p.grad is not None]
            norm = torch.nn.utils.clip_grad_norm_(params, self.args.max_grad_norm) if params \
                else torch.zeros((), device=self.args.device)
            norms.append(norm)
            self._metrics["train"][f"grad_norm_{part}"].append(float(norm))
        return torch.sqrt(sum(n.float() ** 2 for n in norms))

    # ---- loss ----------------------------------------------------------------------------------------
    def compute_loss(self, model: nn.Module, inputs: dict[str, torch.Tensor], return_outputs: bool = False,
                     num_items_in_batch: Any = None):
        """Value loss (Eq. 8) + policy loss (Eq. 9 / step / Eq. 10) + alpha * KL for one micro-batch.

        Order of the released code per micro-batch: (1) policy log-probs without gradient, (2) critic forward,
        (3) reference forward, (4) value loss, (5) actor forward with gradient, policy loss + alpha KL. Here the
        policy runs once with gradient and the value loss takes its log-probs detached (the same numbers and
        gradients, one forward less); the critic's values enter the policy loss detached."""
        args: OREOConfig = self.args
        ids, attn = inputs["input_ids"], inputs["attention_mask"]
        action_mask, state_mask = inputs["action_mask"], inputs["state_mask"]
        rewards, lengths = inputs["rewards"], inputs["lengths"]
        out = model(input_ids=ids, attention_mask=attn)
        logits = out["logits"][:, :-1]
        values = out["values"][:, :-1]
        targets = ids[:, 1:]
        with torch.no_grad():
            ref_logits = self.ref_model(input_ids=ids, attention_mask=attn, use_cache=False).logits[:, :-1]
        if args.kl_estimator == "exact":
            logp_all = torch.log_softmax(logits.float(), dim=-1)
            ref_logp_all = torch.log_softmax(ref_logits.float(), dim=-1)
            logps = logp_all.gather(-1, targets[..., None]).squeeze(-1)
            ref_logps = ref_logp_all.gather(-1, targets[..., None]).squeeze(-1)
            kl = L.exact_kl(logp_all, ref_logp_all, action_mask)
        else:
            logps = L.selective_log_softmax(logits, targets)
            ref_logps = L.selective_log_softmax(ref_logits, targets)
            kl = L.k3_kl(logps, ref_logps, action_mask)
        del ref_logits
        v_loss = L.value_loss(values, logps, ref_logps, action_mask, state_mask, rewards, args.beta)
        if args.loss_level == "token":
            p_loss = L.token_policy_loss(logps, ref_logps, values, action_mask, state_mask, rewards, args.beta)
        elif args.loss_level == "step":
            p_loss = L.step_policy_loss(logps, ref_logps, values, action_mask, state_mask, lengths, rewards, args.beta)
        else:
            p_loss = L.response_policy_loss(logps, ref_logps, values, action_mask, state_mask, rewards, args.beta)
        loss = v_loss + p_loss + args.alpha * kl

        mode = "train" if model.training else "eval"
        with torch.no_grad():
            j0 = L.first_state_index(state_mask)[:, None]
            ratio = L.accumulated_logps(logps - ref_logps, action_mask).gather(1, j0).squeeze(1)
            stats = torch.stack([v_loss.detach(), p_loss.detach(), kl.detach(), values.detach().gather(1, j0).mean(),
                                 rewards.float().mean(), (args.beta * ratio).mean()])
            stats = self.accelerator.gather_for_metrics(stats[None]).mean(0).tolist()
        for name, value in zip(("value_loss", "policy_loss", "kl", "value_s0", "reward", "beta_logratio_s0"), stats):
            self._metrics[mode][name].append(value)
        return (loss, out) if return_outputs else loss

    # ---- saving and loading: policy in the folder, critic in critic/ ------------------------------------
    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        self.save_parts(output_dir, state_dict=state_dict, with_args=True)

    def save_parts(self, output_dir: str | os.PathLike, state_dict: dict | None = None,
                   with_args: bool = False) -> None:
        """Write the policy (safetensors, with the tokenizer) to ``output_dir``, the critic to
        ``output_dir/critic`` and ``oreo.json``; ``with_args`` adds ``training_args.bin`` (checkpoints)."""
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        unwrapped = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        if state_dict is None:
            state_dict = unwrapped.state_dict()
        policy_sd = {k[len("policy."):]: v for k, v in state_dict.items() if k.startswith("policy.")}
        critic_sd = {k[len("critic."):]: v for k, v in state_dict.items() if k.startswith("critic.")}
        unwrapped.policy.save_pretrained(str(out), state_dict=policy_sd, safe_serialization=True)
        unwrapped.critic.save_pretrained(out / CRITIC_DIR, state_dict=critic_sd)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(str(out))
            self.processing_class.save_pretrained(str(out / CRITIC_DIR))
        args: OREOConfig = self.args
        info = {"method": "oreo", **self.info, "loss_level": args.loss_level, "beta": args.beta, "alpha": args.alpha,
                "kl_estimator": args.kl_estimator, "rew_mul": args.rew_mul, "rew_add": args.rew_add,
                "critic": CRITIC_DIR, "critic_lora": args.critic_lora, "global_step": self.state.global_step}
        (out / OREO_INFO).write_text(json.dumps(info, indent=2, default=str) + "\n")
        if with_args:
            torch.save(self.args, str(out / "training_args.bin"))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        """Load the policy and the critic of a checkpoint into the trained pair (optimizer, scheduler and RNG
        are restored by ``Trainer``)."""
        from accelerate.utils import DistributedType

        if self.accelerator.distributed_type == DistributedType.FSDP:
            raise ValueError("OREO: resuming under FSDP is not supported (use DDP or DeepSpeed)")
        ckpt = Path(resume_from_checkpoint)
        if not (ckpt / CRITIC_DIR).is_dir():
            raise ValueError(f"{ckpt} is not an OREO checkpoint (no {CRITIC_DIR}/ folder)")
        unwrapped = self.accelerator.unwrap_model(model if model is not None else self.model)
        load_causal_lm_weights(unwrapped.policy, ckpt)
        unwrapped.critic.load_weights(ckpt / CRITIC_DIR)

    def _load_best_model(self) -> None:
        if self.is_deepspeed_enabled:
            return super()._load_best_model()
        self._load_from_checkpoint(self.state.best_model_checkpoint)


def load_causal_lm_weights(model: nn.Module, folder: Path) -> None:
    """Load a ``save_pretrained`` folder's weights (one safetensors file or shards) into ``model`` in place."""
    from safetensors.torch import load_file
    from transformers.trainer_utils import load_sharded_checkpoint

    single = folder / "model.safetensors"
    if not single.is_file():
        load_sharded_checkpoint(model, str(folder), strict=False)
        return
    missing, unexpected = model.load_state_dict(load_file(str(single)), strict=False)
    tied = set()
    for key in missing:
        if key.endswith("lm_head.weight") and getattr(model.config, "tie_word_embeddings", False):
            tied.add(key)
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise ValueError(f"{folder}: policy weights do not fit the model (missing {missing[:3]}, unexpected "
                         f"{unexpected[:3]})")


# --------------------------------------------------------------------------------------------------
# The method


def _read_info(path: str | None) -> dict | None:
    if not path:
        return None
    f = Path(path) / OREO_INFO
    if not f.is_file():
        return None
    try:
        return json.loads(f.read_text())
    except json.JSONDecodeError:
        return None


def resolve_reference(start: str, mode: str = "start") -> str:
    """The reference model of a stage that starts from ``start``: ``start`` itself, or with ``mode`` inherit
    and ``start`` an earlier OREO stage's output (its ``oreo.json``), the reference that stage recorded."""
    info = _read_info(start)
    if mode != "inherit" or not info or not info.get("reference"):
        return str(start)
    reference = str(info["reference"])
    if not Path(reference).is_dir():
        raise RecipeError(f"trainer.reference: inherit: the reference {reference!r} recorded in {start}/{OREO_INFO} "
                          "is not a saved model folder (an in-memory model cannot be reloaded); use reference: start")
    return reference


@register_method
class OREOMethod(TrainerMethod):
    """``method: oreo``: OREO on scored samples (module docstring)."""

    name = "oreo"
    rewards = "none"

    def config_class(self) -> type:
        return OREOConfig

    def check(self, run: Any, config: OREOConfig, where: str) -> None:
        from ...data import BENCHMARKS

        prefix = where[: -len("trainer")] if where.endswith("trainer") else ""
        spec = run.data.train
        if spec.source is None and (spec.name == "synthetic" or spec.name in BENCHMARKS):
            raise RecipeError(f"{prefix}data.train: oreo trains on scored samples, not on the {spec.name!r} problems: "
                              "set data.train to {from: SAMPLE_STAGE, dataset: samples} (a `sample` stage before "
                              "this one) or jsonl:FILE with prompt, completion (or response) and a 0/1 reward")
        if spec.name.startswith("jsonl:") and Path(spec.name[len("jsonl:"):]).is_file():
            from ...data import DataError

            try:  # a file that is already there: bad rows fail now, before any model loads
                normalize_rows(*load_oreo_rows(spec))
            except DataError as e:
                raise RecipeError(f"{prefix}data.train: {e}") from None
        if getattr(run.model, "lora", None) is not None:
            raise RecipeError(f"{prefix}model.lora: OREO trains the policy fully (as the paper); for a LoRA critic "
                              "set trainer.critic_lora")

    def build_trainer(self, run: Any, ctx: Any, args: OREOConfig) -> OREOTrainer:
        from ...models import load_model
        from ...recipe import ModelSpec

        start = ctx.model_path or run.model.name
        reference_name = resolve_reference(start, args.reference)
        ref_model = None
        if reference_name != str(start):
            print(f"[rlkit] oreo: reference inherited from {start}: {reference_name}", flush=True)
            ref_model, _ = load_model(ModelSpec(name=reference_name, dtype=run.model.dtype), seed=run.seed)
            ref_model.to(next(ctx.model.parameters()).dtype)
        if ref_model is None:
            ref_model = copy.deepcopy(ctx.model)
        # the critic: the start model's critic/ (an earlier OREO round) or a fresh one with a zero head
        critic_from = None
        critic_dir = Path(str(start)) / CRITIC_DIR
        if args.critic_init == "auto" and is_value_model_dir(critic_dir):
            critic = ValueModel.from_pretrained(critic_dir, merge_lora=True)
            critic.to(next(ctx.model.parameters()).dtype)
            if args.critic_lora:
                from ...value import wrap_lora

                critic = ValueModel(wrap_lora(critic.backbone, dict(args.critic_lora)), critic.value_head,
                                    lora=args.critic_lora)
            critic_from = str(critic_dir)
            print(f"[rlkit] oreo: critic continues from {critic_dir}", flush=True)
        else:
            critic = ValueModel.from_causal_lm(ctx.model, lora=args.critic_lora)
        critic.attach_tokenizer(ctx.tokenizer)

        raw, source = load_oreo_rows(run.data.train)
        rows = normalize_rows(raw, source, ctx.tokenizer)
        examples = tokenize_rows(rows, ctx.tokenizer, level=args.loss_level, splitter=args.step_splitter,
                                 max_length=args.max_length, rew_mul=args.rew_mul, rew_add=args.rew_add)
        positives = sum(r["reward"] == 1.0 for r in rows)
        print(f"[rlkit] oreo: {len(examples)} training sequences from {source} ({positives} correct, "
              f"{len(rows) - positives} wrong), loss level {args.loss_level}", flush=True)
        self._counts = {"rows": len(rows), "sequences": len(examples), "positives": positives}
        info = {"start_model": str(start), "reference": str(reference_name), "critic_init": critic_from or "model",
                "data": source, "rows": len(rows)}
        return OREOTrainer(model=ctx.model, args=args, train_dataset=OREODataset(examples),
                           processing_class=ctx.tokenizer, ref_model=ref_model, critic=critic,
                           callbacks=ctx.callbacks, info=info)

    def finish(self, trainer: OREOTrainer, ctx: Any) -> StageOutput:
        """The policy in ``final/`` (as every trainer stage), the critic in ``final/critic/``, ``oreo.json``."""
        final = Path(ctx.final_dir)
        state_dict = None
        if trainer.is_deepspeed_enabled or trainer.is_fsdp_enabled:
            state_dict = trainer.accelerator.get_state_dict(trainer.model_wrapped)
        if trainer.accelerator.is_main_process:
            trainer.save_parts(final, state_dict=state_dict, with_args=False)
            (final / DONE_MARKER).write_text(time.strftime("%Y-%m-%d %H:%M:%S\n"))
        trainer.accelerator.wait_for_everyone()
        return StageOutput(model=str(final), summary={"oreo": {**getattr(self, "_counts", {}),
                                                               "critic": str(final / CRITIC_DIR)}})
