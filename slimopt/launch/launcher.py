"""``slimopt-launch``: build and run the real launcher's command for many GPUs and nodes.

Usage::

    slimopt-launch [LAUNCHER OPTIONS] -- [PRETRAIN ARGS...]
    python -m slimopt.launch.launcher [LAUNCHER OPTIONS] -- [PRETRAIN ARGS...]

Everything after the first ``--`` reaches the training module (by default
``slimopt.launch.pretrain``, change it with ``--module``) byte for byte, on every launcher (see
``deepspeed`` below for how); only a first argument ``--`` is refused, as torchrun's and
DeepSpeed's parsers would drop it. ``--dry-run`` prints the command(s), one per line and
shell-quoted, and runs nothing. Otherwise the command is printed to stderr, run, and its exit
status becomes ours (``128 + N`` when it died of signal ``N``).

Launchers
---------
``torchrun`` (default)
    One command per node, run on every node (``PY`` is this interpreter, ``sys.executable``, so
    it works in a virtualenv that is not activated)::

        PY -m torch.distributed.run --nnodes N --nproc_per_node G --node_rank R \\
            --master_addr A --master_port P -m MODULE ARGS...

    One node: ``A`` defaults to ``127.0.0.1``. Several nodes: ``A`` is ``--master-addr`` or the
    first host of ``--hostfile``; without either it is an error. With a hostfile ``--dry-run``
    prints the command of every node (``--node_rank`` 0..N-1, in hostfile order), each after a
    ``# on HOST`` line; a real run runs only this node's command, ``--node-rank`` (default
    ``$SLURM_NODEID`` when set, else 0), so start ``slimopt-launch`` once on every node.

``deepspeed``
    DeepSpeed's runner (flag names as in ``deepspeed/launcher/runner.py``, 0.19)::

        deepspeed --num_nodes N --num_gpus G [--hostfile H] [--master_addr A] \\
            --master_port P --no_local_rank --module MODULE ARGS...

    One command in all: with a hostfile the runner itself starts every node (pdsh/ssh).
    ``--no_local_rank`` stops DeepSpeed from appending ``--local_rank=K`` to ``ARGS``; the
    workers get ``RANK``/``LOCAL_RANK``/``WORLD_SIZE``/``MASTER_ADDR``/``MASTER_PORT`` in the
    environment as with torchrun. Several nodes need ``--hostfile``; ``--master_addr`` is given
    for one node (``127.0.0.1``) or when ``--master-addr`` is, else the runner finds node 0's
    address itself (``hostname -I`` on the first host). A hostfile whose hosts have different
    slot counts is accepted here only (``--num_gpus`` is then left out and each host uses its
    slots).

    Several nodes: DeepSpeed's runner starts them with pdsh, and there the arguments do not stay
    an argv list: pdsh expands ``%h``/``%u``/``%n`` in every word (pdsh ``pipecmd.c``), ssh joins
    the words with spaces, and each node's login shell (a POSIX shell: sh, bash, zsh, dash)
    parses the text again. DeepSpeed itself only puts an argument that contains a space in
    double quotes, escaping its ``"`` (``PDSHRunner.parse_user_args``). So ``ARGS`` are written
    for that route (``%`` doubled; then ``$``, backquote and ``\\`` escaped in an argument with
    a space, which DeepSpeed double-quotes; any other argument single-quoted when needed), and
    ``--dry-run`` adds a ``#`` line with what the module gets on every node. Before it runs (and
    on ``--dry-run``) ``slimopt-launch`` checks that the installed DeepSpeed quotes as described
    and that the working directory, which DeepSpeed sends to the nodes unquoted
    (``cd DIR;``), needs no quoting; it refuses otherwise. DeepSpeed's other multi-node
    backends (OpenMPI, MPICH, Intel MPI, MVAPICH, SLURM) pass argv lists, but ``slimopt-launch``
    does not select them: it always uses DeepSpeed's default, pdsh. One host (a one-line
    hostfile included) is run by DeepSpeed as an argv list, so the arguments go unquoted.

``slurm``
    The usual recipe for torchrun under SLURM: one ``srun`` task per node, each a torchrun
    agent that starts the node's ``G`` workers, meeting at a c10d rendezvous on node 0::

        srun --nodes N --ntasks N --ntasks-per-node 1 --kill-on-bad-exit=1 \\
            PY -m torch.distributed.run --nnodes N --nproc_per_node G \\
            --rdzv_id JOBID --rdzv_backend c10d --rdzv_endpoint A:P -m MODULE ARGS...

    (Not ``--ntasks-per-node G``: that would start ``G`` agents per node, ``G*G`` workers.)
    Run it from inside an allocation, typically an ``sbatch`` script with
    ``#SBATCH --nodes=N --ntasks-per-node=1 --gpus-per-node=G --cpus-per-task=C`` (give the one
    task all the node's CPUs: its workers share them). ``A`` is ``--master-addr`` or the first
    host of ``$SLURM_JOB_NODELIST`` (expanded with ``scontrol show hostnames`` when available);
    outside an allocation, ``--dry-run`` included, ``--master-addr`` is required. ``N`` defaults
    to ``$SLURM_JOB_NUM_NODES``, ``G`` to ``$SLURM_GPUS_ON_NODE``, ``JOBID`` is
    ``$SLURM_JOB_ID`` (``slimopt`` outside an allocation). ``--hostfile`` is not used.
    ``examples/slurm.sbatch`` is the same command as a plain sbatch script.

``PY`` must exist at the same path on every node (a shared filesystem), as usual for these
launchers. ``--num-gpus`` defaults to ``torch.cuda.device_count()``, or 1 without CUDA.

Hostfile
--------
DeepSpeed's format: one ``HOSTNAME slots=N`` a line; ``#`` starts a comment, blank lines are
skipped. The number of hosts gives ``--num-nodes`` and their (equal) slots ``--num-gpus``; an
explicit ``--num-nodes``/``--num-gpus`` that disagrees is an error. A host, like
``--master-addr``, must be a hostname or an IP address: letters, digits, ``.``, ``_``, ``:`` and
``-``, not starting with ``-`` (it becomes a launcher option's value, an ssh argument and a
word of the nodes' shell command).

``build_commands(options, pretrain_args)`` is the pure part, returning ``[(host or None,
argv), ...]``; ``options`` is what ``parse_args`` returns (an ``argparse.Namespace``).
"""
from __future__ import annotations

import argparse

import contextlib
import io
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from typing import Mapping, Sequence

from .cli_errors import OneLineParser

__all__ = ["LAUNCHERS", "DEFAULT_MODULE", "DEFAULT_MASTER_PORT", "HOST_RULE", "LaunchError",
           "Plan", "RESOLVERS", "is_host", "read_hostfile", "first_slurm_host", "parse_args",
           "check_names", "resolve",
           "pdsh_word", "deepspeed_pdsh_quoting", "commands_for", "build_commands",
           "check_pdsh_cwd", "check_deepspeed_pdsh", "nodes_note", "run_command", "main"]

LAUNCHERS = ("torchrun", "deepspeed", "slurm")
DEFAULT_MODULE = "slimopt.launch.pretrain"
DEFAULT_MASTER_PORT = 29500
PROG = "slimopt-launch"


class LaunchError(ValueError):
    """A user error: bad option, hostfile or environment. ``main`` reports it like argparse."""


# ---------------------------------------------------------------------------------------------
# hostfile and SLURM node lists

_HOST = re.compile(r"[A-Za-z0-9_.:][A-Za-z0-9_.:-]*")
HOST_RULE = ("a hostname or IP address (letters, digits, '.', '_', ':' and '-', not starting "
             "with '-')")


def is_host(name: str) -> bool:
    """Whether ``name`` can be used as a host or master address: nothing a shell, ssh, pdsh's
    host lists or a launcher's option parser would read as anything but one name."""
    return _HOST.fullmatch(name) is not None


def read_hostfile(path) -> list[tuple[str, int]]:
    """``[(host, slots), ...]`` in file order, from a DeepSpeed hostfile (``HOST slots=N``)."""
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        raise LaunchError(f"hostfile {path}: no such file") from None
    except IsADirectoryError:
        raise LaunchError(f"hostfile {path}: is a directory") from None
    except (OSError, UnicodeDecodeError) as e:
        raise LaunchError(f"hostfile {path}: cannot read it ({e})") from None
    hosts: list[tuple[str, int]] = []
    seen: dict[str, int] = {}
    for lineno, raw in enumerate(lines, 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        where = f"hostfile {path}, line {lineno}"
        fields = line.split()
        if len(fields) != 2 or not fields[1].startswith("slots="):
            raise LaunchError(f"{where}: expected 'HOSTNAME slots=N', got {raw.strip()!r}")
        host, value = fields[0], fields[1][len("slots="):]
        if not is_host(host):
            raise LaunchError(f"{where}: host {host!r} is not {HOST_RULE}")
        if not re.fullmatch(r"[0-9]+", value) or int(value) < 1:
            raise LaunchError(f"{where}: slots must be a positive integer, got {value!r}")
        if host in seen:
            raise LaunchError(f"{where}: host {host!r} is already listed on line {seen[host]}")
        seen[host] = lineno
        hosts.append((host, int(value)))
    if not hosts:
        raise LaunchError(f"hostfile {path}: lists no hosts")
    return hosts


def _expand_first(nodelist: str) -> str:
    """First host of a SLURM node list such as ``gpu[003-010,012],cpu1`` (``gpu003``)."""
    # the first top-level, comma-separated entry (commas inside [...] do not split)
    depth, end = 0, len(nodelist)
    for i, ch in enumerate(nodelist):
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        elif ch == "," and depth == 0:
            end = i
            break
    entry = nodelist[:end].strip()
    # in each [...] take the first item, and of a range its start (zero padding kept)
    return re.sub(r"\[([^\]]*)\]", lambda m: m.group(1).split(",")[0].split("-")[0], entry)


def first_slurm_host(nodelist: str) -> str:
    """First host of ``$SLURM_JOB_NODELIST``: ``scontrol show hostnames`` when it is available,
    else expanded here."""
    scontrol = shutil.which("scontrol")
    if scontrol:
        try:
            out = subprocess.run([scontrol, "show", "hostnames", nodelist], capture_output=True,
                                 text=True, timeout=30, check=True).stdout.split()
            if out:
                return out[0]
        except (OSError, subprocess.SubprocessError):
            pass
    host = _expand_first(nodelist)
    if not host:
        raise LaunchError(f"cannot find a host in SLURM_JOB_NODELIST={nodelist!r}; "
                          "give --master-addr")
    return host


def _slurm_master(nodelist: str) -> str:
    host = first_slurm_host(nodelist)
    if not is_host(host):
        raise LaunchError(f"the first host of SLURM_JOB_NODELIST={nodelist!r}, {host!r}, is not "
                          f"{HOST_RULE}; give --master-addr")
    return host


# ---------------------------------------------------------------------------------------------
# options


def _int_type(minimum: int, maximum: int | None = None, what: str = "an integer"):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if value < minimum or (maximum is not None and value > maximum):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value
    return parse


_positive = _int_type(1, what="an integer >= 1")
_nonnegative = _int_type(0, what="an integer >= 0")
_port = _int_type(1, 65535, what="a port number in 1..65535")


def _parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog=PROG,
        usage=f"{PROG} [options] -- [pretrain args ...]",
        description="Build and run the torchrun / DeepSpeed / SLURM command that starts the "
                    "slimopt pretraining CLI (or --module) on many GPUs and nodes. Arguments "
                    "after '--' go to the module unchanged.")
    p.add_argument("--launcher", choices=LAUNCHERS, default="torchrun",
                   help="the real launcher (default: torchrun)")
    p.add_argument("--num-nodes", type=_positive, default=None, metavar="N",
                   help="number of nodes (default: 1, the hostfile's host count, or "
                        "$SLURM_JOB_NUM_NODES with --launcher slurm)")
    p.add_argument("--num-gpus", type=_positive, default=None, metavar="N",
                   help="processes (GPUs) per node (default: the hostfile's slots, else "
                        "torch.cuda.device_count(), or 1 without CUDA)")
    p.add_argument("--node-rank", type=_nonnegative, default=None, metavar="R",
                   help="this node's rank for torchrun (default: $SLURM_NODEID or 0)")
    p.add_argument("--master-addr", default=None, metavar="ADDR",
                   help="address of node 0 (default: 127.0.0.1 on one node, else the first "
                        "host of --hostfile or of $SLURM_JOB_NODELIST)")
    p.add_argument("--master-port", type=_port, default=DEFAULT_MASTER_PORT, metavar="PORT",
                   help=f"port on node 0 (default: {DEFAULT_MASTER_PORT})")
    p.add_argument("--hostfile", default=None, metavar="PATH",
                   help="DeepSpeed hostfile ('HOSTNAME slots=N' lines); gives the nodes and "
                        "GPUs per node")
    p.add_argument("--module", default=DEFAULT_MODULE,
                   help=f"Python module to run (default: {DEFAULT_MODULE})")
    p.add_argument("--dry-run", action="store_true",
                   help="print the command(s), one per line, and run nothing")
    return p


def parse_args(argv: Sequence[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    """``(options, pretrain_args)`` from ``[options] -- [pretrain args]``; argparse errors exit."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" in argv:
        cut = argv.index("--")
        ours, theirs = argv[:cut], argv[cut + 1:]
    else:
        ours, theirs = argv, []
    return _parser().parse_args(ours), theirs


# ---------------------------------------------------------------------------------------------
# resolution and command building


@dataclass(frozen=True)
class Plan:
    """Everything ``options`` + hostfile + environment settle."""
    launcher: str
    num_nodes: int
    num_gpus: int | None        # None: deepspeed with per-host slots from the hostfile
    node_rank: int
    master_addr: str | None     # None: deepspeed finds it
    master_port: int
    hostfile: str | None
    hosts: tuple[tuple[str, int], ...] | None
    module: str
    rdzv_id: str = "slimopt"

    @property
    def through_pdsh(self) -> bool:
        """Whether DeepSpeed's runner starts the nodes with pdsh, which hands the arguments to
        each node's shell as text (several hosts; with one it runs an argv list locally)."""
        return self.launcher == "deepspeed" and self.num_nodes > 1


def _env_int(env: Mapping[str, str], name: str) -> int | None:
    value = env.get(name, "").strip()
    # SLURM_GPUS_ON_NODE etc. are plain integers; anything else is ignored
    return int(value) if value.isdigit() and int(value) > 0 else None


def _default_num_gpus() -> int:
    try:
        import torch
        return torch.cuda.device_count() or 1
    except Exception:  # noqa: BLE001 - no usable torch/CUDA: one process
        return 1


def check_names(options) -> None:
    """What the argparse types leave to check: ``--module`` is a dotted name and
    ``--master-addr`` a hostname or IP address (both reach a command line and, with pdsh, a
    shell)."""
    module, master_addr = options.module, options.master_addr
    if not (isinstance(module, str) and all(part.isidentifier() for part in module.split("."))):
        raise LaunchError(f"--module must name a Python module (dotted identifiers such as "
                          f"{DEFAULT_MODULE}), got {module!r}")
    if master_addr is not None and not str(master_addr).strip():
        raise LaunchError("--master-addr is empty")
    if master_addr is not None and not is_host(str(master_addr)):
        raise LaunchError(f"--master-addr {master_addr!r} is not {HOST_RULE}")


@dataclass
class _Draft:
    """A plan being settled: the options, then what the hostfile and the environment add."""
    options: argparse.Namespace
    env: Mapping[str, str]
    num_nodes: int | None
    num_gpus: int | None
    hosts: tuple[tuple[str, int], ...] | None = None

    def node_rank(self) -> int:
        if self.options.node_rank is not None:
            return self.options.node_rank
        slurm_rank = self.env.get("SLURM_NODEID", "").strip()
        return int(slurm_rank) if slurm_rank.isdigit() else 0

    def plan(self, master_addr: str | None, rdzv_id: str = "slimopt") -> Plan:
        o = self.options
        hostfile = os.fspath(o.hostfile) if o.hostfile is not None else None
        return Plan(launcher=o.launcher, num_nodes=self.num_nodes, num_gpus=self.num_gpus,
                    node_rank=self.node_rank(), master_addr=master_addr,
                    master_port=o.master_port, hostfile=hostfile, hosts=self.hosts,
                    module=o.module, rdzv_id=rdzv_id)


def read_hosts(draft: _Draft) -> None:
    """Nodes and GPUs per node from ``--hostfile``, checked against ``--num-nodes/--num-gpus``.
    Only DeepSpeed takes hosts with different slot counts (``num_gpus`` stays None)."""
    launcher, hostfile = draft.options.launcher, os.fspath(draft.options.hostfile)
    hosts = draft.hosts = tuple(read_hostfile(hostfile))
    if draft.num_nodes is not None and draft.num_nodes != len(hosts):
        raise LaunchError(f"--num-nodes {draft.num_nodes} contradicts hostfile {hostfile}, which "
                          f"lists {len(hosts)} host(s)")
    draft.num_nodes = len(hosts)
    slots = sorted({s for _, s in hosts})
    if len(slots) == 1:
        if draft.num_gpus is not None and draft.num_gpus != slots[0]:
            raise LaunchError(f"--num-gpus {draft.num_gpus} contradicts hostfile {hostfile}, "
                              f"which gives slots={slots[0]} per host")
        draft.num_gpus = slots[0]
        return
    listed = ", ".join(f"{h} slots={s}" for h, s in hosts)
    if launcher != "deepspeed":
        raise LaunchError(f"hostfile {hostfile}: {launcher} needs the same slots on every "
                          f"host, got {listed}")
    if draft.num_gpus is not None:
        raise LaunchError(f"--num-gpus {draft.num_gpus} contradicts hostfile {hostfile}, whose "
                          f"hosts have different slots ({listed})")


def _resolve_torchrun(draft: _Draft) -> Plan:
    draft.num_nodes = draft.num_nodes or 1
    if draft.num_gpus is None:
        draft.num_gpus = _default_num_gpus()
    if draft.node_rank() >= draft.num_nodes:
        raise LaunchError(f"--node-rank {draft.node_rank()} is out of range for "
                          f"{draft.num_nodes} node(s) (0..{draft.num_nodes - 1})")
    master_addr = draft.options.master_addr
    if master_addr is None:
        if draft.hosts is not None:
            master_addr = draft.hosts[0][0]
        elif draft.num_nodes == 1:
            master_addr = "127.0.0.1"
        else:
            raise LaunchError(f"{draft.num_nodes} nodes need a master address: give "
                              "--master-addr (the address of node 0) or --hostfile")
    return draft.plan(master_addr)


def _resolve_deepspeed(draft: _Draft) -> Plan:
    draft.num_nodes = draft.num_nodes or 1
    if draft.num_gpus is None and draft.hosts is None:
        draft.num_gpus = _default_num_gpus()
    if draft.num_nodes > 1 and draft.hosts is None:
        raise LaunchError(f"--launcher deepspeed on {draft.num_nodes} nodes needs --hostfile "
                          "(DeepSpeed starts the other nodes from it)")
    master_addr = draft.options.master_addr
    if master_addr is None and draft.num_nodes == 1:
        master_addr = "127.0.0.1"
    return draft.plan(master_addr)  # None on several nodes: DeepSpeed's runner finds it


def _resolve_slurm(draft: _Draft) -> Plan:
    env = draft.env
    draft.num_nodes = (draft.num_nodes or _env_int(env, "SLURM_JOB_NUM_NODES")
                       or _env_int(env, "SLURM_NNODES") or 1)
    if draft.num_gpus is None:
        draft.num_gpus = _env_int(env, "SLURM_GPUS_ON_NODE") or _default_num_gpus()
    master_addr = draft.options.master_addr
    if master_addr is None:
        nodelist = env.get("SLURM_JOB_NODELIST", "").strip()
        if not nodelist:
            raise LaunchError("--launcher slurm outside a SLURM allocation "
                              "($SLURM_JOB_NODELIST is not set) needs --master-addr, the "
                              "address of the first node")
        master_addr = _slurm_master(nodelist)
    return draft.plan(master_addr, rdzv_id=env.get("SLURM_JOB_ID", "").strip() or "slimopt")


#: one resolver per launcher: the nodes, GPUs per node and master address it needs
RESOLVERS = {"torchrun": _resolve_torchrun, "deepspeed": _resolve_deepspeed,
             "slurm": _resolve_slurm}


def resolve(options, env: Mapping[str, str] | None = None) -> Plan:
    """Settle the launch from ``options`` (a ``parse_args`` namespace: its types have checked
    every number), the hostfile and ``env`` (default ``os.environ``). Raises ``LaunchError`` on
    contradictions."""
    check_names(options)
    draft = _Draft(options, os.environ if env is None else env, options.num_nodes,
                   options.num_gpus)
    if options.hostfile is not None:
        if options.launcher == "slurm":
            raise LaunchError("--hostfile is not used with --launcher slurm (the nodes are the "
                              "SLURM allocation's)")
        read_hosts(draft)
    return RESOLVERS[options.launcher](draft)


def _torchrun(plan: Plan, node_rank: int, args: list[str]) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run",
            "--nnodes", str(plan.num_nodes), "--nproc_per_node", str(plan.num_gpus),
            "--node_rank", str(node_rank), "--master_addr", plan.master_addr,
            "--master_port", str(plan.master_port), "-m", plan.module, *args]


def deepspeed_pdsh_quoting(words: Sequence[str]) -> list[str]:
    """What DeepSpeed's ``PDSHRunner.parse_user_args`` (0.19,
    ``deepspeed/launcher/multinode_runner.py``) does to the arguments: one that contains a space
    is put in double quotes with its ``"`` escaped; the others go as they are."""
    return ['"{}"'.format(w.replace('"', '\\"')) if " " in w else w for w in words]


def pdsh_word(arg: str) -> str:
    """``arg`` written so that DeepSpeed's pdsh runner, pdsh (which expands ``%h``, ``%u``,
    ``%n`` and ``%%`` in every word), ssh (which joins the words with spaces) and the node's
    POSIX shell together turn it back into ``arg``, byte for byte."""
    arg = arg.replace("%", "%%")
    if " " in arg:  # DeepSpeed double-quotes it and escapes '"'; escape what "..." still expands
        return re.sub(r"([$`\\])", r"\\\1", arg)
    return shlex.quote(arg)  # no space, so DeepSpeed passes it as it is; quote() adds none


def _deepspeed(plan: Plan, args: list[str]) -> list[str]:
    cmd = ["deepspeed", "--num_nodes", str(plan.num_nodes)]
    if plan.num_gpus is not None:
        cmd += ["--num_gpus", str(plan.num_gpus)]
    if plan.hostfile is not None:
        cmd += ["--hostfile", plan.hostfile]
    if plan.master_addr is not None:
        cmd += ["--master_addr", plan.master_addr]
    cmd += ["--master_port", str(plan.master_port), "--no_local_rank", "--module", plan.module,
            *args]
    return cmd


def _slurm(plan: Plan, args: list[str]) -> list[str]:
    addr = plan.master_addr
    if ":" in addr and not addr.startswith("["):  # IPv6
        addr = f"[{addr}]"
    n = str(plan.num_nodes)
    return ["srun", "--nodes", n, "--ntasks", n, "--ntasks-per-node", "1",
            "--kill-on-bad-exit=1",
            sys.executable, "-m", "torch.distributed.run", "--nnodes", n,
            "--nproc_per_node", str(plan.num_gpus), "--rdzv_id", plan.rdzv_id,
            "--rdzv_backend", "c10d", "--rdzv_endpoint", f"{addr}:{plan.master_port}",
            "-m", plan.module, *args]


def commands_for(plan: Plan, pretrain_args: Sequence[str]) -> list[tuple[str | None, list[str]]]:
    args = [str(a) for a in pretrain_args]
    if args[:1] == ["--"]:
        raise LaunchError("the first pretraining argument cannot be '--': the argument parsers "
                          "of torchrun and DeepSpeed (argparse) drop it there; leave it out or "
                          "put it later")
    if plan.launcher == "torchrun":
        if plan.hosts is not None:
            return [(host, _torchrun(plan, rank, args)) for rank, (host, _) in
                    enumerate(plan.hosts)]
        return [(None, _torchrun(plan, plan.node_rank, args))]
    if plan.launcher == "deepspeed":
        if plan.through_pdsh:
            args = [pdsh_word(a) for a in args]
        return [(None, _deepspeed(plan, args))]
    return [(None, _slurm(plan, args))]


def build_commands(options, pretrain_args: Sequence[str],
                   env: Mapping[str, str] | None = None) -> list[tuple[str | None, list[str]]]:
    """``[(host or None, argv), ...]`` for ``options`` (a ``parse_args`` namespace).

    torchrun with a hostfile gives one entry per host, node rank = position; otherwise a single
    entry whose host is None (torchrun: this node's command; deepspeed/slurm: the one command
    that starts every node). Raises ``LaunchError`` on bad or contradictory options."""
    return commands_for(resolve(options, env), pretrain_args)


# ---------------------------------------------------------------------------------------------
# several nodes through DeepSpeed's pdsh runner: checks before running, and what the nodes get

_SHELL_SAFE_PATH = re.compile(r"[\w@+=:,./-]+", re.ASCII)  # no quoting needed, no pdsh '%'


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def check_deepspeed_pdsh(cmd: Sequence[str], pretrain_args: Sequence[str]) -> None:
    """Refuse unless the installed DeepSpeed reads ``cmd`` (our ``deepspeed ...`` argv) as meant
    and its pdsh runner quotes the arguments as ``deepspeed_pdsh_quoting`` says, which is what
    ``pdsh_word`` is written for. Raises ``LaunchError``."""
    sink = io.StringIO()  # DeepSpeed logs on import, its parser on error; the run is a child
    try:
        with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            from deepspeed.launcher.multinode_runner import PDSHRunner
            from deepspeed.launcher.runner import parse_args as deepspeed_parse_args
            ds_args = deepspeed_parse_args(list(cmd[1:]))
            passed = PDSHRunner(ds_args, "").user_arguments
    except (Exception, SystemExit) as e:  # noqa: BLE001 - whatever stops the check, say it
        raise LaunchError("--launcher deepspeed on several nodes: cannot check how the installed "
                          f"DeepSpeed passes the arguments to pdsh ({_one_line(e)}); install "
                          "DeepSpeed 0.19 in this Python ('pip install deepspeed')") from None
    words = [pdsh_word(a) for a in pretrain_args]
    if ds_args.user_args != words or passed != deepspeed_pdsh_quoting(words):
        raise LaunchError("--launcher deepspeed on several nodes: the installed DeepSpeed passes "
                          "the arguments to pdsh differently from DeepSpeed 0.19, so they would "
                          "not reach the nodes unchanged; use DeepSpeed 0.19, or --launcher "
                          "torchrun (run on every node) or --launcher slurm")


def check_pdsh_cwd(cwd: str) -> None:
    """Refuse a working directory that DeepSpeed's pdsh runner cannot send to the nodes: it
    writes ``cd DIR;`` into their shell command unquoted."""
    if not _SHELL_SAFE_PATH.fullmatch(cwd):
        raise LaunchError(f"--launcher deepspeed on several nodes: the working directory {cwd!r} "
                          "goes unquoted into the nodes' shell command ('cd DIR;', written by "
                          "DeepSpeed's pdsh runner); run slimopt-launch from a directory whose "
                          "path has only letters, digits and '_@+=:,./-'")


def nodes_note(plan: Plan, pretrain_args: Sequence[str]) -> str:
    """The ``#`` line that says what the module gets on every node when ``plan.through_pdsh``."""
    return (f"# the arguments above are quoted for the nodes' shell (DeepSpeed starts the nodes "
            f"with pdsh over ssh); on every node {plan.module} gets sys.argv[1:] == "
            f"{list(pretrain_args)!r}")


# ---------------------------------------------------------------------------------------------
# running


def _find_executable(name: str) -> str | None:
    """``name`` on ``PATH``, else next to this interpreter (a virtualenv that is not active)."""
    found = shutil.which(name)
    if found:
        return found
    sibling = os.path.join(os.path.dirname(sys.executable), name)
    return sibling if os.path.isfile(sibling) and os.access(sibling, os.X_OK) else None


def run_command(argv: Sequence[str]) -> int:
    """Run ``argv``, forwarding SIGTERM/SIGHUP to it; its exit status (``128 + N`` for signal
    ``N``). On Ctrl-C (which the child gets too) wait for it to shut down; a second Ctrl-C or
    30 s later it is killed."""
    proc = subprocess.Popen(list(argv))
    previous = {}

    def forward(signum, _frame):
        if proc.poll() is None:
            proc.send_signal(signum)

    for sig in (signal.SIGTERM, getattr(signal, "SIGHUP", None)):
        if sig is None:
            continue
        try:
            previous[sig] = signal.signal(sig, forward)
        except (ValueError, OSError):  # not the main thread
            pass
    try:
        try:
            rc = proc.wait()
        except KeyboardInterrupt:
            try:
                rc = proc.wait(timeout=30)
            except (KeyboardInterrupt, subprocess.TimeoutExpired):
                proc.kill()
                rc = proc.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 128 - rc if rc < 0 else rc


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    options, pretrain_args = parse_args(argv)
    try:
        plan = resolve(options)
        commands = commands_for(plan, pretrain_args)
        if plan.through_pdsh:
            check_pdsh_cwd(os.getcwd())
            check_deepspeed_pdsh(commands[0][1], pretrain_args)
    except LaunchError as e:
        parser.error(str(e))
    note = nodes_note(plan, pretrain_args) if plan.through_pdsh else None
    if options.dry_run:
        for host, cmd in commands:
            if host is not None:
                print(f"# on {shlex.quote(host)}")
            print(shlex.join(cmd))
        if note is not None:
            print(note)
        sys.stdout.flush()
        return 0

    if len(commands) > 1:  # torchrun from a hostfile: this node's command only
        host, cmd = commands[plan.node_rank]
    else:
        host, cmd = commands[0]
    cmd = list(cmd)
    if plan.launcher in ("deepspeed", "slurm"):
        name = "deepspeed" if plan.launcher == "deepspeed" else "srun"
        exe = _find_executable(name)
        if exe is None:
            if name == "deepspeed":
                parser.error("the 'deepspeed' launcher was not found (not on PATH nor next to "
                             f"{sys.executable}); install it with 'pip install deepspeed', or "
                             "use --launcher torchrun")
            parser.error("'srun' was not found: run inside a SLURM allocation (e.g. from an "
                         "sbatch script), use --dry-run to see the command, or use "
                         "--launcher torchrun")
        cmd[0] = exe
    if host is not None:
        print(f"# on {shlex.quote(host)} (node rank {plan.node_rank})", file=sys.stderr)
    print(shlex.join(cmd), file=sys.stderr)
    if note is not None:
        print(note, file=sys.stderr)
    sys.stderr.flush()
    try:
        return run_command(cmd)
    except OSError as e:
        parser.error(f"cannot run {cmd[0]}: {e}")


if __name__ == "__main__":
    sys.exit(main())
