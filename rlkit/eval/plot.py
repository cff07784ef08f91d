"""PNG of training reward and held-out accuracy against step (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path


def plot_training(log_history: list[dict], path: str | Path, title: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    reward = [(h["step"], h["reward"]) for h in log_history if "reward" in h and "step" in h]
    acc = [(h["step"], h["heldout/accuracy"]) for h in log_history if "heldout/accuracy" in h]
    fig, ax = plt.subplots(figsize=(7, 4))
    if reward:
        ax.plot(*zip(*reward), label="train reward (mean)", color="tab:blue", alpha=0.7)
    if acc:
        ax.plot(*zip(*acc), "o-", label="held-out accuracy (greedy)", color="tab:red")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("reward / accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    if title:
        ax.set_title(title)
    return save_figure(fig, path)


def save_figure(fig, path: str | Path, dpi: int = 110) -> Path:
    """Lay out, write (creating the folder) and close a matplotlib figure; returns the path."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi)
    plt.close(fig)
    return out
