"""Token data for language models: token arrays, or text tokenised and packed into blocks.

- ``FILE.npz`` / ``FILE.h5`` holding ``input_ids`` (N, T) integers and optionally ``attention_mask`` (N, T) of
  0/1 (default: all ones). Sizes the file declares are checked against the bytes it stores first.
- ``FILE.txt`` (one document per non-empty line), ``FILE.jsonl`` (one JSON object per line, text under
  ``--text-field``, default ``text``) or ``FILE.parquet`` (a column ``--text-field``; needs pandas and
  pyarrow): tokenised with the tokenizer in the model folder (or ``--tokenizer DIR``), loaded with
  ``local_files_only=True`` and never ``trust_remote_code``. Documents are joined with the tokenizer's
  end-of-sequence token (when it has one) and cut into ``--seq-len`` blocks; the last block is padded, with
  ``attention_mask`` 0 on the padding.

The seeded 80/10/10 train/val/test split (``split_indices``) applies to sequences. Batches are dicts of long
tensors ``{"input_ids", "attention_mask"}``; ids are never cast to float. Padded positions (mask 0) are never
part of the scanned data. Whether the ids fit the model (vocabulary, positions) is checked by ``check_fits``.
"""

from __future__ import annotations

import inspect
import json
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..defaults import DEFAULTS, MAX_BYTES_ENV
from ..distributed import span
from ..errors import DataError, one_line
from ..files import open_regular, read_array_file, regular_size, shown

ARRAY_SUFFIXES = (".npz", ".h5", ".hdf5")
TEXT_SUFFIXES = (".txt", ".jsonl", ".parquet")
DEFAULT_SEQ_LEN = 512
KEYS = ("input_ids", "attention_mask")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "vocab.txt", "tokenizer.model",
                   "spiece.model", "merges.txt", "special_tokens_map.json")


@dataclass
class TokenDataset:
    """One split of token sequences: ``input_ids`` and ``attention_mask`` (N, T) integer tensors on the host.

    :func:`load_tokens` keeps them compact (int32 ids, bool mask: 5 bytes a token, not int64's 16: a corpus of
    billions of tokens is held by every torchrun process); every batch it hands out is int64."""

    name: str
    split: str
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    seed: int = DEFAULTS.seed
    val_fraction: float | None = DEFAULTS.val_fraction
    test_fraction: float | None = DEFAULTS.test_fraction
    indices: np.ndarray | None = None
    source: str | None = None
    tokenizer_size: int | None = None  # len(tokenizer) when the text was tokenised here
    info: dict = field(default_factory=dict)  # tokenizer, text_field: for describe()
    _device_copy: tuple | None = field(default=None, repr=False, compare=False)  # (device, ids, mask)
    kind = "tokens"

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def seq_len(self) -> int:
        return int(self.input_ids.shape[1])

    @property
    def tokens(self) -> int:
        """Real (unpadded) tokens."""
        return int(torch.count_nonzero(self.attention_mask))  # a bool sum would make an int64 copy

    @property
    def max_id(self) -> int:
        return int(self.input_ids.max()) if self.input_ids.numel() else -1

    def describe(self) -> dict:
        from .dataset import fingerprint

        d = {"name": self.name, "kind": "tokens", "split": self.split, "samples": len(self), "sequences": len(self),
             "tokens": self.tokens, "seq_len": self.seq_len, "seed": self.seed, "val_fraction": self.val_fraction,
             "test_fraction": self.test_fraction}
        if self.indices is not None:
            d["indices_sha256"] = fingerprint(self.indices)
        if self.source:
            d["source"] = self.source
        d.update(self.info)
        return d

    def batches(self, batch_size: int, device: torch.device | str):
        """``{"input_ids", "attention_mask"}`` batches of long tensors on ``device``, in order."""
        dev = torch.device(device)
        for i in range(0, len(self), batch_size):
            yield {"input_ids": _long(self.input_ids[i:i + batch_size], dev),
                   "attention_mask": _long(self.attention_mask[i:i + batch_size], dev)}

    def train_batches(self, batch_size: int, device: torch.device | str,
                      generator: torch.Generator | int | None = None, augment: str | None = "default",
                      drop_last: bool = False, share: tuple[int, int] | None = None):
        """One epoch of shuffled ``{"input_ids", "attention_mask"}`` batches for a training loop.

        ``generator`` (a ``torch.Generator``, an int seed, or None for torch's default) draws a permutation of
        the sequences on ``device``; the same generator state gives the same epoch. Sequences are never cut or
        re-packed. ``augment``: token data has none (``"default"``, ``"none"`` or None). ``share``: ``(rank,
        world)`` of a torchrun process: only its rows of each batch (``Dataset.train_batches``)."""
        from .dataset import _generator

        if augment not in (None, "default", "none"):
            raise DataError(f"--augment {augment}: token data has no augmentation; use --augment none")
        dev = torch.device(device)
        ids, mask = self._on(dev)
        n = len(self)
        perm = torch.randperm(n, generator=_generator(generator, dev), device=dev)
        for i in range(0, n, batch_size):
            if drop_last and i + batch_size > n:
                break
            idx = perm[i:i + batch_size]
            if share is not None:
                start, stop = span(len(idx), *share)
                idx = idx[start:stop]
            yield {"input_ids": ids.index_select(0, idx).long(), "attention_mask": mask.index_select(0, idx).long()}

    def _on(self, dev: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Both arrays on ``dev``, copied once for repeated epochs (ids are small next to the model)."""
        if dev.type == "cpu":
            return self.input_ids, self.attention_mask
        if self._device_copy is None or self._device_copy[0] != dev:
            self._device_copy = (dev, self.input_ids.to(dev), self.attention_mask.to(dev))
        return self._device_copy[1], self._device_copy[2]

    def example(self, n: int = 2) -> dict:
        return {"input_ids": self.input_ids[:n].long(), "attention_mask": self.attention_mask[:n].long()}

    def release(self) -> None:
        """Drop the device copy kept for repeated epochs."""
        self._device_copy = None


def _long(t: torch.Tensor, dev: torch.device) -> torch.Tensor:
    """A batch as models take it: int64 on ``dev`` (moved compact, cast there)."""
    return t.to(dev, non_blocking=True).long()


# ---------------------------------------------------------------------------------------------
# Calling a model on a token batch


def model_kwargs(model, batch: dict) -> dict:
    """Keyword arguments for ``model(**kwargs)`` on a token batch. An encoder-decoder (T5) also gets the
    ids shifted right by one as ``decoder_input_ids`` (teacher forcing with labels = input_ids), with the
    same attention mask: decoder position t predicts token t, a real position exactly when token t is."""
    ids = batch["input_ids"]
    mask = batch.get("attention_mask")
    out = {"input_ids": ids}
    if mask is not None:
        out["attention_mask"] = mask
    config = getattr(model, "config", None)
    if getattr(config, "is_encoder_decoder", False):
        start = _first_int(getattr(config, "decoder_start_token_id", None), getattr(config, "pad_token_id", None))
        dec = torch.full_like(ids, start)
        dec[:, 1:] = ids[:, :-1]
        out["decoder_input_ids"] = dec
        if mask is not None:
            out["decoder_attention_mask"] = mask
    if _takes(model, "use_cache"):  # no key/value cache: nothing is generated
        out["use_cache"] = False
    return out


def _first_int(*values) -> int:
    return next((int(v) for v in values if isinstance(v, int) and not isinstance(v, bool)), 0)


def _takes(model, name: str) -> bool:
    try:
        return name in inspect.signature(type(model).forward).parameters
    except (TypeError, ValueError):
        return False


def vocab_size(model) -> int | None:
    """The model's vocabulary: its input embedding's rows (config.vocab_size if it has no embedding)."""
    get = getattr(model, "get_input_embeddings", None)
    try:
        emb = get() if callable(get) else None
    except (NotImplementedError, AttributeError):
        emb = None
    n = getattr(emb, "num_embeddings", None)
    if isinstance(n, int):
        return n
    v = getattr(getattr(model, "config", None), "vocab_size", None)
    return v if isinstance(v, int) and v > 0 else None


def max_positions(model) -> int | None:
    """The longest sequence the model's position embeddings cover, if its config says (None: no limit)."""
    config = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions"):
        v = getattr(config, key, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


# ---------------------------------------------------------------------------------------------
# Which --data is token data


def is_token_data(spec) -> bool:
    """True for a text corpus (.txt/.jsonl/.parquet) or an array file holding ``input_ids``."""
    path = Path(str(spec)).expanduser()
    suffix = path.suffix.lower()
    if suffix in TEXT_SUFFIXES:
        return True
    if suffix not in ARRAY_SUFFIXES or not os.path.lexists(path):
        return False
    try:  # a peek through a checked descriptor; anything unreadable (a FIFO...) is left to the array reader
        with open_regular(path) as f:
            if suffix == ".npz":
                with zipfile.ZipFile(f) as zf:
                    return "input_ids.npy" in zf.namelist() or "input_ids" in zf.namelist()
            import h5py

            with h5py.File(f, "r") as h:
                return "input_ids" in h.keys()
    except Exception:
        return False


def load_tokens(spec, split: str = DEFAULTS.split, *, seed: int = DEFAULTS.seed,
                val_fraction: float = DEFAULTS.val_fraction, limit: int | None = None, seq_len: int | None = None,
                tokenizer: str | os.PathLike | None = None, text_field: str | None = None,
                model_folder: str | os.PathLike | None = None) -> TokenDataset:
    """One split of token data from ``spec`` (an array file or a text corpus; see the module docstring).

    ``tokenizer``: the folder a text corpus is tokenised with (``--tokenizer``); default ``model_folder``
    (the Hugging Face model folder being scanned)."""
    path = Path(str(spec)).expanduser()
    suffix = path.suffix.lower()
    info: dict = {}
    tok_size = None
    if suffix in ARRAY_SUFFIXES:
        if tokenizer is not None:
            raise DataError("--tokenizer applies to text corpora; token arrays are already tokenised")
        ids, mask, idx, total = _read_token_arrays(path, split, seed, val_fraction, limit)  # the split's rows
        rows = None
        if seq_len is not None and seq_len != ids.shape[1]:
            raise DataError(f"--seq-len {seq_len}: {shown(path)} holds sequences of {ids.shape[1]} tokens; "
                            "--seq-len applies to text corpora (omit it for token arrays)")
    else:
        regular_size(path)  # before loading a tokenizer: the data itself may be a FIFO or missing
        tokenizer = tokenizer if tokenizer is not None else model_folder
        if tokenizer is None:
            raise DataError(f"--data {shown(path)} is text: it needs a tokenizer; pass --tokenizer DIR, or a model "
                            "folder holding one")
        tok = load_tokenizer(tokenizer)
        field_name = text_field or "text"
        texts = _read_texts(path, suffix, field_name)
        n = int(seq_len) if seq_len is not None else min(DEFAULT_SEQ_LEN, _model_max(tok))
        if n < 1:
            raise DataError(f"--seq-len {seq_len} must be at least 1")
        ids, mask = _pack(texts, tok, n, path)
        tok_size = len(tok)
        info = {"tokenizer": str(tokenizer), "text_field": field_name if suffix != ".txt" else None}
        info = {k: v for k, v in info.items() if v is not None}
        total = len(ids)
        idx = rows = _split_rows(total, split, seed, val_fraction, limit)
    if len(idx) == 0:
        raise DataError(f"--data {shown(spec)} split {split!r} is empty ({total} sequences); use --split all, "
                        "more text, or a shorter --seq-len")
    ids_t = torch.from_numpy(_take(ids, rows, _id_dtype(ids, path)))
    mask_t = torch.from_numpy(_take(mask, rows, bool))
    if not mask_t.any():
        raise DataError(f"--data {shown(spec)} split {split!r}: every position is padding (attention_mask 0); "
                        "nothing to scan")
    return TokenDataset(str(spec), split, ids_t, mask_t, seed, None if split == "all" else val_fraction,
                        None if split == "all" else DEFAULTS.test_fraction, idx, str(path), tok_size, info)


def _split_rows(n: int, split: str, seed: int, val_fraction: float, limit: int | None) -> np.ndarray:
    from .load import split_indices

    idx = split_indices(n, split, seed, val_fraction, DEFAULTS.test_fraction)
    return idx if limit is None else idx[:limit]


def _read_token_arrays(path: Path, split: str, seed: int, val_fraction: float,
                       limit: int | None) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """The split's rows of the file's ids and mask (only those are read into memory), the split's indices
    and the file's number of sequences."""
    shapes: dict = {}

    def rows(key: str, shape: tuple) -> np.ndarray:
        if key == "input_ids":  # read first (KEYS)
            shapes[key], shapes["rows"] = shape, _split_rows(shape[0], split, seed, val_fraction, limit)
        elif shape != shapes["input_ids"]:
            raise DataError(f"{shown(path)}: 'attention_mask' has shape {shape} but 'input_ids' "
                            f"{shapes['input_ids']}; give one 0/1 entry per token")
        return shapes["rows"]

    found = read_array_file(path, KEYS, ("input_ids",), _check_meta, "'input_ids' (and optionally 'attention_mask')",
                            what="token arrays", rows=rows)
    ids = found["input_ids"]
    mask = found.get("attention_mask")
    total = shapes["input_ids"][0]
    if mask is None:
        mask = np.ones(ids.shape, dtype=bool)
    elif mask.size and not 0 <= mask.min() <= mask.max() <= 1:  # min and max copy nothing (np.isin: 12 B a token)
        bad = mask[(mask < 0) | (mask > 1)].flat[0]
        raise DataError(f"{shown(path)}: 'attention_mask' must hold only 0 (padding) and 1 (token), found {bad}")
    if ids.size and int(ids.min()) < 0:
        raise DataError(f"{shown(path)}: 'input_ids' must be 0 or more, found {int(ids.min())}")
    return ids, mask, shapes["rows"], total


def _take(a: np.ndarray, rows: np.ndarray | None, dtype, chunk: int = 4096) -> np.ndarray:
    """``a[rows]`` (``rows`` None: all of ``a``) as ``dtype``, gathered a chunk of rows at a time: no whole
    intermediate copy in the file's dtype beside the result."""
    if rows is None:
        return a.astype(dtype, copy=False)
    out = np.empty((len(rows), *a.shape[1:]), dtype=dtype)
    for i in range(0, len(rows), chunk):
        out[i:i + chunk] = a[rows[i:i + chunk]]
    return out


def _id_dtype(ids: np.ndarray, path: Path) -> type:
    """The dtype ids are held in: int32 when they fit (every real vocabulary), else int64."""
    top = int(ids.max()) if ids.size else 0
    if top < 2**31:
        return np.int32
    if top < 2**63:
        return np.int64
    raise DataError(f"{shown(path)}: 'input_ids' holds {top}, beyond int64; token ids index a vocabulary")


def _check_meta(path, key: str, shape: tuple, dtype: np.dtype) -> None:
    """Type and rank from a header, before the data is read."""
    plain = dtype.fields is None and dtype.subdtype is None and dtype.itemsize <= 8
    kinds = "iu" if key == "input_ids" else "iub"
    if not plain or dtype.kind not in kinds:
        raise DataError(f"{shown(path)}: '{key}' must hold integers, got {dtype}"
                        + ("; token ids are never floats" if dtype.kind == "f" else ""))
    if len(shape) != 2 or 0 in shape:
        raise DataError(f"{shown(path)}: '{key}' must be shaped (sequences, tokens) with both above 0, got {shape}")


def load_tokenizer(folder):
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise DataError("text data needs transformers' tokenizers: pip install 'deadscan[hf]'") from None
    where = Path(str(folder)).expanduser()
    if not where.is_dir():
        raise DataError(f"--tokenizer {shown(folder)}: not a folder; give the folder a tokenizer was saved to "
                        "(tokenizer.json, tokenizer_config.json)")
    # transformers may build an empty tokenizer from a config alone: ask for the files a saved one holds
    if not any(os.path.lexists(where / name) for name in TOKENIZER_FILES):
        raise DataError(f"no tokenizer in {shown(folder)} (none of {', '.join(TOKENIZER_FILES[:3])}, ...); "
                        "pass --tokenizer DIR with the model's tokenizer")
    for name in TOKENIZER_FILES:  # a FIFO among them would block the reader
        if os.path.lexists(where / name):
            regular_size(where / name)
    try:
        # local files only, and never code from the folder
        tok = AutoTokenizer.from_pretrained(str(where), local_files_only=True, trust_remote_code=False)
    except Exception as e:  # missing files, remote code, damaged json: one line
        raise DataError(f"no usable tokenizer in {shown(folder)} ({type(e).__name__}: {one_line(e, 200)}); "
                        "pass --tokenizer DIR with the model's tokenizer") from None
    if len(tok) == 0:
        raise DataError(f"the tokenizer in {shown(folder)} has no tokens; pass --tokenizer DIR with the model's tokenizer")
    return tok


def _model_max(tok) -> int:
    n = getattr(tok, "model_max_length", None)
    return n if isinstance(n, int) and 0 < n < 10**9 else DEFAULT_SEQ_LEN


def _read_texts(path: Path, suffix: str, text_field: str) -> list[str]:
    size = regular_size(path)
    if size > DEFAULTS.max_decoded_bytes:
        raise DataError(f"{shown(path)}: {size:,} bytes, above the {DEFAULTS.max_decoded_bytes:,}-byte limit; "
                        f"raise it with {MAX_BYTES_ENV} if the file is trusted")
    if suffix == ".parquet":
        try:
            import pandas as pd
            import pyarrow  # noqa: F401
        except ImportError:
            raise DataError(f"{shown(path)}: reading parquet needs pandas and pyarrow (pip install pandas pyarrow); "
                            "or give the text as .txt or .jsonl") from None
        with open_regular(path) as f:
            try:
                frame = pd.read_parquet(f)
            except Exception as e:
                raise DataError(f"{shown(path)}: cannot read parquet ({one_line(e, 200)})") from None
        if text_field not in frame.columns:
            raise DataError(f"{shown(path)}: no column {text_field!r} (found {list(frame.columns)[:20]}); "
                            "pass --text-field NAME")
        texts = [t for t in frame[text_field].tolist() if isinstance(t, str)]
    else:
        with open_regular(path) as f:
            raw = f.read()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{shown(path)}: not UTF-8 text (byte {e.start}); save it as UTF-8") from None
        if suffix == ".txt":
            texts = text.splitlines()
        else:
            texts = []
            for i, line in enumerate(text.splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except ValueError as e:
                    raise DataError(f"{shown(path)}: line {i} is not JSON ({one_line(e, 120)})") from None
                if not isinstance(row, dict) or not isinstance(row.get(text_field), str):
                    keys = list(row)[:20] if isinstance(row, dict) else type(row).__name__
                    raise DataError(f"{shown(path)}: line {i} has no text field {text_field!r} (found {keys}); "
                                    "pass --text-field NAME")
                texts.append(row[text_field])
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise DataError(f"{shown(path)}: no text in the file (empty or whitespace only); give a corpus with text")
    return texts


def _pack(texts: list[str], tok, seq_len: int, path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Token ids of every document joined by EOS, cut into ``seq_len`` blocks; the last one padded (mask 0)."""
    eos = tok.eos_token_id
    pieces = []
    for ids in tok(texts, add_special_tokens=False)["input_ids"]:
        if ids:
            pieces.append(np.asarray(ids, dtype=np.int64))
            if isinstance(eos, int):
                pieces.append(np.asarray([eos], dtype=np.int64))
    if not pieces:
        raise DataError(f"{shown(path)}: the tokenizer made no tokens of the text; check the tokenizer")
    flat = np.concatenate(pieces)
    if isinstance(eos, int) and len(flat) > 1:
        flat = flat[:-1]  # no separator after the last document
    n = -(-len(flat) // seq_len)
    pad = tok.pad_token_id if isinstance(tok.pad_token_id, int) else 0
    ids = np.full(n * seq_len, pad, dtype=np.int64)
    ids[:len(flat)] = flat
    mask = np.zeros(n * seq_len, dtype=np.int64)
    mask[:len(flat)] = 1
    return ids.reshape(n, seq_len), mask.reshape(n, seq_len)
