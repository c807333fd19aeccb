"""Training: it learns, resumes bit-exactly, saves atomically, and 2 processes = 1."""

import json
import os
import socket
import struct
import subprocess
import sys

import pytest
import torch

import gptfn.train as T
from gptfn import GPTModel, TextDataset, load_params
from gptfn.checkpoint import load_checkpoint
from gptfn.train import TrainSettings, TrainingDiverged, train
from tests.helpers import tiny_config

PATTERN = [(i * 7) % 23 for i in range(460)]  # a periodic sequence: learnable exactly


def datasets(context=16):
    return (TextDataset(PATTERN, context_size=context, stride=4),
            TextDataset(PATTERN[:120], context_size=context, stride=context))


def settings(**kw):
    base = dict(max_steps=30, batch_size=4, lr=3e-3, warmup_steps=3, eval_interval=10,
                eval_batches=2)
    return TrainSettings(**(base | kw))


def model(dropout=0.1, seed=0):
    return GPTModel(tiny_config(vocab_size=32, context_length=16, dropout_rate=dropout), seed=seed)


def crash_at(monkeypatch, crash_step):
    """Make training raise KeyboardInterrupt as step ``crash_step`` starts; returns the real
    ``lr_at``."""
    real = T.lr_at

    def crashing(step, s):
        if step == crash_step:
            raise KeyboardInterrupt("simulated crash")
        return real(step, s)

    monkeypatch.setattr(T, "lr_at", crashing)
    return real


def same_params(a, b):
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_a_tiny_model_overfits_a_tiny_corpus(tmp_path):
    tr, va = datasets()
    trained = model(dropout=0.0)
    result = train(trained, tr, va, settings(max_steps=150, eval_interval=50), tmp_path,
                   progress=False)
    first, last = result["metrics"][0], result["metrics"][-1]
    assert last["train_loss"] < 0.3 < first["train_loss"]
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 50, 100, 150]  # step 0: the random model
    assert rows[-1]["tokens"] == 150 * 4 * 16
    loaded = GPTModel.from_pretrained(tmp_path)  # the run dir is a save_pretrained layout
    assert same_params(loaded, trained) and loaded.config == trained.config
    png = (tmp_path / "losses.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", png[16:24])
    assert width > 100 and height > 100


def test_resume_is_bit_identical(tmp_path, monkeypatch):
    tr, va = datasets()
    straight = model()
    train(straight, tr, va, settings(), tmp_path / "a", progress=False)

    real_lr_at = crash_at(monkeypatch, 25)
    with pytest.raises(KeyboardInterrupt):
        train(model(), tr, va, settings(), tmp_path / "b", progress=False)
    assert load_checkpoint(tmp_path / "b").state["step"] == 20
    monkeypatch.setattr(T, "lr_at", real_lr_at)
    torch.manual_seed(999)  # the resumed run must restore the RNG itself
    resumed = model(seed=123)  # and its weights
    train(resumed, tr, va, settings(), tmp_path / "b", resume=True, progress=False)
    assert same_params(straight, resumed)
    a = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert a == b


def test_crash_mid_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    import gptfn.checkpoint as C

    tr, va = datasets()
    real = C.save_safetensors

    def flaky(tensors, path, metadata=None):
        if "optimizer" in str(path) and load_checkpoint_exists(tmp_path):
            raise OSError("disk full (simulated)")
        return real(tensors, path, metadata)

    def load_checkpoint_exists(p):
        return (p / "checkpoint.json").is_file()

    monkeypatch.setattr(C, "save_safetensors", flaky)
    with pytest.raises(OSError, match="disk full"):
        train(model(), tr, va, settings(), tmp_path, progress=False)
    ck = load_checkpoint(tmp_path)  # the step-10 checkpoint, whole
    assert ck.state["step"] == 10
    assert sorted(p.name for p in tmp_path.glob("ckpt-*")) == ["ckpt-00000010"]


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    tr, va = datasets()
    real_lr_at = T.lr_at
    # a learning rate of 1e30 from step 12 on: the weights blow up, the loss follows
    monkeypatch.setattr(T, "lr_at", lambda step, s: 1e30 if step >= 12 else real_lr_at(step, s))
    with pytest.raises(TrainingDiverged, match=r"the loss is (nan|inf) at step 1[34].*ckpt-00000010"):
        train(model(), tr, va, settings(max_steps=30), tmp_path, progress=False)
    ck = load_checkpoint(tmp_path)
    assert ck.state["step"] == 10 and torch.isfinite(ck.params["wte.weight"]).all()


def test_bad_inputs(tmp_path):
    tr, va = datasets()
    with pytest.raises(ValueError, match="larger than the .* windows"):
        train(model(), TextDataset(PATTERN[:40], context_size=16, stride=16), va,
              settings(batch_size=4), tmp_path / "a", progress=False)
    with pytest.raises(ValueError, match="max_steps"):
        settings(max_steps=0)
    train(model(), tr, va, settings(max_steps=10), tmp_path / "b", progress=False)
    other = GPTModel(tiny_config(vocab_size=32, context_length=16, embed_dim=16, num_heads=2), seed=0)
    with pytest.raises(ValueError, match="checkpoint .* is for another model config"):
        train(other, tr, va, settings(), tmp_path / "b", resume=True, progress=False)
    ckpt = next((tmp_path / "b").glob("ckpt-*"))
    (ckpt / "optimizer.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="optimizer.safetensors is unreadable"):
        train(model(), tr, va, settings(), tmp_path / "b", resume=True, progress=False)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, out):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    tr, va = datasets()
    train(model(dropout=0.0), tr, va, settings(batch_size=2, max_steps=12, eval_interval=6),
          out, rank=rank, world_size=world, progress=False)
    dist.destroy_process_group()


def test_two_gloo_processes_equal_one_with_the_same_global_batch(tmp_path):
    import torch.multiprocessing as mp

    torch.set_num_threads(1)
    tr, va = datasets()
    single = model(dropout=0.0)
    train(single, tr, va, settings(batch_size=4, max_steps=12, eval_interval=6),
          tmp_path / "one", progress=False)
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path / "two")), nprocs=2, join=True)
    _, two = load_params(tmp_path / "two")
    for k, v in single.state_dict().items():
        torch.testing.assert_close(two[k], v, atol=1e-5, rtol=1e-5)
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(
        p.name for p in (tmp_path / "one").iterdir())  # rank 0 alone wrote


def test_cli_train_eval_resume(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the cat sat on the mat. " * 300)
    cfg = tmp_path / "tiny.json"
    cfg.write_text(json.dumps({"vocab_size": 50257, "context_length": 16, "embed_dim": 16,
                               "num_layers": 1, "num_heads": 2, "dropout_rate": 0.0,
                               "qkv_bias": True}))

    def gptfn(*args):
        return subprocess.run([sys.executable, "-m", "gptfn", *args, "--no-progress"]
                              if args[0] == "train" else [sys.executable, "-m", "gptfn", *args],
                              capture_output=True, text=True)

    run = tmp_path / "run"
    r = gptfn("train", "--data", str(corpus), "--config", str(cfg), "--out", str(run),
              "--max-steps", "20", "--batch-size", "4", "--eval-interval", "10", "--lr", "3e-3")
    assert r.returncode == 0, r.stderr
    assert "trained 20 steps" in r.stdout
    assert {"model.safetensors", "config.json", "metrics.jsonl", "losses.png",
            "checkpoint.json"} <= {p.name for p in run.iterdir()}
    r = gptfn("train", "--data", str(corpus), "--config", str(cfg), "--out", str(run),
              "--max-steps", "30", "--batch-size", "4", "--eval-interval", "10", "--resume")
    assert r.returncode == 0, r.stderr
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in rows] == [0, 10, 20, 30]
    r = gptfn("eval", "--model", str(run), "--data", str(corpus), "--max-batches", "3")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("loss ") and "perplexity" in r.stdout
    (tmp_path / "empty.txt").write_text("")
    r = gptfn("train", "--data", str(tmp_path / "empty.txt"), "--config", str(cfg), "--out",
              str(tmp_path / "r2"))
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("gptfn: error:")
    assert "empty" in r.stderr and "Traceback" not in r.stderr
