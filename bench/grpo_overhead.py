"""GRPO step-time overhead: rlkit's ``grpo`` method against plain ``trl.GRPOTrainer``.

Both sides train the same tiny char-level Llama (``rlkit.models.build_tiny_model`` + ``build_char_tokenizer``,
seed 0) on the same synthetic arithmetic prompts (``rlkit.data``), with the same reward
(``rlkit_rewards.get("math_accuracy")``) and the same ``GRPOConfig`` (built once from the recipe section by
``rlkit.methods.get_method("grpo").make_config``, so every TRL field is identical):

- rlkit: the path ``rlkit train`` takes -- recipe dict -> validated ``RunSpec`` -> ``rlkit.models.load_model``
  -> ``get_method("grpo").run`` (dataset, reward functions, ``RLKitGRPOTrainer``, ``train()``, final save).
- TRL: ``trl.GRPOTrainer(model, reward_funcs=[reward], args=config, train_dataset=..., processing_class=...)``.

A ``TrainerCallback`` times every optimizer step (``on_step_begin`` -> ``on_step_end``, ``time.perf_counter``;
generation, reward scoring, loss and optimizer update all fall inside it). The first ``--warmup`` steps of
each run are dropped. Runs alternate ABBA (rlkit, TRL, TRL, rlkit, ...) so slow drift of the machine load
hits both sides equally. Reported: the median step time of each side over all timed steps of all its runs,
and their ratio rlkit/TRL (target <= 1.05). The median of the per-pair ratios is printed too as a
drift-robust cross-check. Torch runs on one CPU thread by default (``--threads``): the tiny model's ops
gain nothing from more, and on a shared machine oversubscribed OpenMP threads make step times erratic.

    python bench/grpo_overhead.py            # full: 6 run pairs x 40 steps
    python bench/grpo_overhead.py --quick    # under 3 minutes on 2 cores: 6 pairs x 20 steps
    python bench/grpo_overhead.py --smoke    # seconds: 1 pair x 3 steps (tests)
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _runs import add_jobs_threads, bench_parser, preset_of, print_result  # noqa: E402

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

PRESETS = {
    #        pairs steps warmup batch gens completion
    "smoke": (1, 3, 1, 8, 4, 8),
    "quick": (6, 20, 2, 16, 4, 16),
    "full": (6, 40, 3, 32, 8, 24),
}


def make_step_timer():
    """A ``TrainerCallback`` recording the wall time of each optimizer step in ``.times`` (generation,
    reward scoring, loss and optimizer update all happen between ``on_step_begin`` and ``on_step_end``)."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times: list[float] = []
            self._t0: float | None = None

        def on_step_begin(self, args, state, control, **kwargs):
            self._t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if self._t0 is not None:
                self.times.append(time.perf_counter() - self._t0)
                self._t0 = None

    return StepTimer()


def make_recipe(steps: int, batch: int, gens: int, completion: int, out: str) -> dict:
    return {
        "method": "grpo",
        "seed": 0,
        "output_dir": out,
        "plot": False,
        "model": {"name": "tiny", "tiny": {"hidden_size": 128, "intermediate_size": 384, "num_hidden_layers": 4,
                                           "num_attention_heads": 4, "num_key_value_heads": 2,
                                           "max_position_embeddings": 256}},
        "data": {"train": {"name": "synthetic", "split": "train", "template": "plain",
                           "synthetic": {"num_train": 2000, "num_test": 10}}},
        "rewards": [{"name": "math_accuracy"}],
        "trainer": {"max_steps": steps, "per_device_train_batch_size": batch, "num_generations": gens,
                    "max_completion_length": completion, "learning_rate": 1e-5, "beta": 0.0, "temperature": 1.0,
                    "logging_steps": 10, "save_strategy": "no", "dataloader_num_workers": 0,
                    "lr_scheduler_type": "constant", "disable_tqdm": True},
    }


def run_rlkit(run) -> list[float]:
    """One run through rlkit's own method path (what ``rlkit train`` calls after loading the recipe)."""
    from transformers import set_seed

    from rlkit.methods import RunContext, get_method
    from rlkit.models import load_model

    set_seed(run.seed)
    model, tokenizer = load_model(run.model, seed=run.seed)
    timer = make_step_timer()
    ctx = RunContext(model=model, tokenizer=tokenizer, callbacks=[timer], final_dir=Path(run.output_dir) / "final")
    get_method("grpo").run(run, ctx)
    return timer.times


def run_trl(run) -> list[float]:
    """The same run with plain TRL: same model, data, reward and GRPOConfig."""
    import rlkit_rewards
    from transformers import set_seed
    from trl import GRPOTrainer

    from rlkit.data import build_dataset
    from rlkit.methods import get_method
    from rlkit.models import build_char_tokenizer, build_tiny_model

    set_seed(run.seed)
    tokenizer = build_char_tokenizer()
    model = build_tiny_model(run.model.tiny, tokenizer, seed=run.seed)
    args = get_method("grpo").make_config(run)
    train_ds = build_dataset(run.data.train, tokenizer, shuffle=False)
    timer = make_step_timer()
    trainer = GRPOTrainer(model=model, reward_funcs=[rlkit_rewards.get("math_accuracy")], args=args,
                          train_dataset=train_ds, processing_class=tokenizer, callbacks=[timer])
    trainer.train()
    return timer.times


def _quiet(fn, *args):
    """Run ``fn`` with its stdout/stderr (Trainer's metric dicts, progress bars) captured; shown on error."""
    import contextlib
    import io

    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
            return fn(*args)
    except BaseException:
        sys.stderr.write(buf.getvalue())
        raise


def main(argv: list[str] | None = None) -> int:
    p = bench_parser(__doc__, quick="smaller run, under 3 minutes on 2 cores",
                     smoke="1 pair x 3 steps, for the test suite")
    p.add_argument("--pairs", type=int, help="run pairs (rlkit + TRL) to interleave")
    p.add_argument("--steps", type=int, help="optimizer steps per run")
    p.add_argument("--warmup", type=int, help="steps dropped at the start of each run")
    add_jobs_threads(p, jobs=None,
                     threads_help="torch CPU threads (default 1: the tiny model's ops gain nothing from more, and one "
                                  "thread keeps timings stable when other processes share the cores; 0: torch's "
                                  "default)")
    a = p.parse_args(argv)
    preset = preset_of(a)
    pairs, steps, warmup, batch, gens, completion = PRESETS[preset]
    pairs, steps, warmup = a.pairs or pairs, a.steps or steps, a.warmup if a.warmup is not None else warmup
    if steps <= warmup:
        p.error("--steps must exceed --warmup")

    import torch
    import transformers

    from rlkit.recipe import recipe_from_dict, resolve_runs

    warnings.filterwarnings("ignore")
    transformers.logging.set_verbosity_error()
    if a.threads:
        torch.set_num_threads(a.threads)

    t_start = time.perf_counter()
    print(f"grpo_overhead [{preset}]: {pairs} pairs x {steps} steps (warmup {warmup}); tiny Llama h128 L4, "
          f"batch {batch}, {gens} generations, {completion} completion tokens, {torch.get_num_threads()} threads",
          flush=True)
    times: dict[str, list[float]] = {"rlkit": [], "trl": []}
    pair_ratios = []
    with tempfile.TemporaryDirectory(prefix="rlkit_bench_") as tmp:
        for i in range(pairs):
            order = ("rlkit", "trl") if i % 2 == 0 else ("trl", "rlkit")
            med = {}
            for side in order:
                out = str(Path(tmp) / f"{side}{i}")
                (run,) = resolve_runs(recipe_from_dict(make_recipe(steps, batch, gens, completion, out)))
                t = _quiet((run_rlkit if side == "rlkit" else run_trl), run)[warmup:]
                if not t:
                    raise RuntimeError(f"{side} run {i} recorded no timed steps")
                times[side].extend(t)
                med[side] = statistics.median(t)
            pair_ratios.append(med["rlkit"] / med["trl"])
            print(f"pair {i + 1}/{pairs} ({order[0]} first): rlkit {med['rlkit'] * 1e3:.1f} ms/step, "
                  f"trl {med['trl'] * 1e3:.1f} ms/step, ratio {pair_ratios[-1]:.3f}", flush=True)

    r_med, t_med = statistics.median(times["rlkit"]), statistics.median(times["trl"])
    ratio = r_med / t_med
    pair_med = statistics.median(pair_ratios)
    print(f"rlkit grpo step time (median of {len(times['rlkit'])} steps): {r_med * 1e3:.1f} ms")
    print(f"trl GRPOTrainer step time (median of {len(times['trl'])} steps): {t_med * 1e3:.1f} ms")
    print(f"ratio rlkit/trl (pooled medians): {ratio:.3f} (target <= 1.05: {'ok' if ratio <= 1.05 else 'ABOVE'})")
    print(f"ratio rlkit/trl (median of per-pair ratios): {pair_med:.3f}")
    print(f"bench wall time: {time.perf_counter() - t_start:.0f} s")
    print_result(ratio=ratio, rlkit_step_s=r_med, trl_step_s=t_med, pair_ratio=pair_med,
                 steps_per_side=len(times["rlkit"]), precision={"ratio": 3, "pair_ratio": 3})
    return 0


if __name__ == "__main__":
    sys.exit(main())
