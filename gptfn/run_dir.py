"""What a training run keeps in its directory, and the rules that keep it that run's.

A run directory holds the checkpoints (``gptfn.checkpoint``), ``metrics.jsonl`` (one JSON
row per evaluation, appended), ``losses.png`` (redrawn from those rows) and the final model.
It belongs to one run: ``previous_run`` finds the files another run left, which a new run
refuses or (asked to overwrite) deletes, those only; ``run_lock`` keeps a second run out
while one trains; ``changed_course`` names the settings in which a resumed run departs from
the checkpoint's. A row that an interrupted append cut short is dropped, and a resumed run
drops the rows past its checkpoint, so the file always reads as the run's own history.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import warnings
from pathlib import Path
from typing import List, Optional

import numpy as np
from torch import Tensor

from gptfn.checkpoint import POINTER, run_dir_entries
from gptfn.fileio import atomic_write_text

# What a run writes into its directory (and so what ``overwrite`` deletes), besides the
# ckpt-NNNNNNNN checkpoints and their temporaries.
RUN_FILES = (POINTER, "metrics.jsonl", "losses.png", "model.safetensors", "config.json")
LOCK_NAME = ".gptfn-train.lock"  # held while a run trains; left behind, empty
# Settings that change which weights a run ends with; the others only change what it reports.
COURSE_SETTINGS = ("max_steps", "batch_size", "grad_accum", "lr", "min_lr", "warmup_steps",
                   "weight_decay", "beta1", "beta2", "grad_clip", "seed")


@contextlib.contextmanager
def run_lock(out: Path):
    """An exclusive lock on ``out/.gptfn-train.lock`` (where the platform has ``flock``)."""
    try:
        import fcntl
    except ImportError:  # no flock here: one run at a time is up to the user
        yield
        return
    fd = os.open(out / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise FileExistsError(f"another gptfn train is running in {out}: wait for it to "
                                  "end, or give another --out") from None
        yield
    finally:
        os.close(fd)


def previous_run(out: Path) -> List[Path]:
    """The entries of ``out`` that a gptfn run wrote (none if ``out`` does not exist)."""
    return [e for e in run_dir_entries(out)
            if e.name in RUN_FILES or _is_checkpoint_entry(e.name)]


def _is_checkpoint_entry(name: str) -> bool:
    return re.fullmatch(r"\.?ckpt-\d{8}(\.tmp)?", name) is not None


def changed_course(saved: dict, now: dict) -> List[str]:
    """The settings in which ``now`` differs from the checkpoint's, as 'name old -> new'."""
    old_settings, old_data = saved.get("settings", {}), saved.get("data", {})
    changed = []
    for key in COURSE_SETTINGS:
        if key in old_settings and old_settings[key] != now["settings"][key]:
            schedule = key in ("max_steps", "warmup_steps")
            why = " (the learning-rate schedule changes)" if schedule else ""
            changed.append(f"{key} {old_settings[key]} -> {now['settings'][key]}{why}")
    for key in ("context_length", "world_size"):
        if key in old_data and old_data[key] != now["data"][key]:
            changed.append(f"{key} {old_data[key]} -> {now['data'][key]}")
    old_sha, new_sha = old_data.get("sha256"), now["data"]["sha256"]
    if old_sha and new_sha and old_sha != new_sha:
        changed.append(f"the training data (sha256 {str(old_sha)[:12]}... -> {new_sha[:12]}...)")
    return changed


def data_fingerprint(dataset) -> Optional[str]:
    """The sha256 of the tokens a dataset's windows come from (for a prepared corpus, the
    one its meta.json states, and its split), or None for a dataset of another kind."""
    meta = getattr(dataset, "meta", None)
    if isinstance(meta, dict) and "sha256" in meta:
        tokens = getattr(dataset, "tokens", None)
        return hashlib.sha256(f"{meta['sha256']}:{len(tokens) if tokens is not None else ''}"
                              .encode()).hexdigest()
    tokens = getattr(dataset, "tokens", None)
    if isinstance(tokens, Tensor):
        return hashlib.sha256(tokens.detach().cpu().numpy().tobytes()).hexdigest()
    if isinstance(tokens, np.ndarray):
        return hashlib.sha256(np.ascontiguousarray(tokens).tobytes()).hexdigest()
    return None


def read_metrics(path: Path, log=None) -> List[dict]:
    """The rows of ``metrics.jsonl``. A last line cut short (an append that was interrupted)
    is dropped, with a warning through ``log``; a bad line before the last is an error."""
    if not path.is_file():
        return []
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if not isinstance(row, dict) or not isinstance(row.get("step"), int) or not all(
                    isinstance(row.get(k), (int, float)) for k in ("train_loss", "val_loss")):
                raise ValueError("not a metrics row")
        except (ValueError, RecursionError) as e:
            if number == len(lines):
                if log is not None:
                    log(f"warning: {path}: dropping its last line, cut short ({line[:40]!r})")
                break
            raise ValueError(f"{path}, line {number}: not a metrics row ({e})") from None
        rows.append(row)
    return rows


def append_metrics(path: Path, row: dict) -> None:
    rows = read_metrics(path) if path.is_file() and not _ends_cleanly(path) else None
    if rows is not None:  # a cut-short last line: rewrite without it before appending
        _write_metrics(path, rows)
    # O_NOFOLLOW: a symbolic link planted as metrics.jsonl must not make gptfn append to a
    # file outside the run directory
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o666)
    with open(fd, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(row) + "\n")


def _ends_cleanly(path: Path) -> bool:
    with open(path, "rb") as fh:
        fh.seek(0, 2)
        if fh.tell() == 0:
            return True
        fh.seek(-1, 2)
        return fh.read(1) == b"\n"


def _write_metrics(path: Path, rows: List[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def truncate_metrics(path: Path, step: int, log=None) -> None:
    """Drop metrics past the checkpoint's step (a crash after writing them), atomically."""
    if path.is_file():
        _write_metrics(path, [r for r in read_metrics(path, log) if r["step"] <= step])


def plot_metrics(out: Path) -> None:
    from gptfn.plot import plot_losses

    try:
        plot_losses(read_metrics(out / "metrics.jsonl"), out / "losses.png")
    except ImportError as e:  # matplotlib is an extra: training goes on without the plot
        warnings.warn(str(e), stacklevel=2)
