"""GRPO on TRL, and ``RLKitGRPOTrainer``: the base class that rlkit's RL methods extend.

``method: grpo`` runs TRL's ``GRPOTrainer`` unchanged except for three documented hooks, which are
no-ops unless a subclass or the caller uses them (so with nothing extra turned on the loss equals
plain TRL's for the same seed; a test checks the first-step loss):

- ``reward_engine``: an object with ``score(funcs, prompts, completions, completion_ids, columns,
  kwargs=...)`` returning ``(scores, statuses)``; ``scores`` is a ``[n, num_funcs]`` list of floats (NaN
  for "not applicable") and ``statuses`` one string per item (``ok``, ``wrong``, ``unparseable``,
  ``timeout``, ``error``). When set, it replaces TRL's serial in-process scoring and the status counts
  (summed over ranks) are logged each step as ``rewards/status/<status>``. In evaluation every row gets
  ``is_eval=True`` (so ``noisy`` never flips there). When None, TRL's own ``_calculate_rewards`` runs.
  ``rlkit train`` passes an ``rlkit_rewards.engine.RewardEngine`` built from the recipe's
  ``reward_engine`` section by :mod:`rlkit.rewarding` (on by default; ``reward_engine: {enabled: false}``
  gives TRL's scoring).
- ``postprocess_batch(batch, inputs)``: called on every scored generation batch before the loss; a
  method may replace ``advantages`` by a ``(B, T)`` per-token tensor or add metrics.
- ``extra_token_mask(batch, inputs)``: an optional ``(B, T)`` 0/1 mask multiplied into TRL's
  per-token loss mask (TRL's ``tool_mask`` slot).

``log_method_metric(name, value)`` records per-method scalars that TRL logs with its own metrics.

Games: with a non-empty ``env.games`` (:mod:`rlkit.envs`) the run trains on multi-turn TextArena episodes
instead of the recipe's dataset: the train set holds one row per initial state, rollouts go through TRL's
``rollout_func`` (:class:`rlkit.envs.rollout.GameRollout`, which reads the batch's rows from ``rlkit_inputs``),
only the policy's action tokens enter the loss (``env_mask``), and the episode's shaped reward is the first
reward (``game``, weight 1) before any recipe rewards, which are then optional and scored in-process.

``kv_cache``: an ``rlkit.kvcache.KVCacheConfig``; when its kind is not ``none``, HF-generate rollouts run
with that compressed key cache (PolarQuant / ThinK; a fresh cache per ``generate`` call). vLLM rollouts
manage their own cache, so the combination is refused at construction.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch
from accelerate.utils import gather
from rlkit_rewards.engine import STATUSES, light_trainer_state
from trl import GRPOConfig, GRPOTrainer

from ..config import RecipeError
from ..rewarding import build_reward_funcs, make_reward_engine, reward_weights_of, score_mixed
from . import register_method
from .aux_loss import AuxLossMixin
from .base import TrainerMethod


def check_kv_cache_backend(kv_cache: Any, use_vllm: bool) -> Any:
    """The ``KVCacheConfig`` HF rollouts use (None for none); vLLM rollouts cannot take one."""
    if kv_cache is None or kv_cache.kind == "none":
        return None
    if use_vllm:
        raise RecipeError(f"kv_cache kind {kv_cache.kind!r} compresses HF-generate rollouts; vLLM manages its own "
                          "KV cache (set use_vllm: false, or kv_cache kind none)")
    return kv_cache


class RLKitGRPOTrainer(AuxLossMixin, GRPOTrainer):
    """TRL ``GRPOTrainer`` with rlkit's hooks (reward engine, per-batch post-processing, extra masks) and
    the auxiliary losses of patched layers (MoE load balancing) added to the policy loss."""

    def __init__(self, *args, reward_engine: Any = None, kv_cache: Any = None, vllm_settings: Any = None, **kwargs):
        import contextlib

        from ..rollout.settings import VLLMSettings

        config = kwargs.get("args")
        self.vllm_settings = vllm_settings or VLLMSettings()
        colocate = config is not None and config.use_vllm and config.vllm_mode == "colocate"
        stack = contextlib.ExitStack()
        if colocate:  # TRL builds the engine: give it rlkit's dtype / eager mode (rlkit.rollout.vllm)
            from ..rollout.vllm import colocate_settings

            stack.enter_context(colocate_settings(self.vllm_settings, getattr(kwargs.get("model"), "dtype", None)))
        with stack:
            super().__init__(*args, **kwargs)
        self.rlkit_inputs = None
        self.reward_engine = reward_engine
        self.kv_cache = check_kv_cache_backend(kv_cache, self.use_vllm)
        if self.use_vllm and self.vllm_settings.sync_check != "off":
            self._wrap_weight_sync()

    # ---- vLLM weight syncs: the stale-weights probe ------------------------------------------------
    def _wrap_weight_sync(self) -> None:
        generation = self.vllm_generation
        sync = generation.sync_weights

        def sync_and_probe(*args, **kwargs):
            out = sync(*args, **kwargs)
            self.check_vllm_weights()
            return out

        generation.sync_weights = sync_and_probe

    def check_vllm_weights(self) -> Any:
        """Compare vLLM's log-probabilities of the probe tokens with the policy's after a weight sync; log the
        gap (``vllm/sync_probe_max_abs_logprob_diff``, ``vllm/sync_probe_ms``) and raise or warn when it is
        beyond ``vllm.sync_tolerance`` (``vllm.sync_check``). Returns the ``ProbeResult`` (None: not probed)."""
        from ..rollout.vllm import server_probe, sync_probe

        generation, settings = self.vllm_generation, self.vllm_settings
        model = self.accelerator.unwrap_model(self.model)
        if generation.mode == "colocate":
            result = sync_probe(generation.llm, model, self.processing_class, settings)
        elif self.accelerator.num_processes == 1:  # server: the probe asks the server for a short continuation
            result = server_probe(generation.vllm_client, model, self.processing_class, settings)
        else:
            return None  # several ranks: a sharded policy cannot run the reference forward on one rank alone
        mode = "train" if self.model.training else "eval"
        self._metrics[mode]["vllm/sync_probe_max_abs_logprob_diff"].append(result.max_abs_diff)
        self._metrics[mode]["vllm/sync_probe_ms"].append(result.seconds * 1000)
        if not result.ok:
            msg = (f"vLLM weight sync check failed at step {self.state.global_step}: vLLM's log-probabilities of "
                   f"the probe tokens differ from the policy's by up to {result.max_abs_diff:.3g} (tolerance "
                   f"{result.tolerance:.3g}); vLLM is generating with other weights than the ones being trained "
                   "(a sync that did nothing, or a dtype mismatch: set vllm.dtype to the policy's). Set "
                   "vllm.sync_check: warn to continue anyway")
            if settings.sync_check == "error":
                raise RuntimeError(msg)
            import warnings

            warnings.warn(msg, RuntimeWarning, stacklevel=2)
        return result

    # ---- hooks for subclasses --------------------------------------------------------------------
    def postprocess_batch(self, batch: dict[str, Any], inputs: list[dict]) -> dict[str, Any]:
        """Modify a scored generation batch (advantages, masks, metrics). Default: unchanged."""
        return batch

    def extra_token_mask(self, batch: dict[str, Any], inputs: list[dict]) -> torch.Tensor | None:
        """A ``(B, T)`` mask of completion tokens that enter the loss, or None for all of them."""
        return None

    def log_method_metric(self, name: str, value: float, mode: str | None = None) -> None:
        mode = mode or ("train" if self.model.training else "eval")
        self._metrics[mode][name].append(float(value))

    # ---- TRL overrides ---------------------------------------------------------------------------
    def _generate_single_turn(self, *args, **kwargs):
        if self.kv_cache is None:
            return super()._generate_single_turn(*args, **kwargs)
        from ..rollout import compressed_generate

        # TRL calls ``generate`` on the unwrapped model; the context gives each call a fresh compressed cache
        with compressed_generate(self.accelerator.unwrap_model(self.model), self.kv_cache):
            return super()._generate_single_turn(*args, **kwargs)

    def _generate_and_score_completions(self, inputs):
        self.rlkit_inputs = inputs  # a rollout_func sees the prompts only; game rollouts need the rows
        try:
            batch = super()._generate_and_score_completions(inputs)
        finally:
            self.rlkit_inputs = None
        mask = self.extra_token_mask(batch, inputs)
        if mask is not None:
            mask = mask.to(batch["completion_mask"].dtype)
            batch["tool_mask"] = mask if "tool_mask" not in batch else batch["tool_mask"] * mask
            # TRL counted the loss tokens before this mask existed; the token-level losses divide by it
            loss_mask = batch["completion_mask"] * batch["tool_mask"]
            batch["num_items_in_batch"] = self.accelerator.gather(loss_mask.sum()).sum()
        return self.postprocess_batch(batch, inputs)

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        if (self.reward_engine is None or self.environments is not None
                or any(isinstance(f, torch.nn.Module) for f in self.reward_funcs)):
            # reward models run batched on the accelerator and environments live in this process: TRL's path
            return super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        device = self.accelerator.device
        training = self.model.training
        keys = [k for k in inputs[0] if k not in ("prompt", "completion", "completion_ids")]
        columns = {k: [x[k] for x in inputs] for k in keys}
        if not training and "is_eval" not in columns:
            columns["is_eval"] = [True] * len(prompts)  # rewards that add noise (``noisy``) never do so in eval
        # TRL passes ``trainer_state=self.state`` to reward functions. The engine ships it to worker
        # processes, so send a light copy (the real one carries the whole log history).
        scores, statuses = score_mixed(  # model-based rewards (a PRM) run here, the others in the engine
            self.reward_engine, self.reward_funcs, prompts, completions, completion_ids_list, columns,
            kwargs={"trainer_state": light_trainer_state(self.state)},
        )
        rewards = torch.tensor(scores, dtype=torch.float32, device=device).view(len(prompts), len(self.reward_funcs))
        counts = Counter(statuses)
        mode = "train" if training else "eval"
        local = torch.tensor([float(counts.get(s, 0)) for s in STATUSES], device=device)
        total = self.accelerator.gather(local).view(-1, len(STATUSES)).sum(0).tolist()
        for status, count in zip(STATUSES, total):
            self._metrics[mode][f"rewards/status/{status}"].append(count)
        return gather(rewards)


@register_method
class GRPOMethod(TrainerMethod):
    """``method: grpo``: TRL's GRPO through :class:`RLKitGRPOTrainer`. Subclasses (StepHint) change the config
    class, the trainer class and the training dataset."""

    name = "grpo"
    rewards = "required"
    trainer_class: type = RLKitGRPOTrainer

    def config_class(self) -> type:
        return GRPOConfig

    def config_extra(self, run) -> dict:
        extra = reward_weights_of(run)
        if run.env.enabled and ("reward_weights" in extra or "reward_weights" in run.trainer):
            weights = extra.get("reward_weights") or run.trainer["reward_weights"]
            if len(weights) == len(run.rewards):  # the game reward comes first, weight 1
                extra = {"reward_weights": [1.0, *weights]}
        return extra

    def rewards_required(self, run) -> bool:
        return not run.env.enabled  # a game run's reward is the episode's

    def check(self, run, config, where: str) -> None:
        if run.env.enabled:
            from ..envs.games import GameError, check_games

            prefix = where[: -len("trainer")] if where.endswith("trainer") else ""
            from ..envs.episode import check_scripted_opponent

            try:
                check_games(run.env.games)
                check_scripted_opponent(run.env)
            except GameError as e:
                raise RecipeError(f"{prefix}env.games: {e}") from None
            except ValueError as e:
                raise RecipeError(f"{prefix}{e}") from None
            if config.use_vllm and config.vllm_mode == "colocate" and config.vllm_tensor_parallel_size > 1:
                raise RecipeError(f"{where}.vllm_tensor_parallel_size: game rollouts with colocated vLLM need 1 "
                                  "(episodes end at different turns on each rank)")
            if run.kv_cache.kind != "none":
                raise RecipeError(f"{prefix}kv_cache: game rollouts do not use a compressed key cache; set kind none")
        if config.use_vllm and run.model.name == "tiny":
            raise RecipeError(f"{where}.use_vllm: vLLM loads the policy by name and cannot load the in-memory 'tiny' "
                              "model; train a saved checkpoint, or set use_vllm: false")
        if config.use_vllm:
            check_kv_cache_backend(run.kv_cache, True)

    def train_dataset(self, run, ctx, args):
        from ..data import build_dataset

        if run.env.enabled:
            import datasets

            from ..envs.rollout import game_rows

            return datasets.Dataset.from_list(game_rows(run.env, run.seed))
        return build_dataset(run.data.train, ctx.tokenizer, shuffle=False)

    def game_kwargs(self, run, ctx) -> dict:
        """The rollout function and reward of a game run (none otherwise)."""
        if not run.env.enabled:
            return {}
        from ..envs.episode import make_opponent
        from ..envs.rollout import GameRollout, episode_reward

        opponent = make_opponent(run.env, policy=(ctx.model, ctx.tokenizer))
        return {"rollout_func": GameRollout(run.env, opponent),
                "reward_funcs": [episode_reward, *build_reward_funcs(run.rewards)]}

    def build_trainer(self, run, ctx, args):
        from ..models import peft_config

        game = self.game_kwargs(run, ctx)
        engine = None if game else make_reward_engine(run.reward_engine, run.rewards)
        kwargs = {"reward_engine": engine, "vllm_settings": run.vllm}
        if kwargs["reward_engine"] is not None:
            ctx.on_close(kwargs["reward_engine"].close)
        if run.kv_cache.kind != "none":
            kwargs["kv_cache"] = run.kv_cache
        if "rollout_func" in game:
            kwargs["rollout_func"] = game["rollout_func"]
        return self.trainer_class(
            model=ctx.model,
            reward_funcs=game.get("reward_funcs") or build_reward_funcs(run.rewards),
            args=args,
            train_dataset=self.train_dataset(run, ctx, args),
            processing_class=ctx.tokenizer,
            peft_config=peft_config(run.model),
            callbacks=ctx.callbacks,
            **kwargs,
        )
