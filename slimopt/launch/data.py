"""Pretraining data: documents, a byte-level BPE tokenizer trained and cached on first use, packing
into fixed-length blocks, a held-out split, and a resumable batch order.

Sources (``load_documents``):
- ``None``: the embedded default, the Python standard library's own ``.py`` files read from the
  running interpreter (works offline on any machine with Python);
- ``"fortunes"`` (a reserved name): English prose, the epigrams of Debian's ``fortunes`` package
  (``apt-get install fortunes``; ~2.5 MB in ~15,000 fortunes), one document per fortune, in a
  fixed shuffled order so the held-out last 2% samples every file (see ``fortune_documents``);
  a local file or folder named ``fortunes`` is read as ``--data ./fortunes``;
- a local ``.txt``/``.json``/``.jsonl``/``.parquet`` file or a folder of them, through ``datasets``;
- any other string: a hub dataset name, streamed through ``datasets`` (needs a network; the first
  ``max_documents`` documents are used).

The batch order is a pure function of ``(seed, epoch)``: batch ``i`` of the run is block
permutation ``perm_epoch[(i mod n) * B : ...]``, so the data position in a checkpoint is one
integer and a resumed run neither repeats nor skips a batch.
"""
from __future__ import annotations

import codecs
import hashlib
import json
import os
import random
import re
import sys
import sysconfig

import torch

from .cli_errors import first_line

EOS = "<|endoftext|>"
TEXT_SUFFIXES = {".txt": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
SKIP_DIRS = {"test", "tests", "site-packages", "dist-packages", "idlelib", "__pycache__"}
#: the built-in prose corpus: ``--data fortunes`` reads the fortune files of this folder
FORTUNES = "fortunes"
FORTUNES_DIR = "/usr/share/games/fortunes"


class DataError(ValueError):
    """A data problem the CLI reports as a one-line message."""


def stdlib_documents(max_chars: int) -> list[str]:
    """The standard library's ``.py`` files, in a fixed order, up to ``max_chars`` characters."""
    root = sysconfig.get_paths()["stdlib"]
    docs, total = [], 0
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS)
        for name in sorted(files):
            if name.endswith(".py"):
                with open(os.path.join(folder, name), encoding="utf-8", errors="replace") as f:
                    text = f.read()
                docs.append(text)
                total += len(text)
                if total >= max_chars:
                    return docs
    if not docs:
        raise DataError(f"no Python source under {root}: pass --data")
    return docs


def _fortune_files(root: str) -> list[str]:
    """The plain fortune files of ``root``: its regular files, without the ``strfile`` indexes
    (``.dat``), the ``.u8`` links and any subfolder (Debian's ``off/``, the offensive ones)."""
    if not os.path.isdir(root):
        raise DataError(f"--data {FORTUNES}: the fortunes corpus is not installed (no {root}); "
                        "install it with `apt-get install fortunes`, or leave out --data for the "
                        "default stdlib corpus, or pass --data PATH for your own text")
    files = sorted(os.path.join(root, n) for n in os.listdir(root)
                   if not n.endswith((".dat", ".u8")) and not n.startswith(".")
                   and os.path.isfile(os.path.join(root, n)))
    if not files:
        raise DataError(f"--data {FORTUNES}: no fortune files in {root}; reinstall them with "
                        "`apt-get install --reinstall fortunes`, or leave out --data for the "
                        "default stdlib corpus, or pass --data PATH")
    return files


def _overstruck(text: str) -> str:
    """``text`` as printed: each backspace erases the character before it (``_<BS>X``
    underlines, ``___<BS><BS><BS>word`` too)."""
    while "\x08" in text:
        cleaner = re.sub(r"[^\x08\n]\x08", "", text)
        if cleaner == text:
            return text.replace("\x08", "")
        text = cleaner
    return text


def fortune_documents(max_chars: int, root: str | None = None) -> tuple[list[str], str]:
    """``(fortunes, digest of the files' names and text)``: one document per fortune (the text
    between lines holding only ``%``, overstrikes ``X<BS>Y`` reduced to ``Y``), shuffled once
    with a fixed seed (the files are sorted by topic, so unshuffled the held-out last 2% would
    all be Zippy the Pinhead), then cut at ``max_chars`` characters."""
    files = _fortune_files(root or FORTUNES_DIR)
    docs, digest = [], hashlib.sha1()
    for path in files:
        with open(path, encoding="utf-8", errors="replace") as f:
            text = _overstruck(f.read())
        digest.update(f"{os.path.basename(path)}\0{text}\0".encode())
        docs += [d.strip("\n") for d in re.split(r"^%\n", text + "\n", flags=re.M)
                 if d.strip()]
    random.Random(0).shuffle(docs)
    kept, total = [], 0
    for doc in docs:
        kept.append(doc)
        total += len(doc)
        if total >= max_chars:
            break
    return kept, digest.hexdigest()[:12]


def _local_files(path: str):
    """The data files of ``path``, all of one loader kind (a folder mixing kinds is refused:
    one loader would read the others' bytes as text)."""
    if os.path.isdir(path):
        files = sorted(os.path.join(path, f) for f in os.listdir(path)
                       if os.path.splitext(f)[1] in TEXT_SUFFIXES)
        if not files:
            raise DataError(f"--data {path}: no {sorted(TEXT_SUFFIXES)} files in this folder")
    elif os.path.splitext(path)[1] not in TEXT_SUFFIXES:
        raise DataError(f"--data {path}: unsupported file type; use one of {sorted(TEXT_SUFFIXES)}")
    else:
        files = [path]
    kinds = sorted({TEXT_SUFFIXES[os.path.splitext(f)[1]] for f in files})
    if len(kinds) > 1:
        raise DataError(f"--data {path}: the folder mixes {' and '.join(kinds)} files; keep one "
                        "kind per folder")
    empty = [f for f in files if os.path.getsize(f) == 0]
    if empty:
        raise DataError(f"--data {empty[0]}: the file is empty")
    if kinds == ["text"] or kinds == ["json"]:
        for f in files:
            _check_utf8_text(f)
    return files


def _check_utf8_text(path: str, chunk: int = 1 << 20) -> None:
    """Text and JSON lines must be UTF-8 text, without NUL bytes (binary files are refused)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with open(path, "rb") as f:
        while block := f.read(chunk):
            if b"\0" in block:
                raise DataError(f"--data {path}: a NUL byte at offset {offset + block.index(0)}; "
                                "this looks like a binary file, not text")
            try:
                decoder.decode(block)
            except UnicodeDecodeError as err:
                raise DataError(f"--data {path}: not UTF-8 text (byte {offset + err.start}: "
                                f"{err.reason}); convert it, e.g. iconv -f latin1 -t utf-8") \
                    from None
            offset += len(block)
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError as err:
            raise DataError(f"--data {path}: not UTF-8 text (truncated at the end: "
                            f"{err.reason})") from None


def _read_local(kind: str, files: list, source: str):
    """A ``datasets`` dataset of ``files``; a file it cannot parse is reported in one line."""
    import datasets
    datasets.disable_progress_bars()  # local files load in seconds; keep errors on one line
    verbosity = datasets.logging.get_verbosity()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # its parse errors come below
    try:
        return datasets.load_dataset(kind, data_files=files, split="train")
    except Exception as err:  # DatasetGenerationError wraps the parser's own error
        cause = err.__cause__ or err.__context__ or err
        first = first_line(cause)
        raise DataError(f"--data {source}: could not read it as {kind} ({type(cause).__name__}: "
                        f"{first})") from None
    finally:
        datasets.logging.set_verbosity(verbosity)


def load_documents(source: str | None, *, text_column: str = "text", max_chars: int = 20_000_000,
                   max_documents: int = 200_000) -> tuple[list[str], str]:
    """``(documents, corpus id)``; the id keys the tokenizer and token caches."""
    if source is None:
        docs = stdlib_documents(max_chars)
        return docs, f"stdlib-{sys.version.split()[0]}-{max_chars}"
    if source == FORTUNES:
        docs, digest = fortune_documents(max_chars)
        return docs, f"fortunes-{digest}-{max_chars}"
    try:
        import datasets
    except ImportError:
        raise DataError("--data needs the datasets package: pip install datasets") from None
    looks_local = os.path.sep in source or os.path.splitext(source)[1] in TEXT_SUFFIXES \
        or source.startswith(".")
    if looks_local or os.path.exists(source):
        if not os.path.exists(source):
            raise DataError(f"--data {source}: no such file or folder")
        files = _local_files(source)
        dataset = _read_local(TEXT_SUFFIXES[os.path.splitext(files[0])[1]], files, source)
        stamp = [(f, os.path.getsize(f), int(os.path.getmtime(f))) for f in files]
        corpus_id = "local-" + hashlib.sha1(json.dumps(stamp).encode()).hexdigest()[:12]
    else:
        try:
            dataset = datasets.load_dataset(source, split="train", streaming=True)
        except Exception as err:  # network, unknown name, auth: one line for the CLI
            raise DataError(f"--data {source}: could not open it as a hub dataset ({err})") from None
        corpus_id = "hub-" + source.replace("/", "--")
    docs, total = [], 0
    for row in dataset:
        if text_column not in row:
            raise DataError(f"--data {source}: no column {text_column!r} (columns: "
                            f"{sorted(row)}); pass --text-column")
        text = row[text_column]
        if text is not None and not isinstance(text, str):
            raise DataError(f"--data {source}: column {text_column!r} holds "
                            f"{type(text).__name__} values, not text")
        if text:
            docs.append(text)
            total += len(text)
        if total >= max_chars or len(docs) >= max_documents:
            break
    if not docs:
        raise DataError(f"--data {source}: no text found")
    return docs, f"{corpus_id}-{max_chars}"


def _rebuilding(path: str, err: BaseException) -> None:
    first = first_line(err, limit=200)
    print(f"note: the cache file {path} is unreadable ({type(err).__name__}: {first}); "
          "rebuilding it", file=sys.stderr)


def tokenizer_for(docs: list[str], corpus_id: str, vocab_size: int, cache_dir: str):
    """A byte-level BPE (``tokenizers``) trained on ``docs``, cached by corpus and vocabulary."""
    from tokenizers import ByteLevelBPETokenizer, Tokenizer
    path = os.path.join(cache_dir, f"bpe-{corpus_id}-{vocab_size}.json")
    if os.path.exists(path):
        try:
            return Tokenizer.from_file(path)
        except Exception as err:  # noqa: BLE001 -- a damaged cache entry is rebuilt, and said
            _rebuilding(path, err)
    tok = ByteLevelBPETokenizer()
    tok.train_from_iterator(docs, vocab_size=vocab_size, min_frequency=2, special_tokens=[EOS],
                            show_progress=False)
    os.makedirs(cache_dir, exist_ok=True)
    tmp = path + f".tmp{os.getpid()}"
    tok.save(tmp)
    os.replace(tmp, path)
    return Tokenizer.from_file(path)


def token_blocks(docs: list[str], tokenizer, seq_len: int, corpus_id: str, cache_dir: str,
                 eval_fraction: float = 0.02):
    """``(train, eval)``: ``(n, seq_len)`` int tensors of packed tokens (documents joined with the
    end-of-text token); the last ``eval_fraction`` of the documents is held out. Cached."""
    key = hashlib.sha1(f"{corpus_id}-{tokenizer.get_vocab_size()}-{seq_len}-{eval_fraction}"
                       .encode()).hexdigest()[:16]
    path = os.path.join(cache_dir, f"tokens-{key}.pt")
    if os.path.exists(path):
        try:  # weights_only: a pickled call planted in the cache is refused, never run
            cached = torch.load(path, weights_only=True)
            return cached["train"], cached["eval"]
        except Exception as err:  # noqa: BLE001 -- a damaged cache entry is rebuilt, and said
            _rebuilding(path, err)
    eos = tokenizer.token_to_id(EOS)
    n_eval = max(1, int(len(docs) * eval_fraction))
    if len(docs) - n_eval < 1:
        raise DataError("the corpus needs at least two documents (one for training, one held out)")

    def pack(part):
        ids = []
        for enc in tokenizer.encode_batch(part):
            ids.extend(enc.ids)
            ids.append(eos)
        usable = len(ids) // seq_len * seq_len
        if usable == 0:
            raise DataError(f"too little text for one block of {seq_len} tokens")
        return torch.tensor(ids[:usable], dtype=torch.int32).view(-1, seq_len)

    train, held_out = pack(docs[:-n_eval]), pack(docs[-n_eval:])
    os.makedirs(cache_dir, exist_ok=True)
    tmp = path + f".tmp{os.getpid()}"
    torch.save({"train": train, "eval": held_out}, tmp)
    os.replace(tmp, path)
    return train, held_out


def batch_at(blocks: torch.Tensor, index: int, batch_size: int, seed: int) -> torch.Tensor:
    """Global batch number ``index`` of the run (``batch_size`` blocks), in a per-epoch shuffled
    order that depends only on ``(seed, epoch)``."""
    per_epoch = len(blocks) // batch_size
    if per_epoch == 0:
        raise DataError(f"{len(blocks)} training blocks is fewer than one batch of {batch_size}")
    epoch, within = divmod(index, per_epoch)
    perm = torch.randperm(len(blocks), generator=torch.Generator().manual_seed(seed * 100_003
                                                                             + epoch))
    return blocks[perm[within * batch_size:(within + 1) * batch_size]].long()
