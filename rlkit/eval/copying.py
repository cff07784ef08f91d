"""Context-copying probe and induction-head scores ("Language Models 'Grok' to Copy", arXiv 2409.09281),
and the random-token copy task it shares with PEAR (``rlkit.methods.pear``): ``probe_token_ids`` (the token
pool) and ``copy_sequences`` / ``make_copy_inputs`` (the ``[BOS] S S`` draws).

The paper (Lv et al., NAACL 2025) tracks in-context copying and induction heads during pretraining; its
exact protocol and the definition of its head metric ``I`` are not public (no official code). This
module implements the protocol of ``specs/model-patches.md`` section 7:

- **Inputs.** ``M`` sequences ``S`` of ``n`` token ids drawn uniformly (with replacement) from the
  non-special ids of the tokenizer (and below the model's vocab size), fixed by a seed, so every probe
  of a run sees the same sequences. The input is ``[BOS] S S`` (``bos=False``: ``S S``).
- **Copy accuracy.** Over the positions of the second copy except its first token (whose prediction
  needs no copying): the fraction where the greedy next-token prediction equals the gold token.
  Also logged: the exact-match rate of those ``n-1`` tokens per sequence and the mean next-token loss on
  the first copy (tokens 2..n, unpredictable) and on the second copy (tokens 2..n, copyable).
- **Induction score** of layer ``l``, head ``h``: ``I = mean_i A[i, i-n+1]``, the attention from a token
  in the second copy to the token *after* its earlier occurrence (Olsson et al.), averaged over the
  query positions whose predictions the copy accuracy scores (the second copy's 1st..(n-1)-th tokens)
  and over the sequences. Per query head (GQA heads are expanded by the attention function).
- **Attention weights.** Fused kernels (``sdpa``, flash, flex) return no weights, so the probe switches
  such a model to ``eager`` attention for its forward passes and back afterwards (same math, up to
  float rounding). A custom attention implementation registered through ``AttentionInterface`` (e.g.
  the ``cog`` patch) is kept as is, so the probe sees the patched attention; it must return its
  weights, or the probe raises ``ProbeError``.
- **Grok step** (our convention, from the spec): the first probed step whose copy accuracy exceeds 0.5.
- The callback probes every ``every_steps`` optimizer steps (the paper's claim is step-based), at step 0
  and after the last step, in eval mode (no dropout) and without gradients; every rank runs the same
  forward passes (safe under DDP). Results go to ``state.log_history`` (so a resumed run keeps them) as
  ``probe/copy_accuracy``, ``probe/copy_exact_match``, ``probe/loss_first_copy``,
  ``probe/loss_second_copy``, ``probe/induction/L{l}H{h}``, ``probe/induction/L{l}_max``,
  ``probe/induction_max`` and ``probe/induction_heads`` (heads with I above ``threshold``, 0.4); the
  main process rewrites ``probe_history.json`` and ``probe.png`` (copy accuracy and max induction score
  against step, training loss, per-layer max induction score) in the output folder after each probe.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import TrainerCallback

# Attention implementations that compute no attention weights.
_NO_WEIGHTS = {"sdpa", "flash_attention_2", "flash_attention_3", "flex_attention"}


class ProbeError(RuntimeError):
    """The model cannot be probed as configured (e.g. its attention returns no weights)."""


@dataclass
class CopyProbeConfig:
    seq_length: int = 32
    """``n``: tokens per random sequence; the input is ``[BOS] S S`` (2n+1 tokens). Spec: 16, 32 or 64."""
    num_sequences: int = 64
    """``M``: sequences per probe (the spec suggests 256; 64 keeps CPU runs quick)."""
    batch_size: int = 16
    seed: int = 1234
    threshold: float = 0.4
    """Induction score above which a head counts as an induction head (``probe/induction_heads``)."""
    bos: bool = True


def probe_token_ids(tokenizer, vocab_size: int | None = None) -> list[int]:
    """Ids the random sequences are drawn from: every id below ``min(len(tokenizer), vocab_size)`` that is not
    one of the tokenizer's special tokens (the probe passes ``config.vocab_size``, PEAR the output-embedding
    rows)."""
    n = len(tokenizer) if vocab_size is None else min(len(tokenizer), vocab_size)
    special = set(getattr(tokenizer, "all_special_ids", None) or [])
    ids = [i for i in range(n) if i not in special]
    if len(ids) < 2:
        raise ProbeError("the tokenizer has fewer than 2 non-special token ids to draw probe sequences from")
    return ids


def copy_sequences(token_ids: list[int] | torch.Tensor, n: int, m: int, generator: torch.Generator,
                   bos_id: int | None = None) -> torch.Tensor:
    """``[m, 2n(+1)]`` ids ``[BOS] S S`` per row, ``S`` uniform (with replacement) over ``token_ids``.

    One ``torch.randint(len(token_ids), (m, n))`` call on ``generator``, so successive calls continue one
    seeded stream (PEAR's scoring and training draws); ``make_copy_inputs`` starts a fresh one per call."""
    if n < 2:
        raise ProbeError(f"copy sequence length must be at least 2, got {n}")
    pool = torch.as_tensor(token_ids, dtype=torch.long)
    seq = pool[torch.randint(len(pool), (m, n), generator=generator)]
    parts = [seq, seq]
    if bos_id is not None:
        parts.insert(0, torch.full((m, 1), bos_id, dtype=torch.long))
    return torch.cat(parts, dim=1)


def make_copy_inputs(token_ids: list[int], n: int, m: int, seed: int = 0, bos_id: int | None = None) -> torch.Tensor:
    """``[m, 2n(+1)]`` ids: ``[BOS] S S`` per row, ``S`` uniform over ``token_ids``, from a generator seeded
    with ``seed`` (the probe's fixed sequences)."""
    return copy_sequences(token_ids, n, m, torch.Generator().manual_seed(seed), bos_id)


def copy_positions(n: int, start: int) -> torch.Tensor:
    """Indices ``t`` of the scored targets: the second copy (from ``start + n``) without its first token."""
    return torch.arange(start + n + 1, start + 2 * n)


def copy_stats(logits: torch.Tensor, input_ids: torch.Tensor, n: int, start: int) -> dict:
    """Sums over a batch: correct predictions, exact rows, and losses on both copies (see module doc)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    tgt2 = copy_positions(n, start)                        # second copy, tokens 2..n
    tgt1 = torch.arange(start + 1, start + n)              # first copy, tokens 2..n
    pred = logits[:, tgt2 - 1].argmax(-1)
    correct = pred == input_ids[:, tgt2]
    nll2 = -logp[:, tgt2 - 1].gather(-1, input_ids[:, tgt2, None]).squeeze(-1)
    nll1 = -logp[:, tgt1 - 1].gather(-1, input_ids[:, tgt1, None]).squeeze(-1)
    return {"correct": int(correct.sum()), "tokens": correct.numel(), "exact": int(correct.all(-1).sum()),
            "rows": input_ids.shape[0], "nll_first": float(nll1.sum()), "nll_second": float(nll2.sum()),
            "n_first": nll1.numel(), "n_second": nll2.numel()}


def induction_scores(attentions, n: int, start: int) -> torch.Tensor:
    """``[L, H]`` mean of ``A[i, i-n+1]`` over queries ``i`` in the second copy (its 1st..(n-1)-th token)
    and over the batch. ``attentions``: one ``[B, H, T, T]`` tensor per layer."""
    q = torch.arange(start + n, start + 2 * n - 1)
    k = q - n + 1
    out = []
    for a in attentions:
        if a is None:
            raise ProbeError("the attention implementation returned no attention weights")
        out.append(a[:, :, q, k].float().mean(dim=(0, 2)))
    return torch.stack(out)


@contextlib.contextmanager
def attention_weights(model):
    """Run ``model`` with an attention implementation that returns weights (eager for fused kernels)."""
    config = getattr(model, "config", None)
    impl = getattr(config, "_attn_implementation", None)
    switch = impl in _NO_WEIGHTS or (isinstance(impl, str) and impl.startswith("paged|"))
    if switch:
        model.set_attn_implementation("eager")
    try:
        yield
    finally:
        if switch:
            model.set_attn_implementation(impl)


@torch.no_grad()
def run_copy_probe(model, input_ids: torch.Tensor, n: int, start: int = 1, batch_size: int = 16,
                   threshold: float = 0.4) -> dict:
    """Copy accuracy, losses and the ``[L, H]`` induction-score matrix of ``model`` on ``input_ids``.

    ``model(input_ids=..., output_attentions=True)`` must return ``logits`` and ``attentions``.
    """
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    try:
        device = next(model.parameters()).device
    except (AttributeError, StopIteration):
        device = torch.device("cpu")
    totals: dict = {}
    ind_sum = None
    try:
        with attention_weights(model):
            for b in range(0, input_ids.shape[0], batch_size):
                ids = input_ids[b:b + batch_size].to(device)
                out = model(input_ids=ids, output_attentions=True)
                atts = getattr(out, "attentions", None)
                if not atts:
                    raise ProbeError("the model returned no attentions; the copying probe needs attention "
                                     "weights (use eager attention or an implementation that returns them)")
                ids_cpu = ids.cpu()
                stats = copy_stats(out.logits.cpu(), ids_cpu, n, start)
                for key, v in stats.items():
                    totals[key] = totals.get(key, 0) + v
                s = induction_scores([a.cpu() if a is not None else None for a in atts], n, start) * ids.shape[0]
                ind_sum = s if ind_sum is None else ind_sum + s
    finally:
        if was_training:
            model.train()
    ind = ind_sum / totals["rows"]
    return {
        "copy_accuracy": totals["correct"] / totals["tokens"],
        "copy_exact_match": totals["exact"] / totals["rows"],
        "loss_first_copy": totals["nll_first"] / totals["n_first"],
        "loss_second_copy": totals["nll_second"] / totals["n_second"],
        "induction": ind,
        "induction_max": float(ind.max()),
        "induction_heads": int((ind > threshold).sum()),
    }


def probe_log_entry(result: dict) -> dict:
    """Flat ``probe/...`` metrics for ``log_history`` from a ``run_copy_probe`` result."""
    entry = {f"probe/{k}": result[k] for k in ("copy_accuracy", "copy_exact_match", "loss_first_copy",
                                                "loss_second_copy", "induction_max", "induction_heads")}
    ind = result["induction"]
    for layer in range(ind.shape[0]):
        entry[f"probe/induction/L{layer}_max"] = round(float(ind[layer].max()), 6)
        for head in range(ind.shape[1]):
            entry[f"probe/induction/L{layer}H{head}"] = round(float(ind[layer, head]), 6)
    return entry


def grok_step(entries: list[dict], level: float = 0.5) -> int | None:
    """The first probed step whose copy accuracy exceeds ``level`` (the spec's "grok step")."""
    for e in entries:
        if e.get("probe/copy_accuracy", 0.0) > level:
            return e["step"]
    return None


def probe_entries(log_history: list[dict]) -> list[dict]:
    """The probe records of a ``log_history`` (one per step, the latest wins), in step order."""
    by_step = {}
    for h in log_history:
        if "probe/copy_accuracy" in h and "step" in h:
            by_step[h["step"]] = h
    return [by_step[s] for s in sorted(by_step)]


def plot_probe(log_history: list[dict], path: str | Path, title: str = "") -> Path:
    """PNG: copy accuracy and max induction score against step (training loss on a second axis), and
    each layer's max induction score against step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .plot import save_figure

    entries = probe_entries(log_history)
    steps = [e["step"] for e in entries]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    ax.plot(steps, [e["probe/copy_accuracy"] for e in entries], "o-", color="tab:red", label="copy accuracy")
    ax.plot(steps, [e["probe/induction_max"] for e in entries], "s-", color="tab:purple",
            label="max induction score")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("accuracy / attention weight")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    loss = [(h["step"], h["loss"]) for h in log_history if "loss" in h and "step" in h]
    if loss:
        axl = ax.twinx()
        axl.plot(*zip(*loss), color="tab:gray", alpha=0.6, label="train loss")
        axl.set_ylabel("train loss")
        lines = ax.get_legend_handles_labels()
        more = axl.get_legend_handles_labels()
        ax.legend(lines[0] + more[0], lines[1] + more[1], loc="center right", fontsize=8)
    else:
        ax.legend(loc="center right", fontsize=8)
    g = grok_step(entries)
    if g is not None:
        ax.axvline(g, color="tab:red", ls=":", alpha=0.6)
    ax.set_title("context copying" + (f" (grok step {g})" if g is not None else ""))
    layers = sorted({int(k.split("/L")[1].split("_")[0]) for e in entries for k in e if k.endswith("_max")
                     and k.startswith("probe/induction/L")})
    cmap = plt.get_cmap("viridis")
    for i, layer in enumerate(layers):
        ax2.plot(steps, [e.get(f"probe/induction/L{layer}_max", math.nan) for e in entries], "o-", ms=3,
                 color=cmap(i / max(1, len(layers) - 1)), label=f"layer {layer}")
    ax2.set_xlabel("optimizer step")
    ax2.set_ylabel("max induction score in layer")
    ax2.set_ylim(-0.02, 1.02)
    ax2.grid(alpha=0.3)
    if layers:
        ax2.legend(fontsize=8, ncol=2 if len(layers) > 8 else 1)
    ax2.set_title("induction heads by layer")
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)


class CopyingProbeCallback(TrainerCallback):
    """Runs the copying probe every ``every_steps`` optimizer steps (and at step 0 and the last step)."""

    def __init__(self, tokenizer, every_steps: int, config: CopyProbeConfig | None = None,
                 output_dir: str | Path | None = None, plot: bool = True, title: str = ""):
        self.tokenizer = tokenizer
        self.every_steps = every_steps
        self.config = config or CopyProbeConfig()
        self.output_dir = Path(output_dir) if output_dir is not None else None
        self.plot = plot
        self.title = title
        self._inputs: torch.Tensor | None = None
        self.plot_path: Path | None = None

    def inputs(self, model) -> torch.Tensor:
        if self._inputs is None:
            c = self.config
            vocab = getattr(getattr(model, "config", None), "vocab_size", None)
            bos = self.tokenizer.bos_token_id if c.bos else None
            if c.bos and bos is None:
                raise ProbeError("probe_bos is true but the tokenizer has no BOS token; set probe_bos: false")
            self._inputs = make_copy_inputs(probe_token_ids(self.tokenizer, vocab), c.seq_length, c.num_sequences,
                                            c.seed, bos)
        return self._inputs

    def _run(self, args, state, model) -> None:
        if model is None or any(h.get("step") == state.global_step and "probe/copy_accuracy" in h
                                for h in state.log_history):
            return
        c = self.config
        result = run_copy_probe(model, self.inputs(model), c.seq_length, start=1 if c.bos else 0,
                                batch_size=c.batch_size, threshold=c.threshold)
        entry = {"step": state.global_step, **probe_log_entry(result)}
        state.log_history.append(entry)
        if state.is_world_process_zero:
            print(f"[rlkit] step {state.global_step}: copy accuracy {result['copy_accuracy']:.3f}, "
                  f"max induction score {result['induction_max']:.3f} "
                  f"({result['induction_heads']} heads > {c.threshold})", flush=True)
        self._write(args, state)

    def _write(self, args, state) -> None:
        """Rewrite ``probe_history.json`` and ``probe.png`` from ``log_history`` (main process only)."""
        if not state.is_world_process_zero:
            return
        c = self.config
        out = self.output_dir or Path(args.output_dir)
        entries = probe_entries(state.log_history)
        out.mkdir(parents=True, exist_ok=True)
        (out / "probe_history.json").write_text(json.dumps(
            {"config": dataclasses.asdict(c), "grok_step": grok_step(entries), "history": entries}, indent=1) + "\n")
        if self.plot:
            self.plot_path = plot_probe(state.log_history, out / "probe.png", title=self.title)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self.every_steps > 0 and state.global_step == 0:  # a resumed run keeps its own schedule
            self._run(args, state, model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.every_steps > 0 and state.global_step % self.every_steps == 0:
            self._run(args, state, model)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if self.every_steps > 0:
            self._run(args, state, model)
            self._write(args, state)  # again: the plot's loss curve now has the last logged steps
