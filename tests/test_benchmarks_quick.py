"""CI's smoke run of the benchmarks: ``python -m benchmarks all --quick`` (memory, step time,
convergence; under 10 minutes on 2 CPU cores) writes a stamped JSON, a table and a plot per suite.
Not in the default suite: ``python -m pytest -m bench``."""
import json
import os
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_quick(suite: str, tmp_path, outputs) -> tuple:
    """``python -m benchmarks SUITE --quick --out tmp_path``: it must exit 0 and write a
    non-empty ``NAME.json``, ``.md`` and ``.png`` per name of ``outputs``. Returns the results
    folder and the seconds it took."""
    pytest.importorskip("matplotlib")
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "benchmarks", suite, "--quick", "--out",
                           str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=900)
    elapsed = time.time() - t0
    assert proc.returncode == 0, proc.stderr[-4000:]
    folder = tmp_path / "cpu"
    for name in outputs:
        for ext in ("json", "md", "png"):
            assert (folder / f"{name}.{ext}").stat().st_size > 0, (name, ext)
    return folder, elapsed


@pytest.mark.bench
@pytest.mark.timeout(900)
def test_all_suites_quick(tmp_path):
    suites = ("memory", "steptime", "convergence")
    folder, elapsed = run_quick("all", tmp_path, suites)
    for suite in suites:
        data = json.loads((folder / f"{suite}.json").read_text())
        assert data["command"].startswith("python -m benchmarks all --quick")
        assert data["commit"] and data["machine"]["cpu_cores"] >= 1
        assert data["data"]
        assert (folder / f"{suite}.md").read_text().startswith("Command: `python -m benchmarks")
    print(f"python -m benchmarks all --quick: {elapsed:.0f} s")
    assert elapsed < 600
