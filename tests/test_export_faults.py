"""Fault injection for ``python -m export`` (issue 12, section 7). A full disk at a file
system call of the export leaves the previous artifact + report as they were, or the new
pair complete, with a one-line error; kill -9 (at a chosen call, and at random moments)
leaves the same or, killed inside the commit, a whole artifact with no report. Never a
report that describes another file, never a stray file under a final name; the next export
succeeds and removes the temporary files a killed one left.

A TorchScript export of a tiny model (the quickest kind), two runs at a time on two cores.
By default the commit's renames and link fail, and an even spread of the other calls (about
30 s on an idle machine); ``GPTFN_EXPORT_FAULTS=all`` fails every call that changes a file
and kills the process at each rename and link (about 3 minutes).
"""

import hashlib
import os
import random
import re
import shutil
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.faults import (FILE_SYSCALLS, Call, file_calls, python_argv, require_strace,
                          run_and_kill, run_with_fault, spread)

ROOT = Path(__file__).resolve().parents[1]
NAME, REPORT = "gpt.pt", "gpt.pt.report.json"
MAX_SEQ_LEN = "17"  # the least that verification's 16 decode steps allow: a quick export
SYSCALLS = FILE_SYSCALLS  # writev included: torch's stream writer writes with it
TEMP = re.compile(rf"\.({re.escape(NAME)}|{re.escape(REPORT)})\.[a-z0-9_]{{8}}\.tmp")
ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}  # two runs at a time on two cores
EVERY = os.environ.get("GPTFN_EXPORT_FAULTS") == "all"


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Two tiny models (the previous export's and the new one's), a directory holding the
    previous pair, and the new export's file system calls, from a dry run over a copy."""
    from export.__main__ import main
    from gptfn import GPTModel, init_params
    from tests.helpers import randomize_ln_and_biases, tiny_config

    require_strace()
    root = tmp_path_factory.mktemp("faults")
    cfg = tiny_config(context_length=int(MAX_SEQ_LEN))
    for name, seed in (("old", 1), ("new", 2)):
        params = randomize_ln_and_biases(init_params(cfg, seed), seed)
        GPTModel(cfg, params=params).save_pretrained(root / name)
    base = root / "base"
    base.mkdir()
    assert main(["torchscript", "--model", str(root / "old"), "--out", str(base / NAME)]) == 0
    dry = _copy(base, root / "dry")
    t0 = time.perf_counter()
    calls = file_calls(_argv(root, dry), dry, cwd=ROOT, env=ENV, syscalls=SYSCALLS)
    seconds = time.perf_counter() - t0
    assert _state(dry, base) == "new"  # a plain re-export over the previous pair
    return root, base, calls, seconds


def _argv(root: Path, out_dir: Path):
    return python_argv("-m", "export", "torchscript", "--model", str(root / "new"),
                       "--out", str(out_dir / NAME), "--max-seq-len", MAX_SEQ_LEN)


def _copy(base: Path, to: Path) -> Path:
    shutil.copytree(base, to)
    return to


def _state(d: Path, base: Path) -> str:
    """What ``d`` holds: "old" (the previous pair, as it was), "new" (the new pair, its
    report describing the artifact beside it), "unreported" (a whole artifact, no report).
    Fails on anything else: a report that does not describe the artifact, a file that is
    not whole, a file that is neither a final name nor a recognisable temporary one."""
    from export.build import load_torchscript
    from export.commit import read_report

    names = sorted(p.name for p in d.iterdir())
    stray = [n for n in names if n not in (NAME, REPORT) and not TEMP.fullmatch(n)]
    assert not stray, f"unexpected files {stray} in {names}"
    artifact, report = d / NAME, d / REPORT
    assert artifact.is_file(), f"no artifact: {names}"  # the previous one was there
    load_torchscript(artifact)  # whole: it loads
    old = _sha(artifact) == _sha(base / NAME)
    if not report.exists():
        return "unreported"
    read_report(report)  # names the artifact beside it, size and sha256
    if old:
        assert report.read_bytes() == (base / REPORT).read_bytes()
        return "old"
    return "new"


def _temps(d: Path):
    return sorted(p.name for p in d.iterdir() if TEMP.fullmatch(p.name))


def _rerun(root: Path, d: Path, base: Path) -> None:
    """The next export of the same name (in this process: the same code, less start-up)
    succeeds and leaves the new pair alone."""
    from export.__main__ import main

    argv = _argv(root, d)[3:]
    assert main(argv) == 0
    assert _state(d, base) == "new" and not _temps(d)


def _kill_at(argv, call: Call, **kwargs) -> subprocess.CompletedProcess:
    """Run ``argv`` killed (SIGKILL) as it makes ``call``, before the call takes effect."""
    tool = require_strace()
    cmd = [tool, "-f", "-qq", "-o", os.devnull, "-e", f"trace={call.syscall}", "-e",
           f"inject={call.syscall}:error=ENOSPC:signal=KILL:when={call.when}", *argv]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, **kwargs)


def _env():
    return {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", **ENV}


def _parallel(jobs):
    with ThreadPoolExecutor(max_workers=2) as pool:
        return list(pool.map(lambda job: job(), jobs))


def test_a_full_disk_at_any_call_keeps_a_whole_pair(setup):
    root, base, calls, _ = setup
    changing = [c for c in calls if c.changes_files]
    commit = [c for c in changing if c.syscall in ("rename", "link")]
    chosen = changing if EVERY else commit + spread([c for c in changing if c not in commit], 3)
    assert len(commit) >= 3  # the previous report moved, the artifact and report renamed
    dirs = [root / f"enospc-{i}" for i in range(len(chosen))]
    for d in dirs:
        _copy(base, d)
    results = _parallel([lambda c=c, d=d: run_with_fault(_argv(root, d), c, cwd=ROOT, env=ENV)
                         for c, d in zip(chosen, dirs)])
    problems = []
    for call, d, r in zip(chosen, dirs, results):
        what = f"ENOSPC at {call.text.strip()}"
        try:
            state = _state(d, base)
        except Exception as e:  # a report that lies, a file that does not load
            problems.append(f"{what}: {type(e).__name__}: {e}")
            continue
        if r.returncode == 0:
            if state != "new":
                problems.append(f"{what}: exit 0 with the {state} files")
        elif (r.returncode != 2 or "Traceback" in r.stderr
              or not r.stderr.strip().splitlines()[-1].startswith("export: error:")):
            problems.append(f"{what}: exit {r.returncode}, not one error line: {r.stderr[-2000:]}")
        elif state not in ("old", "new"):
            problems.append(f"{what}: left the {state} files")
        if _temps(d) and call.syscall != "unlink":  # only a failed clean-up leaves one
            problems.append(f"{what}: left {_temps(d)}")
        elif _temps(d):
            _rerun(root, d, base)
    assert not problems, "\n".join(problems)


def test_kill_9_keeps_a_whole_pair_and_the_next_export_cleans_up(setup):
    root, base, calls, seconds = setup
    commit = [c for c in calls if c.syscall in ("rename", "link") and c.changes_files]
    at = commit if EVERY else commit[-1:]  # the report's rename: the artifact is in place
    rng = random.Random(os.environ.get("GPTFN_FAULT_SEED", time.time_ns()))
    delays = sorted(round(rng.uniform(0.4, 0.9) * seconds, 2) for _ in range(2))
    jobs, cases = [], []
    for i, call in enumerate(at):
        d = _copy(base, root / f"kill-at-{i}")
        cases.append((f"kill -9 at {call.text.strip()}", d))
        jobs.append(lambda c=call, d=d: _kill_at(_argv(root, d), c, cwd=ROOT, env=_env()))
    for i, delay in enumerate(delays):
        d = _copy(base, root / f"kill-after-{i}")
        cases.append((f"kill -9 after {delay} s (of ~{seconds:.1f})", d))
        jobs.append(lambda t=delay, d=d: run_and_kill(_argv(root, d), t, cwd=ROOT, env=ENV))
    _parallel(jobs)
    for what, d in cases:
        assert _state(d, base) in ("old", "new", "unreported"), what
        _rerun(root, d, base)


def test_the_dry_run_saw_the_commit(setup):
    """The calls failed above are the export's own commit: the previous report moved to a
    temporary name, then the artifact renamed into place, then its report, last."""
    _, _, calls, _ = setup
    renames = [c.text for c in calls if c.syscall == "rename" and c.changes_files]
    assert len(renames) == 3, renames
    assert f'/{REPORT}", ' in renames[0]
    assert renames[1].rstrip().endswith(f'/{NAME}") = 0'), renames[1]
    assert renames[2].rstrip().endswith(f'/{REPORT}") = 0'), renames[2]
