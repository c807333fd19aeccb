"""The export suite: artifacts equal eager gptfn, load without gptfn, fail cleanly."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gptfn import GPTModel, generate
from tests.helpers import random_idx, randomize_ln_and_biases, tiny_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from gptfn import init_params

    cfg = tiny_config(context_length=48)
    path = tmp_path_factory.mktemp("model")
    GPTModel(cfg, params=randomize_ln_and_biases(init_params(cfg, 2))).save_pretrained(path)
    return path


def export(*args):
    return subprocess.run([sys.executable, "-m", "export", *args], capture_output=True,
                          text=True, cwd=ROOT, timeout=600)


def test_torchscript_artifact_runs_without_gptfn(tiny_dir, tmp_path):
    out = tmp_path / "gpt.pt"
    r = export("torchscript", "--model", str(tiny_dir), "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert "= eager over" in r.stdout and out.is_file()
    assert (tmp_path / "gpt.pt.report.json").is_file()
    model = GPTModel.from_pretrained(tiny_dir)
    idx = random_idx(model.config, 2, 11, seed=3)
    torch.save({"idx": idx}, tmp_path / "in.pt")
    code = (
        "import sys; sys.modules['gptfn'] = None\n"  # any import of gptfn now fails
        "import torch, warnings\n"
        "warnings.simplefilter('default')\n"
        f"m = torch.jit.load({str(out)!r})\n"
        f"idx = torch.load({str(tmp_path / 'in.pt')!r}, weights_only=True)['idx']\n"
        "with torch.no_grad():\n"
        "    torch.save({'logits': m(idx), 'greedy': m.generate(idx, 20, 0.0, 0, 0),\n"
        "                'sampled': m.generate(idx, 20, 0.8, 5, 7)},"
        f" {str(tmp_path / 'out.pt')!r})\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    got = torch.load(tmp_path / "out.pt", weights_only=True)
    with torch.no_grad():
        torch.testing.assert_close(got["logits"], model(idx), atol=1e-5, rtol=0)
        assert torch.equal(got["greedy"], generate(model, idx, 20))
    assert got["sampled"].shape == (2, 31)


def test_pt2_forward_has_dynamic_batch_and_length(tiny_dir, tmp_path):
    out = tmp_path / "gpt.pt2"
    r = export("pt2", "--model", str(tiny_dir), "--out", str(out), "--max-seq-len", "40")
    assert r.returncode == 0, r.stderr
    program = torch.export.load(str(out)).module()
    model = GPTModel.from_pretrained(tiny_dir)
    with torch.no_grad():
        for batch, length in [(1, 1), (3, 17), (5, 40)]:
            idx = random_idx(model.config, batch, length, seed=length)
            torch.testing.assert_close(program(idx), model(idx), atol=1e-5, rtol=0)


def test_aoti_packages_forward_and_decode(tiny_dir, tmp_path):
    out = tmp_path / "gpt_aoti.pt2"
    r = export("aoti", "--model", str(tiny_dir), "--out", str(out), "--max-seq-len", "24")
    assert r.returncode == 0, r.stderr
    assert out.is_file() and (tmp_path / "gpt_aoti.decode.pt2").is_file()
    runner = torch._inductor.aoti_load_package(str(out))
    model = GPTModel.from_pretrained(tiny_dir)
    idx = random_idx(model.config, 2, 9)
    with torch.no_grad():
        torch.testing.assert_close(runner(idx), model(idx), atol=1e-5, rtol=0)


def test_bf16_aoti_is_held_to_an_fp32_reference(tiny_dir, tmp_path):
    import json

    out = tmp_path / "gpt_aoti.pt2"
    r = export("aoti", "--model", str(tiny_dir), "--out", str(out), "--max-seq-len", "24",
               "--dtype", "bfloat16")
    assert r.returncode == 0, r.stderr
    report = json.loads((tmp_path / "gpt_aoti.pt2.report.json").read_text())
    for check in [*report["error_vs_fp32"].values(), report["decode_error_vs_fp32"]]:
        assert 0 < check["eager"] and check["artifact"] <= check["allowed"]
    runner = torch._inductor.aoti_load_package(str(out))
    model = GPTModel.from_pretrained(tiny_dir, dtype=torch.bfloat16)
    idx = random_idx(model.config, 1, 9)
    allowed = max(c["allowed"] for c in report["error_vs_fp32"].values())
    with torch.no_grad():
        got = runner(idx)
        assert got.dtype == torch.bfloat16
        reference = model.float()(idx)  # the bf16 weights, upcast, in fp32
        assert (got.float() - reference).abs().max() <= allowed


def test_half_check_rejects_an_artifact_that_computes_something_else():
    from export.verify import VerificationError, _check_half

    reference = torch.randn(2, 5, 97)
    eager = reference.bfloat16()
    assert _check_half("aoti", "logits", eager, eager, reference)["artifact"] > 0
    wrong = (reference + 0.1 * torch.randn_like(reference)).bfloat16()
    with pytest.raises(VerificationError, match="aoti logits: max abs error"):
        _check_half("aoti", "logits", wrong, eager, reference)


@pytest.mark.parametrize("args, message", [
    (["--max-seq-len", "49"], "max_seq_len 49 must be in [1, context_length 48]"),
    (["--out", "/nonexistent-dir/gpt.pt"], "output directory does not exist"),
    (["--dtype", "float16"], "float16 on the CPU is not supported"),
    (["--dtype", "int4"], "unknown dtype 'int4'"),
    (["--device", "tpu"], "unknown device 'tpu'"),
])
def test_bad_requests_one_line(tiny_dir, tmp_path, args, message):
    base = {"--out": str(tmp_path / "gpt.pt")}
    full = ["torchscript", "--model", str(tiny_dir)]
    given = dict(zip(args[::2], args[1::2]))
    for k, v in (base | given).items():
        full += [k, v]
    r = export(*full)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("export: error:")
    assert message in r.stderr and "Traceback" not in r.stderr
    assert not list(tmp_path.iterdir())


def test_failed_verification_keeps_nothing(tiny_dir, tmp_path):
    from export.build import build
    from export.verify import VerificationError

    model = GPTModel.from_pretrained(tiny_dir)

    def reject(kind, paths):
        assert all(Path(p).is_file() for p in paths)  # written, under temporary names
        raise VerificationError("simulated mismatch")

    with pytest.raises(VerificationError):
        build("torchscript", model, tmp_path / "gpt.pt", 32, reject)
    assert not list(tmp_path.iterdir())


def test_cpp_example_generates_the_same_tokens(tiny_dir, tmp_path):
    import shutil

    if shutil.which(os.environ.get("CXX", "g++")) is None:
        pytest.skip("no C++ compiler (g++) on this machine")
    out = tmp_path / "gpt.pt"
    r = export("torchscript", "--model", str(tiny_dir), "--out", str(out))
    assert r.returncode == 0, r.stderr
    binary = tmp_path / "gptfn_generate"
    r = subprocess.run(["bash", str(ROOT / "export" / "cpp" / "build.sh"), sys.executable, str(binary)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    prompt = [5, 17, 42, 3, 88]
    r = subprocess.run([str(binary), str(out), "20", *map(str, prompt)], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    cpp_tokens = [int(t) for t in r.stdout.split()]
    model = GPTModel.from_pretrained(tiny_dir)
    assert cpp_tokens == generate(model, torch.tensor([prompt]), 20)[0].tolist()
    r = subprocess.run([str(binary), str(tmp_path / "missing.pt"), "3", "1"], capture_output=True,
                       text=True)
    assert r.returncode == 1 and "cannot load" in r.stderr
