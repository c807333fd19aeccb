"""Downloads against a real HTTP server on 127.0.0.1; OpenAI TF checkpoints; conversion."""

import json
import subprocess
import sys

import pytest
import torch

from gptfn import GPTModel, gpt_forward, init_params, load_params
from gptfn.weights.download import DownloadError, download, plan
from gptfn.weights.hub import canonicalize
from gptfn.weights.safetensors_io import save_safetensors
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
    """Short back-off so retry tests take milliseconds."""
    return dict(progress=False, retries=3, backoff=0.01)


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
    assert not (target / "model.safetensors").exists()
    assert not (target / "model.safetensors.part").exists()


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


def test_openai_download_and_tf_load_equal_hf(openai_release, tmp_path, fast):
    cfg, model, d = openai_release
    files = {f"/models/124M/{f.name}": f.read_bytes() for f in d.iterdir()}
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
    r = run("gpt-9")
    assert r.returncode == 2 and "unknown model name 'gpt-9'" in r.stderr
    with FileServer(files) as server:
        r = run("gpt2", "--base-url", server.url)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(tmp_path / "hf" / "openai-community" / "gpt2")
