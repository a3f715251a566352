"""``python -m benchmarks.data_memory [--quick] [--base-mb MB] [--out DIR]``: host memory of
slimopt-pretrain's data path as the corpus grows.

It writes synthetic ``.jsonl`` corpora of 1x, 4x and 16x ``--base-mb`` megabytes (documents of
50-500 words drawn from a fixed made-up vocabulary; a temporary folder, deleted after) and, in a
fresh Python process per corpus and phase, measures the peak resident memory (``VmHWM``) and
the resident memory after the imports (the baseline), so the difference is what the phase
itself holds:

- ``bpe``: training the byte-level BPE (vocabulary 2048) on the corpus's first
  ``TOKENIZER_SAMPLE_CHARS`` characters (``slimopt.launch.tokenizer.trained_bpe``);
- ``write``: streaming, tokenizing (with one tokenizer saved beforehand, so every corpus is
  tokenized alike) and writing the token shards (``token_shards``);
- ``read``: opening the cached shards (their SHA-256 checked) and reading ``BATCHES`` batches of
  64 x 256 tokens through the run's batch order (``batch_order.batch_at``).

Results: ``benchmarks/results/cpu/data_memory.{json,md}``. ``--quick`` uses 1 MB as the base.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time

from .report import ROOT

FACTORS = (1, 4, 16)
PHASES = ("bpe", "write", "read")
BATCHES, BATCH, SEQ_LEN = 200, 64, 256


def _status_mb(field: str) -> float:
    """``VmRSS`` (resident now) or ``VmHWM`` (its peak) of this process, in MB. The peak is read
    here, not from ``ru_maxrss``: Linux carries ``ru_maxrss`` over ``fork`` and ``exec``, so a
    child would report at least its parent's size."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def write_corpus(path: str, megabytes: float, seed: int = 0) -> int:
    """A ``.jsonl`` corpus of about ``megabytes`` MB; returns its number of documents."""
    rng = random.Random(seed)
    letters = "etaoinshrdlucmfwypvbgkjqxz"
    words = ["".join(rng.choice(letters[:12 + i % 14]) for _ in range(rng.randint(2, 9)))
             for i in range(5000)]
    target, size, docs = int(megabytes * 1e6), 0, 0
    with open(path, "w") as f:
        while size < target:
            text = " ".join(rng.choice(words) for _ in range(rng.randint(50, 500))) + "."
            line = json.dumps({"text": text}) + "\n"
            f.write(line)
            size += len(line)
            docs += 1
    return docs


def child(phase: str, corpus_path: str, tokenizer_path: str, cache: str) -> dict:
    """One phase in this (fresh) process: the figures it reports."""
    import numpy  # noqa: F401 -- imported before the baseline, like the rest
    import torch  # noqa: F401
    from slimopt.launch.batch_order import batch_at
    from slimopt.launch.data import open_corpus
    from slimopt.launch.token_shards import token_shards
    from slimopt.launch.tokenizer import pretrained_tokenizer, trained_bpe
    import datasets  # noqa: F401
    import tokenizers  # noqa: F401
    baseline = _status_mb("VmRSS")
    t0 = time.perf_counter()
    corpus = open_corpus(corpus_path, max_chars=None)
    out = {}
    if phase == "bpe":
        trained_bpe(corpus, 2048, cache, say=lambda *a: None)
    else:
        tokenizer = pretrained_tokenizer(tokenizer_path)
        shards = token_shards(corpus, tokenizer, cache, say=lambda *a: None)
        out.update(tokens=shards.record["tokens"], documents=shards.record["documents"])
        if phase == "read":
            train, _ = shards.blocks(SEQ_LEN)
            for step in range(BATCHES):
                batch_at(train, step, BATCH, 0)
    peak, end = _status_mb("VmHWM"), _status_mb("VmRSS")
    return dict(out, phase=phase, seconds=time.perf_counter() - t0, baseline_mb=baseline,
                peak_mb=peak, held_mb=peak - baseline, end_mb=end)


def _run_child(phase, corpus_path, tokenizer_path, cache) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.data_memory", "--child", phase, corpus_path,
           tokenizer_path, cache]
    env = dict(os.environ, TOKENIZERS_PARALLELISM="true")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env,
                          cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"{phase} on {corpus_path} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure(base_mb: float, work: str) -> list[dict]:
    rows = []
    tokenizer_path = os.path.join(work, "tokenizer.json")
    for factor in FACTORS:
        corpus_path = os.path.join(work, f"corpus-{factor}x.jsonl")
        docs = write_corpus(corpus_path, base_mb * factor)
        size_mb = os.path.getsize(corpus_path) / 1e6
        if factor == FACTORS[0]:  # one tokenizer for every corpus: the first's BPE, saved
            from slimopt.launch.data import open_corpus
            from slimopt.launch.tokenizer import trained_bpe
            bpe = trained_bpe(open_corpus(corpus_path), 2048, os.path.join(work, "tok"),
                              say=lambda *a: None)
            bpe.backend.save(tokenizer_path)
        cache = os.path.join(work, f"cache-{factor}x")
        for phase in PHASES:
            row = _run_child(phase, corpus_path, tokenizer_path, cache)
            row.update(factor=factor, corpus_mb=size_mb, corpus_documents=docs)
            rows.append(row)
            print(f"{factor:>3}x ({size_mb:7.1f} MB) {phase:<5}: peak {row['peak_mb']:7.1f} MB, "
                  f"baseline {row['baseline_mb']:7.1f} MB, held {row['held_mb']:6.1f} MB, "
                  f"end {row['end_mb']:7.1f} MB, {row['seconds']:6.1f} s", file=sys.stderr)
        shutil.rmtree(cache, ignore_errors=True)
        os.remove(corpus_path)
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| corpus | documents | tokens | phase | peak RSS (MB) | after imports (MB) | "
             "held by the phase (MB) | RSS at the end (MB) | time (s) |",
             "|---|---:|---:|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        tokens = f"{r['tokens']:,}" if "tokens" in r else ""
        lines.append(f"| {r['factor']}x ({r['corpus_mb']:.0f} MB) | {r['corpus_documents']:,} | "
                     f"{tokens} | {r['phase']} | {r['peak_mb']:.0f} | {r['baseline_mb']:.0f} | "
                     f"{r['held_mb']:.0f} | {r['end_mb']:.0f} | {r['seconds']:.1f} |")
    from slimopt.launch.tokenizer import TOKENIZER_SAMPLE_CHARS
    lines += ["", f"bpe: training on at most the first {TOKENIZER_SAMPLE_CHARS:,} characters; "
                  f"write: tokenize and write the shards; read: open them (SHA-256 checked) and "
                  f"read {BATCHES} batches of {BATCH} x {SEQ_LEN} tokens in the run's order. "
                  "Each phase in a fresh process; peak RSS is its VmHWM."]
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "--child":
        print(json.dumps(child(*argv[1:5])))
        return 0
    parser = argparse.ArgumentParser(prog="python -m benchmarks.data_memory",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--base-mb", type=float, default=16.0,
                        help="size of the 1x corpus in MB (default 16: 16, 64, 256 MB)")
    parser.add_argument("--quick", action="store_true", help="--base-mb 1")
    parser.add_argument("--out", default=None, help="results base folder (default "
                                                    "benchmarks/results); files go to OUT/cpu/")
    args = parser.parse_args(argv)
    base = 1.0 if args.quick else args.base_mb
    from .report import out_dir, stamp, write
    work = tempfile.mkdtemp(prefix="slimopt-data-memory-")
    try:
        rows = measure(base, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    info = stamp("cpu", argv)
    info["command"] = "python -m benchmarks.data_memory " + " ".join(argv)
    paths = write(out_dir("cpu", args.out), "data_memory" + ("-quick" if args.quick else ""),
                  info, rows, table(rows))
    print("\n".join(paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
