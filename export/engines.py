"""llama.cpp and ONNX Runtime, each in a process of its own, driven from gptfn.

The export suite checks its GGUF and ONNX files by running them in the engine they are for,
and the benchmark suite times those engines against gptfn. Both go through ``Engine``: a
child process (``python -m export.engines``) that loads one model file in one engine and
answers requests over a pipe. A process of its own because

- the engine then has the machine as a user would run it: its own thread pool (2 threads,
  say) with no torch threads beside it, and no torch imported at all;
- an engine that aborts on a bad file (llama.cpp does, with GGML_ASSERT) ends its own
  process, and the export reports a failed check instead of dying.

Requests (all ids are plain ints; arrays come back as numpy float32):

- ``logits(ids)``: the logits after every token of ``ids``, run as one sequence;
- ``stepwise(ids, prompt)``: ``ids[:prompt]`` as one batch, then the rest one token at a
  time through the engine's KV cache; the logits after each of tokens ``prompt-1..``;
- ``greedy(ids, n)``: ``n`` greedy tokens after ``ids`` (the first from the prompt's pass,
  then one step per token), with a timestamp on the child's clock after each;
- ``prefill(ids)``: the last logits of one pass over ``ids``, and its seconds;
- ``tokenize(text)`` / ``detokenize(ids)`` (llama.cpp: its own tokenizer, from the file).
"""

from __future__ import annotations

import os
import pickle
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, List, Optional, Sequence

import numpy as np

ENGINES = ("llama.cpp", "onnxruntime")
_LEN = struct.Struct("<Q")


class EngineError(RuntimeError):
    """The engine could not load the model or answer (its own message, or how it died)."""


def _send(stream, obj: Any) -> None:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(_LEN.pack(len(data)) + data)
    stream.flush()


def _receive(stream) -> Any:
    head = stream.read(_LEN.size)
    if len(head) < _LEN.size:
        raise EOFError
    (n,) = _LEN.unpack(head)
    data = stream.read(n)
    if len(data) < n:
        raise EOFError
    return pickle.loads(data)


def available(engine: str) -> Optional[str]:
    """Why ``engine`` cannot run here (its Python package is missing), or None."""
    module = {"llama.cpp": "llama_cpp", "onnxruntime": "onnxruntime"}[engine]
    import importlib.util

    if importlib.util.find_spec(module) is None:
        package = {"llama.cpp": "llama-cpp-python", "onnxruntime": "onnxruntime"}[engine]
        return f"{engine} is not installed (pip install {package}, or the interop extra)"
    return None


class Engine:
    """A model file loaded in ``engine`` in a child process; a context manager.

    ``threads``: the engine's thread count. ``exact`` (llama.cpp): keep the KV cache in
    float32 instead of llama.cpp's default float16 and compute every position's logits, for
    checking a file against fp32; without it llama.cpp runs as it does for a user.
    ``n_ctx``: llama.cpp's context (0: the model's).
    """

    def __init__(self, engine: str, path: Path, threads: int = 2, exact: bool = False,
                 n_ctx: int = 0):
        if engine not in ENGINES:
            raise ValueError(f"unknown engine {engine!r}; use one of {', '.join(ENGINES)}")
        why = available(engine)
        if why:
            raise ImportError(why)
        self.engine = engine
        env = dict(os.environ, OMP_NUM_THREADS=str(threads))
        root = str(Path(__file__).resolve().parent.parent)  # export/ importable in the child
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        # the child's stderr goes to a file: a pipe nobody reads could fill and stall it
        self._stderr = tempfile.TemporaryFile()
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "export.engines", engine, str(path), str(threads),
             "1" if exact else "0", str(n_ctx)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr, env=env)
        try:
            self.info = self._call(None)  # the child's answer once the model is loaded
        except BaseException:
            self.close()
            raise

    def _call(self, request) -> Any:
        try:
            if request is not None:
                _send(self._proc.stdin, request)
            status, value = _receive(self._proc.stdout)
        except (EOFError, BrokenPipeError, OSError):
            self._proc.kill()
            self._proc.wait()
            self._stderr.seek(0)
            err = self._stderr.read().decode(errors="replace").strip().splitlines()
            tail = " | ".join(err[-3:]) or "no message"
            raise EngineError(f"{self.engine} stopped (exit {self._proc.returncode}): "
                              f"{tail}") from None
        if status != "ok":
            raise EngineError(f"{self.engine}: {value}")
        return value

    def logits(self, ids: Sequence[int]) -> np.ndarray:
        return self._call(("logits", list(map(int, ids))))

    def stepwise(self, ids: Sequence[int], prompt: int) -> np.ndarray:
        return self._call(("stepwise", list(map(int, ids)), prompt))

    def greedy(self, ids: Sequence[int], n: int):
        """(the n new ids, a timestamp in seconds after each)."""
        return self._call(("greedy", list(map(int, ids)), n))

    def greedy_rows(self, rows: Sequence[Sequence[int]], n: int):
        """Greedy decoding of several prompts of one length at once, each its own sequence in
        one batch per step (llama.cpp only): (the n new ids of each row, a timestamp in
        seconds after each step)."""
        return self._call(("greedy_rows", [list(map(int, r)) for r in rows], n))

    def prefill(self, ids: Sequence[int]):
        """(last logits, seconds)."""
        return self._call(("prefill", list(map(int, ids))))

    def tokenize(self, text: str) -> List[int]:
        return self._call(("tokenize", text))

    def detokenize(self, ids: Sequence[int]) -> bytes:
        return self._call(("detokenize", list(map(int, ids))))

    def close(self) -> None:
        if self._proc.poll() is None:
            try:
                _send(self._proc.stdin, ("quit",))
                self._proc.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                self._proc.kill()
                self._proc.wait()
        for stream in (self._proc.stdin, self._proc.stdout, self._stderr):
            stream.close()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --- the child ------------------------------------------------------------------------------


class _LlamaCpp:
    def __init__(self, path: str, threads: int, exact: bool, n_ctx: int):
        import llama_cpp

        kwargs = {"type_k": llama_cpp.GGML_TYPE_F32, "type_v": llama_cpp.GGML_TYPE_F32} \
            if exact else {}
        # exact: every position's logits (for the checks); else the last only, as llama.cpp
        # computes them when it generates
        self.all_logits = exact
        self.llm = llama_cpp.Llama(model_path=path, n_ctx=n_ctx, n_threads=threads,
                                   n_threads_batch=threads, n_batch=max(n_ctx, 512),
                                   n_ubatch=max(n_ctx, 512), logits_all=exact, verbose=False,
                                   **kwargs)
        self.n_vocab = self.llm.n_vocab()
        self.info = {"n_vocab": self.n_vocab, "n_ctx": self.llm.n_ctx(),
                     "version": getattr(llama_cpp, "__version__", "?")}
        self.threads, self.cache_types = threads, kwargs
        self.batched = None  # (rows, cells per row, context): the context greedy_rows made

    def greedy_rows(self, rows: List[List[int]], n: int):
        """Each row its own sequence (``seq_id``) in one ``llama_batch`` per step, as
        llama.cpp's batched and parallel examples decode, in a context of its own with a KV
        stream per sequence; the model's weights are the loaded ones."""
        import llama_cpp as lc

        b, p = len(rows), len(rows[0]) if rows else 0
        if p == 0 or any(len(r) != p for r in rows) or n < 1:
            raise ValueError(f"greedy_rows takes prompts of one length, at least one token "
                             f"each, and n >= 1; got lengths {[len(r) for r in rows]}, n {n}")
        ctx = self._batched_context(b, p + n)
        lc.llama_memory_clear(lc.llama_get_memory(ctx), True)  # data too, not only metadata
        batch = lc.llama_batch_init(b * p, 0, 1)
        try:
            def decode(entries):  # entries: (token, position, sequence, wants logits)
                batch.n_tokens = len(entries)
                for i, (tok, pos, seq, out) in enumerate(entries):
                    batch.token[i], batch.pos[i] = tok, pos
                    batch.n_seq_id[i], batch.seq_id[i][0], batch.logits[i] = 1, seq, out
                code = lc.llama_decode(ctx, batch)
                if code != 0:
                    raise RuntimeError(f"llama_decode returned {code}")

            def argmax(i: int) -> int:
                row = np.ctypeslib.as_array(lc.llama_get_logits_ith(ctx, i),
                                            shape=(self.n_vocab,))
                return int(np.argmax(row))

            decode([(tok, pos, s, pos == p - 1) for s, r in enumerate(rows)
                    for pos, tok in enumerate(r)])
            last = [argmax(s * p + p - 1) for s in range(b)]  # each row's last position
            out, stamps = [last], [time.perf_counter()]
            for step in range(1, n):
                decode([(tok, p + step - 1, s, True) for s, tok in enumerate(last)])
                last = [argmax(s) for s in range(b)]
                out.append(last)
                stamps.append(time.perf_counter())
        finally:
            lc.llama_batch_free(batch)
        return [list(col) for col in zip(*out)], stamps

    def _batched_context(self, rows: int, cells: int):
        import llama_cpp as lc

        if self.batched and self.batched[:2] == (rows, cells):
            return self.batched[2]
        self.close_batched()
        params = lc.llama_context_default_params()
        per_row = -(-cells // 256) * 256  # llama.cpp pads a KV stream to 256 cells
        params.n_ctx, params.n_seq_max, params.kv_unified = rows * per_row, rows, False
        params.n_batch = params.n_ubatch = max(rows * cells, 512)
        params.n_threads = params.n_threads_batch = self.threads
        for key, value in self.cache_types.items():
            setattr(params, key, value)
        ctx = lc.llama_init_from_model(self.llm._model.model, params)
        if not ctx:
            raise RuntimeError(f"llama.cpp could not make a context for {rows} sequences")
        self.batched = (rows, cells, ctx)
        return ctx

    def close_batched(self) -> None:
        if self.batched:
            import llama_cpp as lc

            lc.llama_free(self.batched[2])
            self.batched = None

    def _eval(self, ids: List[int]) -> np.ndarray:
        """Feed ``ids`` after what is cached; (len(ids), V) logits, or (1, V): the last
        position's, where only those are computed."""
        start = self.llm.n_tokens
        self.llm.eval(ids)
        if self.all_logits:
            return np.array(self.llm.scores[start:start + len(ids)], dtype=np.float32)
        last = np.ctypeslib.as_array(self.llm._ctx.get_logits(), shape=(1, self.n_vocab))
        return last.copy()

    def reset(self) -> None:
        self.llm.reset()  # the next eval drops the cached positions

    def tokenize(self, text: str) -> List[int]:
        return self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)

    def detokenize(self, ids: List[int]) -> bytes:
        return self.llm.detokenize(ids)


class _OnnxRuntime:
    def __init__(self, path: str, threads: int, exact: bool, n_ctx: int):
        import json

        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        config = json.loads((Path(path).parent / "config.json").read_text(encoding="utf-8"))
        self.layers, heads = config["n_layer"], config["n_head"]
        self.shape = (1, heads, 0, config["n_embd"] // heads)
        self.info = {"n_vocab": config["vocab_size"], "version": ort.__version__}
        self.reset()

    def reset(self) -> None:
        empty = np.zeros(self.shape, dtype=np.float32)
        self.past = {f"past_key_values.{i}.{kv}": empty
                     for i in range(self.layers) for kv in ("key", "value")}
        self.n_tokens = 0

    def _eval(self, ids: List[int]) -> np.ndarray:
        total = self.n_tokens + len(ids)
        feeds = {"input_ids": np.array([ids], dtype=np.int64),
                 "attention_mask": np.ones((1, total), dtype=np.int64),
                 "position_ids": np.arange(self.n_tokens, total, dtype=np.int64)[None],
                 **self.past}
        out = self.session.run(None, feeds)
        names = [o.name for o in self.session.get_outputs()]
        for name, value in zip(names[1:], out[1:]):  # present.{i}.key -> past_key_values.{i}.key
            self.past["past_key_values." + name.split(".", 1)[1]] = value
        self.n_tokens = total
        return out[0][0]  # (T, V)


def _serve(engine: str, path: str, threads: int, exact: bool, n_ctx: int) -> None:
    proto_in = os.fdopen(os.dup(0), "rb")
    proto_out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # whatever the engine prints goes to stderr, never into the protocol
    try:
        model = (_LlamaCpp if engine == "llama.cpp" else _OnnxRuntime)(path, threads, exact,
                                                                        n_ctx)
    except Exception as e:  # noqa: BLE001  (the parent gets the engine's own message)
        _send(proto_out, ("error", f"cannot load {path}: {type(e).__name__}: {e}"))
        return
    _send(proto_out, ("ok", model.info))
    try:
        while True:
            try:
                request = _receive(proto_in)
            except EOFError:
                return
            if request[0] == "quit":
                return
            try:
                _send(proto_out, ("ok", _answer(model, request)))
            except Exception as e:  # noqa: BLE001
                _send(proto_out, ("error", f"{request[0]}: {type(e).__name__}: {e}"))
    finally:
        if isinstance(model, _LlamaCpp):
            model.close_batched()  # before the model it uses is freed


def _answer(model, request):
    kind, args = request[0], request[1:]
    if kind == "tokenize":
        return model.tokenize(*args)
    if kind == "detokenize":
        return model.detokenize(*args)
    model.reset()
    if kind == "logits":
        return model._eval(args[0])
    if kind == "stepwise":
        ids, prompt = args
        rows = [model._eval(ids[:prompt])[-1]]
        rows += [model._eval([tok])[-1] for tok in ids[prompt:]]
        return np.stack(rows)
    if kind == "prefill":
        t0 = time.perf_counter()
        logits = model._eval(args[0])[-1]
        return logits, time.perf_counter() - t0
    if kind == "greedy_rows":
        if not isinstance(model, _LlamaCpp):
            raise ValueError("batched greedy decoding is driven for llama.cpp only")
        return model.greedy_rows(*args)
    if kind == "greedy":
        ids, n = args
        out, stamps = [], []
        logits = model._eval(ids)[-1]
        for i in range(n):
            tok = int(np.argmax(logits))
            out.append(tok)
            stamps.append(time.perf_counter())
            if i + 1 < n:
                logits = model._eval([tok])[-1]
        return out, stamps
    raise ValueError(f"unknown request {kind!r}")


if __name__ == "__main__":
    _serve(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "1", int(sys.argv[5]))
