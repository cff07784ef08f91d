"""DPO on scored samples (``method: dpo``): TRL's ``DPOTrainer`` on correct/incorrect pairs of a ``sample`` stage.

The DPO baseline of OREO (arXiv 2412.16145, Table 1 and A.1): from the same SFT model and the same offline
samples as OREO, up to 6 (correct, incorrect) pairs per training query, trained with the DPO loss
(Rafailov et al. 2023; paper's settings at 1.5B: LR 5e-7, beta 0.1). This module builds the pairs and hands them
to TRL's ``DPOTrainer`` unchanged; the reference model is the stage's starting model (a frozen copy of it).

Pairs (:func:`build_pairs`): the ``sample`` stage's rows (``data.train: {from: sample, dataset: samples}``, after
the ``where`` filter and the ``balance`` selection) are grouped by ``prompt_index``; a row is positive when its
``reward`` is above ``reward_threshold`` (:func:`rlkit.data.is_positive`, the rule of ``data.train.balance``).
A prompt with P positives and N negatives (each in ``sample_index`` order) gives ``min(P * N,
max_pairs_per_prompt)`` pairs, taken round-robin: pair k is (positive k mod P, negative (k + k // lcm(P, N)) mod
N), which walks every (positive, negative) combination once and uses each sample as evenly as possible before
any is reused. The prompt is the row's rendered ``prompt`` (the text the model saw), chosen/rejected the
completions as plain text (TRL appends EOS to them). ``limit`` caps the number of pairs. Every choice is listed
in ``docs/methods/dpo.md``.

``pairs: best_worst`` (BOLT's on-policy DPO, arXiv 2502.03860, Stage 3; :func:`build_best_worst_pairs`): one pair
per prompt, chosen = the best sample by ``reward`` and rejected = the worst, samples whose ``valid_column``
(``format_ok``, written by ``bolt_sample``) is false ranking below every valid one
(:func:`rlkit.methods.bolt.core.dpo_pair`); no pair when all samples rank equal.

The reference model is the stage's starting model (a frozen copy), or the model at ``ref_model`` (a folder,
hub id or built-in name; in a staged recipe ``ref_model: {from: STAGE}`` names an earlier stage's model, e.g.
BOLT's SFT model pi_0 for every DPO iteration).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from trl import DPOConfig, DPOTrainer

from ..config import RecipeError
from . import register_method
from .aux_loss import AuxLossMixin
from .base import StageOutput, TrainerMethod

__all__ = ["DPOMethod", "RLKitDPOConfig", "RLKitDPOTrainer", "build_best_worst_pairs", "build_pairs", "pair_indices"]

SAMPLE_FIELDS = ("prompt_index", "prompt", "completion", "reward")


@dataclass
class RLKitDPOConfig(DPOConfig):
    """TRL's ``DPOConfig`` (every field passes through: ``beta`` 0.1 as in the paper, ``loss_type``, ...) plus how
    pairs are built from scored samples. The paper's DPO baseline uses LR 5e-7 and beta 0.1 at 1.5B (TRL's
    default learning rate is 1e-6; the shipped recipes set 5e-7)."""

    max_pairs_per_prompt: int = field(default=6, metadata={"help": "Most (correct, incorrect) pairs per prompt "
                                                                     "(the paper: 6)."})
    reward_threshold: float = field(default=0.5, metadata={"help": "A sample is positive (chosen side) when its "
                                                                   "reward is above this (0.5: rewards in {0, 1})."})
    pairs: str = field(default="correct_incorrect", metadata={
        "help": "correct_incorrect: up to max_pairs_per_prompt (positive, negative) pairs per prompt (OREO's DPO "
                "baseline); best_worst: one pair per prompt, the best and the worst sample (BOLT)."})
    valid_column: str = field(default="format_ok", metadata={
        "help": "best_worst: rows whose column is false rank below every other (rows without it count as valid)."})
    ref_model: str | None = field(default=None, metadata={
        "help": "The frozen reference model: a folder, hub id or built-in name (staged recipes: {from: STAGE}); "
                "None: the stage's starting model."})
    no_pairs: str = field(default="error", metadata={
        "help": "When the samples give no pair: error (one line), or keep_model (save the starting model unchanged "
                "as this stage's model: an iteration of an online loop that had nothing to learn from)."})

    def __post_init__(self):
        if self.max_pairs_per_prompt < 1:
            raise ValueError(f"max_pairs_per_prompt must be at least 1, got {self.max_pairs_per_prompt}")
        if self.pairs not in ("correct_incorrect", "best_worst"):
            raise ValueError(f"pairs must be correct_incorrect or best_worst, got {self.pairs!r}")
        if self.no_pairs not in ("error", "keep_model"):
            raise ValueError(f"no_pairs must be error or keep_model, got {self.no_pairs!r}")
        super().__post_init__()


class RLKitDPOTrainer(AuxLossMixin, DPOTrainer):
    """TRL's ``DPOTrainer`` plus the auxiliary losses of patched layers (MoE load balancing)."""


def pair_indices(n_pos: int, n_neg: int, max_pairs: int) -> list[tuple[int, int]]:
    """``min(n_pos * n_neg, max_pairs)`` distinct (positive, negative) index pairs, round-robin: pair k is
    ``(k mod P, (k + k // lcm(P, N)) mod N)``. The first lcm(P, N) pairs are the diagonal (k mod P, k mod N);
    each later block shifts the negatives by one, so all P * N pairs come once and the samples are used evenly."""
    if n_pos <= 0 or n_neg <= 0:
        return []
    lcm = n_pos * n_neg // math.gcd(n_pos, n_neg)
    return [(k % n_pos, (k + k // lcm) % n_neg) for k in range(min(n_pos * n_neg, max_pairs))]


def build_pairs(rows: list[dict], max_pairs_per_prompt: int = 6, threshold: float = 0.5,
                bos_token: str | None = None, source: str = "dataset") -> tuple[list[dict], dict]:
    """DPO pairs from a ``sample`` stage's rows (module docstring) and counts for the log.

    Each pair: ``prompt``, ``chosen``, ``rejected`` (what TRL reads) and, for auditing, ``prompt_index``,
    ``chosen_sample``, ``rejected_sample`` (the samples' ``sample_index``) and their rewards. ``bos_token``: a
    prompt that starts with it (a chat template that writes BOS) has it cut, since the tokenizer adds it back
    (as generation did, which does not add a second one). Raises ``DataError`` when no prompt has both a positive
    and a negative sample."""
    from ..data import DataError, group_by_prompt, is_positive, require_sample_fields

    require_sample_fields(rows, SAMPLE_FIELDS, "dpo", source)
    pairs: list[dict] = []
    groups = group_by_prompt(rows)
    stats = {"rows": len(rows), "prompts": len(groups), "prompts_with_pairs": 0, "prompts_all_positive": 0,
             "prompts_all_negative": 0}
    for prompt_index, items in groups.items():
        pos = [r for _, r in items if is_positive(r["reward"], threshold)]
        neg = [r for _, r in items if not is_positive(r["reward"], threshold)]
        if not neg:
            stats["prompts_all_positive"] += 1
        elif not pos:
            stats["prompts_all_negative"] += 1
        chosen_rows = pair_indices(len(pos), len(neg), max_pairs_per_prompt)
        if chosen_rows:
            stats["prompts_with_pairs"] += 1
        for i, j in chosen_rows:
            c, r = pos[i], neg[j]
            pairs.append({"prompt": _strip_bos(c["prompt"], bos_token), "chosen": c["completion"], "rejected": r["completion"],
                          "prompt_index": prompt_index, "chosen_sample": c.get("sample_index"),
                          "rejected_sample": r.get("sample_index"), "chosen_reward": c["reward"],
                          "rejected_reward": r["reward"]})
    stats["pairs"] = len(pairs)
    if not pairs:
        raise DataError(f"dpo: no prompt of {source} has both a positive (reward > {threshold}) and a negative "
                        f"sample ({stats['prompts']} prompts: {stats['prompts_all_positive']} all positive, "
                        f"{stats['prompts_all_negative']} all negative), so there is no pair to train on; sample "
                        "more completions per prompt (args.num_samples), at a higher temperature, or check the "
                        "rewards")
    return pairs, stats


def build_best_worst_pairs(rows: list[dict], valid_column: str = "format_ok", bos_token: str | None = None,
                           source: str = "dataset") -> tuple[list[dict], dict]:
    """One (best, worst) pair per prompt of a sampling stage's rows (``pairs: best_worst``; module docstring):
    samples whose ``valid_column`` is false rank below every valid one, then by ``reward`` (None: lowest); ties
    give the first best and the last worst (``sample_index`` order). Raises ``DataError`` when no prompt has a
    pair."""
    from ..data import DataError, group_by_prompt, require_sample_fields
    from .bolt.core import dpo_pair

    require_sample_fields(rows, ("prompt_index", "prompt", "completion"), "dpo", source)
    pairs: list[dict] = []
    groups = group_by_prompt(rows)
    stats = {"rows": len(rows), "prompts": len(groups), "prompts_with_pairs": 0, "prompts_all_equal": 0,
             "rejected_invalid": 0}
    for prompt_index, items in groups.items():
        group = [r for _, r in items]
        valid = [r.get(valid_column, True) is not False for r in group]
        scores = [float(r["reward"]) if r.get("reward") is not None else float("-inf") for r in group]
        pair = dpo_pair(scores, valid)
        if pair is None:
            stats["prompts_all_equal"] += 1
            continue
        c, r = group[pair[0]], group[pair[1]]
        stats["prompts_with_pairs"] += 1
        stats["rejected_invalid"] += not valid[pair[1]]
        pairs.append({"prompt": _strip_bos(c["prompt"], bos_token), "chosen": c["completion"], "rejected": r["completion"],
                      "prompt_index": prompt_index, "chosen_sample": c.get("sample_index"),
                      "rejected_sample": r.get("sample_index"), "chosen_reward": c.get("reward"),
                      "rejected_reward": r.get("reward"), "rejected_valid": valid[pair[1]]})
    stats["pairs"] = len(pairs)
    if not pairs:
        raise DataError(f"dpo: every prompt of {source} has samples that all rank the same ({stats['prompts']} "
                        "prompts), so there is no best/worst pair to train on; sample more responses per prompt or "
                        "at a higher temperature, or check the rewards")
    return pairs, stats


def _strip_bos(prompt: str, bos_token: str | None) -> str:
    """``prompt`` without a leading ``bos_token`` (the tokenizer adds it back)."""
    return prompt[len(bos_token):] if bos_token and prompt.startswith(bos_token) else prompt


def _bos_to_strip(tokenizer) -> str | None:
    """The BOS text to cut from a rendered prompt: only when the tokenizer adds BOS to plain text itself."""
    bos = getattr(tokenizer, "bos_token", None)
    if not bos or tokenizer.bos_token_id is None:
        return None
    with_special = tokenizer("a")["input_ids"]
    return bos if with_special and with_special[0] == tokenizer.bos_token_id else None


@register_method
class DPOMethod(TrainerMethod):
    """``method: dpo``: TRL's DPO on (correct, incorrect) pairs of a ``sample`` stage's completions."""

    name = "dpo"
    rewards = "none"

    def config_class(self) -> type:
        return RLKitDPOConfig

    def check(self, run, config, where: str) -> None:
        from ..data import is_stage_rows

        spec = run.data.train
        if not is_stage_rows(spec):
            raise RecipeError("data.train: dpo trains on scored samples; set data.train to {from: STAGE, dataset: "
                              f"samples}} (a `sample` stage) or jsonl:PATH of such rows, not {spec.name!r}")
        if config.ref_model is not None and run.model.lora is not None:
            raise RecipeError(f"{where}.ref_model: with LoRA the reference is the base model (TRL disables the "
                              "adapter); unset ref_model or train without LoRA")

    def pairs(self, run, config, tokenizer) -> tuple[list[dict], dict]:
        from ..data import load_selected_rows

        rows, source, _ = load_selected_rows(run.data.train)
        if config.pairs == "best_worst":
            pairs, stats = build_best_worst_pairs(rows, config.valid_column, _bos_to_strip(tokenizer), source)
        else:
            pairs, stats = build_pairs(rows, config.max_pairs_per_prompt, config.reward_threshold,
                                       _bos_to_strip(tokenizer), source)
        stats["pairs_built"] = len(pairs)
        if run.data.train.limit is not None:
            pairs = pairs[: run.data.train.limit]
            stats["pairs"] = len(pairs)
        return pairs, stats

    def build_trainer(self, run, ctx, args):
        import datasets
        from accelerate.utils import is_peft_model

        from ..models import peft_config

        pairs, stats = self.pairs(run, args, ctx.tokenizer)
        self._stats = stats
        limited = f", the first {stats['pairs']} kept (data.train.limit)" if stats["pairs"] < stats["pairs_built"] else ""
        detail = (f"{stats['prompts_all_equal']} prompts with all samples equal, {stats['rejected_invalid']} rejected "
                  "for the format; best/worst per prompt" if args.pairs == "best_worst" else
                  f"{stats['prompts_all_positive']} prompts all positive, {stats['prompts_all_negative']} all "
                  f"negative; at most {args.max_pairs_per_prompt} per prompt")
        print(f"[rlkit] dpo: {stats['pairs_built']} pairs from {stats['prompts_with_pairs']} of {stats['prompts']} "
              f"prompts ({stats['rows']} samples; {detail}){limited}", flush=True)
        out = Path(run.output_dir)
        if args.process_index == 0:
            out.mkdir(parents=True, exist_ok=True)
            with (out / "pairs.jsonl").open("w") as f:
                f.writelines(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs)
        train = datasets.Dataset.from_list([{k: p[k] for k in ("prompt", "chosen", "rejected")} for p in pairs])
        lora = peft_config(run.model)
        ref = None
        if args.ref_model is not None:
            from ..models import load_model

            if lora is not None or is_peft_model(ctx.model):
                raise RecipeError("trainer.ref_model: with LoRA the reference is the base model (TRL disables the "
                                  "adapter); unset ref_model or train without LoRA")
            spec = dataclasses.replace(run.model, name=args.ref_model, lora=None, source=None, patches=[])
            ref = load_model(spec, seed=run.seed)[0].to(ctx.model.device).eval()
            ref.requires_grad_(False)
            print(f"[rlkit] dpo: reference model {args.ref_model}", flush=True)
        elif lora is None and not is_peft_model(ctx.model):
            # the stage's starting model, frozen. TRL would reload it by name, which an in-memory model (tiny) or a
            # patched one does not survive. With LoRA none is needed: TRL disables the adapter instead.
            ref = copy.deepcopy(ctx.model).eval()
            ref.requires_grad_(False)
        return RLKitDPOTrainer(model=ctx.model, ref_model=ref, args=args, train_dataset=train,
                               processing_class=ctx.tokenizer, callbacks=ctx.callbacks, peft_config=lora)

    def run(self, run, ctx) -> StageOutput:
        from ..data import DataError
        from .base import save_model

        args = self.make_config(run)
        if args.no_pairs == "keep_model":
            try:
                self.pairs(run, args, ctx.tokenizer)
            except DataError as e:
                print(f"[rlkit] {e}; no_pairs: keep_model, so the starting model is kept unchanged", flush=True)
                ctx.close()
                path = save_model(ctx.model, ctx.tokenizer, ctx.final_dir) if args.process_index == 0 else None
                return StageOutput(model=path or str(ctx.final_dir),
                                   summary={"dpo_pairs": 0, "dpo_no_pairs": str(e)})
        output = super().run(run, ctx)
        output.summary.update({f"dpo_{k}": v for k, v in getattr(self, "_stats", {}).items()})
        return output
