"""What a user can cause from the command line gets one line, and a stopped run can go on."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from gptfn.cli import main
from gptfn.weights.safetensors_io import load_safetensors

TINY = {"vocab_size": 50257, "context_length": 16, "embed_dim": 16, "num_layers": 1,
        "num_heads": 2, "dropout_rate": 0.0, "qkv_bias": True}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    (d / "corpus.txt").write_text("the cat sat on the mat. " * 300)
    (d / "tiny.json").write_text(json.dumps(TINY))
    return d


def train_args(files, out, *extra):
    return ["train", "--data", str(files / "corpus.txt"), "--config", str(files / "tiny.json"),
            "--out", str(out), "--batch-size", "4", "--eval-batches", "2", "--no-progress", *extra]


def one_line_error(capsys, argv, code=2):
    rc = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == code, err
    assert len(err) >= 1 and "Traceback" not in "\n".join(err)
    return err[-1]


def test_config_and_model_paths_that_do_not_exist(capsys, files, tmp_path):
    line = one_line_error(capsys, ["train", "--data", str(files / "corpus.txt"), "--config",
                                   "nonexist.json", "--out", str(tmp_path / "r")])
    assert "--config nonexist.json: no such file" in line
    line = one_line_error(capsys, ["eval", "--model", "/nonexistent/dir", "--data",
                                   str(files / "corpus.txt")])
    assert "no such checkpoint file or directory: /nonexistent/dir" in line
    line = one_line_error(capsys, ["generate", "--model", "./missing-model"])
    assert "no such checkpoint file or directory" in line


def test_init_name_without_weights_names_trains_own_flags(capsys, files, tmp_path, monkeypatch):
    monkeypatch.setenv("GPTFN_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("GPTFN_OFFLINE", "1")  # a missing model is otherwise downloaded
    line = one_line_error(capsys, ["train", "--data", str(files / "corpus.txt"), "--init", "gpt2",
                                   "--out", str(tmp_path / "r")])
    assert "no pretrained weights for 'gpt2'" in line and "downloads are disabled" in line
    assert "--init random" in line and "--random-init" not in line


def test_data_prepared_with_another_tokenizer_is_named(capsys, files, tmp_path):
    from gptfn.prepare import prepare

    prepare([files / "corpus.txt"], tmp_path / "p50k", tokenizer="p50k_base", progress=False)
    line = one_line_error(capsys, ["train", "--data", str(tmp_path / "p50k"), "--config",
                                   str(files / "tiny.json"), "--out", str(tmp_path / "r")])
    assert "prepared with the p50k_base tokenizer (50281 token ids)" in line
    assert "vocab_size 50257" in line
    assert not (tmp_path / "r").exists()


def test_divergence_and_a_corrupt_checkpoint_are_one_line(capsys, files, tmp_path):
    out = tmp_path / "run"
    assert main(train_args(files, out, "--max-steps", "4", "--eval-interval", "2")) == 0
    capsys.readouterr()
    line = one_line_error(capsys, train_args(files, out, "--max-steps", "40", "--lr", "1e30",
                                             "--warmup-steps", "0", "--resume"), code=1)
    assert line.startswith("gptfn: error: training diverged: the loss is")
    assert "the last good checkpoint is" in line and "ckpt-00000004" in line
    (out / "ckpt-00000004" / "state.json").write_text("{")
    line = one_line_error(capsys, train_args(files, out, "--max-steps", "8", "--resume"))
    assert "state.json is corrupt" in line
    line = one_line_error(capsys, train_args(files, out, "--max-steps", "8"))
    assert "holds another run" in line and "--overwrite" in line
    line = one_line_error(capsys, train_args(files, out, "--max-steps", "8", "--resume",
                                             "--overwrite"))
    assert "give one of them" in line


def test_sampling_options_without_a_temperature_sample(capsys, files, tmp_path):
    from gptfn import GPTModel
    from gptfn.config import GPTConfig

    GPTModel(GPTConfig.from_dict(TINY), seed=0).save_pretrained(tmp_path / "m")
    base = ["generate", "--model", str(tmp_path / "m"), "--prompt", "Hello", "--max-new-tokens", "12"]
    assert main(base) == 0
    greedy = capsys.readouterr().out
    outs = set()
    for seed in ("1", "2", "3"):
        assert main(base + ["--top-k", "50", "--seed", seed]) == 0
        outs.add(capsys.readouterr().out)
    assert len(outs | {greedy}) > 1  # sampled: not always the greedy text
    assert main(base + ["--top-k", "50", "--temperature", "0"]) == 0
    assert "ignores --top-k and --top-p" in capsys.readouterr().err


def test_eval_shows_progress(capfd, files, tmp_path):
    from gptfn import GPTModel
    from gptfn.config import GPTConfig

    GPTModel(GPTConfig.from_dict(TINY), seed=0).save_pretrained(tmp_path / "m")
    assert main(["eval", "--model", str(tmp_path / "m"), "--data", str(files / "corpus.txt")]) == 0
    err = capfd.readouterr().err
    assert "eval: 100%" in err and "batch" in err


def _params(path):
    return load_safetensors(path / "model.safetensors")


STEPS = ["--max-steps", "30", "--eval-interval", "30"]


@pytest.fixture(scope="module")
def straight(files):
    """An uninterrupted run, to compare the stopped-and-resumed runs with."""
    out = files / "straight"
    # a process of its own, as the stopped run's: the same thread count (an earlier test may
    # have changed this process's), so the same sums, bit for bit
    subprocess.run([sys.executable, "-m", "gptfn", *train_args(files, out, *STEPS)], check=True,
                   capture_output=True)
    return _params(out)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_saves_a_checkpoint_and_resuming_ends_where_the_straight_run_does(
        files, straight, tmp_path, sig):
    steps = STEPS
    out = tmp_path / "stopped"
    proc = subprocess.Popen([sys.executable, "-m", "gptfn", *train_args(files, out, *steps)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))
    for line in proc.stdout:  # the step-0 evaluation is printed: training has begun
        if line.startswith("step 0:"):
            break
    time.sleep(0.5)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    line = err.strip().splitlines()[-1]
    assert line.startswith(f"gptfn: interrupted: {sig.name} at step ") and "--resume" in line
    step = int(line.split(" at step ")[1].split(":")[0])
    assert 0 < step < 30 and (out / f"ckpt-{step:08d}").is_dir()
    subprocess.run([sys.executable, "-m", "gptfn", *train_args(files, out, *steps, "--resume")],
                   check=True, capture_output=True)
    resumed = _params(out)
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)  # bit-identical to the uninterrupted run


def test_more_user_mistakes_are_one_line(capsys, files, tmp_path):
    from gptfn import GPTModel
    from gptfn.config import GPTConfig
    from gptfn.weights.safetensors_io import load_safetensors, save_safetensors

    GPTModel(GPTConfig.from_dict(TINY), seed=0).save_pretrained(tmp_path / "m")
    corpus = str(files / "corpus.txt")
    assert "is not supported: use cpu, cuda" in one_line_error(
        capsys, ["eval", "--model", str(tmp_path / "m"), "--data", corpus, "--device", "meta"])
    with pytest.raises(SystemExit):  # argparse: usage + one error line
        main(["train", "--data", corpus, "--out", str(tmp_path / "r"), "--seed", "-1"])
    assert "a seed must be in [0, 2**63), got -1" in capsys.readouterr().err
    big = tmp_path / "big.json"
    big.write_text(json.dumps(TINY | {"embed_dim": 10**9, "num_heads": 1}))
    line = one_line_error(capsys, ["train", "--data", corpus, "--config", str(big), "--out",
                                   str(tmp_path / "r")], code=1)
    assert line.startswith("gptfn: error: ")
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.txt").write_text("hello")
    for glob in ("/etc/*", "../*.txt"):
        assert "the glob must match names inside" in one_line_error(
            capsys, ["prepare", str(tmp_path / "in"), "--out", str(tmp_path / "p"), "--glob", glob])
    weights = load_safetensors(tmp_path / "m" / "model.safetensors")
    save_safetensors(dict(weights), tmp_path / "m" / "x.safetensors")
    raw = (tmp_path / "m" / "x.safetensors").read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    header["__metadata__"] = ["x"]
    text = json.dumps(header).encode()
    (tmp_path / "m" / "model.safetensors").write_bytes(
        len(text).to_bytes(8, "little") + text + raw[8 + n:])
    assert "__metadata__ must map strings to strings" in one_line_error(
        capsys, ["eval", "--model", str(tmp_path / "m"), "--data", corpus])
