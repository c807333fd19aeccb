"""The gptfn command as a user types it."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from gptfn import GPTModel
from tests.helpers import tiny_config


def gptfn(*args, timeout=300):
    env = dict(os.environ, PYTHONWARNINGS="error::DeprecationWarning:gptfn")
    return subprocess.run(
        [sys.executable, "-m", "gptfn", *args], capture_output=True, text=True, timeout=timeout,
        env=env,
    )


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("model")
    GPTModel(tiny_config(), seed=0).save_pretrained(path)
    return path


def test_demo_on_a_checkpoint(tiny_dir):
    r = gptfn("demo", "--model", str(tiny_dir), "--seq-len", "8", "--repeats", "2", "--no-compile")
    assert r.returncode == 0, r.stderr
    assert f"weights from {tiny_dir}" in r.stdout
    assert "parameters 29,600" in r.stdout  # wte 3,104 + wpe 1,024 + 2 blocks x 12,704 + ln_f 64
    table = [line for line in r.stdout.splitlines() if line.startswith("| ")]
    assert [row.split("|")[1].strip() for row in table[1:]] == ["eager", "torchscript"]
    assert "DeprecationWarning" not in r.stderr


def test_demo_compiled_on_a_tiny_checkpoint(tiny_dir):
    r = gptfn("demo", "--model", str(tiny_dir), "--seq-len", "4", "--repeats", "1", "--no-script")
    assert r.returncode == 0, r.stderr
    row = next(line for line in r.stdout.splitlines() if line.startswith("| compiled"))
    max_abs_diff = float(row.rstrip(" |").split("|")[-1])
    assert max_abs_diff <= 1e-5


@pytest.mark.parametrize("args, message", [
    (["demo", "--model", "gpt3"], "unknown preset 'gpt3'"),
    (["demo", "--seq-len", "0"], "expected a positive integer, got 0"),
])
def test_bad_arguments_one_line(args, message):
    r = gptfn(*args)
    assert r.returncode == 2
    assert message in r.stderr
    assert "Traceback" not in r.stderr


def test_too_long_sequence_one_line(tiny_dir):
    r = gptfn("demo", "--model", str(tiny_dir), "--seq-len", "33", "--no-compile")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == ["gptfn: error: seq_len must be in [1, 32], got 33"]


def test_corrupt_checkpoint_one_line(tmp_path, tiny_dir):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_bytes((Path(tiny_dir) / "config.json").read_bytes())
    (broken / "model.safetensors").write_bytes(b"\x00" * 4)
    r = gptfn("demo", "--model", str(broken))
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "not a safetensors file" in lines[0]


def test_no_command_shows_usage():
    r = gptfn()
    assert r.returncode == 2
    assert "usage: gptfn" in r.stderr
