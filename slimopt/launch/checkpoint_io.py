"""Checkpoint files that are safe to load and cannot be half-written.

- **Writes are atomic and durable**: the payload goes to a temporary file with a unique name in the
  target folder, is flushed and ``fsync``-ed, then ``os.replace``-d over the target, and the folder
  is ``fsync``-ed. A killed process or a full disk leaves the previous file intact and no
  temporary file behind.
- **Every checkpoint carries a digest** (SHA-256 over its tensors' bytes, dtypes and shapes and
  its plain values, in order) that ``load_verified`` recomputes: flipped bytes are refused, not
  loaded.
- **Loads never run code**: ``torch.load(weights_only=True)`` only.
- DeepSpeed tags get the same check through per-rank digest files (``write_tag_digests``,
  ``verify_tag_digests``).
- ``RunLock``: one run at a time per output folder (``fcntl.flock``), so two runs cannot write the
  same checkpoints.
"""
from __future__ import annotations

import errno
import fcntl
import glob
import hashlib
import json
import os
import pickle
import re
import shutil
import tempfile

import torch

from .cli_errors import first_line

DIGEST_KEY = "sha256"


class CheckpointError(ValueError):
    """A checkpoint that cannot be written or loaded; the CLI reports it in one line."""


def _feed(h, obj) -> None:
    """Hash ``obj`` (nested dicts/lists/tuples of tensors and plain values) in a fixed order."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    elif isinstance(obj, dict):
        h.update(f"D{len(obj)}".encode())
        for key, value in obj.items():
            _feed(h, key)
            _feed(h, value)
    elif isinstance(obj, (set, frozenset)):  # iteration order varies between processes
        h.update(f"S{len(obj)}".encode())
        for value in sorted(obj, key=repr):
            _feed(h, value)
    elif isinstance(obj, (list, tuple)):
        h.update(f"{type(obj).__name__[0]}{len(obj)}".encode())
        for value in obj:
            _feed(h, value)
    else:
        h.update(f"{type(obj).__name__}:{obj!r};".encode())


def digest(payload: dict) -> str:
    h = hashlib.sha256()
    _feed(h, payload)
    return h.hexdigest()


def _fsync_dir(folder: str) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_error(path: str, err: BaseException) -> CheckpointError:
    folder = os.path.dirname(os.path.abspath(path))
    try:
        free = f"; {shutil.disk_usage(folder).free:,} bytes free there"
    except OSError:
        free = ""
    if isinstance(err, OSError):
        reason = err.strerror or str(err)
        if err.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
            reason = f"disk full ({reason})"
    else:  # torch.save reports a failed write (a full disk, a file-size limit) this way
        first = first_line(err, limit=200)
        reason = f"the write failed (is the disk full?): {first}"
    return CheckpointError(f"could not write checkpoint {path}: {reason}{free}")


def write_atomic(data, path: str) -> None:
    """``torch.save(data)`` to a unique temporary file in ``path``'s folder, flushed and
    ``fsync``-ed, then ``os.replace``-d onto ``path`` and the folder ``fsync``-ed: a reader (or
    a crash) sees the old file or the whole new one. A failure is a ``CheckpointError`` naming
    ``path``, and the temporary file is removed."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(data, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(folder)
    except (OSError, RuntimeError) as err:
        raise _write_error(path, err) from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_atomic(payload: dict, *paths: str) -> None:
    """``payload`` plus its digest (computed once), written by ``write_atomic`` to each path."""
    data = {**payload, DIGEST_KEY: digest(payload)}
    for path in paths:
        write_atomic(data, path)


def load_verified(path: str) -> dict:
    """The payload saved by ``save_atomic``, after checking its digest (``weights_only=True``).

    A checkpoint without a digest (format version 1, before digests) loads with ``"sha256"`` set to
    ``None``, so the caller can say that it was not verified."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such checkpoint")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a refused pickle global, a truncated zip, random bytes
        found = re.search(r"GLOBAL ([\w.]+)", str(err))
        if isinstance(err, pickle.UnpicklingError) and found:  # weights_only refused to run it
            raise CheckpointError(f"{path}: refused: it holds a pickled object "
                                  f"({found.group(1)}) that is not plain data, and loading it "
                                  "could run code") from None
        first = first_line(err, "")
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(err).__name__}: "
                              f"{first})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: not a slimopt checkpoint (holds a {type(data).__name__})")
    saved = data.pop(DIGEST_KEY, None)
    if saved is not None and saved != digest(data):
        raise CheckpointError(f"{path}: corrupted (its SHA-256 digest does not match its "
                              "contents); resume from an earlier checkpoint")
    data[DIGEST_KEY] = saved
    return data


def check_writable_dir(folder: str, flag: str) -> None:
    """Create ``folder`` if needed and prove a file can be written there, before any training."""
    try:
        os.makedirs(folder, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test.", dir=folder)
        os.close(fd)
        os.remove(probe)
    except OSError as err:
        reason = "it exists and is not a folder" if os.path.exists(folder) and \
            not os.path.isdir(folder) else f"cannot write there ({err.strerror or err})"
        raise CheckpointError(f"{flag} {folder}: {reason}") from None


class RunLock:
    """An exclusive lock on ``folder/.slimopt.lock`` for the life of the run."""

    def __init__(self, folder: str):
        self.path = os.path.join(folder, ".slimopt.lock")
        self._file = open(self.path, "a+")
        try:
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._file.seek(0)
            holder = self._file.read().strip() or "another process"
            self._file.close()
            raise CheckpointError(f"--output-dir {folder}: another run ({holder}) is writing "
                                  "there; wait for it or choose another --output-dir") from None
        self._file.seek(0)
        self._file.truncate()
        self._file.write(f"pid {os.getpid()}")
        self._file.flush()

    def release(self) -> None:
        if not self._file.closed:
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()


# ---------------------------------------------------------------------------- DeepSpeed tags
def file_sha256(path: str, chunk: int = 1 << 24) -> str:
    """SHA-256 of a file, read ``chunk`` bytes at a time (DeepSpeed tags, token shards)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _own_files(tag_dir: str, rank: int) -> list:
    """The files of a DeepSpeed tag that ``rank`` wrote: its ``zero_pp_rank_R_*`` partitions,
    and on rank 0 the shared ``mp_rank_*`` model states."""
    names = sorted(os.listdir(tag_dir))
    own = [n for n in names if n.startswith(f"zero_pp_rank_{rank}_") and n.endswith(".pt")]
    if rank == 0:
        own += [n for n in names if n.startswith("mp_rank_") and n.endswith(".pt")]
    return own


def write_tag_digests(tag_dir: str, rank: int) -> None:
    """After ``engine.save_checkpoint``: each rank records the SHA-256 of the files it wrote in
    ``slimopt-sha256-rankR.json`` (no shared file system needed)."""
    digests = {name: file_sha256(os.path.join(tag_dir, name))
               for name in _own_files(tag_dir, rank)}
    path = os.path.join(tag_dir, f"slimopt-sha256-rank{rank}.json")
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=tag_dir)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(digests, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        raise _write_error(path, err) from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def verify_tag_digests(tag_dir: str) -> int:
    """Check every file of a DeepSpeed tag that a digest file names and this node can see;
    returns how many were checked (0: the tag carries no digests, e.g. an older slimopt's)."""
    checked = 0
    for manifest in sorted(glob.glob(os.path.join(tag_dir, "slimopt-sha256-rank*.json"))):
        try:
            with open(manifest) as f:
                digests = json.load(f)
        except (OSError, ValueError) as err:
            raise CheckpointError(f"{manifest}: unreadable digest file ({err})") from None
        for name, expected in digests.items():
            path = os.path.join(tag_dir, os.path.basename(name))
            if os.path.exists(path):
                if file_sha256(path) != expected:
                    raise CheckpointError(f"{path}: corrupted (its SHA-256 digest does not "
                                          "match); resume from an earlier checkpoint")
                checked += 1
    return checked
