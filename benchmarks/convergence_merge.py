"""Pool the pieces of a convergence sweep into one table.

A sweep is often run in pieces: a grid first, then an lr beyond an edge, then a second seed at
each method's best lr, or parts on different machines. Each piece of ``python -m benchmarks
convergence`` writes its own JSON; this pools their runs, refusing pieces whose training
settings or corpus differ (so only like runs are compared) and a (method, lr, seed) present
twice, then picks each method's best lr and its seed spread exactly as the suite does
(``convergence.select_best``) and writes ``NAME.json``, ``NAME.md`` (the table, then every
piece's command and commit) and ``NAME.png``.

    python -m benchmarks.convergence_merge grid.json edge.json seed1.json --out DIR --name NAME

A piece given as ``PATH:METHOD=NAME`` has its method ``METHOD`` renamed ``NAME`` (an ablation
run under the method's own name, e.g. ``norecovery.json:grassjump=grassjump-no-recovery``).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from . import convergence, report

#: the settings every piece must share: what a run trains on and how it is scored
SAME = ("preset", "steps", "batch_size", "seq_len", "warmup", "min_lr_ratio", "rank",
        "update_interval", "eval_every", "eval_batches", "max_chars", "corpus", "vocab", "device")


def load(spec: str) -> dict:
    """One piece (``PATH`` or ``PATH:METHOD=NAME``): its settings, its runs (seed 0 where the
    piece predates seeds, renamed as asked), its command."""
    path, rename = spec, {}
    if not os.path.exists(spec) and ":" in spec:
        path, pair = spec.rsplit(":", 1)
        old, sep, new = pair.partition("=")
        if not sep or not old or not new:
            raise ValueError(f"{spec}: expected PATH or PATH:METHOD=NAME")
        rename = {old: new}
    try:
        with open(path) as f:
            piece = json.load(f)
        data = piece["data"]
        settings, runs = data["settings"], data["runs"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{path}: not a convergence result ({type(err).__name__}: {err})") \
            from None
    for row in runs:
        row.setdefault("seed", 0)
        row["method"] = rename.get(row["method"], row["method"])
    if rename and not any(r["method"] in rename.values() for r in runs):
        raise ValueError(f"{spec}: no method {next(iter(rename))!r} in {path}")
    return dict(path=spec, settings=settings, runs=runs, command=piece.get("command", "?"),
                commit=piece.get("commit", "?"))


def pool(pieces: list[dict]) -> tuple[dict, list]:
    """``(settings, runs)`` of the pooled sweep; ValueError when the pieces are not alike."""
    first = pieces[0]
    for piece in pieces[1:]:
        differ = [k for k in SAME if piece["settings"].get(k) != first["settings"].get(k)]
        if differ:
            raise ValueError(f"{piece['path']} and {first['path']} differ in "
                             + ", ".join(f"{k} ({piece['settings'].get(k)!r} vs "
                                         f"{first['settings'].get(k)!r})" for k in differ))
    seen, runs = {}, []
    for piece in pieces:
        for row in piece["runs"]:
            key = (row["method"], row["lr"], row["seed"])
            if key in seen:
                raise ValueError(f"{row['method']} lr {row['lr']:g} seed {row['seed']} is in both "
                                 f"{seen[key]} and {piece['path']}")
            seen[key] = piece["path"]
            runs.append(row)
    settings = dict(pieces[-1]["settings"])
    methods = list(dict.fromkeys(r["method"] for r in runs))
    settings.update(
        seeds=sorted({r["seed"] for r in runs}), seed_policy="merged", extend_edges=False,
        extended={}, extra_flags=[], lrs={m: sorted({r["lr"] for r in runs if r["method"] == m})
                                          for m in methods},
        pieces=[dict(path=p["path"], command=p["command"], commit=p["commit"]) for p in pieces])
    settings.setdefault("corpus_name", "stdlib" if str(settings["corpus"]).startswith("stdlib")
                        else "fortunes" if str(settings["corpus"]).startswith("fortunes")
                        else "custom")
    return settings, runs


def piece_lines(settings: dict) -> list[str]:
    lines = ["", "Pooled from these runs of the suite:", ""]
    for p in settings["pieces"]:
        lines.append(f"- `{p['command']}` (commit `{str(p['commit'])[:7]}`)")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pieces", nargs="+", metavar="JSON")
    parser.add_argument("--out", required=True, help="folder for NAME.json, NAME.md, NAME.png")
    parser.add_argument("--name", default="convergence")
    args = parser.parse_args(argv)
    try:
        settings, runs = pool([load(p) for p in args.pieces])
    except ValueError as err:
        print(f"convergence_merge: error: {err}", file=sys.stderr)
        return 2
    best = convergence.select_best(runs)
    text = convergence.table(best, settings) + "\n" + "\n".join(piece_lines(settings)) + "\n"
    info = report.stamp(settings.get("device", "cpu"))
    info["command"] = "python -m benchmarks.convergence_merge " + " ".join(
        argv if argv is not None else sys.argv[1:])
    os.makedirs(args.out, exist_ok=True)
    data = convergence._clean(dict(settings=settings, runs=runs, best=best))
    for path in report.write(args.out, args.name, info, data, text,
                             convergence.figure(runs, best, settings)):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
