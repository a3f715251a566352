"""slimopt-pretrain's contract: bad input exits 2 with one line naming the flag or file, before any
training; no code runs from a checkpoint; corrupted checkpoints are refused; a resumed run refuses
what it cannot honour and says what it applies."""
import json
import os
import resource
import signal
import subprocess
import sys
import zipfile

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from slimopt.launch import pretrain  # noqa: E402
from slimopt.launch.checkpoint_io import RunLock  # noqa: E402

SMALL = ["--preset", "tiny", "--seq-len", "32", "--batch-size", "4", "--vocab-size", "300",
         "--max-chars", "150000", "--eval-every", "4", "--eval-batches", "1", "--no-progress",
         "--rank", "8", "--update-interval", "3", "--threads", "1", "--no-tensorboard"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def source(tmp_path_factory, cache):
    """A 6-step run with a checkpoint at step 3 (and 6)."""
    out = tmp_path_factory.mktemp("source")
    pretrain.execute(SMALL + ["--cache-dir", cache, "--output-dir", str(out), "--steps", "6",
                              "--save-every", "3"])
    return out


def _base(tmp_path, cache, name="out"):
    return SMALL + ["--cache-dir", cache, "--output-dir", str(tmp_path / name)]


def _refused(args, capsys, *needles):
    """The run exits 2 with exactly one stderr line holding every needle, and trains nothing."""
    with pytest.raises(SystemExit) as err:
        pretrain.execute(args)
    assert err.value.code == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("slimopt-pretrain: error: "), captured.err
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert "step 1" not in captured.out and "final eval" not in captured.out
    return lines[0]


@pytest.mark.parametrize("flag, value", [
    ("--min-lr-ratio", "-5"), ("--min-lr-ratio", "nan"), ("--min-lr-ratio", "50"),
    ("--grad-clip", "nan"), ("--grad-clip", "inf"), ("--threads", "-1")])
def test_schedule_and_machine_inputs_are_validated(tmp_path, cache, capsys, flag, value):
    _refused(_base(tmp_path, cache) + [flag, value, "--steps", "2"], capsys, flag)


def test_unusable_output_and_cache_folders_fail_before_training(tmp_path, cache, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    args = SMALL + ["--cache-dir", cache, "--steps", "3", "--save-every", "3"]
    _refused(args + ["--output-dir", str(blocker)], capsys, "--output-dir", "not a folder")
    _refused(args + ["--output-dir", str(blocker / "sub")], capsys, "--output-dir")
    _refused(SMALL + ["--cache-dir", str(blocker), "--output-dir", str(tmp_path / "o")], capsys,
             "--cache-dir")


def _write(path, data: bytes):
    path.write_bytes(data)
    return str(path)


def test_bad_data_files_are_one_line_errors(tmp_path, cache, capsys):
    base = _base(tmp_path, cache) + ["--steps", "2"]
    docs = [json.dumps({"text": f"json doc {i} " * 20}) for i in range(50)]
    cases = {
        "empty.txt": (b"", "empty"),
        "binary.txt": (bytes(range(256)) * 8, "NUL byte"),
        "latin1.txt": ("caf\u00e9 cr\u00e8me ".encode("latin-1") * 100, "not UTF-8"),
        "bad.jsonl": (b'{"text": "fine"}\n{not json\n', "could not read it as json"),
        "numbers.jsonl": (b'{"text": 5}\n{"text": 6}\n', "not text"),
    }
    for name, (data, needle) in cases.items():
        _refused(base + ["--data", _write(tmp_path / name, data)], capsys, name, needle)
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "a.txt").write_text("plain text line\n" * 200)
    (mixed / "b.jsonl").write_text("\n".join(docs))
    _refused(base + ["--data", str(mixed)], capsys, "mixes json and text")


def test_deepspeed_config_shapes_are_one_line_errors(tmp_path, cache, capsys):
    cfg = tmp_path / "ds.json"
    for body, needle in [([1, 2], "top level"), ({"optimizer": {"type": "slimopt.GrassWalk",
                                                                "params": [1, 2]}}, "params"),
                         ({"bf16": True}, "'bf16'"),
                         ({"train_micro_batch_size_per_gpu": "4"}, "train_micro_batch")]:
        cfg.write_text(json.dumps(body))
        _refused(_base(tmp_path, cache) + ["--deepspeed", str(cfg)], capsys, needle)


def _resume(tmp_path, cache, ckpt, *extra, steps="8", name="resumed"):
    return _base(tmp_path, cache, name) + ["--steps", steps, "--resume", str(ckpt), *extra]


class Payload:
    """Pickles to a call of ``os.system``: what a malicious checkpoint would carry."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_pickled_call_in_a_checkpoint_never_runs(tmp_path, cache, source):
    marker = tmp_path / "PWNED"
    ckpt = torch.load(source / "checkpoint-3.pt", weights_only=True)
    ckpt["extra"] = Payload(marker)
    torch.save(ckpt, tmp_path / "evil.pt")
    cmd = [sys.executable, "-m", "slimopt.launch.pretrain",
           *_resume(tmp_path, cache, tmp_path / "evil.pt")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert not marker.exists(), "the pickled call ran"
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "posix.system" in proc.stderr and "could run code" in proc.stderr


def test_flipped_bytes_are_refused_by_the_digest(tmp_path, cache, capsys, source):
    path = str(source / "checkpoint-3.pt")
    big = max(zipfile.ZipFile(path).infolist(), key=lambda i: i.file_size)
    start = big.header_offset + 30 + len(big.filename.encode()) + len(big.extra) \
        + big.file_size // 2
    data = bytearray(open(path, "rb").read())
    for i in range(start, start + 64):
        data[i] ^= 0x55
    flipped = _write(tmp_path / "flipped.pt", bytes(data))
    _refused(_resume(tmp_path, cache, flipped), capsys, "flipped.pt", "digest")


def _crafted(tmp_path, source, name, edit):
    ckpt = torch.load(source / "checkpoint-3.pt", weights_only=True)
    ckpt.pop("sha256")
    edit(ckpt)
    torch.save(ckpt, tmp_path / name)  # no digest: the structural checks must still hold
    return tmp_path / name


@pytest.mark.parametrize("name, edit, needle", [
    ("no-args.pt", lambda c: c.pop("args"), "no args"),
    ("no-opt.pt", lambda c: c.pop("optimizer"), "no optimizer"),
    ("negative.pt", lambda c: c.update(step=-5, data_position=-5), "invalid step"),
    ("skewed.pt", lambda c: c.update(data_position=1), "data position"),
])
def test_crafted_checkpoints_are_refused(tmp_path, cache, capsys, source, name, edit, needle):
    _refused(_resume(tmp_path, cache, _crafted(tmp_path, source, name, edit)), capsys, needle)


@pytest.mark.parametrize("extra, needle", [
    (["--weight-decay", "0.1"], "weight_decay"),
    (["--opt-args", '{"walk_angle": 0.1}'], "opt_args"),
    (["--seed", "3"], "seed"),
])
def test_resume_refuses_settings_it_cannot_honour(tmp_path, cache, capsys, source, extra,
                                                 needle):
    _refused(_resume(tmp_path, cache, source / "checkpoint-3.pt", *extra), capsys, needle)


def test_resume_refuses_steps_below_the_checkpoint(tmp_path, cache, capsys, source):
    _refused(_resume(tmp_path, cache, source / "checkpoint-6.pt", steps="4"), capsys,
             "at step 6", "--steps")


def test_resume_applies_a_new_lr_and_says_so(tmp_path, cache, capsys, source):
    pretrain.execute(_resume(tmp_path, cache, source / "checkpoint-3.pt", "--lr", "0.01"))
    assert "--lr changed from 0.003 to 0.01" in capsys.readouterr().out
    groups = torch.load(tmp_path / "resumed" / "checkpoint-8.pt",
                        weights_only=True)["optimizer"]["param_groups"]
    assert all(g["initial_lr"] == pytest.approx(0.01) for g in groups)


def test_resume_notices_changed_data_behind_the_same_path(tmp_path, cache, capsys):
    data = tmp_path / "c.jsonl"
    data.write_text("\n".join(json.dumps({"text": f"def f{i}(x):\n    return x + {i}\n" * 20})
                              for i in range(400)))
    args = _base(tmp_path, cache, "d") + ["--data", str(data), "--steps", "6", "--save-every",
                                          "3", "--halt-after", "3"]
    pretrain.execute(args)
    capsys.readouterr()
    data.write_text("\n".join(json.dumps({"text": f"lorem ipsum {i} dolor sit amet. " * 12})
                              for i in range(400)))
    _refused(args + ["--resume", "auto"], capsys, "data_sha256")


def test_resume_auto_starts_fresh_then_continues(tmp_path, cache, capsys):
    args = _base(tmp_path, cache, "auto") + ["--steps", "4", "--save-every", "2",
                                             "--resume", "auto"]
    pretrain.execute(args + ["--halt-after", "2"])
    assert "starting from step 0" in capsys.readouterr().out
    pretrain.execute(args)
    assert "resumed from step 2" in capsys.readouterr().out


def test_two_runs_cannot_share_an_output_dir(tmp_path, cache, capsys):
    folder = tmp_path / "busy"
    folder.mkdir()
    lock = RunLock(str(folder))
    try:
        _refused(SMALL + ["--cache-dir", cache, "--output-dir", str(folder)], capsys,
                 "another run")
    finally:
        lock.release()


def _limit_file_size():
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG
    resource.setrlimit(resource.RLIMIT_FSIZE, (2_000_000, 2_000_000))


def test_a_full_disk_is_one_line_and_leaves_no_temp_file(tmp_path, cache, source):
    out = tmp_path / "full"
    cmd = [sys.executable, "-m", "slimopt.launch.pretrain", *SMALL, "--cache-dir", cache,
           "--output-dir", str(out), "--steps", "2", "--save-every", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240,
                          preexec_fn=_limit_file_size)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and "could not write checkpoint" in proc.stderr
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]


def test_deepspeed_tag_digests_refuse_flipped_bytes(tmp_path):
    from slimopt.launch.checkpoint_io import (CheckpointError, verify_tag_digests,
                                              write_tag_digests)
    tag = tmp_path / "step3"
    tag.mkdir()
    files = {"mp_rank_00_model_states.pt": 0, "zero_pp_rank_0_mp_rank_00_optim_states.pt": 0,
             "zero_pp_rank_1_mp_rank_00_optim_states.pt": 1}
    for name in files:
        (tag / name).write_bytes(os.urandom(4096))
    for rank in (0, 1):
        write_tag_digests(str(tag), rank)
    assert json.loads((tag / "slimopt-sha256-rank1.json").read_text()).keys() == {
        "zero_pp_rank_1_mp_rank_00_optim_states.pt"}
    assert verify_tag_digests(str(tag)) == 3
    data = bytearray((tag / "zero_pp_rank_1_mp_rank_00_optim_states.pt").read_bytes())
    data[100] ^= 0x01
    (tag / "zero_pp_rank_1_mp_rank_00_optim_states.pt").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="rank_1_mp_rank_00_optim_states.pt: corrupted"):
        verify_tag_digests(str(tag))


def test_a_pickled_call_in_the_data_caches_never_runs(tmp_path, capsys):
    """The token cache is raw token ids and a JSON record, nothing is unpickled: a pickled call
    planted in the token file fails its size and digest check, and the cache is rebuilt, with a
    note; a damaged tokenizer file is rebuilt the same way."""
    private = tmp_path / "cache"
    args = SMALL + ["--cache-dir", str(private), "--steps", "1"]
    first = pretrain.execute(args + ["--output-dir", str(tmp_path / "a")])
    tokens, = private.glob("tokens-*.bin")
    record, = private.glob("tokens-*.json")
    bpe, = private.glob("bpe-*.json")
    marker = tmp_path / "PWNED"
    torch.save({"train": Payload(marker)}, tokens)
    bpe.write_text("{not json")
    capsys.readouterr()
    again = pretrain.execute(args + ["--output-dir", str(tmp_path / "b")])
    err = capsys.readouterr().err
    assert not marker.exists()
    assert f"the cache file {record} is unreadable" in err and str(bpe) in err
    assert again["eval_loss"] == first["eval_loss"]
