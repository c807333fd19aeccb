"""The device a benchmark runs on: its dtype, its clock, and the rooflines figures are held to.

- ``Target``: device + dtype from the command line (``--device cuda --dtype bf16``), with
  the checks that turn a bad pair into a clear error.
- ``Clock``: timestamps on the device's own timeline. On the CPU, ``time.perf_counter``; on
  CUDA, events recorded in stream order (``torch.cuda.Event(enable_timing=True)``) and read
  after one synchronize, so host-side launch time and queueing do not count as GPU time.
- Rooflines. On CUDA, the device's datasheet figures (HBM bandwidth; dense tensor-core
  FLOP/s per dtype), from ``GPU_SPECS`` by device name or from ``--peak-gbps`` /
  ``--peak-tflops``. On the CPU there is no datasheet to trust (a VM's share of a socket),
  so the workloads measure probes in the same rounds: a GEMV kernel for bandwidth
  (``benchmarks.decode``) and a GEMM for FLOP/s (``gemm_probe``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# (substring of torch.cuda.get_device_name(), HBM bytes/s, {dtype: dense FLOP/s}), from
# NVIDIA's datasheets; tensor-core figures without sparsity; fp32 is the non-tensor-core
# rate (TF32 is off by default in torch). The first matching entry wins: specific names first.
GPU_SPECS = [
    ("H200", 4.8e12, {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12}),
    ("H100 NVL", 3.9e12, {"bf16": 835e12, "fp16": 835e12, "fp32": 60e12}),
    ("H100 PCIe", 2.0e12, {"bf16": 756e12, "fp16": 756e12, "fp32": 51e12}),
    ("H100", 3.35e12, {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12}),  # SXM, "80GB HBM3"
    ("A100-SXM4-80GB", 2.039e12, {"bf16": 312e12, "fp16": 312e12, "fp32": 19.5e12}),
    ("A100 80GB PCIe", 1.935e12, {"bf16": 312e12, "fp16": 312e12, "fp32": 19.5e12}),
    ("A100", 1.555e12, {"bf16": 312e12, "fp16": 312e12, "fp32": 19.5e12}),  # the 40 GB parts
    ("L40S", 864e9, {"bf16": 362e12, "fp16": 362e12, "fp32": 91.6e12}),
    ("L4", 300e9, {"bf16": 121e12, "fp16": 121e12, "fp32": 30.3e12}),
]


@dataclass(frozen=True)
class Target:
    """Where and in what precision the model workloads run."""

    device: torch.device
    dtype_name: str = "fp32"
    peak_bytes_per_s: Optional[float] = None  # overrides the datasheet (CUDA)
    peak_flops: Optional[float] = None

    @classmethod
    def parse(cls, device: str = "cpu", dtype: str = "fp32", peak_gbps: Optional[float] = None,
              peak_tflops: Optional[float] = None) -> "Target":
        """Check the pair and build it; ValueError names the bad argument."""
        if dtype not in DTYPES:
            raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        try:
            dev = torch.device(device)
        except RuntimeError as exc:
            raise ValueError(f"--device {device!r} is not a torch device: {exc}") from None
        if dev.type not in ("cpu", "cuda"):
            raise ValueError(f"--device must be cpu or cuda[:N], got {device!r}")
        if dev.type == "cpu" and dtype == "fp16":
            raise ValueError("--dtype fp16 is for CUDA: the CPU has no fast fp16 kernels "
                             "(use fp32, or bf16)")
        if dev.type == "cuda":
            if not torch.cuda.is_available():
                raise ValueError(f"--device {device}: this torch build or machine has no CUDA")
            if dev.index is not None and dev.index >= torch.cuda.device_count():
                raise ValueError(f"--device {device}: there are {torch.cuda.device_count()} GPUs")
        for name, value in (("--peak-gbps", peak_gbps), ("--peak-tflops", peak_tflops)):
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be > 0, got {value}")
        return cls(dev, dtype,
                   peak_gbps * 1e9 if peak_gbps is not None else None,
                   peak_tflops * 1e12 if peak_tflops is not None else None)

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.dtype_name]

    @property
    def torch_dtype_name(self) -> str:
        """``float32`` / ``bfloat16`` / ``float16``: the name ``getattr(torch, ...)`` takes
        (how the workloads' child processes receive the dtype)."""
        return str(self.dtype).removeprefix("torch.")

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"

    def describe(self) -> str:
        if self.is_cuda:
            return f"{torch.cuda.get_device_name(self.device)} ({self.device}), {self.dtype_name}"
        return f"cpu, {self.dtype_name}"

    def clock(self) -> "Clock":
        return Clock(self.device)

    def spec(self) -> Tuple[Optional[float], Optional[float]]:
        """(bytes/s, FLOP/s at this dtype) from the overrides, else the datasheet; None where
        unknown (always, on the CPU, unless overridden)."""
        bandwidth, flops = self.peak_bytes_per_s, self.peak_flops
        if self.is_cuda:
            found = gpu_spec(torch.cuda.get_device_name(self.device))
            if found is not None:
                bandwidth = bandwidth or found[0]
                flops = flops or found[1].get(self.dtype_name)
        return bandwidth, flops


def gpu_spec(name: str):
    """(HBM bytes/s, {dtype: FLOP/s}) of the first ``GPU_SPECS`` entry in ``name``, or None."""
    for key, bandwidth, flops in GPU_SPECS:
        if key in name:
            return bandwidth, flops
    return None


class Clock:
    """Timestamps on the device's timeline; ``seconds(a, b)`` is the time from a to b.

    ``event`` is the event class: ``torch.cuda.Event`` on CUDA by default, None (host
    clock) on the CPU. It is a parameter so that the event arithmetic can be tested on a
    machine without a GPU.
    """

    def __init__(self, device, event: Optional[Callable[..., object]] = None):
        self._device = torch.device(device)
        self.cuda = self._device.type == "cuda"
        self._event = event if event is not None else (torch.cuda.Event if self.cuda else None)

    def stamp(self):
        """Now, in stream order: a CUDA event (recorded) or a perf_counter reading."""
        if self._event is None:
            return time.perf_counter()
        ev = self._event(enable_timing=True)
        ev.record()
        return ev

    def seconds(self, start, end) -> float:
        if self._event is None:
            return end - start
        end.synchronize()
        return start.elapsed_time(end) / 1e3  # elapsed_time is in ms

    def sync(self) -> None:
        """Wait until the device has done everything queued so far."""
        if self.cuda:
            torch.cuda.synchronize(self._device)


def per_round(spec: Optional[float], work: float, probe_times) -> list:
    """The roofline of each round: the datasheet's figure where there is one, else the
    rate of a probe that does ``work`` (bytes or FLOPs) in that round's time."""
    if spec:
        return [spec] * len(probe_times)
    return [work / t for t in probe_times]


def gemm_probe(target: Target, size: int = 1024):
    """A closure running one (size x size) @ (size x size) product at the target's dtype, and
    the FLOPs it does: the achievable compute rate MFU is held to on the CPU."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=gen).to(target.device, target.dtype)
    b = torch.randn(size, size, generator=gen).to(target.device, target.dtype)

    def run():
        torch.mm(a, b)

    return run, 2 * size ** 3


def gemm_note(target: Target, gemm_flops_per_s: float, spec_flops: Optional[float]) -> str:
    """The line under an MFU table: the device, and the peak FLOP/s measured and quoted."""
    return (f"{target.describe()}; GEMM probe {gemm_flops_per_s / 1e9:.0f} GFLOP/s (median)"
            + (f"; datasheet peak {spec_flops / 1e12:.0f} TFLOP/s" if spec_flops else ""))
