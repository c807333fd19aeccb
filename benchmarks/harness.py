"""Timing harness: warm-up, variants interleaved in rounds, medians and per-round ratios.

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
from typing import Callable, Dict, List, Optional

from benchmarks.device import Clock


@dataclass
class Samples:
    """Seconds per call of each variant, one entry per round."""

    times: Dict[str, List[float]] = field(default_factory=dict)

    def median(self, name: str) -> float:
        return statistics.median(self.times[name])

    def ratio(self, name: str, baseline: str) -> float:
        """Median over rounds of baseline_time / variant_time."""
        return statistics.median(
            b / v for b, v in zip(self.times[baseline], self.times[name])
        )


def interleaved(
    variants: Dict[str, Callable[[], object]],
    rounds: int,
    warmup: int = 1,
    clock: Optional[Clock] = None,
    progress: Optional[Callable[[str], None]] = None,
) -> Samples:
    """Time each variant ``rounds`` times, interleaved, after ``warmup`` untimed rounds.

    ``clock`` (default: the host's) times each call on the device's timeline; the device
    is idle when each call starts, so no call is charged for the one before it.
    """
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    clock = clock or Clock("cpu")
    for _ in range(warmup):
        for fn in variants.values():
            fn()
    samples = Samples({name: [] for name in variants})
    for r in range(rounds):
        for name, fn in variants.items():
            clock.sync()
            start = clock.stamp()
            fn()
            samples.times[name].append(clock.seconds(start, clock.stamp()))
        if progress is not None:
            progress(f"round {r + 1}/{rounds}")
    return samples


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> list:
    """The CPU features that decide kernel choice (from /proc/cpuinfo, where there is one)."""
    wanted = ("avx", "avx2", "fma", "f16c", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16")
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("flags"):
                    have = set(line.split(":", 1)[1].split())
                    return [f for f in wanted if f in have]
    except OSError:
        pass
    return []


def environment() -> dict:
    """What the figures depend on: versions, CPU and its flags, threads, GPU."""
    env = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cpu_flags": cpu_flags(),
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


def write_report(out_dir: Path, name: str, result: dict, table: str) -> None:
    """``{name}.json`` (every raw sample and the environment) and ``{name}.md`` (the table)."""
    from gptfn.fileio import atomic_write_text

    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / f"{name}.json", json.dumps(result, indent=2) + "\n")
    atomic_write_text(out_dir / f"{name}.md", table + "\n")


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
