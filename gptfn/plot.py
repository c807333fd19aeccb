"""Loss curves: train and validation loss against steps (and tokens seen), to PNG.

matplotlib is the extra ``gptfn[plot]``, imported here only, with the Agg backend (no
display needed). The file is written atomically, so a reader never sees half a PNG.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Sequence, Union

from gptfn.fileio import atomic_path


def plot_losses(metrics: Sequence[dict], path: Union[str, Path]) -> Path:
    """Plot ``metrics`` (dicts with step, train_loss, val_loss, tokens) to ``path``."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("plotting losses needs matplotlib: pip install 'gptfn[plot]'") from None
    steps: List[int] = [m["step"] for m in metrics]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(steps, [m["train_loss"] for m in metrics], marker="o", label="train loss")
    ax.plot(steps, [m["val_loss"] for m in metrics], marker="o", linestyle="--",
            label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    if metrics and metrics[-1]["tokens"] and steps[-1]:
        per_step = metrics[-1]["tokens"] / steps[-1]
        top = ax.secondary_xaxis("top", functions=(lambda s: s * per_step, lambda t: t / per_step))
        top.set_xlabel("tokens seen")
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return path
