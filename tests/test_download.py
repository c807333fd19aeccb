"""Downloads against a real HTTP server on 127.0.0.1; OpenAI TF checkpoints; conversion;
files checked before they are cached; a model's files as one unit, under faults (a full disk
at each file system call, kill -9 mid-transfer).

The full-disk test runs ``gptfn download`` under strace, two runs at a time on two cores: every
write, rename and unlink fails once (with ENOSPC), and the first and last of its other calls
that change a file (``GPTFN_DOWNLOAD_FAULTS=all``: every one of them). The kill test kills
it at three random moments of its transfers.
"""

import json
import os
import random
import stat
import subprocess
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from gptfn import GPTModel, gpt_forward, init_params, load_params
from gptfn.fileio import umask_mode
from gptfn.weights.download import OPENAI_FILES, DownloadError, download, is_cached, plan
from gptfn.weights.hub import canonicalize
from gptfn.weights.safetensors_io import save_safetensors
from tests.faults import (file_calls, python_argv, require_strace, run_and_kill,
                          run_with_fault, spread)
from tests.fileserver import FileServer
from tests.helpers import hf_logits, hf_model, random_idx, randomize_ln_and_biases, tiny_config

transformers = pytest.importorskip("transformers")
HUB = "/openai-community/gpt2/resolve/main/"


@pytest.fixture(scope="module")
def hub_repo(tmp_path_factory):
    """Files of a tiny model as save_pretrained writes them, and the HF model."""
    cfg = tiny_config(context_length=64, vocab_size=2000)  # ~380 kB: several chunks
    model = hf_model(cfg, seed=1)
    d = tmp_path_factory.mktemp("hub")
    model.save_pretrained(d)
    files = {HUB + f: (d / f).read_bytes() for f in ("config.json", "model.safetensors")}
    return cfg, model, files


@pytest.fixture
def fast(monkeypatch):
    """Short back-off so retry tests take milliseconds; online whatever the environment says."""
    monkeypatch.delenv("GPTFN_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    return dict(progress=False, retries=3, backoff=0.01)


@pytest.fixture(scope="module")
def tiny_hub(tmp_path_factory):
    """A 2-layer, 32-wide model with a 64-token vocabulary in the hub's layout (114 kB):
    (config, params, the files the server serves)."""
    cfg = tiny_config(vocab_size=64, context_length=16)
    params = randomize_ln_and_biases(init_params(cfg, 3))
    d = tmp_path_factory.mktemp("tiny")
    save_safetensors(params, d / "model.safetensors", metadata={"format": "pt"})
    files = {HUB + "config.json": json.dumps(cfg.to_hf_dict()).encode(),
             HUB + "model.safetensors": (d / "model.safetensors").read_bytes()}
    return cfg, params, files


HTML = b"<!DOCTYPE html>\n<html><head><title>Sign in</title></head><body>...</body></html>\n"


def gpt2_dir(cache):
    return cache / "hf" / "openai-community" / "gpt2"


def assert_whole(cache, files, params=None):
    """The cache holds the model's complete set, byte for byte the server's, and it loads."""
    target = gpt2_dir(cache)
    assert sorted(p.name for p in target.iterdir()) == ["config.json", "model.safetensors"]
    for name in ("config.json", "model.safetensors"):
        assert (target / name).read_bytes() == files[HUB + name], name
    assert is_cached("gpt2", cache_dir=cache)
    _, loaded = load_params(target)
    if params is not None:
        assert set(loaded) == set(params) and all(torch.equal(loaded[k], params[k]) for k in params)


def assert_none_or_whole(cache, files, before=None):
    """The cache holds the complete model set, or none: no model directory, or (part of) the
    one that was there ``before`` ({name: bytes}), untouched."""
    target = gpt2_dir(cache)
    if is_cached("gpt2", cache_dir=cache):
        assert_whole(cache, files)
    elif target.exists():
        assert {p.name: p.read_bytes() for p in target.iterdir()}.items() <= (before or {}).items()


def older_partial_directory(cache):
    """What an older gptfn left when a download was cut: config.json (of whatever the server
    had then) renamed into the model's directory, beside model.safetensors.part."""
    target = gpt2_dir(cache)
    target.mkdir(parents=True)
    before = {"config.json": json.dumps(tiny_config(vocab_size=64, context_length=32)
                                        .to_hf_dict()).encode(),
              "model.safetensors.part": bytes(1000)}
    for name, data in before.items():
        (target / name).write_bytes(data)
    return before


def test_download_then_load_equals_source(hub_repo, tmp_path, fast):
    cfg, model, files = hub_repo
    with FileServer(files) as server:
        path = download("gpt2", base_url=server.url, cache_dir=tmp_path, **fast)
    assert path == tmp_path / "hf" / "openai-community" / "gpt2"
    for f in ("config.json", "model.safetensors"):
        assert (path / f).read_bytes() == files[HUB + f]
    loaded_cfg, params = load_params(path)
    want = canonicalize({k: v for k, v in model.state_dict().items()})
    want.pop("lm_head.weight", None)
    assert set(params) == set(want) and all(torch.equal(params[k], want[k]) for k in want)
    idx = random_idx(cfg, 2, 9)
    assert (gpt_forward(params, idx, loaded_cfg) - hf_logits(model, idx)).abs().max() <= 1e-4


def test_cached_files_are_used_with_no_network(hub_repo, tmp_path, fast):
    _, _, files = hub_repo
    with FileServer(files) as server:
        download("gpt2", base_url=server.url, cache_dir=tmp_path, **fast)
        seen = len(server.requests)
    # the server is gone: the cache answers alone
    path = download("gpt2", base_url=server.url, cache_dir=tmp_path, **fast)
    assert (path / "model.safetensors").is_file() and seen == 2


def test_offline_and_not_cached(tmp_path, fast, monkeypatch):
    with FileServer({}) as server:
        url = server.url
    with pytest.raises(DownloadError, match="connection refused"):
        download("gpt2", base_url=url, cache_dir=tmp_path, **fast)
    monkeypatch.setenv("GPTFN_OFFLINE", "1")
    with pytest.raises(DownloadError, match="downloads are disabled"):
        download("gpt2", base_url=url, cache_dir=tmp_path, **fast)


def test_cut_transfer_is_resumed_with_range(hub_repo, tmp_path, fast):
    _, _, files = hub_repo
    with FileServer(files) as server:
        server.behaviour.cut_once.add(HUB + "model.safetensors")
        path = download("gpt2", base_url=server.url, cache_dir=tmp_path, **fast)
        log = [r for r in server.requests if r[0].endswith("model.safetensors")]
    assert (path / "model.safetensors").read_bytes() == files[HUB + "model.safetensors"]
    half = len(files[HUB + "model.safetensors"]) // 2
    assert log[0][1:] == (None, 200) and log[1][2] == 206
    resumed_at = int(log[1][1].removeprefix("bytes=").rstrip("-"))
    assert 0 < resumed_at <= half  # what had arrived was kept, not fetched again
    assert not list(path.glob("*.part"))


def test_server_that_ignores_range_restarts_cleanly(hub_repo, tmp_path, fast):
    _, _, files = hub_repo
    with FileServer(files) as server:
        server.behaviour.cut_once.add(HUB + "model.safetensors")
        server.behaviour.ignore_range = True
        path = download("gpt2", base_url=server.url, cache_dir=tmp_path, **fast)
        log = [r for r in server.requests if r[0].endswith("model.safetensors")]
    assert (path / "model.safetensors").read_bytes() == files[HUB + "model.safetensors"]
    assert log[1][1] is not None and log[1][2] == 200  # asked for a range, got the whole file


def test_corrupt_file_is_detected_and_deleted(hub_repo, tmp_path, fast):
    _, _, files = hub_repo
    with FileServer(files) as server:
        server.behaviour.corrupt.add(HUB + "model.safetensors")
        with pytest.raises(DownloadError, match="corrupt"):
            download("gpt2", base_url=server.url, cache_dir=tmp_path, **fast)
    target, _ = plan("gpt2", cache_dir=tmp_path)
    assert not target.exists()
    assert not list(tmp_path.rglob("model.safetensors*"))


def test_wrong_content_length(hub_repo, tmp_path, fast):
    _, _, files = hub_repo
    with FileServer(files) as server:
        server.behaviour.extra_length[HUB + "config.json"] = 100
        with pytest.raises(DownloadError, match="could not download .*config.json after 4 attempts"):
            download("gpt2", base_url=server.url, cache_dir=tmp_path, **fast)
    target, _ = plan("gpt2", cache_dir=tmp_path)
    assert not (target / "config.json").exists()


def test_404_is_not_retried_and_503_is(hub_repo, tmp_path, fast):
    _, _, files = hub_repo
    with FileServer({}) as server:
        with pytest.raises(DownloadError, match=r"HTTP 404 \(not found\)"):
            download("gpt2", base_url=server.url, cache_dir=tmp_path, **fast)
        assert len(server.requests) == 1
    with FileServer(files) as server:
        server.behaviour.status[HUB + "config.json"] = 503
        with pytest.raises(DownloadError, match="HTTP 503"):
            download("gpt2", base_url=server.url, cache_dir=tmp_path, **fast)
        assert len(server.requests) == 4  # retries=3


def test_unknown_name_and_source(tmp_path):
    with pytest.raises(ValueError, match="unknown model name 'gpt3'"):
        download("gpt3", cache_dir=tmp_path)
    with pytest.raises(ValueError, match="unknown source"):
        download("gpt2", source="s3", cache_dir=tmp_path)


def test_env_endpoint_and_cache_and_from_pretrained(hub_repo, tmp_path, monkeypatch):
    cfg, model, files = hub_repo
    files = {k.replace("/gpt2/", "/gpt2-medium/"): v for k, v in files.items()}
    with FileServer(files) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        monkeypatch.setenv("GPTFN_CACHE_DIR", str(tmp_path))
        ours = GPTModel.from_pretrained("355M")  # an alias, resolved and downloaded
    assert (tmp_path / "hf" / "openai-community" / "gpt2-medium" / "model.safetensors").is_file()
    idx = random_idx(cfg, 1, 7)
    assert (ours(idx) - hf_logits(model, idx)).abs().max() <= 1e-4


def test_a_missing_model_is_not_fetched_when_told_not_to_or_offline(tmp_path, monkeypatch):
    from gptfn.weights.resolve import NotCached

    monkeypatch.setenv("GPTFN_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens: a fetch fails
    monkeypatch.setenv("GPTFN_OFFLINE", "0")
    with pytest.raises(NotCached, match=r"no pretrained weights for 'gpt2' in .*: download "
                                        r"them with `gptfn download gpt2`"):
        GPTModel.from_pretrained("gpt2", download=False)
    monkeypatch.setenv("GPTFN_OFFLINE", "1")
    with pytest.raises(NotCached, match=r"downloads are disabled \(GPTFN_OFFLINE=1\)"):
        GPTModel.from_pretrained("124M")
    with pytest.raises(ValueError, match="unknown model name 'gpt3'; known names: gpt2, "):
        GPTModel.from_pretrained("gpt3")
    with pytest.raises(FileNotFoundError, match="no such checkpoint file or directory"):
        GPTModel.from_pretrained(tmp_path / "nowhere" / "model.safetensors")
    assert not any(tmp_path.iterdir())  # nothing was written


def test_hub_key_style_download(tmp_path, fast):
    """The real hub file's style: no transformer. prefix, h.N.attn.bias mask buffers."""
    cfg = tiny_config(context_length=16)
    params = randomize_ln_and_biases(init_params(cfg, 4))
    tensors = dict(params)
    for i in range(cfg.num_layers):
        tensors[f"h.{i}.attn.bias"] = torch.tril(torch.ones(16, 16)).view(1, 1, 16, 16)
    src = tmp_path / "src"
    src.mkdir()
    save_safetensors(tensors, src / "model.safetensors", metadata={"format": "pt"})
    files = {HUB + "model.safetensors": (src / "model.safetensors").read_bytes(),
             HUB + "config.json": json.dumps(cfg.to_hf_dict()).encode()}
    with FileServer(files) as server:
        path = download("gpt2", base_url=server.url, cache_dir=tmp_path / "cache", **fast)
    _, loaded = load_params(path)
    assert set(loaded) == set(params) and all(torch.equal(loaded[k], params[k]) for k in params)


# ------------------------------------------------------------- OpenAI / TensorFlow

@pytest.fixture(scope="module")
def openai_release(tmp_path_factory, hub_repo):
    pytest.importorskip("tensorflow")
    from tests.tf_checkpoint import write_openai_checkpoint

    cfg, model, _ = hub_repo
    params = canonicalize(dict(model.state_dict()))
    params.pop("lm_head.weight", None)
    d = write_openai_checkpoint(params, cfg, tmp_path_factory.mktemp("openai") / "124M")
    return cfg, model, d


def openai_files(d):
    """The release directory's files as the server serves them. TF's Saver writes absolute
    paths into ``checkpoint``; OpenAI's file names ``model.ckpt``, relative to its directory
    (so that a load reads the downloaded files, not the ones the test wrote)."""
    files = {f"/models/124M/{f.name}": f.read_bytes() for f in d.iterdir()}
    files["/models/124M/checkpoint"] = (b'model_checkpoint_path: "model.ckpt"\n'
                                        b'all_model_checkpoint_paths: "model.ckpt"\n')
    return files


def test_openai_download_and_tf_load_equal_hf(openai_release, tmp_path, fast):
    cfg, model, d = openai_release
    files = openai_files(d)
    with FileServer(files) as server:
        server.behaviour.hash_style = "azure"
        server.behaviour.cut_once.add("/models/124M/model.ckpt.data-00000-of-00001")
        path = download("124M", source="openai", base_url=server.url, cache_dir=tmp_path, **fast)
    assert path == tmp_path / "openai" / "models" / "124M"
    assert sorted(p.name for p in path.iterdir()) == sorted(files_name.rsplit("/", 1)[1] for files_name in files)
    loaded_cfg, params = load_params(path)  # a TF checkpoint directory
    idx = random_idx(cfg, 2, 11)
    assert (gpt_forward(params, idx, loaded_cfg) - hf_logits(model, idx)).abs().max() <= 1e-4


def test_convert_cli_writes_what_hf_loads(openai_release, tmp_path):
    cfg, model, d = openai_release
    r = subprocess.run([sys.executable, "-m", "gptfn", "convert", str(d), "--out", str(tmp_path / "out")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "wrote" in r.stdout
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "out").eval()
    idx = random_idx(cfg, 2, 8)
    assert (hf_logits(hf, idx) - hf_logits(model, idx)).abs().max() <= 1e-4


def test_tf_checkpoint_missing_variable_or_wrong_shape(hub_repo, tmp_path):
    pytest.importorskip("tensorflow")
    from gptfn.weights.openai_tf import load_tf_checkpoint
    from tests.tf_checkpoint import write_openai_checkpoint

    cfg = tiny_config(context_length=64)
    params = init_params(cfg, 0)
    write_openai_checkpoint(params, cfg, tmp_path / "a", drop={"model/h1/mlp/c_fc/b"})
    with pytest.raises(ValueError, match="missing variable model/h1/mlp/c_fc/b"):
        load_tf_checkpoint(tmp_path / "a")
    write_openai_checkpoint(params, cfg, tmp_path / "b", bad_shape={"model/h0/attn/c_attn/w"})
    with pytest.raises(ValueError, match=r"model/h0/attn/c_attn/w has shape \[1, 32, 95\], expected \[32, 96\]"):
        load_tf_checkpoint(tmp_path / "b")


@pytest.mark.parametrize("pointer", ["absolute", "relative"])
def test_tf_checkpoint_pointer_to_outside_the_directory_is_not_followed(tmp_path, pointer):
    """A ``checkpoint`` file naming a checkpoint outside the release directory (an absolute
    path, or ``../``): the directory's own model.ckpt is read, nothing outside it."""
    pytest.importorskip("tensorflow")
    from gptfn.weights.openai_tf import load_tf_checkpoint
    from tests.tf_checkpoint import write_openai_checkpoint

    cfg = tiny_config(context_length=16, vocab_size=64)
    mine, other = init_params(cfg, 0), init_params(cfg, 1)
    write_openai_checkpoint(mine, cfg, tmp_path / "release")
    write_openai_checkpoint(other, cfg, tmp_path / "elsewhere")
    where = str(tmp_path / "elsewhere" / "model.ckpt") if pointer == "absolute" \
        else "../elsewhere/model.ckpt"
    (tmp_path / "release" / "checkpoint").write_text(
        f'model_checkpoint_path: "{where}"\nall_model_checkpoint_paths: "{where}"\n')
    _, loaded = load_tf_checkpoint(tmp_path / "release")
    assert all(torch.equal(loaded[k], mine[k]) for k in mine)


def test_without_tensorflow_the_error_says_what_to_install(openai_release, monkeypatch):
    from gptfn.weights.openai_tf import load_tf_checkpoint

    monkeypatch.setitem(sys.modules, "tensorflow", None)
    with pytest.raises(ImportError, match=r"pip install 'gptfn\[tf\]'"):
        load_tf_checkpoint(openai_release[2])


def test_download_cli_one_line_errors_and_success(hub_repo, tmp_path):
    _, _, files = hub_repo

    def run(*args):
        return subprocess.run([sys.executable, "-m", "gptfn", "download", *args, "--no-progress",
                               "--cache-dir", str(tmp_path)], capture_output=True, text=True)

    with FileServer({}) as server:
        r = run("gpt2", "--base-url", server.url)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [
        f"gptfn: error: HTTP 404 (not found) for {server.url}{HUB}config.json"]
    with FileServer(files) as server:
        server.behaviour.replace[HUB + "config.json"] = HTML
        r = run("gpt2", "--base-url", server.url)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        f"gptfn: error: config.json from {server.url}{HUB}config.json is not JSON (starts with "
        "'<!DOCTYPE html>'); it was deleted"]
    r = run("gpt-9")
    assert r.returncode == 2 and "unknown model name 'gpt-9'" in r.stderr
    with FileServer(files) as server:
        r = run("gpt2", "--base-url", server.url)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(tmp_path / "hf" / "openai-community" / "gpt2")


# ------------------------------------------------------------ files checked before caching

@pytest.mark.parametrize("served, problem", [
    (HTML, "is not JSON (starts with '<!DOCTYPE html>')"),
    (b'{"error": "Repository not found"}', "is not a GPT-2 config (unknown config key 'error')"),
    (b"", "is empty"),
])
def test_config_json_that_is_no_gpt2_config_is_refused(tiny_hub, tmp_path, fast, served, problem):
    """A mirror that answers 200 with a login page (or an error document) as config.json."""
    _, params, files = tiny_hub
    with FileServer(files) as server:
        server.behaviour.replace[HUB + "config.json"] = served
        with pytest.raises(DownloadError) as e:
            download("gpt2", base_url=server.url, cache_dir=tmp_path, **fast)
        url = f"{server.url}{HUB}config.json"
        assert str(e.value) == f"config.json from {url} {problem}; it was deleted"
        assert not gpt2_dir(tmp_path).exists() and not list(tmp_path.rglob("config.json*"))
        server.behaviour.replace.clear()  # the mirror mended: the next run completes
        download("gpt2", base_url=server.url, cache_dir=tmp_path, **fast)
    assert_whole(tmp_path, files, params)


def test_truncated_safetensors_with_no_hash_and_an_honest_length_is_refused(tiny_hub, tmp_path,
                                                                            fast):
    _, params, files = tiny_hub
    whole = files[HUB + "model.safetensors"]
    with FileServer(files) as server:
        server.behaviour.hash_style = "none"
        server.behaviour.replace[HUB + "model.safetensors"] = whole[:-1000]
        with pytest.raises(DownloadError) as e:
            download("gpt2", base_url=server.url, cache_dir=tmp_path, **fast)
        assert server.requests[-1] == (HUB + "model.safetensors", None, 200)  # all it offered
        server.behaviour.replace.clear()
        download("gpt2", base_url=server.url, cache_dir=tmp_path, **fast)
        # config.json was whole and stayed staged: only the weights were fetched again
        fetched = [r[0][len(HUB):] for r in server.requests]
        assert fetched == ["config.json", "model.safetensors", "model.safetensors"]
    message = str(e.value)
    assert message.startswith(f"model.safetensors from {server.url}{HUB}model.safetensors is "
                              "not a valid safetensors file: ")
    assert f"the file holds only {len(whole) - 1008 - int.from_bytes(whole[:8], 'little')} " \
           "(truncated); it was deleted" in message
    assert_whole(tmp_path, files, params)


def _html(data):
    return HTML


@pytest.mark.parametrize("name, damage, problem, deleted", [
    ("hparams.json", _html, "hparams.json from {url} is not JSON (starts with '<!DOCTYPE html>')",
     ["hparams.json"]),
    ("hparams.json", lambda d: d.replace(b'"n_embd": 32', b'"n_embd": 30'),
     "hparams.json from {url} is not a GPT-2 config (GPTConfig.embed_dim (30) must be divisible "
     "by num_heads (4))", ["hparams.json"]),
    ("model.ckpt.index", lambda d: d[:-100],
     "model.ckpt.index from {url} is not a TF checkpoint index: no table magic number at its end",
     ["model.ckpt.index"]),
    ("model.ckpt.index", lambda d: d[:40] + bytes([d[40] ^ 1]) + d[41:],
     "model.ckpt.index from {url} is not a TF checkpoint index: block 0 fails its checksum",
     ["model.ckpt.index"]),
    ("model.ckpt.data-00000-of-00001", lambda d: d[:-1000],
     "model.ckpt.index and model.ckpt.data-00000-of-00001 disagree: tensor 'model/wte' needs "
     "bytes", ["model.ckpt.index", "model.ckpt.data-00000-of-00001"]),
    ("model.ckpt.meta", lambda d: d[:len(d) // 2], "model.ckpt.meta from {url} is not a TF "
     "MetaGraph protobuf", ["model.ckpt.meta"]),
    ("checkpoint", _html, "checkpoint from {url} is not a TF checkpoint state (starts with "
     "'<!DOCTYPE html>')", ["checkpoint"]),
    ("encoder.json", lambda d: b"[]", "encoder.json from {url} is not a JSON object",
     ["encoder.json"]),
    ("vocab.bpe", _html, "vocab.bpe from {url} is not a BPE merges file", ["vocab.bpe"]),
])
def test_invalid_openai_file_is_refused(openai_release, tmp_path, fast, name, damage, problem,
                                        deleted):
    """Each file of OpenAI's release served damaged, with no hash (a plain mirror): the error
    names the file, its URL and what is wrong; the bad files (both, where the index and the
    data disagree) are deleted, the good ones stay staged, and no model directory appears."""
    _, _, d = openai_release
    files = openai_files(d)
    path = f"/models/124M/{name}"
    target = tmp_path / "openai" / "models" / "124M"
    staging = target.with_name(".124M.partial")
    with FileServer(files) as server:
        server.behaviour.hash_style = "none"
        server.behaviour.replace[path] = damage(files[path])
        with pytest.raises(DownloadError) as e:
            download("124M", source="openai", base_url=server.url, cache_dir=tmp_path, **fast)
        assert problem.format(url=server.url + path) in str(e.value)
        assert all(f"{server.url}/models/124M/{f}" in str(e.value) for f in deleted)
        assert not target.exists() and not is_cached("124M", "openai", tmp_path)
        for f in deleted:
            assert not (staging / f).exists() and not (staging / f"{f}.part").exists()
        server.behaviour.replace.clear()
        server.requests.clear()
        download("124M", source="openai", base_url=server.url, cache_dir=tmp_path, **fast)
        # what was fetched whole and checked stayed staged: the next run fetches the rest
        rest = deleted if len(deleted) == 2 else OPENAI_FILES[OPENAI_FILES.index(name):]
        assert sorted(r[0].rsplit("/", 1)[1] for r in server.requests) == sorted(rest)
    assert all((target / p.rsplit("/", 1)[1]).read_bytes() == b for p, b in files.items())


def test_offline_variables_read_as_hf_hub_offline(tiny_hub, tmp_path, fast, monkeypatch):
    """0 / false / no / off / empty mean online, 1 / true / yes / on offline, for
    GPTFN_OFFLINE and HF_HUB_OFFLINE alike; GPTFN_OFFLINE, where set, decides."""
    _, _, files = tiny_hub
    with FileServer(files) as server:
        for var in ("GPTFN_OFFLINE", "HF_HUB_OFFLINE"):
            for i, value in enumerate(["0", "false", "No", "off", "", " 0 "]):
                monkeypatch.setenv(var, value)
                download("gpt2", base_url=server.url, cache_dir=tmp_path / f"{var}{i}", **fast)
            for value in ["1", "true", "YES", "on"]:
                monkeypatch.setenv(var, value)
                disabled = rf"downloads are disabled \({var}={value}\)"
                with pytest.raises(DownloadError, match=disabled):
                    download("gpt2", base_url=server.url, cache_dir=tmp_path / "off", **fast)
            monkeypatch.delenv(var)
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        monkeypatch.setenv("GPTFN_OFFLINE", "0")
        download("gpt2", base_url=server.url, cache_dir=tmp_path / "both", **fast)
    assert not (tmp_path / "off").exists()


@pytest.mark.parametrize("var", ["GPTFN_OFFLINE", "HF_HUB_OFFLINE"])
def test_offline_variable_with_another_value_is_an_error(tiny_hub, tmp_path, fast, monkeypatch,
                                                         var):
    _, _, files = tiny_hub
    with FileServer(files) as server:
        download("gpt2", base_url=server.url, cache_dir=tmp_path / "cached", **fast)
        monkeypatch.setenv(var, "maybe")
        for cache in ("cached", "empty"):  # a typo is said at once, cached model or not
            with pytest.raises(ValueError, match=rf"^{var}='maybe' is not understood: set it to "
                               "1, true, yes or on to forbid downloads, or to 0, false"):
                download("gpt2", base_url=server.url, cache_dir=tmp_path / cache, **fast)
        assert len(server.requests) == 2
    assert not (tmp_path / "empty").exists()


@pytest.mark.parametrize("damage", ["html config.json", "truncated model.safetensors",
                                    "no model.safetensors"])
def test_invalid_cached_file_is_not_trusted(tiny_hub, tmp_path, fast, monkeypatch, damage):
    """A cached set is re-checked (headers and JSON, no hash) before it is used: a bad one is
    an error offline, and downloaded again online (with a warning)."""
    _, params, files = tiny_hub
    target = gpt2_dir(tmp_path)
    with FileServer(files) as server:
        download("gpt2", base_url=server.url, cache_dir=tmp_path, **fast)
        if damage == "html config.json":
            (target / "config.json").write_bytes(HTML)
            problem = f"{target / 'config.json'} is not JSON (starts with '<!DOCTYPE html>')"
        elif damage == "truncated model.safetensors":
            weights = target / "model.safetensors"
            weights.write_bytes(weights.read_bytes()[:-10])
            problem = f"{weights} is not a valid safetensors file: tensor"
        else:
            (target / "model.safetensors").unlink()
            problem = f"{target} lacks model.safetensors"
        assert not is_cached("gpt2", cache_dir=tmp_path)
        monkeypatch.setenv("GPTFN_OFFLINE", "1")
        with pytest.raises(DownloadError) as e:
            download("gpt2", base_url=server.url, cache_dir=tmp_path, **fast)
        assert str(e.value).startswith(f"gpt2 is not in the cache ({problem}")
        assert str(e.value).endswith("and downloads are disabled (GPTFN_OFFLINE=1)")
        monkeypatch.delenv("GPTFN_OFFLINE")
        with pytest.warns(UserWarning, match="downloading gpt2 again"):
            download("gpt2", base_url=server.url, cache_dir=tmp_path, **fast)
        assert len(server.requests) == 4  # the whole set, again
    assert_whole(tmp_path, files, params)


# ------------------------------------------------------------------- one set, one unit

def test_file_set_is_one_unit(tiny_hub, tmp_path, fast):
    """A download that fails part way leaves no model directory at all (its complete files
    wait, staged, for the next run); files get the umask's mode."""
    _, params, files = tiny_hub
    target = gpt2_dir(tmp_path)
    with FileServer(files) as server:
        server.behaviour.status[HUB + "model.safetensors"] = 404
        with pytest.raises(DownloadError, match="HTTP 404"):
            download("gpt2", base_url=server.url, cache_dir=tmp_path, **fast)
        assert not target.exists()  # no config.json under its final name, alone
        assert (target.with_name(".gpt2.partial") / "config.json").is_file()
        del server.behaviour.status[HUB + "model.safetensors"]
        download("gpt2", base_url=server.url, cache_dir=tmp_path, **fast)
        fetched = [r[0][len(HUB):] for r in server.requests]
        assert fetched == ["config.json", "model.safetensors", "model.safetensors"]
    assert_whole(tmp_path, files, params)
    assert sorted(p.name for p in target.parent.iterdir()) == [".gpt2.lock", "gpt2"]
    for path in [target, *target.iterdir()]:
        want = umask_mode(0o777 if path.is_dir() else 0o666)
        assert stat.S_IMODE(path.stat().st_mode) == want, path


def test_partial_directory_of_an_older_version_is_replaced_whole(tiny_hub, tmp_path, fast):
    """An older gptfn renamed each file into the model's directory as it came; what a cut run
    left there is not a set: every file is fetched again, and the directory replaced whole."""
    _, params, files = tiny_hub
    target = gpt2_dir(tmp_path)
    older_partial_directory(tmp_path)
    assert not is_cached("gpt2", cache_dir=tmp_path)
    with FileServer(files) as server:
        with pytest.warns(UserWarning, match=f"{target} lacks model.safetensors: downloading"):
            download("gpt2", base_url=server.url, cache_dir=tmp_path, **fast)
        assert [r[1] for r in server.requests] == [None, None]  # nothing resumed from the old
    assert_whole(tmp_path, files, params)


def test_concurrent_downloads_of_one_model_take_turns(tiny_hub, tmp_path, fast):
    _, params, files = tiny_hub
    with FileServer(files) as server:
        server.behaviour.rate = 400_000  # ~0.3 s per transfer: the runs overlap
        with ThreadPoolExecutor(3) as pool:
            paths = list(pool.map(lambda _: download("gpt2", base_url=server.url,
                                                     cache_dir=tmp_path, **fast), range(3)))
        assert sorted(r[0] for r in server.requests) == sorted(files)  # each file once
    assert paths == [gpt2_dir(tmp_path)] * 3
    assert_whole(tmp_path, files, params)


# ------------------------------------------------------------- faults: full disk, kill -9

FAULT_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}  # two runs at a time on 2 cores
# each of these fails once; an even spread of the other calls that change a file
EACH = ("write", "pwrite64", "rename", "renameat", "renameat2", "unlink", "unlinkat", "rmdir")
SYSCALLS = (*EACH, "openat", "fsync", "mkdir", "mkdirat")
ALL_FAULTS = os.environ.get("GPTFN_DOWNLOAD_FAULTS") == "all"


def _download_argv(url, cache):
    return python_argv("-m", "gptfn", "download", "gpt2", "--base-url", url, "--cache-dir",
                       str(cache), "--no-progress")


def rerun(url, cache, fast):
    """A plain download after a fault (which may say that it replaces what it found)."""
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        download("gpt2", base_url=url, cache_dir=cache, **fast)
    assert all("downloading gpt2 again" in str(w.message) for w in seen), seen


def test_full_disk_at_each_file_call_leaves_no_set_or_a_whole_one(tiny_hub, tmp_path, fast):
    """ENOSPC at each write, rename and unlink of ``gptfn download`` (and at a spread of its
    other calls that change a file: mkdir, open for writing, fsync), over the directory an
    older gptfn left (so that replacing it is failed too): a one-line error or success, then
    the cache holds no model set or the complete one, and a plain re-run completes."""
    require_strace()
    _, params, files = tiny_hub
    before = older_partial_directory(tmp_path / "dry")
    with FileServer(files) as server:
        calls = [c for c in file_calls(_download_argv(server.url, tmp_path / "dry"),
                                       tmp_path / "dry", env=FAULT_ENV, syscalls=SYSCALLS)
                 if c.changes_files]
        each = [c for c in calls if c.syscall in EACH]
        chosen = calls if ALL_FAULTS else each + spread([c for c in calls if c not in each], 2)
        assert {c.syscall for c in each} >= {"write", "rename", "unlinkat", "rmdir"}

        def faulted(i_call):
            i, call = i_call
            older_partial_directory(tmp_path / f"c{i}")
            return run_with_fault(_download_argv(server.url, tmp_path / f"c{i}"), call,
                                  env=FAULT_ENV)

        with ThreadPoolExecutor(2) as pool:
            results = list(pool.map(faulted, enumerate(chosen)))
        failed = 0
        for i, (call, r) in enumerate(zip(chosen, results)):
            cache = tmp_path / f"c{i}"
            assert "Traceback" not in r.stderr, (call.text, r.stderr)
            assert r.returncode in (0, 2), (call.text, r.returncode, r.stderr)
            errors = [line for line in r.stderr.splitlines() if line.startswith("gptfn: error:")]
            assert len(errors) == r.returncode // 2, (call.text, r.stderr)
            failed += r.returncode == 2
            assert_none_or_whole(cache, files, before)
            rerun(server.url, cache, fast)
            assert_whole(cache, files, params)
    assert failed >= len(each)  # every failed write, rename and unlink was an error
def test_kill_9_mid_download_leaves_no_set_or_a_whole_one(tiny_hub, tmp_path, fast):
    """kill -9 of ``gptfn download`` at random moments of its transfers (a slowed server):
    the cache holds no model set or the complete one, and a plain re-run completes, resuming
    what the killed run left."""
    _, params, files = tiny_hub
    with FileServer(files) as server:
        server.behaviour.rate = 60_000  # ~2 s for the weights
        start = time.monotonic()
        assert run_and_kill(_download_argv(server.url, tmp_path / "whole"), 120) == 0
        end = time.monotonic() - start
        first = server.times[0] - start  # the interpreter's start-up is not worth killing
        assert_whole(tmp_path / "whole", files, params)
        rng = random.Random(7)
        landed = []
        for i, (lo, hi) in enumerate([(0.05, 0.35), (0.35, 0.65), (0.65, 0.95)]):
            cache = tmp_path / f"k{i}"
            after = first + rng.uniform(lo, hi) * (end - first)
            for _ in range(3):
                seen = len(server.requests)
                code = run_and_kill(_download_argv(server.url, cache), after)
                if code is not None or len(server.requests) > seen:
                    break
                after += first / 2  # killed while starting up (a busy machine): later
            assert_none_or_whole(cache, files)
            staged = gpt2_dir(cache).with_name(".gpt2.partial")
            landed.append((round(after, 2), code, sorted(p.name for p in staged.glob("*"))))
            rerun(server.url, cache, fast)
            assert_whole(cache, files, params)
    # at least one kill cut a transfer
    cut = [names for *_, names in landed if any(n.endswith(".part") for n in names)]
    assert cut, (first, end, landed)


# ----------------------------------------------------- symbolic links planted in the cache

def _victims(tmp_path):
    """Files outside the cache that a planted link points at, and what they hold."""
    victim = tmp_path / "victim"
    victim.mkdir()
    before = {"notes.txt": b"DATA\n", "other.txt": b"X\n",
              "config.json": b'{"not": "a gpt-2 config"}'}  # would fail the staged-file check
    for name, data in before.items():
        (victim / name).write_bytes(data)
    return victim, before


def _untouched(victim, before):
    assert {p.name: p.read_bytes() for p in victim.iterdir()} == before


def _no_links(cache):
    target = gpt2_dir(cache)
    assert not target.is_symlink()
    assert not [p for p in target.iterdir() if p.is_symlink()]


def test_links_to_outside_in_the_staging_directory_are_removed_not_followed(tiny_hub, tmp_path):
    """The finding's repro, through the CLI: .part files that are links to files outside the
    cache. The links are removed (their targets untouched) and the set is downloaded whole."""
    _, params, files = tiny_hub
    cache = tmp_path / "c"
    victim, before = _victims(tmp_path)
    staging = gpt2_dir(cache).with_name(".gpt2.partial")
    staging.mkdir(parents=True)
    (staging / "config.json.part").symlink_to(victim / "notes.txt")
    (staging / "model.safetensors.part").symlink_to(victim / "other.txt")
    (staging / "config.json").symlink_to(victim / "config.json")  # a staged file, a link
    env = {k: v for k, v in os.environ.items() if k not in ("GPTFN_OFFLINE", "HF_HUB_OFFLINE")}
    with FileServer(files) as server:
        r = subprocess.run(_download_argv(server.url, cache), capture_output=True, text=True,
                           env=env)
    assert r.returncode == 0, r.stderr
    _untouched(victim, before)
    assert_whole(cache, files, params)
    _no_links(cache)


@pytest.mark.parametrize("staged", [None, "config.json", "config.json.part"])
def test_a_staging_directory_that_is_a_link_is_replaced_by_a_real_one(tiny_hub, tmp_path, fast,
                                                                      staged):
    """``.gpt2.partial`` a link to a directory outside: the link is removed (nothing there is
    deleted or written) and gpt2 is published as a real directory."""
    _, params, files = tiny_hub
    cache = tmp_path / "c"
    victim, before = _victims(tmp_path)
    if staged == "config.json.part":
        (victim / staged).write_bytes(b"{")  # a 'partial' file there: neither resumed nor cut
        before[staged] = b"{"
    gpt2_dir(cache).parent.mkdir(parents=True)
    staging = gpt2_dir(cache).with_name(".gpt2.partial")
    staging.symlink_to(victim, target_is_directory=True)
    with FileServer(files) as server:
        download("gpt2", base_url=server.url, cache_dir=cache, **fast)
        assert [r[1] for r in server.requests] == [None, None]  # nothing resumed from outside
    _untouched(victim, before)
    assert_whole(cache, files, params)
    _no_links(cache)
    assert not staging.exists() and not staging.is_symlink()


def test_a_staging_path_that_is_a_dangling_link_or_a_file(tiny_hub, tmp_path, fast):
    _, params, files = tiny_hub
    outside = tmp_path / "not-there"
    for i, plant in enumerate(["dangling", "file"]):
        cache = tmp_path / f"c{i}"
        staging = gpt2_dir(cache).with_name(".gpt2.partial")
        staging.parent.mkdir(parents=True)
        if plant == "dangling":
            staging.symlink_to(outside, target_is_directory=True)
        else:
            staging.write_bytes(b"junk")
        with FileServer(files) as server:
            download("gpt2", base_url=server.url, cache_dir=cache, **fast)
        assert not outside.exists() and not outside.is_symlink()
        assert_whole(cache, files, params)
        _no_links(cache)


@pytest.mark.parametrize("points_at", ["missing", "existing"])
def test_a_lock_file_that_is_a_link_is_not_followed(tiny_hub, tmp_path, fast, points_at):
    _, params, files = tiny_hub
    cache = tmp_path / "c"
    victim, before = _victims(tmp_path)
    aim = victim / ("created-by-gptfn" if points_at == "missing" else "notes.txt")
    lock = gpt2_dir(cache).with_name(".gpt2.lock")
    lock.parent.mkdir(parents=True)
    lock.symlink_to(aim)
    with FileServer(files) as server:
        download("gpt2", base_url=server.url, cache_dir=cache, **fast)
    _untouched(victim, before)
    assert not lock.is_symlink() and lock.is_file()
    assert_whole(cache, files, params)


def test_hard_linked_part_file_is_not_written_into(tiny_hub, tmp_path, fast):
    """A ``.part`` with another name outside (a hard link) is removed, not appended to."""
    _, params, files = tiny_hub
    cache = tmp_path / "c"
    victim, before = _victims(tmp_path)
    staging = gpt2_dir(cache).with_name(".gpt2.partial")
    staging.mkdir(parents=True)
    os.link(victim / "other.txt", staging / "model.safetensors.part")
    with FileServer(files) as server:
        download("gpt2", base_url=server.url, cache_dir=cache, **fast)
    _untouched(victim, before)
    assert_whole(cache, files, params)


def test_links_between_the_cache_and_the_model_are_refused(tiny_hub, tmp_path, fast):
    """A directory between the cache and the model's directory that is a link leads
    outside: an error, and nothing written there; so is a model directory that is a link."""
    _, params, files = tiny_hub
    victim, before = _victims(tmp_path)
    cache = tmp_path / "c"
    (cache / "hf").mkdir(parents=True)
    (cache / "hf" / "openai-community").symlink_to(victim, target_is_directory=True)
    with FileServer(files) as server:
        with pytest.raises(DownloadError, match="is a symbolic link: gptfn does not download"):
            download("gpt2", base_url=server.url, cache_dir=cache, **fast)
        assert not server.requests
    _untouched(victim, before)
    (cache / "hf" / "openai-community").unlink()
    gpt2_dir(cache).parent.mkdir()
    gpt2_dir(cache).symlink_to(victim, target_is_directory=True)
    with FileServer(files) as server:
        with pytest.raises(DownloadError, match="is a symbolic link to an incomplete model"):
            download("gpt2", base_url=server.url, cache_dir=cache, **fast)
    _untouched(victim, before)


def test_publish_never_renames_a_link_into_place(tmp_path):
    """A link that appears in (or as) the staging directory after it was cleaned (another
    process, mid-download) is never published."""
    from gptfn.weights.download import _publish

    victim, before = _victims(tmp_path)
    staging, target = tmp_path / ".gpt2.partial", tmp_path / "gpt2"
    staging.mkdir()
    (staging / "config.json").write_bytes(b"{}")
    (staging / "model.safetensors").symlink_to(victim / "other.txt")
    with pytest.raises(DownloadError, match="model.safetensors, not"):
        _publish(staging, target)
    assert not target.exists() and not target.is_symlink()
    (staging / "model.safetensors").unlink()
    os.rename(staging, tmp_path / "real")
    staging.symlink_to(victim, target_is_directory=True)
    with pytest.raises(DownloadError, match="was replaced"):
        _publish(staging, target)
    assert not target.exists() and not target.is_symlink()
    _untouched(victim, before)
