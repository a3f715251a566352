"""No code runs from a checkpoint: a pickled call planted in each kind of file slimopt loads (the
merged resharded file, a DeepSpeed ``*_optim_states.pt``, ``mp_rank_00_model_states.pt``) is
refused by name and never runs; damaged tags and files are one-line ``ValueError``s. Genuine
DeepSpeed checkpoints pass: ``tests/test_zero.py::test_genuine_checkpoints_load_safely``."""
import os

import pytest
import torch

from slimopt.launch.safe_load import ALLOWED, check_deepspeed_tag, load_file, resolve_tag


def leave_marker(path):
    """What the planted pickle calls: harmless, but visible (a file appears)."""
    with open(path, "w") as f:
        f.write("code ran")


class Planted:
    """Unpickling this calls ``leave_marker(marker)``, as ``os.system`` would run a command."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return leave_marker, (self.marker,)


class PlantedShell:
    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def _zero_tag(folder, world=2, stage=2):
    """A ZeRO-``stage`` tag as DeepSpeed lays it out: model states and one optimizer file per
    rank, with the keys the checks read (the genuine files are tested in test_zero.py)."""
    tag = folder / "step8"
    tag.mkdir(parents=True)
    (folder / "latest").write_text("step8")
    config = {"zero_optimization": {"stage": stage}}
    torch.save({"module": {"w": torch.zeros(2, 2)}, "dp_world_size": world, "ds_config": config,
                "global_steps": 8}, tag / "mp_rank_00_model_states.pt")
    for r in range(world):
        torch.save({"optimizer_state_dict": {"zero_stage": stage, "base_optimizer_state": {
            "slimopt_zero": 1, "world_size": world, "state": {}, "param_groups": []}}},
            tag / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt")
    return tag


def _plant(path, marker):
    """Add a ``Planted`` object to the dict saved at ``path``."""
    data = torch.load(path, weights_only=True)
    data["extra"] = Planted(marker)
    torch.save(data, path)


def test_the_planted_pickle_runs_when_loaded_unsafely(tmp_path):
    # the negative control: what weights_only=False (DeepSpeed's own load) would do
    marker = tmp_path / "MARKER"
    torch.save({"x": Planted(marker)}, tmp_path / "evil.pt")
    torch.load(tmp_path / "evil.pt", weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("kind", ["merged", "optim", "model"])
def test_planted_pickle_is_refused_and_never_runs(tmp_path, kind):
    marker = tmp_path / "MARKER"
    tag = _zero_tag(tmp_path / "ds")
    if kind == "merged":
        path = tmp_path / "merged.pt"
        torch.save({"slimopt_resharded": 1, "weights": {}, "x": Planted(marker)}, path)
        with pytest.raises(ValueError) as err:
            load_file(path)
    else:
        name = ("zero_pp_rank_1_mp_rank_00_optim_states.pt" if kind == "optim"
                else "mp_rank_00_model_states.pt")
        path = tag / name
        _plant(path, marker)
        with pytest.raises(ValueError) as err:
            check_deepspeed_tag(tmp_path / "ds", None)
    message = str(err.value)
    assert str(path) in message and "leave_marker" in message
    assert "not on slimopt's allow-list" in message and "\n" not in message
    assert not marker.exists()


def test_os_system_is_refused_by_name(tmp_path):
    marker = tmp_path / "MARKER"
    torch.save({"x": PlantedShell(f"touch {marker}")}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match=r"global (posix|os|nt)\.system, which is not on"):
        load_file(tmp_path / "evil.pt")
    assert not marker.exists()


def test_load_resharded_refuses_a_crafted_file_before_anything(tmp_path):
    # review row SR1: load_resharded(None, crafted.pt) ran the pickle before any check
    from slimopt.launch import load_resharded
    marker = tmp_path / "MARKER"
    torch.save({"slimopt_resharded": 1, "x": Planted(marker)}, tmp_path / "crafted.pt")
    with pytest.raises(ValueError, match="leave_marker"):
        load_resharded(None, str(tmp_path / "crafted.pt"))
    assert not marker.exists()


def test_allow_list_is_exactly_deepspeeds_three_classes():
    assert sorted(ALLOWED) == ["deepspeed.runtime.fp16.loss_scaler.LossScaler",
                               "deepspeed.runtime.zero.config.ZeroStageEnum",
                               "deepspeed.utils.tensor_fragment.fragment_address"]


def test_damaged_files_are_one_line_errors(tmp_path):
    good = tmp_path / "good.pt"
    torch.save({"w": torch.ones(1000)}, good)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:2000])
    noise = tmp_path / "noise.pt"
    noise.write_bytes(os.urandom(5000))  # review row A236: IndexError before
    for path in (truncated, noise):
        with pytest.raises(ValueError, match=f"{path}: not a complete torch checkpoint"):
            load_file(path)
    with pytest.raises(ValueError, match="no such file"):
        load_file(tmp_path / "none.pt")
    assert torch.equal(load_file(good)["w"], torch.ones(1000))


def test_incomplete_tags_are_refused(tmp_path):
    tag = _zero_tag(tmp_path / "a")
    assert check_deepspeed_tag(tmp_path / "a", None) == os.path.join(tmp_path / "a", "step8")
    (tag / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    with pytest.raises(ValueError, match=r"1 optimizer state files .* 2 ranks .*\[1\]"):
        check_deepspeed_tag(tmp_path / "a", "step8")
    tag = _zero_tag(tmp_path / "b")
    (tag / "mp_rank_00_model_states.pt").unlink()  # review row D15: "AssertionError: " before
    with pytest.raises(ValueError, match="no model states"):
        check_deepspeed_tag(tmp_path / "b", "step8")
    tag = _zero_tag(tmp_path / "c")
    with open(tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt", "r+b") as f:
        f.truncate(100)
    with pytest.raises(ValueError, match="zero_pp_rank_0_mp_rank_00_optim_states.pt: not a "
                                         "complete"):
        check_deepspeed_tag(tmp_path / "c", "step8")
    with pytest.raises(ValueError, match="no such checkpoint tag"):
        check_deepspeed_tag(tmp_path / "c", "step9")


def test_tags_are_folder_names(tmp_path):
    with pytest.raises(ValueError, match="has no 'latest' file"):
        resolve_tag(tmp_path, None)
    (tmp_path / "latest").write_text("../../etc")
    with pytest.raises(ValueError, match="a tag is the name of one subfolder"):
        resolve_tag(tmp_path, None)
    assert resolve_tag(tmp_path, "step8") == "step8"


def test_deepspeed_engine_reads_checkpoints_through_the_allow_list(tmp_path):
    """``slimopt.launch.initialize`` points the engine's checkpoint reads at ``load_file``, so a
    file swapped in after ``check_deepspeed_tag`` still cannot run code inside DeepSpeed."""
    pytest.importorskip("deepspeed")
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    from slimopt.launch.zero import read_checkpoints_safely

    class Engine:
        checkpoint_engine = TorchCheckpointEngine()

    path, marker = tmp_path / "optim.pt", tmp_path / "MARKER"
    torch.save({"w": torch.ones(2)}, path)
    engine = Engine()
    read_checkpoints_safely(engine)
    assert torch.equal(engine.checkpoint_engine.load(str(path), map_location="cpu")["w"],
                       torch.ones(2))
    _plant(path, marker)
    with pytest.raises(ValueError, match="leave_marker"):
        engine.checkpoint_engine.load(str(path), map_location=torch.device("cpu"))
    assert not marker.exists()
