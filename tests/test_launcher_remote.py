"""slimopt-launch --launcher deepspeed on several nodes: the pretraining arguments reach every node
byte for byte, although DeepSpeed's pdsh runner hands them to each node's shell as text.

DeepSpeed's own runner (``runner.parse_args`` + ``PDSHRunner.get_cmd``) builds the remote command
from the argv slimopt-launch builds; pdsh's word expansion (``pdsh_expand``, after pdsh's
``src/common/pipecmd.c``), ssh's joining with spaces and a local ``sh -c`` stand in for pdsh, ssh
and the node's login shell. One test runs the whole route with the real pdsh, when installed."""
import ast
import json
import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest

from slimopt.launch import launcher
from slimopt.launch.launcher import build_commands, main, parse_args

runner = pytest.importorskip("deepspeed.launcher.runner")
from deepspeed.launcher.multinode_runner import PDSHRunner  # noqa: E402

PY = sys.executable
MARKER = "PWNED"  # every injection below would create this file in the shell's directory
HOSTILE = [
    "--opt-args", '{"weight_decay":0,"betas":[0.9,0.95]}', '{"name": "a b", "q": "\\""}',
    f"runs/x;touch {MARKER}", f"runs/y;touch${{IFS}}{MARKER}", f"&& touch {MARKER}",
    f"| touch {MARKER}", f"> {MARKER}", f"$(touch {MARKER})", f"my data $(touch {MARKER}).jsonl",
    f"`touch {MARKER}`", f"a `touch {MARKER}` b", "it's", "it's a 'quote'",
    f"' ; touch {MARKER} ; '", f'" ; touch {MARKER} ; "', "line1\nline2", "tab\tsep", "",
    "ünïcödé ☃ 日本", "-x", "--local_rank=3", "-", "--", "back\\slash", "end\\", 'a \\" b',
    '\\"', "$HOME ${IFS} $1 $@", "!!", "!x y", "100%n %h %u %% %", "%n", "50%", "*", "~",
    "# hash", "a=b", "  lead and trail  ", " ",
]
HOSTS = {"node-a": [0, 1], "node-b": [0, 1]}  # what DeepSpeed's runner hands get_cmd
SHELLS = [s for s in ("bash", "dash", "zsh", "ksh") if shutil.which(s)]
DUMP_ARGV = f"{shlex.quote(PY)} -c 'import json, sys; print(json.dumps(sys.argv[1:]))'"


@pytest.fixture(autouse=True)
def _no_slurm(monkeypatch):
    monkeypatch.delenv("SLURM_NODEID", raising=False)


@pytest.fixture
def two_hosts(tmp_path):
    path = tmp_path / "hostfile"
    path.write_text("".join(f"{host} slots=2\n" for host in HOSTS))
    return str(path)


def slimopt_command(argv):
    options, rest = parse_args(argv)
    (_, cmd), = build_commands(options, rest, env={})
    return cmd


def deepspeed_remote_words(cmd):
    """The words after the module in the pdsh command DeepSpeed's runner builds from ``cmd``."""
    ds_args = runner.parse_args(cmd[1:])
    pdsh, _, _ = PDSHRunner(ds_args, "e30=").get_cmd({}, HOSTS)
    return pdsh[pdsh.index(ds_args.user_script) + 1:]


def pdsh_expand(word, host, user, rank):
    """pdsh's ``pipecmd_format_arg``: in every word of the remote command ``%h`` is the host,
    ``%u`` the user, ``%n`` the node's rank, ``%%`` a ``%``; any other ``%X`` stays."""
    values = {"h": host, "u": user, "n": str(rank), "%": "%"}
    return re.sub(r"%(.)", lambda m: values.get(m.group(1), m.group(0)), word, flags=re.S)


def node_argv(shell, words, host, rank, cwd):
    """The argv a node's process gets: pdsh expands every word, ssh joins them with spaces, and
    the node's shell parses the text (here it runs a program that prints its argv)."""
    text = " ".join(pdsh_expand(w, host, "user", rank) for w in words)
    proc = subprocess.run([shell, "-c", f"{DUMP_ARGV} {text}"], cwd=cwd, capture_output=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    return json.loads(proc.stdout)


# --------------------------------------------------------------------------- several nodes

@pytest.mark.parametrize("shell", SHELLS)
def test_hostile_arguments_reach_every_node_byte_for_byte(shell, two_hosts, tmp_path):
    cmd = slimopt_command(["--launcher", "deepspeed", "--hostfile", two_hosts, "--", *HOSTILE])
    words = deepspeed_remote_words(cmd)
    for rank, host in enumerate(HOSTS):
        assert node_argv(shell, words, host, rank, cwd=tmp_path) == HOSTILE
    assert not (tmp_path / MARKER).exists()


def test_each_hostile_argument_alone_reaches_the_nodes(two_hosts, tmp_path):
    for arg in HOSTILE:
        args = ["--name", arg]
        cmd = slimopt_command(["--launcher", "deepspeed", "--hostfile", two_hosts, "--", *args])
        assert node_argv("bash", deepspeed_remote_words(cmd), "node-b", 1, tmp_path) == args
    assert not (tmp_path / MARKER).exists()


def test_installed_deepspeed_passes_the_check(two_hosts):
    cmd = slimopt_command(["--launcher", "deepspeed", "--hostfile", two_hosts, "--", *HOSTILE])
    launcher.check_deepspeed_pdsh(cmd, HOSTILE)  # raises LaunchError if DeepSpeed differs


# --------------------------------------------------------------------------- one node

def test_single_node_deepspeed_argv_is_not_quoted(tmp_path):
    one_host = tmp_path / "one_host"
    one_host.write_text("node-a slots=2\n")
    for argv in (["--num-gpus", "2"], ["--hostfile", str(one_host)]):
        cmd = slimopt_command(["--launcher", "deepspeed", *argv, "--", *HOSTILE])
        assert cmd[-len(HOSTILE):] == HOSTILE
        ds_args = runner.parse_args(cmd[1:])  # DeepSpeed runs [..., module, *user_args] itself
        assert ds_args.user_script == "slimopt.launch.pretrain"
        assert ds_args.user_args == HOSTILE


def test_torchrun_and_slurm_argv_are_not_quoted(two_hosts):
    options, rest = parse_args(["--hostfile", two_hosts, "--", *HOSTILE])
    for _, cmd in build_commands(options, rest, env={}):
        assert cmd[-len(HOSTILE):] == HOSTILE
    cmd = slimopt_command(["--launcher", "slurm", "--master-addr", "h0", "--num-gpus", "1",
                           "--", *HOSTILE])
    assert cmd[-len(HOSTILE):] == HOSTILE


# --------------------------------------------------------------------------- dry run

def test_dry_run_prints_the_command_and_what_the_nodes_get(two_hosts, capsys):
    assert main(["--dry-run", "--launcher", "deepspeed", "--hostfile", two_hosts,
                 "--", *HOSTILE]) == 0
    out = capsys.readouterr().out
    command, note = out.rsplit("\n# ", 1)
    assert shlex.split(command) == slimopt_command(
        ["--launcher", "deepspeed", "--hostfile", two_hosts, "--", *HOSTILE])
    assert note.count("\n") == 1 and "quoted for the nodes' shell" in note
    assert ast.literal_eval(note.split("sys.argv[1:] == ", 1)[1]) == HOSTILE


def test_dry_run_on_one_node_has_no_note(capsys):
    assert main(["--dry-run", "--launcher", "deepspeed", "--num-gpus", "1", "--", "a b"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 1 and shlex.split(out[0])[-1] == "a b"


# --------------------------------------------------------------------------- refusals

def assert_one_line_error(capsys, exc, *needles):
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.splitlines()) == 1  # the error alone
    error = err.splitlines()[0]
    assert error.startswith("slimopt-launch: error: --launcher deepspeed on several nodes")
    for needle in needles:
        assert needle in error


def test_refuses_a_deepspeed_that_quotes_differently(two_hosts, monkeypatch, capsys):
    monkeypatch.setattr(PDSHRunner, "parse_user_args",
                        lambda self: [shlex.quote(a) for a in self.args.user_args])
    with pytest.raises(SystemExit) as exc:
        main(["--dry-run", "--launcher", "deepspeed", "--hostfile", two_hosts, "--", "a b"])
    assert_one_line_error(capsys, exc, "differently from DeepSpeed 0.19", "--launcher torchrun")


def test_refuses_when_deepspeed_cannot_be_imported(two_hosts, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "deepspeed.launcher.multinode_runner", None)
    with pytest.raises(SystemExit) as exc:
        main(["--dry-run", "--launcher", "deepspeed", "--hostfile", two_hosts, "--", "x"])
    assert_one_line_error(capsys, exc, "cannot check", "pip install deepspeed")


@pytest.mark.parametrize("name", ["my runs", "runs$(touch PWNED)", "100%n"])
def test_refuses_a_working_directory_the_nodes_shell_would_misread(name, two_hosts, tmp_path,
                                                                   monkeypatch, capsys):
    (tmp_path / name).mkdir()
    monkeypatch.chdir(tmp_path / name)
    with pytest.raises(SystemExit) as exc:
        main(["--dry-run", "--launcher", "deepspeed", "--hostfile", two_hosts])
    assert_one_line_error(capsys, exc, repr(os.getcwd()), "'cd DIR;'")


# --------------------------------------------------------------------------- the real route

SSH_STAND_IN = """\
#!/bin/sh
# ssh stand-in: drop the options and the host, then do what sshd does with the command words:
# join them with spaces and run the text with the login shell
while [ $# -gt 0 ]; do
  case "$1" in
    -o|-l|-p|-i|-F) shift 2 ;;
    -*) shift ;;
    *) break ;;
  esac
done
shift
exec bash -c "$*"
"""
ARGV_MODULE = """\
import json, os, sys
with open(f"argv_rank{os.environ['RANK']}.json", "w") as f:
    json.dump(sys.argv[1:], f)
"""


@pytest.mark.skipif(shutil.which("pdsh") is None, reason="pdsh is not installed")
def test_real_pdsh_route(tmp_path):
    """slimopt-launch -> deepspeed's runner -> pdsh -> ssh stand-in -> bash -> DeepSpeed's
    launch on each of two "nodes" (both this machine) -> the module, which records its argv."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "ssh").write_text(SSH_STAND_IN)
    (bin_dir / "ssh").chmod(0o755)
    (tmp_path / "argv_module.py").write_text(ARGV_MODULE)
    (tmp_path / "hostfile").write_text("node-a slots=1\nnode-b slots=1\n")
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1",
               PATH=os.pathsep.join([str(bin_dir), os.environ["PATH"]]))
    proc = subprocess.run(
        [PY, "-m", "slimopt.launch.launcher", "--launcher", "deepspeed", "--hostfile",
         "hostfile", "--master-addr", "127.0.0.1", "--module", "argv_module", "--", *HOSTILE],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for rank in (0, 1):
        assert json.loads((tmp_path / f"argv_rank{rank}.json").read_text()) == HOSTILE
    assert not (tmp_path / MARKER).exists()
