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
    r = gptfn("demo", "--model", str(tiny_dir), "--seq-len", "8", "--repeats", "2", "--no-compile",
              "--new-tokens", "8")
    assert r.returncode == 0, r.stderr
    assert f"weights from {tiny_dir}" in r.stdout
    assert "parameters 29,600" in r.stdout  # wte 3,104 + wpe 1,024 + 2 blocks x 12,704 + ln_f 64
    table = [line for line in r.stdout.splitlines() if line.startswith("| ")]
    names = [row.split("|")[1].strip() for row in table]
    assert names == ["variant", "eager", "torchscript", "generation", "eager"]
    assert "DeprecationWarning" not in r.stderr


def test_demo_compiled_on_a_tiny_checkpoint(tiny_dir):
    r = gptfn("demo", "--model", str(tiny_dir), "--seq-len", "4", "--repeats", "1", "--no-script",
              "--new-tokens", "20")
    assert r.returncode == 0, r.stderr
    rows = [line for line in r.stdout.splitlines() if line.startswith("| compiled")]
    max_abs_diff = float(rows[0].rstrip(" |").split("|")[-1])
    assert max_abs_diff <= 1e-5
    assert rows[1].rstrip(" |").endswith("= eager")  # compiled generation's tokens


@pytest.mark.parametrize("args, message", [
    (["demo", "--model", "gpt3"], "unknown model name 'gpt3'"),
    (["demo", "--seq-len", "0"], "expected a positive integer, got 0"),
])
def test_bad_arguments_one_line(args, message):
    r = gptfn(*args)
    assert r.returncode == 2
    assert message in r.stderr
    assert "Traceback" not in r.stderr


def test_too_long_sequence_one_line(tiny_dir):
    r = gptfn("demo", "--model", str(tiny_dir), "--seq-len", "33", "--no-compile", "--new-tokens", "0")
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


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory):
    """A tiny model with GPT-2's vocabulary, so the tokenizer's ids fit."""
    path = tmp_path_factory.mktemp("bpe_model")
    GPTModel(tiny_config(vocab_size=50257, context_length=64), seed=1).save_pretrained(path)
    return path


def expected_text(model_dir, prompt, n, **kwargs):
    import torch

    from gptfn import BPETokenizer, generate

    tok = BPETokenizer()
    model = GPTModel.from_pretrained(model_dir)
    out = generate(model, torch.tensor([tok.encode(prompt)]), n, eos_id=tok.eot_token,
                   **kwargs)[0].tolist()
    new = out[len(tok.encode(prompt)):]
    if tok.eot_token in new:
        new = new[: new.index(tok.eot_token)]
    return prompt + tok.decode(new)


def test_generate_greedy_stream_and_compile(bpe_dir):
    want = expected_text(bpe_dir, "Hello there", 12)
    r = gptfn("generate", "--model", str(bpe_dir), "--prompt", "Hello there", "--max-new-tokens", "12")
    assert r.returncode == 0, r.stderr
    assert r.stdout == want + "\n"
    assert "new tokens" in r.stderr and "tokens/s" in r.stderr
    r = gptfn("generate", "--model", str(bpe_dir), "--prompt", "Hello there", "--max-new-tokens",
              "12", "--stream", "--compile")
    assert r.returncode == 0, r.stderr
    assert r.stdout == want + "\n"
    assert "includes compiling" in r.stderr


def test_generate_sampling_is_seeded(bpe_dir):
    import torch

    args = ["generate", "--model", str(bpe_dir), "--prompt", "Once", "--max-new-tokens", "10",
            "--temperature", "0.9", "--top-k", "50", "--top-p", "0.95", "--seed", "7"]
    a, b = gptfn(*args), gptfn(*args)
    assert a.returncode == 0, a.stderr
    want = expected_text(bpe_dir, "Once", 10, temperature=0.9, top_k=50, top_p=0.95,
                         generator=torch.Generator().manual_seed(7))
    assert a.stdout == b.stdout == want + "\n"


def test_generate_finds_the_cache_and_says_how_to_get_weights(bpe_dir, tmp_path):
    import shutil

    env_cache = tmp_path / "cache"
    env = {**os.environ, "GPTFN_CACHE_DIR": str(env_cache), "GPTFN_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-m", "gptfn", "generate", "--max-new-tokens", "2"],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "no pretrained weights for 'gpt2'" in r.stderr and "--random-init" in r.stderr
    assert "downloads are disabled (GPTFN_OFFLINE=1)" in r.stderr
    shutil.copytree(bpe_dir, env_cache / "hf" / "openai-community" / "gpt2")
    r = subprocess.run([sys.executable, "-m", "gptfn", "generate", "--prompt", "Hi",
                        "--max-new-tokens", "3"], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout == expected_text(bpe_dir, "Hi", 3) + "\n"


def test_generate_downloads_a_missing_model_as_the_library_does(bpe_dir, tmp_path):
    """One policy for names: `gptfn generate --model gpt2` on an empty cache fetches the
    model (here from a mirror on 127.0.0.1), as GPTModel.from_pretrained("gpt2") does."""
    from tests.fileserver import FileServer

    hub = "/openai-community/gpt2/resolve/main/"
    files = {hub + f: (bpe_dir / f).read_bytes() for f in ("config.json", "model.safetensors")}
    env = {k: v for k, v in os.environ.items() if k not in ("GPTFN_OFFLINE", "HF_HUB_OFFLINE")}
    with FileServer(files) as server:
        env.update(GPTFN_CACHE_DIR=str(tmp_path), HF_ENDPOINT=server.url)
        r = subprocess.run([sys.executable, "-m", "gptfn", "generate", "--model", "124M",
                            "--prompt", "Hi", "--max-new-tokens", "3"],
                           capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout == expected_text(bpe_dir, "Hi", 3) + "\n"
    got = tmp_path / "hf" / "openai-community" / "gpt2"
    assert (got / "model.safetensors").read_bytes() == files[hub + "model.safetensors"]


@pytest.mark.parametrize("args, message", [
    (["--temperature", "-1"], "temperature must be a finite number >= 0"),
    (["--top-k", "0"], "top_k must be a positive int"),
    (["--top-p", "1.5"], "top_p must be in (0, 1]"),
    (["--prompt", ""], "the prompt is empty"),
    (["--max-new-tokens", "70"], "exceeds context_length 64"),
    (["--dtype", "int8"], "unknown dtype 'int8'"),
    (["--device", "cuda:0"], "no CUDA GPU"),
])
def test_generate_bad_input_one_line(bpe_dir, args, message):
    import torch

    if args[0] == "--device" and torch.cuda.is_available():
        pytest.skip("a GPU is present here")
    r = gptfn("generate", "--model", str(bpe_dir), *args)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    assert message in r.stderr.strip().splitlines()[-1]
