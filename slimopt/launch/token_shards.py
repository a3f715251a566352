"""Token shards: a corpus tokenized once into one flat file of token ids on disk (``uint16``, or
``uint32`` for a vocabulary over 65,536 tokens), read back through ``numpy.memmap`` as blocks of
``seq_len`` tokens (the nanoGPT pattern).

Writing (``token_shards``): the corpus's documents are streamed, tokenized ``CHUNK_CHARS``
characters at a time, each followed by the end-of-text token, and appended to a temporary file
(each document's end offset to a second one), so host memory holds one chunk whatever the corpus
size; a progress line every ``PROGRESS_SECONDS`` on long work. Then the file is renamed into
place, then a JSON record is written beside it (also by rename): a record marks a complete
file.

The held-out split is the last ``eval_fraction`` of the documents (at least one): the file's
tail. Training blocks are cut from ``[0, boundary)``, held-out ones from ``[boundary, end)``,
each with its last partial block dropped: the blocks a run trains on are those of packing the
training documents, then the held-out ones, end to end. One file serves every ``--seq-len``.

Cache: ``tokens-KEY.bin`` and ``tokens-KEY.json`` under ``--cache-dir``, KEY from the corpus id,
the tokenizer's digest, the held-out fraction and the format. The record holds the file's
SHA-256, checked on every open: an unreadable record, or a file of the wrong size or digest, is
rebuilt, with a note.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import time
from dataclasses import dataclass

import numpy as np
import torch

from .checkpoint_io import file_sha256
from .cli_errors import first_line
from .data import Corpus, DataError
from .tokenizer import RunTokenizer, note_rebuilding

SHARD_FORMAT = 1
#: characters of documents tokenized at a time (a longer document is one chunk by itself)
CHUNK_CHARS = 250_000
PROGRESS_SECONDS = 30.0
EVAL_FRACTION = 0.02


def token_dtype(vocab_size: int):
    return np.uint16 if vocab_size <= 1 << 16 else np.uint32


def documents_digest_update(digest, doc: str) -> None:
    """Add one document to the data digest a checkpoint records (its length, then its text)."""
    digest.update(f"{len(doc)}:".encode())
    digest.update(doc.encode("utf-8", "surrogatepass"))


def _chunks(docs, chars: int):
    chunk, size = [], 0
    for doc in docs:
        chunk.append(doc)
        size += len(doc)
        if size >= chars:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


@dataclass
class TokenShards:
    """A written shard file and its record (see the module's docstring for the fields)."""
    path: str
    record: dict

    def blocks(self, seq_len: int) -> tuple["TokenBlocks", "TokenBlocks"]:
        """``(train, held out)`` blocks of ``seq_len`` tokens."""
        rec = self.record
        split = [TokenBlocks(self, 0, rec["train_tokens"], seq_len),
                 TokenBlocks(self, rec["train_tokens"], rec["tokens"], seq_len)]
        for part, name in zip(split, ("training", "held-out")):
            if len(part) == 0:
                raise DataError(f"too little text for one block of {seq_len} tokens in the "
                                f"{name} documents ({part.stop - part.start} tokens)")
        return split[0], split[1]


class TokenBlocks:
    """Blocks of ``seq_len`` tokens over tokens ``[start, stop)`` of a shard file (a last
    partial block dropped). Rows are read through a fresh ``numpy.memmap`` each time and come
    back as ``int64`` tensors of shape ``(rows, seq_len)``: a map kept open would let every page
    it ever touched count in the process's resident memory, up to the file's size."""

    def __init__(self, shards: TokenShards, start: int, stop: int, seq_len: int):
        self.shards, self.start, self.stop, self.seq_len = shards, start, stop, seq_len
        self.dtype = np.dtype(shards.record["dtype"])
        self.n = (stop - start) // seq_len

    def __len__(self) -> int:
        return self.n

    def numel(self) -> int:
        return self.n * self.seq_len

    def _view(self):
        return np.memmap(self.shards.path, dtype=self.dtype, mode="r",
                         offset=self.start * self.dtype.itemsize, shape=(self.n, self.seq_len))

    def rows(self, indices) -> torch.Tensor:
        """The blocks at ``indices`` (any integer sequence), in that order."""
        indices = np.asarray(indices, dtype=np.int64)
        if indices.size and (indices.min() < 0 or indices.max() >= self.n):
            raise IndexError(f"block index out of range [0, {self.n})")
        return torch.from_numpy(self._view()[indices].astype(np.int64))

    def __getitem__(self, index: slice) -> torch.Tensor:
        """Consecutive blocks (``blocks[a:b]``)."""
        if not isinstance(index, slice):
            raise TypeError("TokenBlocks takes a slice; use rows() for a list of blocks")
        return self.rows(np.arange(self.n)[index])


def _read_record(path: str, record_path: str, expect: dict) -> dict | None:
    """The record of a complete, intact cached shard file, or None (a damaged one is said)."""
    if not os.path.exists(record_path):
        return None
    try:
        with open(record_path) as f:
            record = json.load(f)
        if not isinstance(record, dict):
            raise ValueError("not a JSON object")
        for key, value in expect.items():
            if record.get(key) != value:
                raise ValueError(f"{key} is {record.get(key)!r}, not {value!r}")
        size = os.path.getsize(path)
        if size != record["tokens"] * np.dtype(record["dtype"]).itemsize:
            raise ValueError(f"{path} holds {size} bytes, not {record['tokens']} tokens")
        if file_sha256(path, chunk=1 << 20) != record["sha256"]:
            raise ValueError(f"{path} does not match its SHA-256")
        return record
    except (OSError, ValueError, KeyError, TypeError) as err:
        note_rebuilding(record_path, err)
        return None


def _write(corpus: Corpus, tokenizer: RunTokenizer, path: str, ends_path: str, say) -> dict:
    """Stream, tokenize and append; returns the counts and digests of the record."""
    dtype, eos = token_dtype(tokenizer.vocab_size), tokenizer.eos_id
    data_digest, file_digest = hashlib.sha256(), hashlib.sha256()
    docs = tokens = chars = 0
    t0 = last = time.monotonic()
    with open(path, "wb") as out, open(ends_path, "wb") as ends:
        for chunk in _chunks(corpus.documents(), CHUNK_CHARS):
            for doc in chunk:
                documents_digest_update(data_digest, doc)
                chars += len(doc)
            encoded = tokenizer.encode_batch(chunk)
            sizes = np.fromiter((len(ids) + 1 for ids in encoded), dtype=np.int64,
                                count=len(encoded))
            doc_ends = np.cumsum(sizes)
            flat = np.empty(int(doc_ends[-1]), dtype=dtype)
            for ids, end in zip(encoded, doc_ends.tolist()):
                flat[end - len(ids) - 1:end - 1] = ids
                flat[end - 1] = eos
            out.write(flat)  # the array's buffer, written and hashed without a copy
            file_digest.update(flat)
            ends.write((doc_ends + tokens).astype(np.uint64).tobytes())
            docs, tokens = docs + len(chunk), tokens + len(flat)
            now = time.monotonic()
            if now - last >= PROGRESS_SECONDS:
                say(f"tokenizing: {docs:,} documents, {chars:,} characters, {tokens:,} tokens "
                    f"so far ({now - t0:.0f} s)")
                last = now
    return dict(documents=docs, tokens=tokens, chars=chars, data_sha256=data_digest.hexdigest(),
                sha256=file_digest.hexdigest(), truncated=bool(corpus.truncated))


def _boundary(ends_path: str, index: int) -> int:
    """The end offset of document ``index`` (0-based) from the offsets file."""
    with open(ends_path, "rb") as f:
        f.seek(index * 8)
        return int(np.frombuffer(f.read(8), dtype=np.uint64)[0])


def token_shards(corpus: Corpus, tokenizer: RunTokenizer, cache_dir: str, say=print,
                 eval_fraction: float = EVAL_FRACTION) -> TokenShards:
    """The corpus's token file under ``cache_dir``: reused when intact, else written."""
    expect = dict(format=SHARD_FORMAT, corpus_id=corpus.corpus_id,
                  tokenizer_sha256=tokenizer.sha256, eos_id=tokenizer.eos_id,
                  eval_fraction=eval_fraction)
    key = hashlib.sha1(json.dumps(expect, sort_keys=True).encode()).hexdigest()[:16]
    path = os.path.join(cache_dir, f"tokens-{key}.bin")
    record_path = path[:-len(".bin")] + ".json"
    record = _read_record(path, record_path, expect)
    if record is not None:
        return TokenShards(path, record)
    os.makedirs(cache_dir, exist_ok=True)
    tmp, ends_tmp, record_tmp = (f"{p}.tmp{os.getpid()}" for p in
                                 (path, path + ".ends", record_path))
    try:
        counts = _write(corpus, tokenizer, tmp, ends_tmp, say)
        if counts["documents"] < 2:
            raise DataError("the corpus needs at least two documents (one for training, one "
                            "held out)")
        held_out = max(1, int(counts["documents"] * eval_fraction))
        train_tokens = _boundary(ends_tmp, counts["documents"] - held_out - 1)
        record = dict(expect, dtype=np.dtype(token_dtype(tokenizer.vocab_size)).name,
                      train_tokens=train_tokens, held_out_documents=held_out,
                      max_chars=corpus.max_chars, **counts)
        os.replace(tmp, path)
        with open(record_tmp, "w") as f:
            json.dump(record, f, indent=1)
        os.replace(record_tmp, record_path)
    except OSError as err:  # a full disk, a file that cannot be read: one line, no temporary
        full = err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
        raise DataError(f"building the token cache {path} failed ({type(err).__name__}: "
                        f"{first_line(err)})" + ("; free space under --cache-dir or pass "
                                                 "another --cache-dir" if full else "")) from None
    finally:
        for leftover in (tmp, ends_tmp, record_tmp):
            if os.path.exists(leftover):
                os.remove(leftover)
    return TokenShards(path, record)
