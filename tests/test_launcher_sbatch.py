"""examples/slurm.sbatch runs the same srun command as ``slimopt-launch --launcher slurm``
(checked with stand-ins for ``scontrol`` and ``srun`` that print what they get)."""
import os
import shutil
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARGS = ["--preset", "1b", "--name", "a b", "$x", "it's"]


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_sbatch_recipe_matches_slimopt_launch(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    # more hosts than a pipe holds: a reader that stops after the first line would make this
    # stand-in die of SIGPIPE, which the script's pipefail turns into a failed job (exit 141)
    (bin_dir / "scontrol").write_text("#!/bin/sh\necho gpu1\necho gpu2\n"
                                      "i=3; while [ $i -le 20000 ]; do echo gpu$i; i=$((i+1)); done\n")
    (bin_dir / "srun").write_text(f"#!{sys.executable}\nimport shlex, sys\n"
                                  "print(shlex.join(['srun'] + sys.argv[1:]))\n")
    for tool in ("scontrol", "srun"):
        (bin_dir / tool).chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", PY=sys.executable,
               SLURM_JOB_NODELIST="gpu[1-2]", SLURM_JOB_NUM_NODES="2", SLURM_GPUS_ON_NODE="8",
               SLURM_JOB_ID="77")
    script = subprocess.run(["bash", os.path.join(REPO, "examples", "slurm.sbatch"), *ARGS],
                            env=env, capture_output=True, text=True, check=True).stdout
    launch = subprocess.run([sys.executable, "-m", "slimopt.launch.launcher", "--launcher",
                             "slurm", "--dry-run", "--", *ARGS], env=env, cwd=REPO,
                            capture_output=True, text=True, check=True).stdout
    assert script == launch and script.startswith("srun --nodes 2 ")
