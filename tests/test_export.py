"""The export suite: artifacts equal eager gptfn, load without gptfn, fail cleanly."""

import errno
import json
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


@pytest.fixture(scope="module")
def aoti_export(tiny_dir, tmp_path_factory):
    """One AOTInductor export of the tiny model (two programs compiled: about a minute),
    shared by the tests that read it: (package path, the export's CompletedProcess)."""
    out = tmp_path_factory.mktemp("aoti") / "gpt_aoti.pt2"
    return out, export("aoti", "--model", str(tiny_dir), "--out", str(out), "--max-seq-len", "24")


def test_aoti_packages_forward_and_decode_over_one_copy_of_the_weights(tiny_dir, aoti_export):
    from zipfile import ZipFile

    from export.aoti import load
    from export.commit import read_report

    out, r = aoti_export
    assert r.returncode == 0, r.stderr
    assert "export: compiling the forward program with AOTInductor" in r.stderr
    assert "export: compiling the decode program with AOTInductor" in r.stderr
    assert sorted(p.name for p in out.parent.iterdir()) == ["gpt_aoti.pt2",
                                                            "gpt_aoti.pt2.report.json"]
    report = read_report(out.parent / "gpt_aoti.pt2.report.json")
    assert [a["file"] for a in report["artifacts"]] == ["gpt_aoti.pt2"]
    model = GPTModel.from_pretrained(tiny_dir)
    tensors = list(model.parameters())
    weights = sum(p.numel() * p.element_size() for p in tensors)
    with ZipFile(out) as archive:
        stored = [i.file_size for i in archive.infolist() if "/data/weights/" in i.filename]
        libraries = [i.filename for i in archive.infolist() if i.filename.endswith(".so")]
    # each weight once, not once per program (a few KB of pickle framing each)
    assert len(stored) == len(tensors) and weights < sum(stored) < weights + 4096 * len(tensors)
    assert len(libraries) == 2
    package = load(out)
    with torch.no_grad():
        for batch, length in [(1, 1), (2, 9), (3, 24)]:
            idx = random_idx(model.config, batch, length, seed=length)
            torch.testing.assert_close(package(idx), model(idx), atol=1e-5, rtol=0)
        prompt = random_idx(model.config, 1, 5)
        assert torch.equal(package.generate(prompt, 19), generate(model, prompt, 19))
    # the weights placed in 2 MB pages (gptfn.hugepages): the programs run on those copies
    placed = load(out, huge_pages=True)
    assert len(placed._weights) == len(stored)
    assert min(t.data_ptr() for t in placed._weights.values()) % (2 << 20) == 0
    for t in placed._weights.values():
        t.mul_(0)  # used in place: zeroing every weight zeroes the logits
    with torch.no_grad():
        assert not placed(idx).any() and package(idx).any()
        del placed
        assert torch.equal(load(out, huge_pages=True).generate(prompt, 19),
                           generate(model, prompt, 19))


def test_building_a_package_holds_less_than_one_more_copy_of_the_weights(tmp_path):
    """The build holds no copy of the weights of its own: AOTInductor is given parameters,
    which it uses as they are (it copies every buffer, a copy per program), the weights are
    not cloned for the package, and the archive is written straight to its file (in memory
    it would be one more copy). What is left is the compiler's own memory and one weight at
    a time pickled into the archive."""
    out = tmp_path / "package.pt2"
    r = subprocess.run([sys.executable, "-m", "tests.package_memory", str(out)],
                       capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads(r.stdout.splitlines()[-1])
    assert out.stat().st_size > m["weights"]  # the weights are in the package
    assert m["after"] - m["before"] < 1.5 * m["weights"], m  # 4.8x with those copies


def test_fp32_logits_are_held_to_their_own_scale():
    """Summed in another order, logits of magnitude 100 differ by rounding at that scale
    (a 16-layer, 1600-channel package differed from eager by 1.1e-5 and was refused): the
    bound is 1e-5 of the largest magnitude, 1e-5 below 1, and a real error stays far
    outside it."""
    from export.verify import fp32_allowed

    assert fp32_allowed(torch.tensor([[0.5, -0.25]])) == 1e-5
    assert fp32_allowed(torch.tensor([[120.0, -250.0]])) == pytest.approx(2.5e-3)
    logits = torch.randn(2, 7, 50, generator=torch.Generator().manual_seed(0)) * 100
    rounded = logits + 1e-5 * logits.abs().max() * torch.rand(logits.shape).sub(0.5)
    assert (rounded - logits).abs().max() <= fp32_allowed(logits)
    wrong = logits.clone()
    wrong[0, 0, 0] += 1.0  # one logit off by one: a wrong program, not rounding
    assert (wrong - logits).abs().max() > fp32_allowed(logits)


def test_a_package_build_keeps_no_copy_of_the_weights_after_it(tmp_path):
    """Weights that are views of one storage (``gptfn.hugepages`` places them so) are copied
    for the package, a storage each; torch.export keeps its last trace, and through it
    those copies, in a module-level map, which the build clears. After the build no copy is
    alive: a process that builds a package and then decodes (the decode benchmark) holds the
    weights once, not twice."""
    import gc

    from export.aoti import package
    from gptfn import init_params
    from gptfn.hugepages import place

    cfg = tiny_config(vocab_size=211, embed_dim=48, num_heads=4)  # shapes no other test has
    params = place(init_params(cfg, 11))
    wte = params["wte.weight"]
    assert wte.untyped_storage().nbytes() > wte.numel() * wte.element_size()  # a view

    def copies():
        gc.collect()
        return [o for o in gc.get_objects()
                if type(o) in (torch.Tensor, torch.nn.Parameter) and o.shape == wte.shape
                and o.dtype == wte.dtype and o.untyped_storage().data_ptr()
                != wte.untyped_storage().data_ptr() and torch.equal(o, wte)]

    assert not copies()
    with torch.no_grad():
        package(cfg, params, 16, tmp_path / "package.pt2")
    assert not copies()


def test_an_archive_written_to_a_full_disk_is_an_error_naming_the_file():
    """torch's archive writer is given a file that never raises into it (an exception
    inside its write callback aborts the process): the full disk is an OSError after it."""
    from export.build import write_streamed

    full = Path("/dev/full")
    if not full.exists():
        pytest.skip("no /dev/full on this system")
    program = torch.export.export(torch.nn.Linear(256, 256), (torch.zeros(1, 256),))
    with pytest.raises(OSError, match="/dev/full") as e:
        write_streamed(full, lambda f: torch.export.save(program, f))
    assert e.value.errno == errno.ENOSPC


def test_aoti_package_runs_gptfns_kernels_on_the_cpu(tiny_dir, aoti_export):
    """The programs call gptfn::rowmul and gptfn::cached_attention (the compiled decode
    step's route), and the package's metadata says so."""
    from torch.profiler import profile

    from export.aoti import load

    package = load(aoti_export[0])
    model = GPTModel.from_pretrained(tiny_dir)
    keys, values = package.new_cache(1)
    with torch.no_grad(), profile() as prof:
        package.forward_with_cache(random_idx(model.config, 1, 3), keys, values)
        package.decode(torch.tensor([[7]]), keys, values, torch.tensor([3]))
    calls = {e.key: e.count for e in prof.key_averages()}
    layers = model.config.num_layers
    assert calls.get("gptfn::rowmul") == 2 * (4 * layers + 1)  # forward and decode
    assert calls.get("gptfn::cached_attention") == layers  # decode only: forward is causal


def test_aoti_package_refuses_what_its_programs_would_read_past(aoti_export):
    """The compiled programs do not check their inputs (a wrong shape there is a write past
    a buffer): the runner does, and says what is wrong."""
    from export.aoti import load

    package = load(aoti_export[0])  # max_seq_len 24
    keys, values = package.new_cache(1)
    ids = torch.tensor([[1, 2, 3]])
    bad = [
        (lambda: package.forward_with_cache(ids.repeat(4, 1), keys, values), "keys must be"),
        (lambda: package(torch.zeros(1, 0, dtype=torch.long)), "1 to 24 tokens"),
        (lambda: package(ids.int()), "int64"),
        (lambda: package(torch.tensor([[10 ** 6]])), "outside the vocabulary"),
        (lambda: package(torch.zeros(1, 25, dtype=torch.long)), "1 to 24 tokens"),
        (lambda: package.decode(ids[:, :1], keys, values, torch.tensor([24])), "input_pos"),
        (lambda: package.decode(ids[:, :2], keys, values, torch.tensor([3])), "token must"),
        (lambda: package.generate(ids, 22), "max_new_tokens must be an int in \\[0, 21\\]"),
    ]
    for call, message in bad:
        with pytest.raises(ValueError, match=message):
            call()
    assert package.generate(ids, 21).shape == (1, 24)  # the limit itself is fine
    package._forward = None  # no token asked for: the prompt's forward pass is not run
    assert list(package.tokens(ids, 0)) == [] and torch.equal(package.generate(ids, 0), ids)


def test_cpp_aoti_runner_generates_the_same_tokens(tiny_dir, aoti_export, tmp_path):
    import shutil

    from gptfn.kernels import load

    if shutil.which(os.environ.get("CXX", "g++")) is None:
        pytest.skip("no C++ compiler (g++) on this machine")
    out = aoti_export[0]
    binary = tmp_path / "gptfn_aoti_generate"
    r = subprocess.run(["bash", str(ROOT / "export" / "cpp" / "build.sh"), sys.executable,
                        str(binary), "aoti_generate.cpp"], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    prompt = [5, 17, 42, 3, 88]
    r = subprocess.run([str(binary), "--kernels", load(), "--time", str(out), "19",
                        *map(str, prompt)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    model = GPTModel.from_pretrained(tiny_dir)
    want = generate(model, torch.tensor([prompt]), 19)[0].tolist()
    assert [int(t) for t in r.stdout.split()] == want
    assert float(r.stderr.split("decode_ms_per_token")[-1]) > 0
    without = subprocess.run([str(binary), str(out), "3", "1"], capture_output=True, text=True)
    assert without.returncode == 2 and "pass --kernels" in without.stderr
    missing = subprocess.run([str(binary), "--kernels", load(), str(tmp_path / "no.pt2"), "3",
                              "1"], capture_output=True, text=True)
    assert missing.returncode == 1 and "cannot load" in missing.stderr
    too_long = subprocess.run([str(binary), "--kernels", load(), str(out), "20",
                               *map(str, prompt)], capture_output=True, text=True)
    assert too_long.returncode == 2 and "max_seq_len" in too_long.stderr


def test_bf16_aoti_is_held_to_an_fp32_reference(tiny_dir, tmp_path):
    import json

    out = tmp_path / "gpt_aoti.pt2"
    r = export("aoti", "--model", str(tiny_dir), "--out", str(out), "--max-seq-len", "24",
               "--dtype", "bfloat16")
    assert r.returncode == 0, r.stderr
    report = json.loads((tmp_path / "gpt_aoti.pt2.report.json").read_text())
    for check in [*report["error_vs_fp32"].values(), report["decode_error_vs_fp32"]]:
        assert 0 < check["eager"] and check["artifact"] <= check["allowed"]
    from export.aoti import load

    runner = load(out)
    model = GPTModel.from_pretrained(tiny_dir, dtype=torch.bfloat16)
    idx = random_idx(model.config, 1, 9)
    allowed = max(c["allowed"] for c in report["error_vs_fp32"].values())
    with torch.no_grad():
        got = runner(idx)
        assert got.dtype == torch.bfloat16
        reference = model.float()(idx)  # the bf16 weights, upcast, in fp32
        assert (got.float() - reference).abs().max() <= allowed


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_integer_aoti_package_is_held_to_the_exact_product(scheme, tiny_dir, tmp_path):
    """An int8 or int4 model's package runs gptfn's kernels, which quantize activations: it
    is held to the core's exact product as closely as those kernels are, run eagerly."""
    import json

    import gptfn
    from export.aoti import load

    gptfn.quantize(GPTModel.from_pretrained(tiny_dir), scheme).save_pretrained(tmp_path / "q")
    out = tmp_path / "gpt_aoti.pt2"
    r = export("aoti", "--model", str(tmp_path / "q"), "--out", str(out), "--max-seq-len", "24")
    assert r.returncode == 0, r.stderr
    report = json.loads((tmp_path / "gpt_aoti.pt2.report.json").read_text())
    checks = [*report["error_vs_fp32"].values(), report["decode_error_vs_fp32"]]
    for check in checks:
        assert 0 < check["eager"] and check["artifact"] <= check["allowed"]
    package = load(out)
    model = GPTModel.from_pretrained(tmp_path / "q")
    idx = random_idx(model.config, 1, 9)
    with torch.no_grad():
        error = (package(idx) - model(idx)).abs().max()
    assert 0 < error <= max(c["allowed"] for c in checks)


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
    (["--out", "/tmp"], "--out /tmp is a directory"),
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
    previous = {"gpt.pt": b"previous artifact", "gpt.pt.report.json": b"previous report"}
    for name, data in previous.items():
        (tmp_path / name).write_bytes(data)
    with pytest.raises(VerificationError):
        build("torchscript", model, tmp_path / "gpt.pt", 32, reject)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == previous


def test_export_commits_artifact_and_report_as_a_unit(tiny_dir, tmp_path, capsys):
    """The report names the artifact with its size and sha256; the stages are announced on
    stderr; the temporary files a killed export left (and only those) are removed; the
    artifact gets the umask's mode, like any file the user writes."""
    from export.__main__ import main
    from export.build import load_torchscript
    from export.commit import read_report, sha256_file

    stale = [".gpt.pt.ab12_xyz.tmp", ".gpt.pt.report.json.0a1b2c3d.tmp"]
    kept = [".gpt.pt.notes", ".gpt.pt.ab12_xyz.tmpfile", ".other.pt.ab12_xyz.tmp", "gpt.pt.tmp"]
    for name in stale + kept:
        (tmp_path / name).write_text("left by someone")
    out = tmp_path / "gpt.pt"
    assert main(["torchscript", "--model", str(tiny_dir), "--out", str(out),
                 "--max-seq-len", "17"]) == 0
    err = capsys.readouterr().err
    for stage in ("loading", "scripting the model and writing gpt.pt", "verifying against eager",
                  "committing gpt.pt, gpt.pt.report.json"):
        assert f"export: {stage}" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        kept + ["gpt.pt", "gpt.pt.report.json"])
    report = read_report(tmp_path / "gpt.pt.report.json")
    assert report["artifacts"] == [{"file": "gpt.pt", "size_bytes": out.stat().st_size,
                                    "sha256": sha256_file(out)}]
    assert report["kind"] == "torchscript" and report["tokens_equal"]
    load_torchscript(out)
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask


def _pair(directory: Path, artifact: bytes, report: dict = None) -> dict:
    """Commit ``artifact`` as ``a.pt`` with its report through export.commit."""
    from export.commit import commit, report_path, temp_path

    final = directory / "a.pt"
    tmp = temp_path(final)
    try:
        tmp.write_bytes(artifact)
        return commit([(tmp, final)], report or {"kind": "test"}, report_path(final))
    finally:
        tmp.unlink(missing_ok=True)  # as export.build does: commit renames, never removes it


def test_a_report_is_read_only_where_it_describes_the_files_beside_it(tmp_path):
    import json

    from export.commit import StaleReport, read_report

    _pair(tmp_path, b"artifact bytes")
    report_file = tmp_path / "a.pt.report.json"
    assert read_report(report_file)["artifacts"][0]["file"] == "a.pt"
    (tmp_path / "a.pt").write_bytes(b"artifact bytez")  # same size, other bytes
    with pytest.raises(StaleReport, match="a.pt is not the file this report describes"):
        read_report(report_file)
    (tmp_path / "a.pt").unlink()
    with pytest.raises(StaleReport, match="names a.pt, which is not there"):
        read_report(report_file)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "x").write_bytes(b"x")
    report = json.loads(report_file.read_text())
    for name in ["../a.pt", "/etc/passwd", "sub/x", "..", "", None, 3]:
        report["artifacts"][0]["file"] = name
        report_file.write_text(json.dumps(report))
        with pytest.raises(StaleReport, match="not a file name in the report's own directory"):
            read_report(report_file)
    report_file.write_text("{not json")
    with pytest.raises(StaleReport, match="not an export report"):
        read_report(report_file)


@pytest.mark.parametrize("step, nth, expect", [
    ("replace", 0, "previous"),    # the previous report moved aside
    ("replace", 1, "previous"),    # the artifact renamed into place: rolled back
    ("replace", 2, "previous"),    # the report renamed into place: rolled back
    ("fsync_file", 1, "previous"),  # the new report's fsync
    ("fsync_dir", 0, "previous"),   # the previous report's move made durable
    ("fsync_dir", 1, "new"),        # after the commit: the new pair stands, the error is told
    ("link", 0, "new"),              # no backup link: the commit goes on without one
])
def test_a_failed_commit_keeps_the_previous_pair(tmp_path, monkeypatch, step, nth, expect):
    """A commit failing at each of its steps puts the previous pair back (or, past the commit
    point, leaves the new pair complete), with no temporary file left behind."""
    import export.commit as commit_module
    from export.commit import read_report

    _pair(tmp_path, b"previous artifact", {"kind": "previous"})
    previous = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    owner = commit_module.os if step in ("replace", "link") else commit_module
    real, calls = getattr(owner, step), []

    def failing(*args, **kwargs):
        calls.append(args)
        if len(calls) == nth + 1:
            raise OSError(28, "No space left on device (simulated)")
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, step, failing)
    try:
        _pair(tmp_path, b"new artifact", {"kind": "new"})
        failed = False
    except OSError:
        failed = True
    monkeypatch.undo()
    files = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert len(calls) > nth  # the step was reached
    if expect == "previous":
        assert failed and files == previous
    else:
        assert failed == (step == "fsync_dir") and set(files) == set(previous)
        assert files["a.pt"] == b"new artifact"
        assert read_report(tmp_path / "a.pt.report.json")["kind"] == "new"


def test_cpp_example_generates_the_same_tokens(tiny_dir, tmp_path):
    import shutil

    if shutil.which(os.environ.get("CXX", "g++")) is None:
        pytest.skip("no C++ compiler (g++) on this machine")
    out = tmp_path / "gpt.pt"
    r = export("torchscript", "--model", str(tiny_dir), "--out", str(out))
    assert r.returncode == 0, r.stderr
    binary = tmp_path / "gptfn_generate"
    r = subprocess.run(["bash", str(ROOT / "export" / "cpp" / "build.sh"), sys.executable,
                        str(binary)], capture_output=True, text=True, timeout=600)
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


def _no_work(*args, **kwargs):
    raise AssertionError("work began")


def test_too_short_for_verification_is_refused_before_any_work(tmp_path, capsys, monkeypatch):
    """A model whose context_length (or a --max-seq-len) leaves no room for the 16 decode
    steps that verification runs: the one-line error verification would give, before the
    build (and, for --max-seq-len, before the model is loaded)."""
    import export.build
    import gptfn.cli_args
    from export.__main__ import main
    from gptfn import init_params

    cfg = tiny_config(context_length=16)
    short = tmp_path / "short"
    GPTModel(cfg, params=init_params(cfg, 0)).save_pretrained(short)
    monkeypatch.setattr(export.build, "build", _no_work)
    out = tmp_path / "out"
    out.mkdir()
    assert main(["torchscript", "--model", str(short), "--out", str(out / "m.pt")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1] == ("export: error: max_seq_len must be at least 17 to verify 16 decode "
                         "steps, got 16")
    monkeypatch.setattr(gptfn.cli_args, "load_model", _no_work)
    assert main(["torchscript", "--random-init", "--out", str(out / "m.pt"),
                 "--max-seq-len", "16"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == ["export: error: max_seq_len must be at least 17 to verify 16 decode "
                     "steps, got 16"]
    assert not list(out.iterdir())


def test_out_with_a_tilde_is_the_home_directory(tiny_dir, tmp_path, capsys, monkeypatch):
    """``--out '~/m.pt'`` (a quoted tilde the shell did not expand) means the home directory:
    the request check sees HOME's directory (and goes on to the next problem, here the
    dtype), not a directory named ``~``."""
    import export.build
    from export.__main__ import main

    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(export.build, "build", _no_work)
    assert main(["torchscript", "--model", str(tiny_dir), "--out", "~/m32.pt",
                 "--dtype", "float16"]) == 2
    err = capsys.readouterr().err
    assert "float16 on the CPU is not supported" in err, err
    assert main(["torchscript", "--model", str(tiny_dir), "--out", "~"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == f"export: error: --out {home} is a directory: give the artifact's file path"
    assert not list(home.iterdir()) and not (tmp_path / "~").exists()
