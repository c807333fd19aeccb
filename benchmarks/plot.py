"""One PNG per workload: the headline figure of each variant, and its ratio to the peer."""

from __future__ import annotations

from pathlib import Path

METRICS = [  # (row key, axis label, higher is better)
    ("tokens_per_s", "tokens/s", True),
    ("mb_per_s", "MB/s", True),
    ("ttft_ms", "time to first token (ms)", False),
    ("median_s", "seconds", False),
    ("forward_ms", "forward (ms)", False),
    ("peak_mb", "peak RSS (MB)", False),
]


def plot_result(result: dict, path: Path) -> bool:
    """Write ``path``; False (and no file) where matplotlib or a plottable figure is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = result.get("rows") or []
    metric = next((m for m in METRICS if rows and m[0] in rows[0]), None)
    if metric is None:
        return False
    key, label, _ = metric
    rows = [r for r in rows if r[key] is not None]  # a variant without this figure
    names = [f"{r['variant']}" + (f" T={r['T']}" if "T" in r else "") for r in rows]
    values = [r[key] for r in rows]
    ratio_key = next((k for k in rows[0] if k.startswith("ratio_vs_")), None)
    fig, ax = plt.subplots(figsize=(max(5, 1.2 * len(rows)), 4))
    bars = ax.bar(names, values, color="#4878a8")
    if ratio_key:
        for bar, r in zip(bars, rows):
            ax.annotate(f"{r[ratio_key]:.2f}x", (bar.get_x() + bar.get_width() / 2,
                                                 bar.get_height()), ha="center", va="bottom",
                        fontsize=9)
    ax.set_ylabel(label)
    peer = ratio_key.removeprefix("ratio_vs_") if ratio_key else None
    ax.set_title(f"{result['workload']}" + (f" (ratios: against {peer})" if peer else ""))
    plt.setp(ax.get_xticklabels(), rotation=20, ha="right")
    fig.tight_layout()
    from gptfn.fileio import atomic_path

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return True
