"""Pretraining documents, streamed from their source one at a time (never the whole corpus in
memory): ``open_corpus`` names the source, and ``Corpus.documents()`` reads it again on each call.

Sources:
- ``None``: the embedded default, the Python standard library's own ``.py`` files read from the
  running interpreter (works offline on any machine with Python);
- ``"fortunes"`` (a reserved name): English prose, the epigrams of Debian's ``fortunes`` package
  (``apt-get install fortunes``; ~2.5 MB in ~15,000 fortunes), one document per fortune, in a
  fixed shuffled order so the held-out last 2% samples every file (see ``fortune_documents``);
  a local file or folder named ``fortunes`` is read as ``--data ./fortunes``;
- a local ``.txt`` (one document per line)/``.json``/``.jsonl``/``.parquet`` file or a folder of
  them, streamed through ``datasets`` (``streaming=True``: rows are parsed in chunks, nothing is
  converted or cached);
- any other string: a hub dataset name, streamed through ``datasets`` (needs a network).

The one limit is ``max_chars`` (``--max-chars``; the presets set it): the documents stop at the
first one that reaches it, and ``Corpus.truncated`` then says whether the source had more, which
the run prints. There is no cap on the number of documents.
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
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

from .cli_errors import first_line

TEXT_SUFFIXES = {".txt": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
SKIP_DIRS = {"test", "tests", "site-packages", "dist-packages", "idlelib", "__pycache__"}
#: the built-in prose corpus: ``--data fortunes`` reads the fortune files of this folder
FORTUNES = "fortunes"
FORTUNES_DIR = "/usr/share/games/fortunes"


class DataError(ValueError):
    """A data problem the CLI reports as a one-line message."""


@dataclass
class Corpus:
    """A source of documents. ``documents()`` streams them from the start on every call, up to
    ``max_chars`` characters (the document that reaches the limit is kept whole; None: no
    limit); after a complete pass, ``truncated`` says whether the limit cut the source short
    (None before one)."""
    source: str | None
    corpus_id: str                          # keys the tokenizer and token caches
    max_chars: int | None
    rows: Callable[[], Iterable[str]]       # the source's documents, unbounded
    truncated: bool | None = None

    def documents(self) -> Iterator[str]:
        total, rows = 0, iter(self.rows())
        for doc in rows:
            yield doc
            total += len(doc)
            if self.max_chars is not None and total >= self.max_chars:
                self.truncated = next(rows, None) is not None
                return
        self.truncated = False


def stdlib_documents() -> Iterator[str]:
    """The standard library's ``.py`` files, one document each (an empty ``__init__.py`` too),
    in a fixed order."""
    root = sysconfig.get_paths()["stdlib"]
    found = False
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS)
        for name in sorted(files):
            if name.endswith(".py"):
                with open(os.path.join(folder, name), encoding="utf-8", errors="replace") as f:
                    found = True
                    yield f.read()
    if not found:
        raise DataError(f"no Python source under {root}: pass --data")


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


def fortune_documents(root: str | None = None) -> tuple[list[str], str]:
    """``(fortunes, digest of the files' names and text)``: one document per fortune (the text
    between lines holding only ``%``, overstrikes ``X<BS>Y`` reduced to ``Y``), shuffled once
    with a fixed seed (the files are sorted by topic, so unshuffled the held-out last 2% would
    all be Zippy the Pinhead). The package is ~2.5 MB, so the shuffle holds it all in memory."""
    files = _fortune_files(root or FORTUNES_DIR)
    docs, digest = [], hashlib.sha1()
    for path in files:
        with open(path, encoding="utf-8", errors="replace") as f:
            text = _overstruck(f.read())
        digest.update(f"{os.path.basename(path)}\0{text}\0".encode())
        docs += [d.strip("\n") for d in re.split(r"^%\n", text + "\n", flags=re.M)
                 if d.strip()]
    random.Random(0).shuffle(docs)
    return docs, digest.hexdigest()[:12]


def _local_files(path: str):
    """The data files of ``path``, all of one loader kind (a folder mixing kinds is refused:
    one loader would read the others' bytes as text), none empty (their text is checked when
    first read, ``_local_rows``)."""
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


def _rows_of(dataset, source: str, text_column: str, reading: str | None) -> Iterator[str]:
    """The non-empty texts of a ``datasets`` (streaming) dataset; a row it cannot parse, a
    missing column or a non-text value is a one-line ``DataError``. ``reading``: the loader kind
    of local files (for the message), None for a hub dataset."""
    import datasets
    verbosity = datasets.logging.get_verbosity()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # its parse errors come below
    rows, found = iter(dataset), False
    try:
        while True:
            try:
                row = next(rows)
            except StopIteration:
                break
            except Exception as err:  # the parser's or the network's error, in one line
                cause = err.__cause__ or err
                what = f"could not read it as {reading}" if reading else "could not read it"
                raise DataError(f"--data {source}: {what} ({type(cause).__name__}: "
                                f"{first_line(cause)})") from None
            if text_column not in row:
                raise DataError(f"--data {source}: no column {text_column!r} (columns: "
                                f"{sorted(row)}); pass --text-column")
            text = row[text_column]
            if text is not None and not isinstance(text, str):
                raise DataError(f"--data {source}: column {text_column!r} holds "
                                f"{type(text).__name__} values, not text")
            if text:
                found = True
                yield text
    finally:
        datasets.logging.set_verbosity(verbosity)
    if not found:
        raise DataError(f"--data {source}: no text found")


def _stream(kind_or_name: str, source: str, **options):
    """``datasets.load_dataset(..., split="train", streaming=True)``, errors in one line."""
    import datasets
    datasets.disable_progress_bars()
    try:
        return datasets.load_dataset(kind_or_name, split="train", streaming=True, **options)
    except Exception as err:  # network, unknown name, auth, unreadable file: one line
        kind = "a hub dataset" if not options else kind_or_name
        raise DataError(f"--data {source}: could not open it as {kind} ({type(err).__name__}: "
                        f"{first_line(err)})") from None


def open_corpus(source: str | None, *, text_column: str = "text",
                max_chars: int | None = None) -> Corpus:
    """The corpus of ``--data`` (None: the stdlib default), read up to ``max_chars`` characters
    (None: all of it). Opening reads no documents (except the fortunes, a small fixed package
    shuffled whole) and opens no dataset: a local corpus is named by its files' paths, sizes and
    modification times, a hub one by its name."""
    limit = "all" if max_chars is None else max_chars
    if source is None:
        return Corpus(None, f"stdlib-{sys.version.split()[0]}-{limit}", max_chars,
                      stdlib_documents)
    if source == FORTUNES:
        docs, digest = fortune_documents()
        return Corpus(source, f"fortunes-{digest}-{limit}", max_chars, lambda: docs)
    try:
        import datasets  # noqa: F401
    except ImportError:
        raise DataError("--data needs the datasets package: pip install datasets") from None
    looks_local = os.path.sep in source or os.path.splitext(source)[1] in TEXT_SUFFIXES \
        or source.startswith(".")
    if looks_local or os.path.exists(source):
        if not os.path.exists(source):
            raise DataError(f"--data {source}: no such file or folder")
        files = _local_files(source)
        kind = TEXT_SUFFIXES[os.path.splitext(files[0])[1]]
        stat = [(f, os.stat(f).st_size, os.stat(f).st_mtime_ns) for f in files]
        corpus_id = "local-" + hashlib.sha1(json.dumps(stat).encode()).hexdigest()[:12]
        return Corpus(source, f"{corpus_id}-{limit}", max_chars,
                      _local_rows(files, kind, source, text_column))
    return Corpus(source, f"hub-{source.replace('/', '--')}-{limit}", max_chars,
                  lambda: _rows_of(_stream(source, source), source, text_column, None))


def _local_rows(files: list, kind: str, source: str, text_column: str):
    """The rows of local files: each text or JSON file is checked to be UTF-8 text the first
    time (then streamed); a run whose tokens are cached reads none of it."""
    checked = []

    def rows():
        if not checked and kind in ("text", "json"):
            for f in files:
                _check_utf8_text(f)
            checked.append(True)
        return _rows_of(_stream(kind, source, data_files=files), source, text_column, kind)
    return rows
