"""``python -m benchmarks SUITE [--quick] [--device cpu|cuda] [--out DIR]``.

Suites: ``memory`` (optimizer-state bytes, counted exactly on the meta device, including per-rank
bytes under ZeRO), ``steptime`` (``optimizer.step()`` time as a ratio to fused torch AdamW in the
same process), ``convergence`` (loss and eval perplexity vs tokens on the tiny preset, with a small
learning-rate sweep per method), ``all`` (the three), ``gpu`` (``benchmarks.gpu``, not in
``all``: kernel checks, Newton-Schulz and step timings and a short 60M pretraining on one GPU in
about 8 minutes; ``--dry-run`` runs it at toy sizes on the CPU), ``peak`` (``benchmarks.peak``,
not in ``all``: peak RSS, and CUDA ``max_memory_allocated`` on a GPU, of real training steps of
a LLaMA preset, one fresh process per optimizer configuration, as a ratio to torch AdamW; plus
the computed 1B/7B table). ``--quick`` runs smaller sizes
and fewer steps (all three under 10 minutes on 2 CPU cores); it is what CI's smoke test runs.
Results go to ``benchmarks/results/<device>/`` (``--out`` to put them elsewhere).
"""
from __future__ import annotations

import argparse
import importlib
import sys
import time

SUITES = ("memory", "steptime", "convergence")
EXTRA = ("gpu", "peak")  # not part of ``all``


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0])
    parser.add_argument("suite", choices=SUITES + EXTRA + ("all",))
    parser.add_argument("--quick", action="store_true",
                        help="small sizes and few steps: all suites in under 10 minutes on 2 CPUs")
    parser.add_argument("--device", default=None,
                        help="cpu or cuda (default cpu; cuda for the gpu suite)")
    parser.add_argument("--out", default=None,
                        help="results base folder (default benchmarks/results); files go to OUT/<device>/")
    modules = {name: importlib.import_module(f"benchmarks.{name}") for name in SUITES + EXTRA}
    for name, module in modules.items():
        group = parser.add_argument_group(f"{name} suite")
        module.add_arguments(group)
    args = parser.parse_args(argv)
    if args.suite == "gpu":
        refusal = modules["gpu"].refuse_without_gpu(args)
        if refusal:
            print(refusal, file=sys.stderr)
            return 2
        dry = args.dry_run or args.device == "cpu"
        args.device = "cpu" if dry else (args.device or "cuda")
        if dry:
            args.out = modules["gpu"].dry_folder(args.out)
    args.device = args.device or "cpu"
    if args.device not in ("cpu", "cuda") and not args.device.startswith("cuda:"):
        parser.error(f"--device must be cpu or cuda, got {args.device!r}")
    if args.device.startswith("cuda"):
        import torch
        if not torch.cuda.is_available():
            parser.error("--device cuda but torch sees no GPU")
    from .report import out_dir, stamp
    folder = out_dir(args.device, args.out)
    for name in SUITES if args.suite == "all" else (args.suite,):
        t0 = time.time()
        print(f"[benchmarks] {name}{' (quick)' if args.quick else ''} -> {folder}", file=sys.stderr)
        paths = modules[name].run(args, folder, stamp(args.device, argv))
        print(f"[benchmarks] {name} done in {time.time() - t0:.0f} s: {', '.join(paths)}",
              file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
