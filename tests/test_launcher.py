"""slimopt-launch: command building for torchrun / DeepSpeed / SLURM, hostfile validation,
error reporting, and one real 2-process torchrun run on CPU (gloo)."""
import os
import shlex
import subprocess
import sys
import textwrap

import pytest

from net import free_port
from slimopt.launch import launcher
from slimopt.launch.launcher import LaunchError, build_commands, main, parse_args

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable
TORCHRUN = [PY, "-m", "torch.distributed.run"]
SLURM_VARS = ("SLURM_JOB_NODELIST", "SLURM_NODEID", "SLURM_JOB_NUM_NODES", "SLURM_NNODES",
              "SLURM_GPUS_ON_NODE", "SLURM_JOB_ID")


@pytest.fixture(autouse=True)
def _no_slurm(monkeypatch):
    for name in SLURM_VARS:
        monkeypatch.delenv(name, raising=False)


def build(argv, env=None):
    options, rest = parse_args(argv)
    return build_commands(options, rest, env=env)


def hostfile(tmp_path, text, name="hostfile"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return str(path)


# --------------------------------------------------------------------------------- torchrun

def test_single_node_torchrun():
    cmds = build(["--num-gpus", "4", "--", "--optimizer", "grasswalk", "--name", "a b"])
    assert cmds == [(None, TORCHRUN + [
        "--nnodes", "1", "--nproc_per_node", "4", "--node_rank", "0",
        "--master_addr", "127.0.0.1", "--master_port", "29500",
        "-m", "slimopt.launch.pretrain", "--optimizer", "grasswalk", "--name", "a b"])]


def test_default_num_gpus_is_cuda_count_or_one():
    import torch
    (_, argv), = build([])
    assert argv[argv.index("--nproc_per_node") + 1] == str(torch.cuda.device_count() or 1)
    assert argv[-2:] == ["-m", "slimopt.launch.pretrain"]


def test_two_node_torchrun_from_hostfile(tmp_path):
    hf = hostfile(tmp_path, """\
        # two workers
        worker-0 slots=8   # node 0

        worker-1 slots=8
        """)
    cmds = build(["--hostfile", hf, "--", "--steps", "10"])
    assert [host for host, _ in cmds] == ["worker-0", "worker-1"]
    for rank, (_, argv) in enumerate(cmds):
        assert argv == TORCHRUN + [
            "--nnodes", "2", "--nproc_per_node", "8", "--node_rank", str(rank),
            "--master_addr", "worker-0", "--master_port", "29500",
            "-m", "slimopt.launch.pretrain", "--steps", "10"]


def test_explicit_master_addr_port_and_module():
    cmds = build(["--num-nodes", "2", "--num-gpus", "2", "--node-rank", "1",
                  "--master-addr", "10.0.0.5", "--master-port", "31337", "--module", "my.mod",
                  "--", "x"])
    assert cmds == [(None, TORCHRUN + [
        "--nnodes", "2", "--nproc_per_node", "2", "--node_rank", "1",
        "--master_addr", "10.0.0.5", "--master_port", "31337", "-m", "my.mod", "x"])]


def test_node_rank_defaults_to_slurm_nodeid(monkeypatch):
    monkeypatch.setenv("SLURM_NODEID", "1")
    (_, argv), = build(["--num-nodes", "2", "--num-gpus", "1", "--master-addr", "h0"])
    assert argv[argv.index("--node_rank") + 1] == "1"


# --------------------------------------------------------------------------------- deepspeed

def test_deepspeed_with_hostfile(tmp_path):
    hf = hostfile(tmp_path, "a slots=4\nb slots=4\n")
    cmds = build(["--launcher", "deepspeed", "--hostfile", hf, "--master-port", "29600",
                  "--", "--deepspeed", "ds.json"])
    assert cmds == [(None, [
        "deepspeed", "--num_nodes", "2", "--num_gpus", "4", "--hostfile", hf,
        "--master_port", "29600", "--no_local_rank", "--module", "slimopt.launch.pretrain",
        "--deepspeed", "ds.json"])]
    # an explicit master address is passed through
    (_, argv), = build(["--launcher", "deepspeed", "--hostfile", hf, "--master-addr", "a"])
    assert argv[argv.index("--master_addr") + 1] == "a"


def test_deepspeed_single_node_and_uneven_hostfile(tmp_path):
    (_, argv), = build(["--launcher", "deepspeed", "--num-gpus", "2"])
    assert argv == ["deepspeed", "--num_nodes", "1", "--num_gpus", "2",
                    "--master_addr", "127.0.0.1", "--master_port", "29500", "--no_local_rank",
                    "--module", "slimopt.launch.pretrain"]
    hf = hostfile(tmp_path, "a slots=4\nb slots=2\n")
    (_, argv), = build(["--launcher", "deepspeed", "--hostfile", hf])
    assert "--num_gpus" not in argv and argv[:3] == ["deepspeed", "--num_nodes", "2"]
    with pytest.raises(LaunchError, match="same slots"):
        build(["--hostfile", hf])  # torchrun needs equal slots


def test_deepspeed_flags_exist_in_installed_runner():
    runner = pytest.importorskip("deepspeed.launcher.runner")
    (_, argv), = build(["--launcher", "deepspeed", "--num-gpus", "2", "--", "--lr", "1"])
    args = runner.parse_args(argv[1:])
    assert (args.num_nodes, args.num_gpus, args.master_port) == (1, 2, 29500)
    assert args.module and args.no_local_rank
    assert args.user_script == "slimopt.launch.pretrain" and args.user_args == ["--lr", "1"]


def test_deepspeed_missing_executable(monkeypatch, capsys):
    monkeypatch.setattr(launcher, "_find_executable", lambda name: None)
    with pytest.raises(SystemExit) as exc:
        main(["--launcher", "deepspeed", "--num-gpus", "1"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "pip install deepspeed" in err and "--launcher torchrun" in err
    assert "Traceback" not in err


# --------------------------------------------------------------------------------- slurm

def test_slurm_inside_allocation():
    env = {"SLURM_JOB_NODELIST": "gpu[007-009,012],cpu1", "SLURM_JOB_NUM_NODES": "4",
           "SLURM_GPUS_ON_NODE": "8", "SLURM_JOB_ID": "1234"}
    cmds = build(["--launcher", "slurm", "--", "--steps", "5"], env=env)
    assert cmds == [(None, [
        "srun", "--nodes", "4", "--ntasks", "4", "--ntasks-per-node", "1",
        "--kill-on-bad-exit=1", *TORCHRUN, "--nnodes", "4", "--nproc_per_node", "8",
        "--rdzv_id", "1234", "--rdzv_backend", "c10d", "--rdzv_endpoint", "gpu007:29500",
        "-m", "slimopt.launch.pretrain", "--steps", "5"])]


def test_slurm_outside_allocation_needs_master_addr():
    with pytest.raises(LaunchError, match="--master-addr"):
        build(["--launcher", "slurm", "--num-nodes", "2", "--num-gpus", "4"], env={})
    (_, argv), = build(["--launcher", "slurm", "--num-nodes", "2", "--num-gpus", "4",
                        "--master-addr", "head", "--master-port", "1234"], env={})
    assert argv[:3] == ["srun", "--nodes", "2"]
    assert argv[argv.index("--rdzv_endpoint") + 1] == "head:1234"
    assert argv[argv.index("--nproc_per_node") + 1] == "4"


def test_slurm_first_host_expansion():
    expand = launcher._expand_first
    assert expand("node1") == "node1"
    assert expand("node[01-04],other") == "node01"
    assert expand("a[3,5-7]-ib[10-11]") == "a3-ib10"


# --------------------------------------------------------------------------------- dry run

def test_dry_run_prints_commands(tmp_path, capsys):
    assert main(["--dry-run", "--num-gpus", "2", "--", "--name", "my run"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 1
    assert shlex.split(out[0]) == TORCHRUN + [
        "--nnodes", "1", "--nproc_per_node", "2", "--node_rank", "0",
        "--master_addr", "127.0.0.1", "--master_port", "29500",
        "-m", "slimopt.launch.pretrain", "--name", "my run"]

    hf = hostfile(tmp_path, "h0 slots=2\nh1 slots=2\n")
    assert main(["--dry-run", "--hostfile", hf]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "# on h0" and out[2] == "# on h1" and len(out) == 4
    assert shlex.split(out[1])[shlex.split(out[1]).index("--node_rank") + 1] == "0"
    assert shlex.split(out[3])[shlex.split(out[3]).index("--node_rank") + 1] == "1"


# --------------------------------------------------------------------------------- errors

@pytest.mark.parametrize("text, message", [
    ("h0 slots=2\nh1\n", "line 2: expected 'HOSTNAME slots=N'"),
    ("h0 slots=2 extra\n", "line 1: expected"),
    ("# c\nh0 gpus=2\n", "line 2: expected"),
    ("h0 slots=0\n", "line 1: slots must be a positive integer, got '0'"),
    ("\nh0 slots=two\n", "line 2: slots must be a positive integer, got 'two'"),
    ("h0 slots=-1\n", "line 1: slots must be a positive integer"),
    ("h0 slots=1\nh0 slots=1\n", "line 2: host 'h0' is already listed on line 1"),
    ("# nothing\n\n", "lists no hosts"),
])
def test_hostfile_errors(tmp_path, text, message):
    hf = hostfile(tmp_path, text)
    with pytest.raises(LaunchError) as exc:
        build(["--hostfile", hf])
    assert hf in str(exc.value) and message in str(exc.value)


@pytest.mark.parametrize("host", [
    "--nproc_per_node=64", "-oProxyCommand=touch${IFS}x", "a;b", "$(id)", "a`id`", "h%n",
    "node[1-2]", "a,b", "user@host", "'q'", "ünï", "a|b", "*",
])
def test_hostfile_hosts_must_be_hostnames(tmp_path, host, capsys):
    hf = hostfile(tmp_path, f"ok slots=1\n{host} slots=1\n")
    for launcher_name in ("torchrun", "deepspeed"):
        with pytest.raises(SystemExit) as exc:
            main(["--dry-run", "--launcher", launcher_name, "--hostfile", hf])
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err and len(err.splitlines()) == 1  # the error alone
        assert err.splitlines()[0] == (f"slimopt-launch: error: hostfile {hf}, line 2: host "
                                       f"{host!r} is not {launcher.HOST_RULE}")


@pytest.mark.parametrize("addr", ["--nproc_per_node=64", "$(id);x", "a b", "[::1]", "h%h"])
def test_master_addr_must_be_a_hostname(addr, capsys):
    for launcher_name in ("torchrun", "deepspeed", "slurm"):
        with pytest.raises(SystemExit) as exc:
            main(["--dry-run", "--launcher", launcher_name, "--num-nodes", "1",
                  "--num-gpus", "1", f"--master-addr={addr}"])
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err
        assert err.splitlines()[-1] == (f"slimopt-launch: error: --master-addr {addr!r} is not "
                                        f"{launcher.HOST_RULE}")


def test_hostnames_and_addresses_that_are_accepted(tmp_path):
    good = ["worker-0", "node_1.cluster.example.com", "10.0.0.1", "fe80::1", "::1", "GPU7"]
    hf = hostfile(tmp_path, "".join(f"{h} slots=1\n" for h in good))
    assert [host for host, _ in build(["--hostfile", hf])] == good
    for addr in good:
        (_, argv), = build(["--num-nodes", "2", "--num-gpus", "1", "--master-addr", addr])
        assert argv[argv.index("--master_addr") + 1] == addr


def test_slurm_first_host_must_be_a_hostname(monkeypatch):
    monkeypatch.setattr(launcher.shutil, "which", lambda name: None)  # no scontrol
    with pytest.raises(LaunchError, match="SLURM_JOB_NODELIST.*give --master-addr"):
        build(["--launcher", "slurm", "--num-gpus", "1"],
              env={"SLURM_JOB_NODELIST": "-oProxyCommand=x", "SLURM_JOB_NUM_NODES": "2"})


@pytest.mark.parametrize("module", ["os; id", "-c", "a b", "pkg..mod", "9lives", "$(id)", ""])
def test_module_must_be_a_dotted_name(module, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--dry-run", "--num-gpus", "1", f"--module={module}"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "--module must name a Python module" in err


def test_first_pretrain_argument_cannot_be_double_dash(capsys):
    for launcher_name in ("torchrun", "deepspeed"):
        with pytest.raises(SystemExit) as exc:
            main(["--dry-run", "--launcher", launcher_name, "--num-gpus", "1", "--", "--", "x"])
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err and "first pretraining argument cannot be '--'" in err
    (_, argv), = build(["--num-gpus", "1", "--", "x", "--"])  # later, it is passed on
    assert argv[-2:] == ["x", "--"]


def test_missing_hostfile_via_main(tmp_path, capsys):
    missing = str(tmp_path / "nope")
    with pytest.raises(SystemExit) as exc:
        main(["--dry-run", "--hostfile", missing])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"hostfile {missing}: no such file" in err and "Traceback" not in err


def test_contradictions(tmp_path):
    hf = hostfile(tmp_path, "h0 slots=4\nh1 slots=4\n")
    with pytest.raises(LaunchError, match="--num-nodes 3 contradicts hostfile"):
        build(["--hostfile", hf, "--num-nodes", "3"])
    with pytest.raises(LaunchError, match="--num-gpus 2 contradicts hostfile"):
        build(["--hostfile", hf, "--num-gpus", "2"])
    # agreeing explicit values are fine
    assert len(build(["--hostfile", hf, "--num-nodes", "2", "--num-gpus", "4"])) == 2
    with pytest.raises(LaunchError, match="out of range"):
        build(["--hostfile", hf, "--node-rank", "2"])
    with pytest.raises(LaunchError, match="not used with --launcher slurm"):
        build(["--launcher", "slurm", "--hostfile", hf, "--master-addr", "x"])


def test_missing_master_address(capsys):
    with pytest.raises(LaunchError, match="--master-addr"):
        build(["--num-nodes", "2", "--num-gpus", "1"])
    with pytest.raises(LaunchError, match="needs --hostfile"):
        build(["--launcher", "deepspeed", "--num-nodes", "2", "--num-gpus", "1"])
    with pytest.raises(SystemExit) as exc:
        main(["--dry-run", "--num-nodes", "2"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "error:" in err and "master address" in err and "Traceback" not in err


@pytest.mark.parametrize("argv", [
    ["--num-gpus", "0"], ["--num-nodes", "-1"], ["--num-nodes", "x"], ["--node-rank", "-1"],
    ["--master-port", "70000"], ["--launcher", "mpirun"], ["--bogus"],
])
def test_bad_options_exit_like_argparse(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--dry-run", *argv])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "slimopt-launch: error:" in err and "Traceback" not in err


def test_run_command_forwards_exit_code():
    assert launcher.run_command([PY, "-c", "import sys; sys.exit(3)"]) == 3
    assert launcher.run_command([PY, "-c", "pass"]) == 0


# --------------------------------------------------------------------------------- real run

ALLREDUCE_MODULE = '''\
import os, sys
import torch
import torch.distributed as dist

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
t = torch.tensor([float(rank + 1)])
dist.all_reduce(t)
assert t.item() == world * (world + 1) / 2, t
with open(os.path.join(sys.argv[1], f"rank{rank}.txt"), "w") as f:
    f.write(f"{world} {t.item()} {os.environ['LOCAL_RANK']}")
dist.destroy_process_group()
'''


def test_real_torchrun_two_processes(tmp_path):
    (tmp_path / "tiny_allreduce.py").write_text(ALLREDUCE_MODULE)
    out = tmp_path / "out"
    out.mkdir()
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(tmp_path), REPO,
                                                        os.environ.get("PYTHONPATH")])))
    proc = subprocess.run(
        [PY, "-m", "slimopt.launch.launcher", "--launcher", "torchrun", "--num-gpus", "2",
         "--master-port", str(free_port()), "--module", "tiny_allreduce", "--", str(out)],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "torch.distributed.run" in proc.stderr  # the command is echoed to stderr
    for rank in (0, 1):
        assert (out / f"rank{rank}.txt").read_text() == f"2 3.0 {rank}"
