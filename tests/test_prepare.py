"""gptfn prepare: streaming tokenization into tokens.bin + meta.json."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from gptfn.prepare import iter_text_blocks, prepare, read_meta, verify
from gptfn.tokenizer import BPETokenizer

tok = BPETokenizer()
ALPHABET = st.sampled_from(list("ab yZ09 \n\n\r\t.,'!-") + ["é", "日", "🙂", "\u00a0", "\u3000", "\x1c", "'s"])


@given(text=st.lists(ALPHABET, max_size=400).map("".join), block=st.integers(4, 64))
def test_blocks_encode_to_the_tokens_of_the_whole_text(tmp_path_factory, text, block):
    path = tmp_path_factory.mktemp("t") / "doc.txt"
    path.write_bytes(text.encode("utf-8"))
    blocks = list(iter_text_blocks(path, block_bytes=block))
    assert "".join(t for t, _ in blocks) == text
    assert sum(n for _, n in blocks) == len(text.encode("utf-8"))
    ids = [i for t, _ in blocks for i in tok.encode_ordinary(t)]
    assert ids == tok.encode_ordinary(text)


def test_blocks_are_actually_cut(tmp_path):
    path = tmp_path / "doc.txt"
    path.write_text("word " * 10000)
    blocks = [t for t, _ in iter_text_blocks(path, block_bytes=1024) if t]
    assert len(blocks) > 10


def write_corpus(root):
    (root / "sub").mkdir(parents=True)
    docs = {
        root / "b.txt": "Second file. " * 50,
        root / "a.txt": "First file, with <|endoftext|> in it.\nAnd café.",
        root / "sub" / "c.txt": "Nested " * 30,
        root / "skip.md": "not matched by the glob",
    }
    for p, t in docs.items():
        p.write_text(t, encoding="utf-8")
    return docs


def test_prepare_contents_meta_and_determinism(tmp_path):
    docs = write_corpus(tmp_path / "corpus")
    r1 = prepare([tmp_path / "corpus"], tmp_path / "out1", progress=False, val_fraction=0.25)
    r2 = prepare([tmp_path / "corpus"], tmp_path / "out2", progress=False, val_fraction=0.25)
    data = (tmp_path / "out1" / "tokens.bin").read_bytes()
    assert data == (tmp_path / "out2" / "tokens.bin").read_bytes()  # deterministic
    order = [tmp_path / "corpus" / "a.txt", tmp_path / "corpus" / "b.txt",
             tmp_path / "corpus" / "sub" / "c.txt"]
    want = []
    for p in order:  # sorted, recursive, glob *.txt; each document then <|endoftext|>
        want += tok.encode_ordinary(docs[p]) + [50256]
    assert np.frombuffer(data, dtype="<u2").tolist() == want
    meta = json.loads((tmp_path / "out1" / "meta.json").read_text())
    assert meta["token_count"] == len(want) == r1.token_count
    assert meta["sha256"] == hashlib.sha256(data).hexdigest() == r2.meta["sha256"]
    assert meta["tokenizer"] == "gpt2"
    assert [rec["path"] for rec in meta["inputs"]] == [str(p) for p in order]
    assert sum(rec["tokens"] for rec in meta["inputs"]) == len(want)
    val_start = len(want) - int(len(want) * 0.25)
    assert meta["splits"] == {"train": [0, val_start], "val": [val_start, len(want)]}
    verify(tmp_path / "out1")
    assert sorted(os.listdir(tmp_path / "out1")) == ["meta.json", "tokens.bin"]


def test_prepare_p50k(tmp_path):
    (tmp_path / "a.txt").write_text("x" + " " * 10 + "y")
    r = prepare([tmp_path / "a.txt"], tmp_path / "out", tokenizer="p50k_base", progress=False)
    ids = np.fromfile(tmp_path / "out" / "tokens.bin", dtype="<u2").tolist()
    assert ids == BPETokenizer("p50k_base").encode_ordinary("x" + " " * 10 + "y") + [50256]
    assert r.meta["n_vocab"] == 50281


def test_non_utf8_input(tmp_path):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("good text then caf".encode() + b"\xe9 and more")
    with pytest.raises(ValueError, match=r"latin1.txt is not valid UTF-8 \(byte 18"):
        prepare([bad], tmp_path / "out", progress=False)
    assert not (tmp_path / "out" / "tokens.bin").exists()
    r = prepare([bad], tmp_path / "out", progress=False, errors="replace")
    ids = np.fromfile(tmp_path / "out" / "tokens.bin", dtype="<u2").tolist()
    assert tok.decode(ids[:-1]) == "good text then caf\ufffd and more" and r.token_count == len(ids)


def test_bad_inputs(tmp_path):
    with pytest.raises(FileNotFoundError, match="input not found"):
        prepare([tmp_path / "nope.txt"], tmp_path / "out", progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no file matching"):
        prepare([tmp_path / "empty"], tmp_path / "out", progress=False)
    (tmp_path / "a.txt").write_text("hi")
    with pytest.raises(ValueError, match="val_fraction"):
        prepare([tmp_path / "a.txt"], tmp_path / "out", progress=False, val_fraction=1.5)
    with pytest.raises(ValueError, match="unknown encoding"):
        prepare([tmp_path / "a.txt"], tmp_path / "out", progress=False, tokenizer="nope")


def test_failure_mid_run_keeps_previous_corpus(tmp_path):
    (tmp_path / "a.txt").write_text("word " * 300000)
    prepare([tmp_path / "a.txt"], tmp_path / "out", progress=False)
    before = {n: (tmp_path / "out" / n).read_bytes() for n in ("tokens.bin", "meta.json")}

    def crash(count):
        raise RuntimeError("simulated failure")

    (tmp_path / "a.txt").write_text("other " * 300000)
    with pytest.raises(RuntimeError):
        prepare([tmp_path / "a.txt"], tmp_path / "out", progress=False, on_block=crash)
    assert {n: (tmp_path / "out" / n).read_bytes() for n in before} == before
    assert sorted(os.listdir(tmp_path / "out")) == ["meta.json", "tokens.bin"]


def test_killed_run_leaves_no_file_under_the_final_name(tmp_path):
    corpus = tmp_path / "big.txt"
    with open(corpus, "w") as fh:
        for i in range(400000):
            fh.write(f"line {i} of a corpus large enough to take a while to tokenize\n")
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "gptfn", "prepare", str(corpus), "--out", str(out),
                             "--no-progress"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        temps = [p for p in out.glob(".tokens.bin.*")] if out.exists() else []
        if temps and temps[0].stat().st_size > 0:
            break
        assert proc.poll() is None, "prepare finished before it could be killed"
        time.sleep(0.01)
    else:
        pytest.fail("prepare never started writing")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "tokens.bin").exists() and not (out / "meta.json").exists()
    with pytest.raises(FileNotFoundError, match="not a prepared corpus"):
        read_meta(out)


def test_truncated_or_tampered_token_file(tmp_path):
    (tmp_path / "a.txt").write_text("some words " * 100)
    prepare([tmp_path / "a.txt"], tmp_path / "out", progress=False)
    f = tmp_path / "out" / "tokens.bin"
    data = f.read_bytes()
    f.write_bytes(data[:-2] + bytes([data[-2] ^ 1, data[-1]]))
    with pytest.raises(ValueError, match="sha256 does not match"):
        verify(tmp_path / "out")
    f.write_bytes(data[:-4])
    with pytest.raises(ValueError, match="tokens.bin holds .* bytes but meta.json says"):
        read_meta(tmp_path / "out")


def test_cli_prepare(tmp_path):
    write_corpus(tmp_path / "corpus")
    r = subprocess.run([sys.executable, "-m", "gptfn", "prepare", str(tmp_path / "corpus"),
                        "--out", str(tmp_path / "out")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "wrote" in r.stdout and "from 3 file(s)" in r.stdout
    assert "prepare" in r.stderr and "100%" in r.stderr  # the progress bar
    (tmp_path / "bad.txt").write_bytes(b"\xff\xfe")
    r = subprocess.run([sys.executable, "-m", "gptfn", "prepare", str(tmp_path / "bad.txt"),
                        "--out", str(tmp_path / "out2")], capture_output=True, text=True)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1] == (
        f"gptfn: error: {tmp_path / 'bad.txt'} is not valid UTF-8 (byte 0: invalid start byte); "
        "pass errors='replace' (--errors replace) to substitute U+FFFD")


def test_prepare_does_not_import_torch(tmp_path):
    (tmp_path / "a.txt").write_text("hello")
    code = ("import sys; from gptfn.prepare import prepare; "
            f"prepare([{str(tmp_path / 'a.txt')!r}], {str(tmp_path / 'out')!r}, progress=False); "
            "assert 'torch' not in sys.modules, 'torch imported'")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
