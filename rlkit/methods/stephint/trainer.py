"""StepHint: GRPO with multi-level stepwise hints (Zhang, Lv et al., arXiv 2507.02841, ACL 2026).

``StepHintConfig``, ``StepHintTrainer`` and ``method: stephint``: one GRPO group per problem of unhinted
rollouts, rollouts that continue hint levels 1..m-1 of a reference chain (prefilled as the start of the answer)
and the reference itself; hint and reference tokens get no negative advantage (``hint_token_rule``). Hints come
from ``rlkit hints build`` (:mod:`.hints`) or are built at the start of the run. Group layout, metrics and every
choice made where the paper is silent: ``docs/methods/stephint.md``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from trl import GRPOConfig

from ...config import RecipeError
from .. import register_method
from ..grpo import GRPOMethod, RLKitGRPOTrainer

HINT_TOKEN_RULES = ("clip", "mask", "none")


@dataclass
class StepHintConfig(GRPOConfig):
    """``GRPOConfig`` plus StepHint's group layout and hint settings (paper defaults)."""

    num_unhinted: int = field(default=5, metadata={"help": "Rollouts per problem without a hint (paper: 5)."})
    num_per_level: int = field(default=2, metadata={"help": "Rollouts per hint level (paper: 2)."})
    num_levels: int = field(default=3, metadata={"help": "Hint levels j = 1..num_levels, m - 1 with m = 4 steps (paper: 3)."})
    include_reference: bool = field(default=True, metadata={"help": "Add the full reference chain as one group member (paper: yes)."})
    hint_token_rule: str = field(default="clip", metadata={"help": "'clip': max(A, 0) on hint tokens; 'mask': no loss on them; 'none'."})
    steps_column: str = field(default="steps", metadata={"help": "Dataset column with the reference chain's steps (list of strings)."})
    hints_path: str | None = field(default=None, metadata={"help": "jsonl from `rlkit hints build`, joined to the data on the question."})
    hint_splitter: str = field(default="adaptive", metadata={"help": "Splitter for hints built at the start of the run: adaptive | paragraph | equal."})
    hint_min_step_tokens: int = field(default=8, metadata={"help": "Minimum tokens per step when building hints."})
    hint_end_marker: str | None = field(default=None, metadata={"help": "End-of-thinking text for the adaptive rule (None: HintConfig's default, '</think>')."})

    def __post_init__(self):
        if self.hint_token_rule not in HINT_TOKEN_RULES:
            raise ValueError(f"hint_token_rule must be one of {', '.join(HINT_TOKEN_RULES)}, got {self.hint_token_rule!r}")
        if self.num_unhinted < 0 or self.num_per_level < 0 or self.num_levels < 0:
            raise ValueError("num_unhinted, num_per_level and num_levels must be >= 0")
        if self.hint_splitter not in ("adaptive", "paragraph", "equal"):
            raise ValueError(f"hint_splitter must be adaptive, paragraph or equal, got {self.hint_splitter!r}")
        size = self.group_size
        if size < 2:
            raise ValueError(f"a StepHint group needs at least 2 members, got {size}")
        if self.num_generations not in (None, 8, size):  # 8 is GRPOConfig's default: not set by the user
            raise ValueError(
                f"num_generations ({self.num_generations}) must equal num_unhinted + num_per_level * num_levels"
                f" + include_reference = {size}; leave it unset")
        self.num_generations = size
        super().__post_init__()

    @property
    def group_size(self) -> int:
        return self.num_unhinted + self.num_per_level * self.num_levels + int(self.include_reference)

    def member_roles(self) -> list[int]:
        """Role of each group member by position: 0 = unhinted, j = hint level j, -1 = reference."""
        roles = [0] * self.num_unhinted
        for j in range(1, self.num_levels + 1):
            roles += [j] * self.num_per_level
        if self.include_reference:
            roles.append(-1)
        return roles


@dataclass
class _Member:
    role: int  # nominal role from the layout (0, level j, or -1)
    prefix: list[int]  # token ids given to the model as the start of its answer ([] = none)
    reference: bool  # the completion is the prefix itself (no generation kept)


class StepHintTrainer(RLKitGRPOTrainer):
    """GRPO trainer that builds StepHint groups (unhinted, hinted at each level, reference)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if not isinstance(self.args, StepHintConfig):
            raise TypeError("StepHintTrainer needs a StepHintConfig")
        self._roles = self.args.member_roles()
        self._plan: list[_Member] | None = None
        self._step_cache: dict[tuple, list[list[int]]] = {}

    # ---- group layout --------------------------------------------------------------------------------
    def _hint_ids(self, steps: tuple[str, ...]) -> list[list[int]]:
        """Token ids of every cumulative hint (level 1..len-1) and of the full chain (last entry)."""
        cached = self._step_cache.get(steps)
        if cached is None:
            tok = self._tokenizer
            cached = [tok("".join(steps[:j]), add_special_tokens=False)["input_ids"] for j in range(1, len(steps) + 1)]
            if len(self._step_cache) > 100_000:
                self._step_cache.clear()
            self._step_cache[steps] = cached
        return cached

    def build_plan(self, inputs: list[dict]) -> list[_Member]:
        """The role and prefix of each local item (its member index is its global position mod the group size)."""
        g = len(self._roles)
        offset = self.accelerator.process_index * len(inputs)
        col = self.args.steps_column
        plan = []
        for i, x in enumerate(inputs):
            role = self._roles[(offset + i) % g]
            steps = tuple(x.get(col) or ())
            levels = self._hint_ids(steps) if steps else []
            if role == 0 or not levels:
                plan.append(_Member(role, [], False))
            elif role == -1:
                eos = self._tokenizer.eos_token_id
                plan.append(_Member(role, list(levels[-1]) + ([eos] if eos is not None else []), True))
            else:
                depth = min(role, len(levels) - 1)  # levels[-1] is the full chain, not a hint
                plan.append(_Member(role, list(levels[depth - 1]), False) if depth >= 1 else _Member(role, [], False))
        return plan

    # ---- TRL overrides -----------------------------------------------------------------------------
    def _generate_and_score_completions(self, inputs):
        self._plan = self.build_plan(inputs) if self.model.training else None
        try:
            return super()._generate_and_score_completions(inputs)
        finally:
            self._plan = None

    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        plan = self._plan
        if plan is None:
            return super()._generate_single_turn(prompt_ids, images, multimodal_fields, num_generations, has_tool_images)
        if len(plan) != len(prompt_ids):
            raise RuntimeError(f"StepHint plan has {len(plan)} members for {len(prompt_ids)} prompts")
        # Every member gets its own prompt (prompt + prefix), so vLLM must not merge a group's prompts
        # (its server mode generates num_generations per unique prompt): one generation per item.
        gen_prompts = [list(p) + m.prefix for p, m in zip(prompt_ids, plan)]
        completion_ids, logprobs = super()._generate_single_turn(gen_prompts, images, multimodal_fields, 1,
                                                                 has_tool_images)
        out_ids, out_lp = [], [] if logprobs is not None else None
        for k, (m, ids) in enumerate(zip(plan, completion_ids)):
            ids = list(ids)
            if m.reference:
                out_ids.append(list(m.prefix))
                if out_lp is not None:
                    out_lp.append([None] * len(m.prefix))
            else:
                out_ids.append(m.prefix + ids)
                if out_lp is not None:
                    out_lp.append([None] * len(m.prefix) + list(logprobs[k]))
        return out_ids, out_lp

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        self._last_rewards = rewards  # gathered over processes: (global batch, num_funcs)
        return rewards

    def _given_token_mask(self, batch) -> torch.Tensor:
        """(B, T) 1 on hint/reference tokens of this process's completions."""
        mask = torch.zeros_like(batch["completion_mask"])
        for i, m in enumerate(self._plan or []):
            n = min(len(m.prefix), mask.shape[1])
            mask[i, :n] = 1
        return mask

    def extra_token_mask(self, batch, inputs):
        if self._plan is None or self.args.hint_token_rule != "mask":
            return None
        return 1 - self._given_token_mask(batch)

    def postprocess_batch(self, batch, inputs):
        if self._plan is None:
            return batch
        given = self._given_token_mask(batch).bool()
        adv = batch["advantages"]
        if self.args.hint_token_rule == "clip" and given.any():
            per_token = adv.unsqueeze(1).expand_as(given).clone() if adv.dim() == 1 else adv.clone()
            per_token = torch.where(given & (per_token < 0), torch.zeros_like(per_token), per_token)
            batch["advantages"] = per_token
        self._log_stephint_metrics(batch, given)
        return batch

    def _log_stephint_metrics(self, batch, given: torch.Tensor) -> None:
        rewards = getattr(self, "_last_rewards", None)
        if rewards is None:
            return
        g = len(self._roles)
        first = rewards[:, 0].detach().float()
        total = (rewards * self.reward_weights.to(rewards.device).unsqueeze(0)).nansum(dim=1)
        roles = torch.tensor(self._roles, device=first.device).repeat(first.numel() // g)
        for role in sorted(set(self._roles)):
            sel = first[roles == role]
            name = "ref" if role == -1 else str(role)
            self.log_method_metric(f"stephint/accuracy_level_{name}", torch.nanmean(sel).item(), "train")
        groups = total.view(-1, g)
        same = (groups.max(1).values - groups.min(1).values).abs() < 1e-8
        self.log_method_metric("stephint/all_equal_groups", same.float().mean().item(), "train")
        unhinted = groups[:, roles[:g] == 0]
        if unhinted.shape[1] > 1:
            same_u = (unhinted.max(1).values - unhinted.min(1).values).abs() < 1e-8
            self.log_method_metric("stephint/all_equal_unhinted", same_u.float().mean().item(), "train")
        loss_mask = batch["completion_mask"] * batch.get("tool_mask", torch.ones_like(batch["completion_mask"]))
        counts = torch.stack([(loss_mask * given).sum(), loss_mask.sum()]).float()
        counts = self.accelerator.gather(counts.unsqueeze(0)).view(-1, 2).sum(0)
        share = (counts[0] / counts[1]).item() if counts[1] > 0 else 0.0
        self.log_method_metric("stephint/hint_token_share", share, "train")


# --------------------------------------------------------------------------------------------------
# method entry


def _with_steps(run, ctx, args: StepHintConfig):
    """The training dataset with a ``steps`` column: from ``hints_path``, the data itself, or built now."""
    import datasets

    from . import hints as hintlib
    from ...data import build_dataset
    from ...pipeline import _is_main, _log

    ds = build_dataset(run.data.train, ctx.tokenizer, shuffle=False)
    col = args.steps_column
    if col in ds.column_names:
        return ds
    rows = ds.to_list()
    if args.hints_path:
        hinted = {r["question"]: r for r in hintlib.read_hints(args.hints_path)}
        missing = sum(r["question"] not in hinted for r in rows)
        if missing == len(rows):
            raise RecipeError(f"trainer.hints_path: no question of the training data is in {args.hints_path}")
        for r in rows:
            r[col] = list((hinted.get(r["question"]) or {}).get("steps") or [])
        _log(f"stephint: hints for {len(rows) - missing}/{len(rows)} problems from {args.hints_path}")
        return datasets.Dataset.from_list(rows)
    if not any(hintlib.reference_of(r) for r in rows):
        raise RecipeError("stephint: the training data has no reference solutions (a `reference` or `solution` column) and no "
                          "trainer.hints_path is set; build hints with `rlkit hints build` first")
    from pathlib import Path

    cache = Path(run.output_dir) / "hints.jsonl"
    cfg_kwargs = dict(splitter=args.hint_splitter, m=args.num_levels + 1, min_step_tokens=args.hint_min_step_tokens)
    if args.hint_end_marker is not None:
        cfg_kwargs["end_marker"] = args.hint_end_marker
    config = hintlib.HintConfig(**cfg_kwargs)
    if cache.is_file():
        built = hintlib.read_hints(cache)
    else:
        scorer = ctx.model if args.hint_splitter == "adaptive" else None
        built = hintlib.build_hints(rows, ctx.tokenizer, config, scorer=scorer, progress=_is_main())
        if _is_main():
            cache.parent.mkdir(parents=True, exist_ok=True)
            hintlib.write_hints(cache, built)
    by_q = {r["question"]: r.get("steps") or [] for r in built}
    for r in rows:
        r[col] = list(by_q.get(r["question"], []))
    n = sum(bool(r[col]) for r in rows)
    _log(f"stephint: split {n}/{len(rows)} reference solutions into steps ({args.hint_splitter}); cached in {cache}")
    return datasets.Dataset.from_list(rows)


@register_method
class StepHintMethod(GRPOMethod):
    """``method: stephint``: GRPO groups with multi-level hints (docs/methods/stephint.md)."""

    name = "stephint"
    trainer_class = StepHintTrainer

    def config_class(self) -> type:
        return StepHintConfig

    def check(self, run, config, where: str) -> None:
        super().check(run, config, where)
        if "num_generations" in run.trainer and run.trainer["num_generations"] != config.group_size:
            raise RecipeError(f"{where}.num_generations: StepHint sets it to the group size "
                              f"num_unhinted + num_per_level * num_levels + include_reference = {config.group_size}; "
                              "remove it")

    def train_dataset(self, run, ctx, args):
        return _with_steps(run, ctx, args)
