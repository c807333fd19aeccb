"""Training and evaluation: losses, AdamW with warm-up + cosine decay, checkpoints, DDP.

``train(model, train_set, val_set, settings, out_dir)`` runs ``settings.max_steps``
optimizer steps. Each step takes a global batch of ``batch_size x grad_accum x world``
windows; which windows is a pure function of (seed, step): an epoch-long permutation of
the windows, drawn from the seed and the epoch, is cut into consecutive global batches and
each process takes its own disjoint slice. So a run resumed from a checkpoint sees exactly
the windows it would have seen, and N processes see exactly what one process with the same
global batch sees.

At step 0 and every ``eval_interval`` steps (and at the end): train and validation loss
over ``eval_batches`` fixed batches, a line in ``metrics.jsonl``, ``losses.png`` and a short
greedy sample. Every ``checkpoint_interval`` steps (default: the eval interval), at the end,
and when the run is stopped by Ctrl-C or SIGTERM: a checkpoint. Only rank 0 writes. A
non-finite loss stops the run with an error before the optimizer touches the weights; the
last checkpoint stays as it was.

A run directory belongs to one run. Starting a run where another one's files are refuses
unless asked to ``resume`` it or to ``overwrite`` it (which deletes that run's files, and
only those); resuming where there is no checkpoint, or with nothing left to train, is an
error; resuming with settings that change the run's course says which changed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import signal
import threading
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gptfn.checkpoint import (POINTER, has_checkpoint, load_checkpoint, remove_entry,
                              restore_rng, run_dir_entries, save_checkpoint)
from gptfn.checks import is_int
from gptfn.config import GPTConfig
from gptfn.errors import TrainingDiverged, TrainingInterrupted
from gptfn.fileio import atomic_write_text
from gptfn.inputs import check_targets, check_tokens
from gptfn.modules import GPTModel


# What a run writes into its directory (and so what ``overwrite`` deletes), besides the
# ckpt-NNNNNNNN checkpoints and their temporaries.
RUN_FILES = (POINTER, "metrics.jsonl", "losses.png", "model.safetensors", "config.json")
# Settings that change which weights a run ends with; the others only change what it reports.
LOCK_NAME = ".gptfn-train.lock"  # held while a run trains; left behind, empty
COURSE_SETTINGS = ("max_steps", "batch_size", "grad_accum", "lr", "min_lr", "warmup_steps",
                   "weight_decay", "beta1", "beta2", "grad_clip", "seed")


@dataclass
class TrainSettings:
    max_steps: int = 1000
    batch_size: int = 8  # windows per micro-batch, per process
    grad_accum: int = 1
    lr: float = 6e-4
    min_lr: Optional[float] = None  # default lr / 10
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    eval_interval: int = 100
    eval_batches: int = 10
    checkpoint_interval: Optional[int] = None  # default: eval_interval
    seed: int = 0
    sample_prompt: str = "Every effort moves you"
    sample_tokens: int = 20

    def __post_init__(self) -> None:
        if self.checkpoint_interval is None:
            self.checkpoint_interval = self.eval_interval
        for name in ("max_steps", "batch_size", "grad_accum", "eval_interval", "eval_batches",
                     "checkpoint_interval"):
            value = getattr(self, name)
            if not is_int(value) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive number, got {self.lr!r}")
        if self.grad_clip < 0:
            raise ValueError(f"grad_clip must be >= 0 (0: no clipping), got {self.grad_clip}")


# ----------------------------------------------------------------------------- losses

def calc_loss_batch(input_batch: Tensor, target_batch: Tensor, model: nn.Module,
                    device) -> Tensor:
    """Mean cross-entropy of next-token prediction over a batch (the GPTModelV1 API's).

    Shapes: input_batch, target_batch (B, T) -> scalar.
    """
    core = getattr(model, "module", model)  # DDP's wrapped model
    if isinstance(core, GPTModel):
        # where batches enter (on the host, before the copy): a bad id is named here, and
        # the step itself only asserts on the device (no sync: it compiles whole)
        check_tokens(input_batch, core.vocab_size, core.context_length)
        check_targets(target_batch, core.vocab_size, core.ignore_index)
    input_batch, target_batch = input_batch.to(device), target_batch.to(device)
    if isinstance(core, GPTModel):
        return model(input_batch, target_batch)  # the fused head + loss (gptfn.loss)
    logits = model(input_batch)  # (B, T, V)
    return F.cross_entropy(logits.flatten(0, 1).float(), target_batch.flatten())


def calc_loss_loader(data_loader: Iterable, model: nn.Module, device,
                     num_batches: Optional[int] = None) -> float:
    """Mean batch loss over the first ``num_batches`` batches (all if None); NaN if none."""
    total, count = 0.0, 0
    for i, (x, y) in enumerate(data_loader):
        if num_batches is not None and i >= num_batches:
            break
        total += calc_loss_batch(x, y, model, device).item()
        count += 1
    return total / count if count else float("nan")


def evaluate(model: nn.Module, data_loader: Iterable, device,
             num_batches: Optional[int] = None) -> Dict[str, float]:
    """Loss and perplexity over ``num_batches`` batches, in eval mode with no gradients."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        loss = calc_loss_loader(data_loader, model, device, num_batches)
    model.train(was_training)
    return {"loss": loss, "perplexity": math.exp(loss) if loss < 700 else float("inf")}


# --------------------------------------------------------------------- optimisation

def make_optimizer(model: nn.Module, s: TrainSettings) -> torch.optim.AdamW:
    """AdamW with weight decay on the matrices (weights, embeddings) only."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": s.weight_decay},
         {"params": no_decay, "weight_decay": 0.0}],
        lr=s.lr, betas=(s.beta1, s.beta2),
    )


def lr_at(step: int, s: TrainSettings) -> float:
    """Linear warm-up to ``lr`` over ``warmup_steps``, then cosine decay to ``min_lr``."""
    min_lr = s.lr / 10 if s.min_lr is None else s.min_lr
    if step < s.warmup_steps:
        return s.lr * (step + 1) / s.warmup_steps
    span = max(1, s.max_steps - s.warmup_steps)
    progress = min(1.0, (step - s.warmup_steps) / span)
    return min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (s.lr - min_lr)


# ---------------------------------------------------------------------------- data

class BatchSchedule:
    """Which windows each (step, micro-batch, rank) trains on: see the module docstring."""

    def __init__(self, num_windows: int, batch_size: int, grad_accum: int, world_size: int,
                 seed: int):
        self.n = num_windows
        self.batch_size = batch_size
        self.grad_accum = grad_accum
        self.world = world_size
        self.seed = seed
        self.per_step = batch_size * grad_accum * world_size
        if self.per_step > num_windows:
            raise ValueError(
                f"a global batch of {self.per_step} windows (batch_size {batch_size} x "
                f"grad_accum {grad_accum} x {world_size} processes) is larger than the "
                f"{num_windows} windows of the training data"
            )
        self._epoch = -1
        self._perm = np.arange(0)

    def _order(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.n)
            self._epoch = epoch
        return self._perm

    def indices(self, step: int, micro: int, rank: int) -> List[int]:
        first = step * self.per_step + (rank * self.grad_accum + micro) * self.batch_size
        out = []
        for p in range(first, first + self.batch_size):
            out.append(int(self._order(p // self.n)[p % self.n]))
        return out


def collate(dataset, indices: Sequence[int]) -> Tuple[Tensor, Tensor]:
    pairs = [dataset[i] for i in indices]
    return torch.stack([x for x, _ in pairs]), torch.stack([y for _, y in pairs])


def fixed_batches(dataset, batch_size: int, count: int) -> List[Tuple[Tensor, Tensor]]:
    """The first ``count`` batches of ``dataset`` in order (for evaluation)."""
    n = len(dataset)
    batches = []
    for b in range(count):
        idx = list(range(b * batch_size, min(n, (b + 1) * batch_size)))
        if not idx:
            break
        batches.append(collate(dataset, idx))
    return batches


# --------------------------------------------------------------------------- train

def train(
    model: nn.Module,
    train_set,
    val_set,
    settings: TrainSettings,
    out_dir,
    tokenizer=None,
    resume: bool = False,
    device=None,
    rank: int = 0,
    world_size: int = 1,
    log=print,
    progress: bool = True,
    overwrite: bool = False,
) -> Dict[str, object]:
    """Train ``model`` (a GPTModel) in place; see the module docstring. Returns a summary.

    Raises TrainingDiverged on a non-finite loss, and TrainingInterrupted (a
    KeyboardInterrupt) after saving a checkpoint when SIGINT or SIGTERM arrives. One run at
    a time in a directory: a second one started there meanwhile is refused."""
    out = Path(out_dir).expanduser()
    if resume and overwrite:
        raise ValueError("resume and overwrite contradict each other: pick one")
    if resume and not has_checkpoint(out):
        raise FileNotFoundError(
            f"cannot resume: {out} holds no checkpoint (no {POINTER}); check the run "
            "directory, or leave out --resume to start a new run")
    if rank != 0:
        return _train(model, train_set, val_set, settings, out, tokenizer, resume, device,
                      rank, world_size, log, progress, overwrite)
    out.mkdir(parents=True, exist_ok=True)
    with _run_lock(out):
        return _train(model, train_set, val_set, settings, out, tokenizer, resume, device,
                      rank, world_size, log, progress, overwrite)


@contextlib.contextmanager
def _run_lock(out: Path):
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


def _train(model, train_set, val_set, settings, out, tokenizer, resume, device, rank,
           world_size, log, progress, overwrite) -> Dict[str, object]:
    config: GPTConfig = model.config
    device = torch.device(device or "cpu")
    if len(train_set) == 0 or len(val_set) == 0:
        raise ValueError("the training and validation data must each hold at least one window")
    schedule = BatchSchedule(len(train_set), settings.batch_size, settings.grad_accum,
                             world_size, settings.seed)
    course = {"settings": asdict(settings), "data": {
        "seed": settings.seed, "context_length": train_set.context_size, "world_size": world_size,
        "sha256": data_fingerprint(train_set)}}
    model.to(device)
    optimizer = make_optimizer(model, settings)
    start, tokens = 0, 0
    if resume:
        links = [name for name in RUN_FILES if (out / name).is_symlink()]
        if links:
            raise ValueError(f"{out / links[0]} is a symbolic link: gptfn writes only files of "
                             "its own inside the run directory; remove the link to resume")
        ck = load_checkpoint(out)
        start, tokens = int(ck.state["step"]), int(ck.state["tokens"])
        if ck.config != config:
            raise ValueError(
                f"the checkpoint in {out} is for another model config ({ck.config}); this "
                f"run's is {config}"
            )
        if start > settings.max_steps:
            raise ValueError(
                f"nothing to train: the checkpoint in {out} is at step {start}, past max_steps "
                f"{settings.max_steps}; give a larger --max-steps to train further")
        changed = _changed_course(ck.state, course)
        model.load_state_dict(ck.params)
        optimizer.load_state_dict(ck.optimizer_state)
        restore_rng(ck.rng)
        if rank == 0:
            _truncate_metrics(out / "metrics.jsonl", start, log)
            log(f"resumed from {ck.path} at step {start}")
            if changed:
                log("warning: resuming with settings that change the run: " + "; ".join(changed)
                    + ". The result will differ from the uninterrupted run's.")
    else:
        previous = _previous_run(out)
        if previous and not overwrite:
            raise FileExistsError(
                f"{out} holds another run ({', '.join(p.name for p in previous[:4])}"
                f"{', ...' if len(previous) > 4 else ''}): pass --resume to continue it, or "
                "--overwrite to delete its files and start again")
        torch.manual_seed(settings.seed + rank)  # dropout: a function of the seed (and rank)
        if rank == 0:
            for entry in previous:
                remove_entry(entry, out)
            out.mkdir(parents=True, exist_ok=True)
    net = model
    if world_size > 1:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    eval_train = fixed_batches(train_set, settings.batch_size, settings.eval_batches)
    eval_val = fixed_batches(val_set, settings.batch_size, settings.eval_batches)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                else contextlib.nullcontext())
    step_tokens = schedule.per_step * train_set.context_size
    metrics: List[dict] = []

    def report(done: int, lr: float) -> None:
        with autocast:
            tr = evaluate(model, eval_train, device)["loss"]
            va = evaluate(model, eval_val, device)["loss"]
        row = {"step": done, "train_loss": tr, "val_loss": va, "tokens": tokens, "lr": lr}
        metrics.append(row)
        if rank == 0:
            _append_metrics(out / "metrics.jsonl", row)
            _plot(out)
            sample = _sample(model, tokenizer, settings, device) if done else None
            bar.write(f"step {done}: train {tr:.3f}, val {va:.3f}" + (f" | {sample!r}" if sample else ""))

    def checkpoint(done: int) -> Path:
        return save_checkpoint(out, model, optimizer, config, course | {
            "step": done, "tokens": tokens,
            "data": course["data"] | {"windows_consumed": done * schedule.per_step}})

    if start == settings.max_steps:  # finished: only the final model may be missing
        if rank == 0:
            log(f"nothing to train: the run in {out} is complete at step {start} (give a larger "
                "--max-steps to train further); its final model is written")
            model.save_pretrained(out)
        return {"steps": start, "tokens": tokens, "metrics": []}
    bar = _bar(start, settings.max_steps, progress and rank == 0)
    with _StopSignals() as stop:
        if start == 0:
            report(0, lr_at(0, settings))  # the random model's loss: the curve starts at step 0
        model.train()
        t_last = time.perf_counter()
        for step in range(start, settings.max_steps):
            lr = lr_at(step, settings)
            for group in optimizer.param_groups:
                group["lr"] = lr
            step_loss = 0.0
            for micro in range(settings.grad_accum):
                x, y = collate(train_set, schedule.indices(step, micro, rank))
                sync = micro == settings.grad_accum - 1 or world_size == 1
                with (contextlib.nullcontext() if sync else net.no_sync()), autocast:
                    loss = calc_loss_batch(x, y, net, device) / settings.grad_accum
                loss.backward()
                step_loss += loss.item()
            if not math.isfinite(step_loss):
                optimizer.zero_grad(set_to_none=True)
                bar.close()
                kept = (f"; the last good checkpoint is {load_checkpoint(out).path} (resume from "
                        "it with --resume, perhaps with a lower --lr)") if has_checkpoint(out) else (
                        "; no checkpoint was saved yet")
                raise TrainingDiverged(f"the loss is {step_loss} at step {step}: stopping{kept}")
            if settings.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            tokens += step_tokens
            now = time.perf_counter()
            bar.set_postfix(loss=f"{step_loss:.3f}", lr=f"{lr:.2e}", tok_s=f"{step_tokens / (now - t_last):,.0f}")
            bar.update(1)
            t_last = now
            done = step + 1
            if done % settings.eval_interval == 0 or done == settings.max_steps:
                report(done, lr)
                model.train()
            if stop.signal is not None or done % settings.checkpoint_interval == 0 or done == settings.max_steps:
                path = checkpoint(done) if rank == 0 else None
            if stop.signal is not None and done < settings.max_steps:
                bar.close()
                raise TrainingInterrupted(
                    f"{stop.signal} at step {done}: saved checkpoint {path}; continue with the "
                    "same command and --resume")
    bar.close()
    if rank == 0:
        model.save_pretrained(out)
    return {"steps": settings.max_steps, "tokens": tokens, "metrics": metrics}


def _previous_run(out: Path) -> List[Path]:
    """The entries of ``out`` that a gptfn run wrote (none if ``out`` does not exist)."""
    return [e for e in run_dir_entries(out)
            if e.name in RUN_FILES or _is_checkpoint_entry(e.name)]


def _is_checkpoint_entry(name: str) -> bool:
    return re.fullmatch(r"\.?ckpt-\d{8}(\.tmp)?", name) is not None


def _changed_course(saved: dict, now: dict) -> List[str]:
    """The settings in which ``now`` differs from the checkpoint's, as 'name old -> new'."""
    old_settings, old_data = saved.get("settings", {}), saved.get("data", {})
    changed = []
    for key in COURSE_SETTINGS:
        if key in old_settings and old_settings[key] != now["settings"][key]:
            why = " (the learning-rate schedule changes)" if key in ("max_steps", "warmup_steps") else ""
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


class _StopSignals:
    """Within the block, the first SIGINT / SIGTERM is noted (``.signal``) instead of killing
    the process, so the loop can save a checkpoint and stop; the handlers before it come back
    at once, so a second signal acts as it would have. Only in the main thread (where Python
    delivers signals)."""

    def __init__(self) -> None:
        self.signal: Optional[str] = None
        self._old: Dict[int, object] = {}

    def _handle(self, signum, frame) -> None:
        self.signal = signal.Signals(signum).name
        self._restore()

    def _restore(self) -> None:
        for signum, handler in self._old.items():
            signal.signal(signum, handler)
        self._old = {}

    def __enter__(self) -> "_StopSignals":
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._old[signum] = signal.getsignal(signum)
                signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> bool:
        self._restore()
        return False


def _sample(model, tokenizer, s: TrainSettings, device) -> Optional[str]:
    if tokenizer is None or s.sample_tokens <= 0 or model.config.vocab_size < tokenizer.n_vocab:
        return None
    from gptfn.generation import generate

    ids = tokenizer.encode(s.sample_prompt)
    room = model.config.context_length - len(ids)
    if not ids or room <= 0:
        return None
    was = model.training
    model.eval()
    out = generate(model, torch.tensor([ids], device=device), min(s.sample_tokens, room))
    model.train(was)
    return tokenizer.decode(out[0, len(ids):].tolist())


def _read_metrics(path: Path, log=None) -> List[dict]:
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


def _append_metrics(path: Path, row: dict) -> None:
    rows = _read_metrics(path) if path.is_file() and not _ends_cleanly(path) else None
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


def _truncate_metrics(path: Path, step: int, log=None) -> None:
    """Drop metrics past the checkpoint's step (a crash after writing them), atomically."""
    if path.is_file():
        _write_metrics(path, [r for r in _read_metrics(path, log) if r["step"] <= step])


def _plot(out: Path) -> None:
    from gptfn.plot import plot_losses

    try:
        plot_losses(_read_metrics(out / "metrics.jsonl"), out / "losses.png")
    except ImportError as e:  # matplotlib is an extra: training goes on without the plot
        warnings.warn(str(e), stacklevel=2)


def _bar(start: int, total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, initial=start, desc="train", unit="step", disable=not enabled,
                mininterval=0.5)
