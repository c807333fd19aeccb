"""A full disk during a GGUF or ONNX export (strace fault injection): the previous export is
left as it was, or the new one is complete, with a one-line error; never a report that
describes other files, never a stray file under a final name.

Each case re-exports over a directory that holds an earlier export (of other weights) and
fails one file system call of the new export's: a spread of the renames and links of its
commit (the protocol that tests/test_export_faults.py fails at every call), and of its other
calls that change files (the GGUF writer's, the ONNX staging directory's, the engine's).
"""

import re
import shutil
from pathlib import Path

import pytest

from tests.faults import file_calls, python_argv, require_strace, run_with_fault, spread
from tests.test_interop import NO_LLAMA, NO_ONNX

ROOT = Path(__file__).resolve().parents[1]
ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
TEMP = re.compile(r"\..+\.[a-z0-9_]{8}\.tmp(\.gguf)?|\.gptfn-onnx-staging\..+|\.gptfn-export\.lock")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from gptfn import GPTModel, init_params
    from tests.helpers import randomize_ln_and_biases, tiny_config

    require_strace()
    root = tmp_path_factory.mktemp("interop-faults")
    cfg = tiny_config(context_length=24)
    for name, seed in (("old", 1), ("new", 2)):
        params = randomize_ln_and_biases(init_params(cfg, seed), seed)
        GPTModel(cfg, params=params).save_pretrained(root / name)
    return root


def _files(d: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.is_file()}


def _check(d: Path, old: dict, report_name: str) -> str:
    """"old" (the earlier export, byte for byte) or "new" (a complete export whose report
    checks out); fails on anything else."""
    from export.commit import read_report

    stray = [p.name for p in d.iterdir() if p.name not in old and not TEMP.fullmatch(p.name)]
    finals = {n: b for n, b in _files(d).items() if not TEMP.fullmatch(n)}
    if finals == old:
        return "old"
    assert not stray or (d / report_name).is_file(), f"stray files {stray}"
    report = read_report(d / report_name)  # every file it names is the one beside it
    named = {a["file"] for a in report["artifacts"]} | {report_name}
    assert set(finals) == named, (sorted(finals), sorted(named))
    return "new"


def _faults(argv, base: Path, report_name: str, most: int, tmp_path: Path):
    """Fail ``most`` of the commit's renames and links and ``most`` of the other calls."""
    dry = tmp_path / "dry"
    shutil.copytree(base, dry)
    calls = [c for c in file_calls(argv(dry), dry, cwd=ROOT, env=ENV) if c.changes_files]
    commit = [c for c in calls if c.syscall in ("rename", "renameat", "renameat2", "link",
                                                 "linkat")]
    assert len(commit) >= 3
    old = _files(base)
    outcomes = []
    chosen = spread(commit, most) + spread([c for c in calls if c not in commit], most)
    for i, call in enumerate(chosen):
        d = tmp_path / f"case-{i}"
        shutil.copytree(base, d)
        r = run_with_fault(argv(d), call, "ENOSPC", cwd=ROOT, env=ENV)
        lines = r.stderr.strip().splitlines()
        assert r.returncode in (0, 1, 2), (call, r.stderr[-1500:])
        if r.returncode:
            assert lines[-1].startswith("export: ") and "Traceback" not in r.stderr, call
        state = _check(d, old, report_name)
        assert state == "new" if r.returncode == 0 else True, call
        outcomes.append(state)
    return outcomes


@pytest.mark.skipif(NO_LLAMA is not None, reason=NO_LLAMA or "")
def test_gguf_export_under_a_full_disk(models, tmp_path):
    from export.__main__ import main

    base = tmp_path / "base"
    base.mkdir()
    assert main(["gguf", "--model", str(models / "old"), "--out", str(base / "m.gguf")]) == 0

    def argv(d):
        return python_argv("-m", "export", "gguf", "--model", str(models / "new"), "--out",
                           str(d / "m.gguf"), "--threads", "1")

    outcomes = _faults(argv, base, "m.gguf.report.json", 3, tmp_path)
    assert "old" in outcomes  # the faults did reach the export


@pytest.mark.skipif(NO_ONNX is not None, reason=NO_ONNX or "")
def test_onnx_export_under_a_full_disk(models, tmp_path):
    from export.__main__ import main

    base = tmp_path / "base"
    assert main(["onnx", "--model", str(models / "old"), "--out", str(base)]) == 0

    def argv(d):
        return python_argv("-m", "export", "onnx", "--model", str(models / "new"), "--out",
                           str(d), "--threads", "1")

    outcomes = _faults(argv, base, "model.onnx.report.json", 2, tmp_path)
    assert "old" in outcomes
