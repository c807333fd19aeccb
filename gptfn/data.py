"""Sliding-window datasets for next-token prediction.

A window of ``context_size + 1`` consecutive tokens starting at ``i`` gives
``input = tokens[i : i + context_size]`` and ``target = tokens[i + 1 : i + 1 + context_size]``.
With strided windows the starts are ``0, stride, 2 stride, ...`` while a whole window fits,
so ``L`` tokens give

    num_windows = (L - context_size - 1) // stride + 1        (L >= context_size + 1)

(the GPTModelV1 API's ``range(0, L - context_size, stride)``); tokens after the last
window are not used.

- ``TextDataset``: a text (tokenized once) or ids held as one tensor; windows are views.
- ``TextDataLoader``: the GPTModelV1 API's loader signature, seedable shuffling.
- ``TokenFileDataset``: a ``gptfn prepare`` corpus or a raw uint16 token file, read through
  ``numpy.memmap``; strided windows, or ``num_samples`` windows at random offsets drawn
  once from a seeded generator.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence, Tuple, TypeVar, Union

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from gptfn.checks import is_int
from gptfn.prepare import META_NAME, TOKEN_DTYPE, TOKENS_NAME, read_meta
from gptfn.tokenizer import BPETokenizer

T = TypeVar("T", str, Sequence[int])


def num_windows(num_tokens: int, context_size: int, stride: int) -> int:
    """How many strided windows ``num_tokens`` tokens give (see the module docstring)."""
    _check_window_args(context_size, stride)
    if num_tokens < context_size + 1:
        return 0
    return (num_tokens - context_size - 1) // stride + 1


def _check_window_args(context_size: int, stride: int) -> None:
    if not is_int(context_size) or context_size <= 0:
        raise ValueError(f"context_size must be a positive int, got {context_size!r}")
    if not is_int(stride) or stride <= 0:
        raise ValueError(f"stride must be a positive int, got {stride!r}")


def _too_short(num_tokens: int, context_size: int, what: str) -> ValueError:
    return ValueError(
        f"{what} has {num_tokens} tokens: at least context_size + 1 = {context_size + 1} "
        "are needed for one window"
    )


class TextDataset(Dataset):
    """Sliding windows over one text (or a sequence of ids).

    The tokens are stored once, as one int64 tensor; ``__getitem__`` returns views.

    Shapes: ``dataset[i]`` -> (input (context_size,), target (context_size,)).
    """

    def __init__(
        self,
        text_or_ids: Union[str, Sequence[int], Tensor],
        tokenizer: Optional[BPETokenizer] = None,
        context_size: int = 256,
        stride: int = 128,
    ):
        _check_window_args(context_size, stride)
        if isinstance(text_or_ids, str):
            if tokenizer is None:
                raise ValueError("a tokenizer is needed to make a dataset from text")
            ids = tokenizer.encode(text_or_ids)
        else:
            ids = text_or_ids
        self.tokens = torch.as_tensor(ids, dtype=torch.long).flatten()  # (L,)
        self.context_size = context_size
        self.stride = stride
        if self.tokens.numel() < context_size + 1:
            raise _too_short(self.tokens.numel(), context_size, "the corpus")
        # (N, context_size + 1): views into self.tokens, no copy
        self.windows = self.tokens.unfold(0, context_size + 1, stride)

    def __len__(self) -> int:
        return self.windows.size(0)

    def __getitem__(self, i: int) -> Tuple[Tensor, Tensor]:
        w = self.windows[i]  # (context_size + 1,)
        return w[:-1], w[1:]


class TextDataLoader:
    """The GPTModelV1 API's loader: text in, batches of (input, target) out.

    ``TextDataLoader(text, tokenizer, context_size=256, stride=128, batch_size=4,
    shuffle=True, drop_last=True, num_workers=0).get_dataloader()``; ``seed`` makes the
    shuffling reproducible. Iterating the object iterates a fresh DataLoader.
    """

    def __init__(
        self,
        text_data: Union[str, Sequence[int]],
        tokenizer: Optional[BPETokenizer] = None,
        context_size: int = 256,
        stride: int = 128,
        batch_size: int = 4,
        shuffle: bool = True,
        drop_last: bool = True,
        num_workers: int = 0,
        seed: Optional[int] = None,
    ):
        if not is_int(batch_size) or batch_size <= 0:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.dataset = TextDataset(text_data, tokenizer or BPETokenizer(), context_size, stride)
        if drop_last and len(self.dataset) < batch_size:
            raise ValueError(
                f"batch_size {batch_size} is larger than the {len(self.dataset)} windows of the "
                "data and drop_last=True would leave no batch"
            )
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.num_workers = num_workers
        self.seed = seed

    def get_dataloader(self) -> DataLoader:
        generator = None
        if self.seed is not None:
            generator = torch.Generator().manual_seed(self.seed)
        return DataLoader(
            self.dataset,
            batch_size=self.batch_size,
            shuffle=self.shuffle,
            drop_last=self.drop_last,
            num_workers=self.num_workers,
            generator=generator,
        )

    # the GPTModelV1 API's spelling, for its users' code (``.get_dataLoader()``)
    get_dataLoader = get_dataloader

    def __iter__(self):
        return iter(self.get_dataloader())

    def __len__(self) -> int:
        n = len(self.dataset)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)


def train_val_split(data: T, train_ratio: float = 0.9) -> Tuple[T, T]:
    """Split a text (at a character) or ids (at a token): the first ``train_ratio`` trains."""
    if not 0.0 < train_ratio < 1.0:
        raise ValueError(f"train_ratio must be in (0, 1), got {train_ratio}")
    cut = int(train_ratio * len(data))
    return data[:cut], data[cut:]


class TokenFileDataset(Dataset):
    """Windows over a memory-mapped uint16 token file; the file is never read whole.

    ``path`` is a directory written by ``gptfn prepare`` (``split`` picks "train", "val" or
    "all") or a raw ``.bin`` file of little-endian uint16 ids. With ``num_samples`` the
    dataset holds that many windows at random offsets (drawn once from ``seed``);
    otherwise strided windows (``stride`` defaults to ``context_size``).

    Shapes: ``dataset[i]`` -> (input (context_size,), target (context_size,)), int64.
    """

    def __init__(
        self,
        path: Union[str, Path],
        context_size: int,
        split: str = "train",
        stride: Optional[int] = None,
        num_samples: Optional[int] = None,
        seed: int = 0,
    ):
        stride = context_size if stride is None else stride
        _check_window_args(context_size, stride)
        path = Path(path).expanduser()
        if path.is_dir():
            meta = read_meta(path)
            if split == "all":
                begin, end = 0, meta["token_count"]
            elif split in meta["splits"]:
                begin, end = meta["splits"][split]
            else:
                raise ValueError(f"split must be 'train', 'val' or 'all', got {split!r}")
            file = path / TOKENS_NAME
            self.meta: Optional[dict] = meta
        elif path.is_file():
            size = path.stat().st_size
            if size % TOKEN_DTYPE.itemsize:
                raise ValueError(
                    f"{path} has {size} bytes: not a whole number of uint16 tokens"
                )
            begin, end, file, self.meta = 0, size // TOKEN_DTYPE.itemsize, path, None
        else:
            raise FileNotFoundError(f"no token file or prepared directory at {path} "
                                    f"(expected {TOKENS_NAME} + {META_NAME})")
        self.path = file
        self.context_size = context_size
        self.stride = stride
        if end - begin < context_size + 1:
            raise _too_short(end - begin, context_size, f"{file} ({split} split)")
        memmap = np.memmap(file, dtype=TOKEN_DTYPE, mode="r")
        self.tokens = memmap[begin:end]  # a view of the map: nothing read yet
        last_start = end - begin - context_size - 1
        if num_samples is None:
            self.starts = None
            self._len = last_start // stride + 1
        else:
            if not is_int(num_samples) or num_samples <= 0:
                raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
            rng = np.random.default_rng(seed)
            self.starts = rng.integers(0, last_start + 1, size=num_samples, dtype=np.int64)
            self._len = num_samples

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, i: int) -> Tuple[Tensor, Tensor]:
        if not -self._len <= i < self._len:
            raise IndexError(f"window {i} out of range for {self._len} windows")
        i %= self._len
        start = int(self.starts[i]) if self.starts is not None else i * self.stride
        w = torch.from_numpy(self.tokens[start:start + self.context_size + 1].astype(np.int64))
        return w[:-1], w[1:]


def read_text(path: Union[str, Path]) -> str:
    """A UTF-8 text file's contents; errors name the file (missing, not UTF-8, empty)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"no data at {path} (a text file or a prepared directory)")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not valid UTF-8 ({e.reason} at byte {e.start})") from None
    if not text:
        raise ValueError(f"{path} is empty: there is nothing to train on or evaluate")
    return text


def load_windows(path: Union[str, Path], context_size: int, tokenizer=None) -> Dataset:
    """Every window (stride = context_size) of a prepared directory or a text file."""
    path = Path(path).expanduser()
    if path.is_dir():
        return TokenFileDataset(path, context_size, split="all")
    return TextDataset(read_text(path), tokenizer or BPETokenizer(), context_size, context_size)


def load_training_data(path: Union[str, Path], context_size: int, tokenizer=None,
                       train_ratio: float = 0.9) -> Tuple[Dataset, Dataset]:
    """(train, validation) windows of length ``context_size`` (stride = context_size) from a
    ``gptfn prepare`` directory (its own split) or a UTF-8 text file (tokenized here; the
    first ``train_ratio`` of the tokens train)."""
    path = Path(path).expanduser()
    if path.is_dir():
        return (TokenFileDataset(path, context_size, split="train"),
                TokenFileDataset(path, context_size, split="val"))
    ids = (tokenizer or BPETokenizer()).encode(read_text(path))
    train_ids, val_ids = train_val_split(ids, train_ratio)
    return (TextDataset(train_ids, context_size=context_size, stride=context_size),
            TextDataset(val_ids, context_size=context_size, stride=context_size))


def check_vocabulary(path: Union[str, Path], vocab_size: int) -> None:
    """Fail, naming both, when the token ids of the data at ``path`` (a prepared directory,
    which records its tokenizer, or a text file, which gptfn tokenizes with GPT-2's) can
    exceed the ids of a model with ``vocab_size`` rows."""
    path = Path(path).expanduser()
    if path.is_dir():
        meta = read_meta(path)
        name, n_vocab = meta.get("tokenizer"), meta.get("n_vocab")
        where = f"{path} was prepared with the {name} tokenizer"
    else:
        name, n_vocab = "gpt2", BPETokenizer().n_vocab
        where = f"{path} is text, which gptfn tokenizes with the gpt2 tokenizer"
    if isinstance(n_vocab, int) and n_vocab > vocab_size:
        raise ValueError(
            f"{where} ({n_vocab} token ids), but the model has vocab_size {vocab_size}: "
            f"tokenize the data for this model (gptfn prepare --encoding), or use a model "
            f"with vocab_size >= {n_vocab}")
