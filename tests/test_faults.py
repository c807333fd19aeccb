"""Fault injection: real processes whose file system calls fail (ENOSPC, EACCES) or that are
killed (SIGKILL) at every step of a save, a prepare and a training run. After each fault the
previous state loads, or the new one is complete; a run resumed after a kill ends
bit-identical to one never interrupted.
"""

import json
import random
import textwrap
from pathlib import Path

import pytest
import torch

from gptfn import load_params
from gptfn.checkpoint import has_checkpoint
from gptfn.prepare import read_meta, verify
from gptfn.weights.safetensors_io import load_safetensors
from tests.faults import file_calls, python_argv, require_strace, run_and_kill, run_with_fault, spread

pytestmark = pytest.mark.filterwarnings("ignore:.*save was cut off:UserWarning")

ERRORS = ("ENOSPC", "EACCES", "KILL")
ROOT = Path(__file__).resolve().parents[1]


def script(code: str):
    return python_argv("-c", textwrap.dedent(code))


# ------------------------------------------------------------------- save_pretrained

SAVE = """
import sys
from gptfn import GPTModel
from tests.helpers import tiny_config
cfg = tiny_config(vocab_size=int(sys.argv[2]), num_layers=int(sys.argv[3]))
GPTModel(cfg, seed=int(sys.argv[4])).save_pretrained(sys.argv[1])
"""


def save_argv(d, vocab, layers, seed):
    return script(SAVE) + [str(d), str(vocab), str(layers), str(seed)]


def expected(vocab, layers, seed):
    from gptfn import GPTModel
    from tests.helpers import tiny_config

    m = GPTModel(tiny_config(vocab_size=vocab, num_layers=layers), seed=seed)
    return m.config, {k: v.detach() for k, v in m.state_dict().items()}


def save(d, vocab, layers, seed):
    from gptfn import GPTModel
    from tests.helpers import tiny_config

    GPTModel(tiny_config(vocab_size=vocab, num_layers=layers), seed=seed).save_pretrained(d)


def test_save_pretrained_survives_a_fault_at_every_file_call(tmp_path):
    require_strace()
    old, new = expected(32, 2, 1), expected(48, 1, 2)
    probe = tmp_path / "probe"
    save(probe, 32, 2, 1)
    calls = file_calls(save_argv(probe, 48, 1, 2), probe, cwd=ROOT)
    assert any(c.syscall.startswith("rename") for c in calls) and any(c.syscall == "write" for c in calls)
    outcomes = {"old": 0, "new": 0}
    for i, call in enumerate(spread(calls, 12)):
        error = ERRORS[i % len(ERRORS)]
        d = tmp_path / f"m{i}"
        save(d, 32, 2, 1)
        run_with_fault(save_argv(d, 48, 1, 2), call, error, cwd=ROOT)
        cfg, params = load_params(d)
        which = "new" if cfg == new[0] else "old"
        want = new if which == "new" else old
        assert all(torch.equal(params[k], want[1][k]) for k in want[1]), (call, error)
        outcomes[which] += 1
        save(d, 48, 1, 2)  # the next save settles what the fault left
        assert load_params(d)[0] == new[0]
        assert sorted(p.name for p in d.iterdir()) == ["config.json", "model.safetensors"]
    assert outcomes["old"] and outcomes["new"]  # faults landed before and after the commit


# ----------------------------------------------------------------------------- prepare

PREPARE = """
import sys
from gptfn.prepare import prepare
prepare([sys.argv[2]], sys.argv[1], progress=False)
"""


def test_prepare_survives_a_fault_at_every_file_call(tmp_path):
    from gptfn.prepare import prepare

    require_strace()
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("old corpus. " * 2000)
    b.write_text("a new and longer corpus! " * 3000)
    argv = lambda out, src: script(PREPARE) + [str(out), str(src)]  # noqa: E731
    probe = tmp_path / "probe"
    prepare([a], probe, progress=False)
    old_meta = read_meta(probe)
    calls = file_calls(argv(probe, b), probe, cwd=ROOT)
    new_meta = read_meta(probe)
    assert old_meta["sha256"] != new_meta["sha256"]
    seen = set()
    for i, call in enumerate(spread(calls, 16)):
        for error in ERRORS:
            out = tmp_path / f"p{i}{error}"
            prepare([a], out, progress=False)
            run_with_fault(argv(out, b), call, error, cwd=ROOT)
            meta = read_meta(out)
            verify(out)  # tokens.bin's sha256 is the one its description states
            assert meta["sha256"] in (old_meta["sha256"], new_meta["sha256"]), (call, error)
            seen.add(meta["sha256"])
    assert seen == {old_meta["sha256"], new_meta["sha256"]}
    out = tmp_path / f"p0{ERRORS[0]}"
    prepare([b], out, progress=False)
    assert read_meta(out)["sha256"] == new_meta["sha256"]
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "tokens.bin"]


# ------------------------------------------------------------------------------- train

TRAIN = """
import sys
from gptfn.checkpoint import has_checkpoint
from tests.test_train import datasets, model, settings
from gptfn.train import train
out = sys.argv[1]
tr, va = datasets()
resume = has_checkpoint(out)
train(model(), tr, va, settings(max_steps=40, checkpoint_interval=4), out, progress=False,
      resume=resume, overwrite=not resume)
"""


def final_params(out):
    return load_safetensors(out / "model.safetensors")


def test_training_killed_or_failing_anywhere_resumes_to_the_same_weights(tmp_path):
    require_strace()
    argv = lambda out: script(TRAIN) + [str(out)]  # noqa: E731
    straight = tmp_path / "straight"
    calls = file_calls(argv(straight), straight, cwd=ROOT,
                       syscalls=("rename", "renameat", "renameat2", "mkdir", "unlink"))
    want = final_params(straight)
    assert len(calls) > 20
    rng = random.Random(0)
    faults = [(call, rng.choice(ERRORS)) for call in rng.sample(calls, 3)]
    kills = [rng.uniform(3.0, 8.0) for _ in range(2)]
    for i, fault in enumerate(faults + kills):
        out = tmp_path / f"run{i}"
        if isinstance(fault, float):
            run_and_kill(argv(out), after=fault, cwd=ROOT)
        else:
            run_with_fault(argv(out), *fault, cwd=ROOT)
        if has_checkpoint(out):
            json.loads((out / "checkpoint.json").read_text())  # whole, and loads below
        assert run_and_kill(argv(out), after=300, cwd=ROOT) == 0, fault
        got = final_params(out)
        assert all(torch.equal(got[k], want[k]) for k in want), fault
        rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == [0, 10, 20, 30, 40], fault
