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

A run directory belongs to one run (``gptfn.run_dir``). Starting a run where another one's
files are refuses unless asked to ``resume`` it or to ``overwrite`` it (which deletes that
run's files, and only those); resuming where there is no checkpoint, or with nothing left to
train, is an error; resuming with settings that change the run's course says which changed.
Processes launched by torchrun join through ``gptfn.distributed``.
"""

from __future__ import annotations

import contextlib
import math
import signal
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gptfn.checkpoint import (POINTER, has_checkpoint, load_checkpoint, remove_entry,
                              restore_rng, save_checkpoint)
from gptfn.checks import is_int
from gptfn.distributed import data_parallel
from gptfn.errors import TrainingDiverged, TrainingInterrupted
from gptfn.inputs import check_targets, check_tokens
from gptfn.modules import GPTModel
from gptfn.run_dir import (RUN_FILES, append_metrics, changed_course, data_fingerprint,
                           plot_metrics, previous_run, run_lock, truncate_metrics)


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
    if rank == 0:  # it alone writes: it alone locks the directory
        out.mkdir(parents=True, exist_ok=True)
    with run_lock(out) if rank == 0 else contextlib.nullcontext():
        return _train(model, train_set, val_set, settings, out, tokenizer, resume, device,
                      rank, world_size, log, progress, overwrite)


@dataclass
class _Run:
    """What the steps of one process's run share: set up once, except that ``net`` becomes
    DDP's wrapper after resuming, and ``tokens`` and ``metrics`` grow as the run goes."""

    model: nn.Module  # the GPTModel: evaluated, sampled and saved
    net: nn.Module  # what the optimizer steps call: ``model``, or DDP around it
    optimizer: torch.optim.Optimizer
    settings: TrainSettings
    schedule: BatchSchedule
    course: dict  # what each checkpoint records of the run's course (settings, data)
    train_set: object
    eval_train: List[Tuple[Tensor, Tensor]]
    eval_val: List[Tuple[Tensor, Tensor]]
    out: Path
    tokenizer: object
    device: torch.device
    rank: int
    world_size: int
    tokens: int = 0  # trained on so far, by all the processes together
    metrics: List[dict] = field(default_factory=list)

    @property
    def step_tokens(self) -> int:
        return self.schedule.per_step * self.train_set.context_size


def _train(model, train_set, val_set, settings, out, tokenizer, resume, device, rank,
           world_size, log, progress, overwrite) -> Dict[str, object]:
    """The run, top-down: its state; the checkpoint resumed, or a fresh start; DDP; the
    optimizer steps; the final model."""
    run = _set_up(model, train_set, val_set, settings, out, tokenizer, device, rank, world_size)
    start = _resume(run, log) if resume else _start_afresh(run, overwrite)
    run.net = data_parallel(model, run.device, world_size)
    if start == settings.max_steps:  # finished: only the final model may be missing
        if rank == 0:
            log(f"nothing to train: the run in {out} is complete at step {start} (give a larger "
                "--max-steps to train further); its final model is written")
            model.save_pretrained(out)
        return {"steps": start, "tokens": run.tokens, "metrics": []}
    _steps(run, start, progress)
    if rank == 0:
        model.save_pretrained(out)
    return {"steps": settings.max_steps, "tokens": run.tokens, "metrics": run.metrics}


def _set_up(model, train_set, val_set, settings, out, tokenizer, device, rank,
            world_size) -> _Run:
    """The model on its device, a new optimizer, the batch schedule and the fixed
    evaluation batches."""
    device = torch.device(device or "cpu")
    if len(train_set) == 0 or len(val_set) == 0:
        raise ValueError("the training and validation data must each hold at least one window")
    schedule = BatchSchedule(len(train_set), settings.batch_size, settings.grad_accum,
                             world_size, settings.seed)
    course = {"settings": asdict(settings), "data": {
        "seed": settings.seed, "context_length": train_set.context_size, "world_size": world_size,
        "sha256": data_fingerprint(train_set)}}
    model.to(device)
    return _Run(
        model=model, net=model, optimizer=make_optimizer(model, settings), settings=settings,
        schedule=schedule, course=course, train_set=train_set,
        eval_train=fixed_batches(train_set, settings.batch_size, settings.eval_batches),
        eval_val=fixed_batches(val_set, settings.batch_size, settings.eval_batches),
        out=out, tokenizer=tokenizer, device=device, rank=rank, world_size=world_size)


def _resume(run: _Run, log) -> int:
    """Load the checkpoint in the run directory into the model, the optimizer and the RNGs;
    returns its step. Refuses another model's checkpoint, or one with nothing left to train."""
    out, settings, config = run.out, run.settings, run.model.config
    links = [name for name in RUN_FILES if (out / name).is_symlink()]
    if links:
        raise ValueError(f"{out / links[0]} is a symbolic link: gptfn writes only files of "
                         "its own inside the run directory; remove the link to resume")
    ck = load_checkpoint(out)
    start, run.tokens = int(ck.state["step"]), int(ck.state["tokens"])
    if ck.config != config:
        raise ValueError(
            f"the checkpoint in {out} is for another model config ({ck.config}); this "
            f"run's is {config}"
        )
    if start > settings.max_steps:
        raise ValueError(
            f"nothing to train: the checkpoint in {out} is at step {start}, past max_steps "
            f"{settings.max_steps}; give a larger --max-steps to train further")
    changed = changed_course(ck.state, run.course)
    run.model.load_state_dict(ck.params)
    run.optimizer.load_state_dict(ck.optimizer_state)
    restore_rng(ck.rng)
    if run.rank == 0:
        truncate_metrics(out / "metrics.jsonl", start, log)
        log(f"resumed from {ck.path} at step {start}")
        if changed:
            log("warning: resuming with settings that change the run: " + "; ".join(changed)
                + ". The result will differ from the uninterrupted run's.")
    return start


def _start_afresh(run: _Run, overwrite: bool) -> int:
    """Seed the RNGs and clear the run directory (another run's files only with
    ``overwrite``); returns step 0."""
    previous = previous_run(run.out)
    if previous and not overwrite:
        raise FileExistsError(
            f"{run.out} holds another run ({', '.join(p.name for p in previous[:4])}"
            f"{', ...' if len(previous) > 4 else ''}): pass --resume to continue it, or "
            "--overwrite to delete its files and start again")
    torch.manual_seed(run.settings.seed + run.rank)  # dropout: a function of the seed (and rank)
    if run.rank == 0:
        for entry in previous:
            remove_entry(entry, run.out)
        run.out.mkdir(parents=True, exist_ok=True)
    return 0


def _steps(run: _Run, start: int, progress: bool) -> None:
    """The optimizer steps from ``start`` to ``max_steps``, with evaluations and checkpoints
    on the way. SIGINT or SIGTERM ends them at the next step's end, after a checkpoint."""
    s = run.settings
    bar = _bar(start, s.max_steps, progress and run.rank == 0)
    with _StopSignals() as stop:
        if start == 0:
            _report(run, 0, lr_at(0, s), bar)  # the random model's loss: the curve starts at step 0
        run.model.train()
        t_last = time.perf_counter()
        for step in range(start, s.max_steps):
            lr = lr_at(step, s)
            loss = _accumulate_gradients(run, step)
            if not math.isfinite(loss):  # before the optimizer touches the weights
                run.optimizer.zero_grad(set_to_none=True)
                bar.close()
                raise _diverged(run.out, loss, step)
            _apply_gradients(run, lr)
            run.tokens += run.step_tokens
            t_last = _show_step(bar, loss, lr, run.step_tokens, t_last)
            done = step + 1
            if done % s.eval_interval == 0 or done == s.max_steps:
                _report(run, done, lr, bar)
            if stop.signal is not None or done % s.checkpoint_interval == 0 or done == s.max_steps:
                path = _checkpoint(run, done) if run.rank == 0 else None
            if stop.signal is not None and done < s.max_steps:
                bar.close()
                raise TrainingInterrupted(
                    f"{stop.signal} at step {done}: saved checkpoint {path}; continue with the "
                    "same command and --resume")
    bar.close()


def _accumulate_gradients(run: _Run, step: int) -> float:
    """Forward and backward over the step's ``grad_accum`` micro-batches (this process's
    slice of the global batch), under autocast; returns the step's mean loss."""
    s = run.settings
    step_loss = 0.0
    for micro in range(s.grad_accum):
        x, y = collate(run.train_set, run.schedule.indices(step, micro, run.rank))
        # DDP averages gradients over the processes in backward: once a step, at the last
        sync = micro == s.grad_accum - 1 or run.world_size == 1
        with (contextlib.nullcontext() if sync else run.net.no_sync()), _autocast(run.device):
            loss = calc_loss_batch(x, y, run.net, run.device) / s.grad_accum
        loss.backward()
        step_loss += loss.item()
    return step_loss


def _apply_gradients(run: _Run, lr: float) -> None:
    """One AdamW step at ``lr`` along the accumulated gradients (clipped), which it clears."""
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    if run.settings.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), run.settings.grad_clip)
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)


def _diverged(out: Path, loss: float, step: int) -> TrainingDiverged:
    kept = (f"; the last good checkpoint is {load_checkpoint(out).path} (resume from it with "
            "--resume, perhaps with a lower --lr)") if has_checkpoint(out) else (
            "; no checkpoint was saved yet")
    return TrainingDiverged(f"the loss is {loss} at step {step}: stopping{kept}")


def _show_step(bar, loss: float, lr: float, step_tokens: int, t_last: float) -> float:
    """Advance the progress bar by a step; returns the time it was shown at."""
    now = time.perf_counter()
    bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}",
                    tok_s=f"{step_tokens / (now - t_last):,.0f}")
    bar.update(1)
    return now


def _report(run: _Run, done: int, lr: float, bar) -> None:
    """Train and validation loss over the fixed batches, kept as a metrics row. Rank 0 also
    appends the row to metrics.jsonl, redraws losses.png and prints it (after step 0 with a
    short sample)."""
    with _autocast(run.device):
        tr = evaluate(run.model, run.eval_train, run.device)["loss"]
        va = evaluate(run.model, run.eval_val, run.device)["loss"]
    row = {"step": done, "train_loss": tr, "val_loss": va, "tokens": run.tokens, "lr": lr}
    run.metrics.append(row)
    if run.rank == 0:
        append_metrics(run.out / "metrics.jsonl", row)
        plot_metrics(run.out)
        sample = _sample(run.model, run.tokenizer, run.settings, run.device) if done else None
        bar.write(f"step {done}: train {tr:.3f}, val {va:.3f}"
                  + (f" | {sample!r}" if sample else ""))


def _checkpoint(run: _Run, done: int) -> Path:
    """A checkpoint of the run after ``done`` steps: weights, optimizer, RNGs, position."""
    return save_checkpoint(run.out, run.model, run.optimizer, run.model.config, run.course | {
        "step": done, "tokens": run.tokens,
        "data": run.course["data"] | {"windows_consumed": done * run.schedule.per_step}})


def _autocast(device: torch.device):
    """bf16 autocast on CUDA; on the CPU none (fp32)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


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


def _bar(start: int, total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, initial=start, desc="train", unit="step", disable=not enabled,
                mininterval=0.5)
