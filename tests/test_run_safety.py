"""A run directory is the run's alone: nothing outside it is touched, nothing in it is lost
unasked, and a checkpoint read from disk is checked before anything trusts it."""

import json
import os

import pytest
import torch

import gptfn.fileio as fileio
import gptfn.run_dir as run_dir
import gptfn.train as T
from gptfn import GPTModel, load_params, save_params
from gptfn.checkpoint import load_checkpoint, save_checkpoint
from gptfn.params import init_params
from gptfn.weights.safetensors_io import load_safetensors, save_safetensors
from tests.helpers import tiny_config
from tests.test_train import crash_at, datasets, model, settings


def run(out, **kw):
    """Train the tiny model into ``out``; returns its log lines."""
    lines = []
    tr, va = datasets()
    args = {k: kw.pop(k) for k in ("resume", "overwrite", "train_set") if k in kw}
    tr = args.pop("train_set", tr)
    T.train(model(), tr, va, settings(**kw), out, progress=False, log=lines.append, **args)
    return lines


def victim(tmp_path):
    v = tmp_path / "victim"
    v.mkdir()
    (v / "precious.txt").write_text("keep me")
    return v


def snapshot(directory):
    return {p.relative_to(directory): p.read_bytes() for p in sorted(directory.rglob("*"))
            if p.is_file()}



# ------------------------------------------------------------------ 1. confinement

@pytest.mark.parametrize("latest", ["ABS", "../victim", "ckpt-00000001/../../victim", "."])
def test_a_checkpoint_pointer_outside_the_run_deletes_nothing(tmp_path, latest):
    v = victim(tmp_path)
    out = tmp_path / "run"
    out.mkdir()
    latest = str(v) if latest == "ABS" else latest
    (out / "checkpoint.json").write_text(json.dumps({"latest": latest, "step": 1}))
    with pytest.raises(FileExistsError, match="--resume.*--overwrite"):
        run(out, max_steps=10)
    with pytest.raises(ValueError, match="ckpt-NNNNNNNN inside"):
        run(out, max_steps=10, resume=True)
    run(out, max_steps=10, overwrite=True)  # deletes the run's own files, by name
    assert (v / "precious.txt").read_text() == "keep me"
    assert load_checkpoint(out).state["step"] == 10


def test_a_symlinked_checkpoint_is_refused_and_only_the_link_is_removed(tmp_path):
    v = victim(tmp_path)
    out = tmp_path / "run"
    out.mkdir()
    (out / "ckpt-00000001").symlink_to(v, target_is_directory=True)
    (out / "checkpoint.json").write_text(json.dumps({"latest": "ckpt-00000001", "step": 1}))
    with pytest.raises(ValueError, match="not a checkpoint directory"):
        run(out, max_steps=10, resume=True)
    run(out, max_steps=10, overwrite=True)
    assert (v / "precious.txt").read_text() == "keep me"
    assert not (out / "ckpt-00000001").exists()


def test_saving_never_follows_a_planted_temporary_link(tmp_path):
    v = victim(tmp_path)
    out = tmp_path / "run"
    out.mkdir()
    (out / ".ckpt-00000010.tmp").symlink_to(v, target_is_directory=True)
    (out / "ckpt-00000010").symlink_to(v, target_is_directory=True)
    m = model()
    save_checkpoint(out, m, T.make_optimizer(m, settings()), m.config, {"step": 10, "tokens": 0})
    assert load_checkpoint(out).path == out / "ckpt-00000010"
    assert sorted(p.name for p in v.iterdir()) == ["precious.txt"]
    assert (v / "precious.txt").read_text() == "keep me"
    assert not (out / ".ckpt-00000010.tmp").exists()


def test_run_files_planted_as_links_are_never_written_through(tmp_path):
    outside = tmp_path / "outside.txt"
    outside.write_text("keep me\n")
    out = tmp_path / "run"
    run(out, max_steps=10)
    (out / "metrics.jsonl").unlink()
    (out / "metrics.jsonl").symlink_to(outside)
    with pytest.raises(ValueError, match="metrics.jsonl is a symbolic link"):
        run(out, max_steps=20, resume=True)
    with pytest.raises(OSError):  # O_NOFOLLOW, should a link appear mid-run
        run_dir.append_metrics(out / "metrics.jsonl", {"step": 1})
    run(out, max_steps=10, overwrite=True)  # removes the link, not what it points to
    assert outside.read_text() == "keep me\n" and not (out / "metrics.jsonl").is_symlink()


def test_a_shard_index_cannot_point_outside_its_directory(tmp_path):
    cfg = tiny_config()
    d = tmp_path / "m"
    save_params(init_params(cfg), d, cfg)
    (d / "model.safetensors").rename(tmp_path / "outside.safetensors")
    (d / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"wte.weight": "../outside.safetensors"}}))
    with pytest.raises(ValueError, match="not a file name in its directory"):
        load_params(d)


# --------------------------------------------------- 2. no silent overwrite or fresh start

def test_a_second_run_in_the_same_directory_is_refused_and_loses_nothing(tmp_path):
    out = tmp_path / "run"
    run(out, max_steps=10)
    before = snapshot(out)
    with pytest.raises(FileExistsError, match=r"holds another run .*--resume.*--overwrite"):
        run(out, max_steps=10)
    assert snapshot(out) == before
    with pytest.raises(ValueError, match="contradict"):
        run(out, max_steps=10, resume=True, overwrite=True)


def test_overwrite_replaces_the_run_and_keeps_other_files(tmp_path):
    out = tmp_path / "run"
    run(out, max_steps=20, checkpoint_interval=20)
    (out / "notes.txt").write_text("mine")
    run(out, max_steps=10, overwrite=True)
    assert (out / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in out.glob("ckpt-*")) == ["ckpt-00000010"]
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 10]


def test_resume_needs_a_checkpoint_and_something_to_train(tmp_path):
    with pytest.raises(FileNotFoundError, match="holds no checkpoint"):
        run(tmp_path / "typo", max_steps=10, resume=True)
    assert not (tmp_path / "typo").exists()
    run(tmp_path / "run", max_steps=10)
    with pytest.raises(ValueError, match="nothing to train: .* at step 10, past max_steps 5"):
        run(tmp_path / "run", max_steps=5, resume=True)
    (tmp_path / "run" / "model.safetensors").unlink()  # as if the last save had failed
    lines = run(tmp_path / "run", max_steps=10, resume=True)
    assert any("nothing to train" in line and "complete at step 10" in line for line in lines)
    assert load_params(tmp_path / "run")[0] == model().config


def test_resume_names_the_settings_that_change_the_run(tmp_path):
    out = tmp_path / "run"
    run(out, max_steps=10, lr=3e-3)
    tr, _ = datasets(context=8)
    lines = run(out, max_steps=20, lr=1e-3, batch_size=2, resume=True, train_set=tr)
    warning = next(line for line in lines if "change the run" in line)
    for part in ("max_steps 10 -> 20 (the learning-rate schedule changes)", "lr 0.003 -> 0.001",
                 "batch_size 4 -> 2", "context_length 16 -> 8"):
        assert part in warning, warning
    run(tmp_path / "b", max_steps=10, lr=3e-3)
    lines = run(tmp_path / "b", max_steps=20, lr=3e-3, resume=True)
    warning = next(line for line in lines if "change the run" in line)
    assert "max_steps 10 -> 20" in warning and "lr" not in warning.replace("learning-rate", "")


# ------------------------------------------------------------ corrupt checkpoint files

def corrupt_cases():
    def state_garbage(ck):
        (ck / "state.json").write_text("{not json")

    def state_step(ck):
        doc = json.loads((ck / "state.json").read_text())
        doc["state"]["step"] = 7
        (ck / "state.json").write_text(json.dumps(doc))

    def rng_missing(ck):
        save_safetensors({"cuda0": torch.zeros(3, dtype=torch.uint8)}, ck / "rng.safetensors")

    def rng_wrong(ck):
        save_safetensors({"cpu": torch.zeros(3, dtype=torch.uint8)}, ck / "rng.safetensors")

    def optimizer_shape(ck):
        t = dict(load_safetensors(ck / "optimizer.safetensors"))
        key = next(k for k in t if k.endswith("wte.weight.exp_avg"))
        t[key] = torch.zeros(2, 2)
        save_safetensors(t, ck / "optimizer.safetensors")

    def optimizer_missing(ck):
        (ck / "optimizer.safetensors").unlink()

    return [
        (state_garbage, r"state.json is corrupt \(JSONDecodeError"),
        (state_step, r"state.json is corrupt: step 7 in ckpt-00000010"),
        (rng_missing, r"rng.safetensors holds no CPU generator state"),
        (rng_wrong, r"rng.safetensors: 'cpu' is not a CPU generator state"),
        (optimizer_shape, r"optimizer.safetensors: wte.weight.exp_avg has shape \(2, 2\)"),
        (optimizer_missing, r"optimizer state .*optimizer.safetensors is unreadable"),
    ]


@pytest.mark.parametrize("damage,message", corrupt_cases(),
                         ids=lambda c: getattr(c, "__name__", ""))
def test_a_corrupt_checkpoint_file_is_named(tmp_path, damage, message):
    out = tmp_path / "run"
    run(out, max_steps=10)
    damage(out / "ckpt-00000010")
    with pytest.raises(ValueError, match=message):
        run(out, max_steps=20, resume=True)


# ------------------------------------------------------------------------- metrics

def test_a_cut_last_metrics_line_is_dropped_with_a_warning(tmp_path):
    out = tmp_path / "run"
    run(out, max_steps=20, checkpoint_interval=10)
    text = (out / "metrics.jsonl").read_text()
    kept = text.splitlines()[:2]  # steps 0 and 10: the checkpoint's
    (out / "metrics.jsonl").write_text("\n".join(kept) + '\n{"step": 20, "train_lo')
    lines = run(out, max_steps=30, resume=True)
    assert any("dropping its last line" in line for line in lines)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 10, 30]


def test_a_bad_metrics_line_in_the_middle_is_an_error(tmp_path):
    out = tmp_path / "run"
    run(out, max_steps=10)
    rows = (out / "metrics.jsonl").read_text().splitlines()
    (out / "metrics.jsonl").write_text("garbage\n" + "\n".join(rows) + "\n")
    with pytest.raises(ValueError, match=r"metrics.jsonl, line 1: not a metrics row"):
        run(out, max_steps=20, resume=True)


def test_checkpoints_follow_their_own_interval(tmp_path, monkeypatch):
    crash_at(monkeypatch, 8)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "run", max_steps=20, eval_interval=10, checkpoint_interval=3)
    assert load_checkpoint(tmp_path / "run").state["step"] == 6
    with pytest.raises(ValueError, match="checkpoint_interval"):
        settings(checkpoint_interval=0)


# ------------------------------------------------------------ 3. a saved model is a unit

class FailingReplace:
    """``os.replace`` in gptfn.fileio failing (ENOSPC) at its ``nth`` call."""

    def __init__(self, nth):
        self.nth, self.calls = nth, 0
        self.real = os.replace

    def __call__(self, src, dst):
        self.calls += 1
        if self.calls == self.nth:
            raise OSError(28, "No space left on device (simulated)")
        return self.real(src, dst)


@pytest.mark.parametrize("nth", [1, 2])
def test_a_save_cut_at_either_rename_leaves_one_whole_model(tmp_path, monkeypatch, nth):
    old_cfg, new_cfg = tiny_config(vocab_size=32), tiny_config(vocab_size=48, num_layers=1)
    d = tmp_path / "m"
    save_params(init_params(old_cfg, seed=1), d, old_cfg)
    new = init_params(new_cfg, seed=2)
    monkeypatch.setattr(fileio.os, "replace", FailingReplace(nth))
    with pytest.raises(OSError, match="No space"):
        save_params(new, d, new_cfg)
    monkeypatch.undo()
    if nth == 1:  # nothing renamed: the old model, and no temporary left
        cfg, params = load_params(d)
        assert cfg == old_cfg
        assert sorted(os.listdir(d)) == ["config.json", "model.safetensors"]
    else:  # the weights renamed, config.json not: the new model, whole
        with pytest.warns(UserWarning, match="save was cut off"):
            cfg, params = load_params(d)
        assert cfg == new_cfg and all(torch.equal(params[k], new[k]) for k in new)
    save_params(new, d, new_cfg)  # the next save settles it and clears the temporaries
    assert sorted(os.listdir(d)) == ["config.json", "model.safetensors"]
    assert load_params(d)[0] == new_cfg


def test_a_replaced_config_json_stays_in_charge(tmp_path):
    cfg = tiny_config()
    d = tmp_path / "m"
    save_params(init_params(cfg), d, cfg)
    (d / "config.json").write_text(json.dumps(tiny_config(num_layers=3).to_hf_dict()))
    with pytest.raises(ValueError, match="missing keys: h.2"):
        load_params(d)


def test_saved_files_get_the_umask_mode_and_paths_expand_home(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = tiny_config()
    old = os.umask(0o022)
    try:
        save_params(init_params(cfg), "~/m", cfg)
    finally:
        os.umask(old)
    for name in ("model.safetensors", "config.json"):
        assert (tmp_path / "m" / name).stat().st_mode & 0o777 == 0o644
    assert load_params("~/m")[0] == cfg
    assert GPTModel.from_pretrained("~/m").config == cfg


def test_a_save_cut_before_the_first_config_json_loads_as_the_new_model(tmp_path, monkeypatch):
    cfg = tiny_config(vocab_size=48)
    new = init_params(cfg, seed=2)
    monkeypatch.setattr(fileio.os, "replace", FailingReplace(2))
    with pytest.raises(OSError, match="No space"):
        save_params(new, tmp_path / "fresh", cfg)
    monkeypatch.undo()
    assert not (tmp_path / "fresh" / "config.json").exists()
    with pytest.warns(UserWarning, match="config.json is missing"):
        got_cfg, params = load_params(tmp_path / "fresh")
    assert got_cfg == cfg and all(torch.equal(params[k], new[k]) for k in new)
    (tmp_path / "weights-only").mkdir()
    os.replace(tmp_path / "fresh" / "model.safetensors",
               tmp_path / "weights-only" / "model.safetensors")
    with pytest.raises(FileNotFoundError, match="needs the model's config.json"):
        load_params(tmp_path / "weights-only")  # no cut save's config.json: nothing to go on


def test_a_checkpoint_whose_pointer_was_never_written_is_found(tmp_path):
    out = tmp_path / "run"
    run(out, max_steps=10, checkpoint_interval=5)
    (out / "checkpoint.json").unlink()  # as if the save was cut before naming it
    assert load_checkpoint(out).state["step"] == 10
    lines = run(out, max_steps=20, resume=True)
    assert any("resumed from" in line and "ckpt-00000010" in line for line in lines)


def test_resuming_on_other_data_is_named(tmp_path):
    out = tmp_path / "run"
    run(out, max_steps=10)
    from gptfn import TextDataset
    from tests.test_train import PATTERN

    shifted = TextDataset([(t + 1) % 23 for t in PATTERN], context_size=16, stride=4)
    lines = run(out, max_steps=20, resume=True, train_set=shifted)
    warning = next(line for line in lines if "change the run" in line)
    assert "the training data (sha256" in warning


@pytest.mark.parametrize("doc,message", [
    ('[' * 100000, "is corrupt"),
    ('{"latest": "ckpt-00000010", "step": 10, "x": ' + '[' * 100000, "is corrupt"),
])
def test_deeply_nested_json_is_a_named_error(tmp_path, doc, message):
    out = tmp_path / "run"
    run(out, max_steps=10)
    (out / "checkpoint.json").write_text(doc)
    with pytest.raises(ValueError, match=message):
        run(out, max_steps=20, resume=True)


@pytest.mark.parametrize("groups,message", [
    ('5', "not an object with a list"),
    ('[["x"]]', "unknown parameters"),
    ('"0.1"', "not a number"),
])
def test_malformed_param_groups_are_named(tmp_path, groups, message):
    out = tmp_path / "run"
    run(out, max_steps=10)
    state = out / "ckpt-00000010" / "state.json"
    doc = json.loads(state.read_text())
    if groups == '"0.1"':
        doc["param_groups"][0]["lr"] = "0.1"
    else:
        doc["param_groups"][0]["params"] = json.loads(groups)
    state.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=message):
        run(out, max_steps=20, resume=True)


def test_a_second_run_in_a_locked_directory_is_refused(tmp_path):
    import fcntl

    out = tmp_path / "run"
    out.mkdir()
    fd = os.open(out / run_dir.LOCK_NAME, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        with pytest.raises(FileExistsError, match="another gptfn train is running"):
            run(out, max_steps=10)
    finally:
        os.close(fd)
    run(out, max_steps=10)
