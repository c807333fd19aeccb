"""Timing harness and reports: warm-up, variants interleaved in rounds, medians and per-round
ratios; the workload registry; one Markdown table and one result dict per workload.

Every variant runs once per round, in the same order (A B C, A B C, ...), so slow drifts of
the machine (frequency, other load) hit all variants alike. A ratio is the median of the
per-round ratios ``baseline_time / variant_time`` (> 1: faster than the baseline).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from string import Formatter
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

from benchmarks.device import Clock

# name -> fn(opts) -> a result, or an iterable of results (decode: batch 1, then batched);
# ``opts`` is the command line's namespace with ``rounds``, ``target`` and ``peer_files`` set
WORKLOADS: Dict[str, Callable] = {}


def workload(name: str):
    """Register the decorated function as the workload ``name``."""
    def register(fn):
        WORKLOADS[name] = fn
        return fn
    return register


@dataclass
class Samples:
    """Seconds per call of each variant, one entry per timed round, and where asked for
    (``interleaved(keep=True)``) what each call returned in those rounds: the warm-up
    rounds' returns are never kept."""

    times: Dict[str, List[float]] = field(default_factory=dict)
    values: Dict[str, List[object]] = field(default_factory=dict)

    def median(self, name: str) -> float:
        return statistics.median(self.times[name])

    def ratio(self, name: str, baseline: str) -> float:
        """Median over rounds of baseline_time / variant_time."""
        return statistics.median(b / v for b, v in zip(self.times[baseline], self.times[name]))


def interleaved(variants: Dict[str, Callable[[], object]], rounds: int, warmup: int = 1,
                clock: Optional[Clock] = None,
                progress: Optional[Callable[[str], None]] = None, keep: bool = False) -> Samples:
    """Time each variant ``rounds`` times, interleaved, after ``warmup`` untimed rounds.

    ``clock`` (default: the host's) times each call on the device's timeline; the device
    is idle when each call starts, so no call is charged for the one before it. ``keep``:
    keep what each timed call returns (a variant's own figures, as a peer's clock gives
    them); otherwise it is dropped at once, as a caller would drop it.
    """
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    clock = clock or Clock("cpu")
    for _ in range(warmup):
        for fn in variants.values():
            fn()
    samples = Samples({name: [] for name in variants}, {name: [] for name in variants})
    for r in range(rounds):
        for name, fn in variants.items():
            clock.sync()
            start = clock.stamp()
            value = fn()
            if not keep:
                value = None  # freed now, inside the timed call, not rounds later
            samples.times[name].append(clock.seconds(start, clock.stamp()))
            samples.values[name].append(value)
        if progress is not None:
            progress(f"round {r + 1}/{rounds}")
    return samples


def markdown(columns: Sequence[Tuple[str, str]], rows: Sequence[dict]) -> List[str]:
    """The lines of a Markdown table: one row per dict, a column per (header, format) where
    the format is a ``str.format`` template over the row's keys ("-" where a key it names
    holds None). Text columns are left-aligned, figures right-aligned."""
    def fields(fmt):
        return [f.split(".")[0] for _, f, _, _ in Formatter().parse(fmt) if f]

    def cell(fmt, row):
        return "-" if any(row[f] is None for f in fields(fmt)) else fmt.format(**row)

    rule = ["---" if rows and isinstance(rows[0][fields(fmt)[0]], str) else "---:"
            for _, fmt in columns]
    return ([_line([h for h, _ in columns], " | "), _line(rule, "|")]
            + [_line([cell(fmt, row) for _, fmt in columns], " | ") for row in rows])


def _line(cells: Sequence[str], sep: str) -> str:
    return sep.lstrip() + sep.join(cells) + sep.rstrip()


def result(workload: str, table: Iterable[str], target=None, cfg=None, **fields) -> dict:
    """A workload's report: its name, model and device (where it has them), ``fields`` (the
    table's ``rows``, raw samples, ...), the environment, and the Markdown lines joined."""
    head = {"workload": workload}
    if cfg is not None:
        head["config"] = cfg.to_dict()
    if target is not None:
        head.update(device=str(target.device), dtype=target.dtype_name)
    return {**head, **fields, "environment": environment(), "table": "\n".join(table)}


def left_out(what: str, why: Dict[str, str]) -> str:
    """"; WHAT left out: a (why); b (why)", or "" where nothing was."""
    return f"; {what} left out: " + "; ".join(f"{k} ({v})" for k, v in why.items()) if why else ""


def _proc_cpuinfo(prefix: str) -> Optional[str]:
    """The value of /proc/cpuinfo's first line starting with ``prefix`` (None: none)."""
    try:
        with open("/proc/cpuinfo") as fh:
            return next((line.split(":", 1)[1] for line in fh if line.startswith(prefix)), None)
    except OSError:
        return None


def environment() -> dict:
    """What the figures depend on: versions, CPU and its flags (those that decide kernel
    choice), threads, GPU."""
    wanted = ("avx", "avx2", "fma", "f16c", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16")
    have = set((_proc_cpuinfo("flags") or "").split())
    env = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu": (_proc_cpuinfo("model name") or "").strip() or platform.processor()
        or platform.machine(),
        "cpu_flags": [f for f in wanted if f in have],
        "cpu_count": os.cpu_count(),
    }
    for module in ("torch", "transformers", "tiktoken", "numpy"):
        mod = sys.modules.get(module)
        if mod is not None:
            env[module] = getattr(mod, "__version__", "?")
    torch = sys.modules.get("torch")
    if torch is not None:
        env["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(torch.cuda.current_device())
            env["gpu"] = props.name
            env["gpu_memory_gb"] = round(props.total_memory / 1e9, 1)
            env["gpu_capability"] = f"{props.major}.{props.minor}"
            env["cuda"] = torch.version.cuda
    return env


def write_report(out_dir: Path, result: dict) -> None:
    """``{workload}.json`` (every raw sample and the environment) and ``{workload}.md`` (the
    table)."""
    from gptfn.fileio import atomic_write_text

    out_dir.mkdir(parents=True, exist_ok=True)
    name = result["workload"]
    atomic_write_text(out_dir / f"{name}.json", json.dumps(result, indent=2) + "\n")
    atomic_write_text(out_dir / f"{name}.md", result["table"] + "\n")


def hf_peer(cfg, model, target, share: bool = False):
    """HF's GPT2LMHeadModel holding ``model``'s weights (checked: every key taken), on the
    target's device and dtype, in eval mode. ``share``: HF's parameters are ``model``'s own
    tensors where the device and dtype already match (GPT-2 XL's 6 GB once, not twice), for
    inference only: a step of HF's optimizer would change ``model``."""
    import transformers

    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(**cfg.to_hf_dict()))
    missing, unexpected = hf.transformer.load_state_dict(model.state_dict(), strict=False,
                                                         assign=share)
    if unexpected or any(not k.endswith(("attn.bias", "attn.masked_bias")) for k in missing):
        raise RuntimeError(f"HF model did not take gptfn's weights: {missing} {unexpected}")
    if share:
        hf.tie_weights()  # assign replaced wte's tensor; the head must follow it
    return hf.to(device=target.device, dtype=target.dtype).eval()


def relative_error(a, b) -> float:
    """||a - b|| / ||b||, in float64."""
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


def quick_config(context_length: int = 256, embed_dim: int = 128, dropout_rate: float = 0.0):
    """The tiny model every workload uses with --quick: 2 layers, 4 heads, 2048 tokens."""
    from gptfn import GPTConfig

    return GPTConfig(vocab_size=2048, context_length=context_length, embed_dim=embed_dim,
                     num_layers=2, num_heads=4, dropout_rate=dropout_rate)


def model_config(opts, **quick):
    """The ``--model`` preset without dropout; with ``--quick``, ``quick_config(**quick)``."""
    from gptfn import GPTConfig

    if opts.quick:
        return quick_config(**quick)
    return GPTConfig.from_preset(opts.model, dropout_rate=0.0)
