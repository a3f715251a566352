"""Where benchmark results go and what they are stamped with: the command, the git commit and
the machine (CPU model and cores, GPU, torch/triton versions), so a table can be traced back."""
from __future__ import annotations

import datetime
import json
import os
import platform
import re
import subprocess
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")


def device_tag(device: str) -> str:
    """Folder name for ``device``: ``cpu``, or the GPU's name as a slug (``nvidia-h100-80gb-hbm3``)."""
    if device == "cpu" or not torch.cuda.is_available():
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(0).lower()).strip("-")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _commit() -> str:
    try:
        out = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "") if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def machine(device: str) -> dict:
    info = {"cpu": _cpu_model(), "cpu_cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version()}
    if device != "cpu" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        try:
            import triton
            info["triton"] = triton.__version__
        except ImportError:
            pass
    return info


def stamp(device: str, argv=None) -> dict:
    """The command (as typed), commit, machine and UTC time of this benchmark run."""
    args = sys.argv[1:] if argv is None else list(argv)
    return {"command": "python -m benchmarks " + " ".join(args), "commit": _commit(),
            "machine": machine(device),
            "time": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


def stamp_markdown(info: dict) -> str:
    m = info["machine"]
    where = m.get("gpu") or f"{m['cpu']} ({m['cpu_cores']} cores, {m['torch_threads']} torch threads)"
    return (f"Command: `{info['command']}` · commit `{info['commit']}` · {where} · "
            f"torch {m['torch']} · {info['time']}")


def out_dir(device: str, base: str | None = None) -> str:
    path = os.path.join(base or RESULTS, device_tag(device))
    os.makedirs(path, exist_ok=True)
    return path


def write(folder: str, name: str, info: dict, data, table: str, figure=None) -> list[str]:
    """``name.json`` (stamp + data), ``name.md`` (stamp + table) and, if ``figure`` (a matplotlib
    figure) is given, ``name.png``. Returns the paths written."""
    paths = [os.path.join(folder, name + ext) for ext in (".json", ".md")]
    with open(paths[0], "w") as f:
        json.dump(dict(info, data=data), f, indent=1)
    with open(paths[1], "w") as f:
        f.write(stamp_markdown(info) + "\n\n" + table.rstrip() + "\n")
    if figure is not None:
        paths.append(os.path.join(folder, name + ".png"))
        figure.savefig(paths[-1], dpi=110, bbox_inches="tight")
        import matplotlib.pyplot as plt
        plt.close(figure)
    return paths


def pyplot():
    """matplotlib's pyplot on the Agg backend (no display), or None if matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        return plt
    except ImportError:
        print("matplotlib not installed: no PNG plots (pip install matplotlib)", file=sys.stderr)
        return None
