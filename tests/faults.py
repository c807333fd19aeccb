"""Fault injection for the tests: fail a chosen system call of a real process, or kill it.

Built on strace's syscall tampering (``-e inject=SYSCALL:error=ENOSPC:when=K`` fails the K-th
call of SYSCALL; strace counts per thread, so the K-th call of every thread that makes K of
them fails, which only adds faults). A dry run (``file_calls``) lists the file system calls
that touch a directory, in order, so a test can fail each of them in turn: every write,
rename, fsync and mkdir a save makes, one at a time.

A test that needs strace calls ``require_strace()``, which skips with that reason where the
tool is absent.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import pytest

# The calls through which a process changes files; each can fail with ENOSPC / EACCES / EIO.
FILE_SYSCALLS = ("openat", "write", "writev", "pwrite64", "pwritev", "pwritev2", "ftruncate", "fsync", "fdatasync", "rename",
                 "renameat", "renameat2", "mkdir", "mkdirat", "unlink", "unlinkat", "link",
                 "linkat", "fchmod")
_LINE = re.compile(r"^(\d+)\s+([a-z0-9_]+)\((.*)$")


@dataclass(frozen=True)
class Call:
    syscall: str
    when: int  # 1-based count of this syscall in its thread: strace's ``when=``
    text: str  # the traced line, for messages

    @property
    def changes_files(self) -> bool:
        """Whether the call (as the dry run made it) changed the file system: not one that
        failed there already, not an open for reading."""
        if "= -1" in self.text:
            return False
        if self.syscall == "openat":
            return any(flag in self.text for flag in ("O_CREAT", "O_WRONLY", "O_RDWR"))
        return True


def strace() -> Optional[str]:
    return shutil.which("strace")


def require_strace() -> str:
    path = strace()
    if path is None:
        pytest.skip("strace is not installed (fault injection needs it)")
    return path


def python_argv(*args: str) -> List[str]:
    """``[python, *args]`` with the test run's interpreter (not a shim that forks)."""
    return [sys.executable, *args]


def _env(env: Optional[Dict[str, str]]) -> Dict[str, str]:
    out = dict(os.environ)
    out.update({"PYTHONDONTWRITEBYTECODE": "1", "TQDM_DISABLE": "1"})
    out.update(env or {})
    return out


def file_calls(argv: Sequence[str], under: os.PathLike, *, cwd=None, env=None,
               syscalls: Sequence[str] = FILE_SYSCALLS, timeout: float = 300) -> List[Call]:
    """Run ``argv`` once under strace; the calls of ``syscalls`` whose arguments name a path
    under ``under`` (an fd's path included), in the order they were made."""
    tool = require_strace()
    log = Path(under).parent / f".strace-{os.getpid()}-{time.monotonic_ns()}.log"
    cmd = [tool, "-f", "--seccomp-bpf", "-qq", "-y", "-s", "0", "-o", str(log), "-e", f"trace={','.join(syscalls)}",
           *argv]
    proc = subprocess.run(cmd, cwd=cwd, env=_env(env), capture_output=True, text=True,
                          timeout=timeout)
    try:
        lines = log.read_text().splitlines()
    finally:
        log.unlink(missing_ok=True)
    if proc.returncode != 0:
        raise AssertionError(f"dry run failed ({proc.returncode}): {proc.stderr[-2000:]}")
    target = str(Path(under).resolve())
    counts: Dict[tuple, int] = {}
    calls: List[Call] = []
    for line in lines:
        m = _LINE.match(line)
        if not m:
            continue  # "<... resumed>" halves and exit lines: the call was counted at its start
        tid, name, rest = m.groups()
        key = (tid, name)
        counts[key] = counts.get(key, 0) + 1
        if target in rest and name in syscalls:
            calls.append(Call(name, counts[key], line))
    return calls


def run_with_fault(argv: Sequence[str], call: Call, error: str = "ENOSPC", *, cwd=None,
                   env=None, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``argv`` with ``call`` (its syscall's ``when``-th invocation) failing with ``error``,
    or, with ``error="KILL"``, with the process killed (SIGKILL) as it makes that call."""
    tool = require_strace()
    what = "signal=KILL" if error == "KILL" else f"error={error}"
    cmd = [tool, "-f", "--seccomp-bpf", "-qq", "-o", os.devnull, "-e", f"trace={call.syscall}",
           "-e", f"inject={call.syscall}:{what}:when={call.when}", *argv]
    return subprocess.run(cmd, cwd=cwd, env=_env(env), capture_output=True, text=True,
                          timeout=timeout)


def run_and_kill(argv: Sequence[str], after: float, *, cwd=None, env=None,
                 timeout: float = 300) -> Optional[int]:
    """Start ``argv``, SIGKILL it (and its children) after ``after`` seconds unless it has
    ended; returns its exit code, or None when it was killed."""
    proc = subprocess.Popen(list(argv), cwd=cwd, env=_env(env), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        return proc.wait(timeout=after)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=timeout)
        return None


def spread(calls: Sequence[Call], most: int) -> List[Call]:
    """At most ``most`` of ``calls``, evenly spread, always with the first and the last (the
    suite fails every call where there are few, a spread where a save makes thousands)."""
    if len(calls) <= most or most < 2:
        return list(calls[:max(most, 0)]) if most < 2 else list(calls)
    step = (len(calls) - 1) / (most - 1)
    return [calls[round(i * step)] for i in range(most)]
