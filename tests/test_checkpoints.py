"""Checkpoints that survive anything: the commit protocol and pruning, the condmoe.json record (and the format before
it), a save torn by SIGKILL, and resuming on a different world size / ep_size with the optimizer state (real
2-process DeepSpeed runs on CPU, gloo)."""

import json
import math
from pathlib import Path

import pytest
import yaml
from conftest import REPO, run, torchrun
from test_distributed import losses, small_config

from condmoe.train import checkpoint

MODEL = "mp_rank_00_model_states.pt"
EXPERT = "layer_0_expert_0_mp_rank_00_model_states.pt"
SHARD_1 = "zero_pp_rank_1_mp_rank_00_optim_states.pt"


def _fake_checkpoint(ckpt_dir: Path, step: int, committed: bool = True) -> Path:
    """A checkpoint of a one-rank dense model: a module file and one expert file, committed with their checksums."""
    import torch

    path = ckpt_dir / f"step_{step}"
    path.mkdir(parents=True)
    torch.save({"module": {"w": torch.full((64,), float(step))}}, path / "mp_rank_00_model_states.pt")
    torch.save({"e": torch.zeros(256)}, path / "layer_0_expert_0_mp_rank_00_model_states.pt")
    if committed:
        _commit(path, step)
    return path


def _commit(path: Path, step: int, files: bool = True) -> None:
    """Writes the record as ``checkpoint.save`` does (``files=False``: as format 2 did, without checksums)."""
    layout = checkpoint.Layout(1, 0, (checkpoint.RankLayout(1, 0, 0, 0),))
    sums = checkpoint.file_sums(path, checkpoint.data_files(path)) if files else None
    record = checkpoint.Record(step, layout, files=sums).to_json()
    if not files:
        record["format"] = 2
    (path / checkpoint.MARKER).write_text(json.dumps(record))


def test_latest_is_always_a_committed_checkpoint(tmp_path):
    ckpt = tmp_path / "checkpoints"
    assert checkpoint.latest_tag(ckpt) is None
    _fake_checkpoint(ckpt, 2)
    _fake_checkpoint(ckpt, 10)
    _fake_checkpoint(ckpt, 12, committed=False)  # torn: its save never finished
    (ckpt / "latest").write_text("step_2")
    assert checkpoint.latest_tag(ckpt) == "step_2"
    (ckpt / "latest").write_text("step_12")  # e.g. written by DeepSpeed's own save before every rank finished
    assert checkpoint.latest_tag(ckpt) == "step_10"
    (ckpt / "latest").unlink()
    assert checkpoint.latest_tag(ckpt) == "step_10"  # step 10 > step 2: numeric, not lexical


def test_find_names_the_bad_checkpoint(tmp_path):
    ckpt = tmp_path / "run" / "checkpoints"
    torn = _fake_checkpoint(ckpt, 4, committed=False)
    assert checkpoint.find(tmp_path / "run", "auto") is None
    assert checkpoint.find(tmp_path / "run", "none") is None
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        checkpoint.find(tmp_path / "run", str(torn))
    with pytest.raises(FileNotFoundError, match="no such checkpoint directory"):
        checkpoint.find(tmp_path / "run", str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="no committed checkpoint"):
        checkpoint.find(tmp_path / "run", str(ckpt))
    good = _fake_checkpoint(ckpt, 2)
    assert checkpoint.find(tmp_path / "run", str(ckpt)) == good
    assert checkpoint.find(tmp_path / "run", "auto") == good
    assert checkpoint.find(tmp_path / "run", str(good)) == good


def test_prune_keeps_the_last_committed_and_drops_old_torn_ones(tmp_path):
    ckpt = tmp_path / "checkpoints"
    for step in (1, 2, 4, 5):
        _fake_checkpoint(ckpt, step)
    _fake_checkpoint(ckpt, 3, committed=False)
    _fake_checkpoint(ckpt, 6, committed=False)  # newer than the latest: a save in progress elsewhere, left alone
    checkpoint._prune(ckpt, latest_step=5, keep_last=2)
    assert sorted(p.name for p in ckpt.iterdir()) == ["step_4", "step_5", "step_6"]


def test_prune_never_deletes_the_checkpoint_just_committed(tmp_path):
    """A newer committed checkpoint of another timeline (a run restarted with run.resume=none) must not push out the
    one just written (it did, leaving `latest` pointing at nothing)."""
    ckpt = tmp_path / "checkpoints"
    _fake_checkpoint(ckpt, 9)
    _fake_checkpoint(ckpt, 3)
    checkpoint._prune(ckpt, latest_step=3, keep_last=1)
    assert sorted(p.name for p in ckpt.iterdir()) == ["step_3", "step_9"]
    _fake_checkpoint(ckpt, 6)
    checkpoint._prune(ckpt, latest_step=6, keep_last=1)
    assert sorted(p.name for p in ckpt.iterdir()) == ["step_6", "step_9"]


# condmoe.json as the code before format 2 wrote it (68853e6, 2 ranks, ep_size 2, ZeRO-2, a MoE model with 2 tasks):
# no "format", each rank's stream positions in its entry, the expert-usage EMA at the top.
FORMAT_1 = """{
 "step": 3,
 "world_size": 2,
 "zero_stage": 2,
 "ep_size": 2,
 "num_experts": 4,
 "ranks": [
  {"ep_rank": 0, "expert_dp_rank": 0, "stream_positions": [1, 2]},
  {"ep_rank": 1, "expert_dp_rank": 0, "stream_positions": [0, 3]}
 ],
 "expert_usage_ema": {
  "share": [[[0.25, 0.25, 0.25, 0.25], [0.5, 0.25, 0.125, 0.125]], [[0.1, 0.4, 0.3, 0.2], [0.4, 0.3, 0.2, 0.1]]],
  "started": [true, true]
 }
}
"""


class FakePart:
    """A stateful part as the trainer hands them to checkpoints."""

    def __init__(self, state: dict):
        self.state = state

    def state_dict(self) -> dict:
        return self.state

    def load_state_dict(self, state: dict) -> None:
        self.state = state


def test_a_format_1_record_reads_as_the_typed_record(tmp_path):
    (tmp_path / checkpoint.MARKER).write_text(FORMAT_1)
    record = checkpoint.read(tmp_path)
    layout = record.layout
    assert (record.step, layout.world_size, layout.zero_stage, layout.ep_size, layout.num_experts) == (3, 2, 2, 2, 4)
    assert layout.ranks == (checkpoint.RankLayout(2, 4, 0, 0), checkpoint.RankLayout(2, 4, 1, 0))
    assert [record.rank_state(rank, "stream_positions") for rank in (0, 1)] == [[1, 2], [0, 3]]
    usage, counters = FakePart({}), FakePart({"skipped_micro_steps": 7})
    record.load_states({"expert_usage_ema": usage, "trainer": counters})
    assert usage.state["started"] == [True, True] and usage.state["share"][1][0] == [0.1, 0.4, 0.3, 0.2]
    assert counters.state == {"skipped_micro_steps": 7}  # format 1 did not checkpoint it: the part keeps its own
    # Written again, it is format 2 with the same layout and states.
    again = checkpoint.Record.from_json(json.loads(json.dumps(record.to_json())))
    assert again == record and record.to_json()["format"] == checkpoint.FORMAT


def test_a_format_1_record_without_states_reads(tmp_path):
    """What a dense model's checkpoint, or one saved before the first log interval, held."""
    (tmp_path / checkpoint.MARKER).write_text(json.dumps({
        "step": 2, "world_size": 1, "zero_stage": 0, "ep_size": 1, "num_experts": 0,
        "ranks": [{"ep_rank": 0, "expert_dp_rank": 0}]}))
    record = checkpoint.read(tmp_path)
    assert record.states == {} and record.rank_states == () and record.rank_state(0, "stream_positions") is None
    assert record.layout.ranks == (checkpoint.RankLayout(1, 0, 0, 0),)


def test_a_record_round_trips_with_its_named_states(tmp_path):
    layout = checkpoint.Layout(2, 1, (checkpoint.RankLayout(1, 4, 0, 0), checkpoint.RankLayout(1, 4, 0, 1)))
    record = checkpoint.Record(5, layout, {"trainer": {"skipped_micro_steps": 1}},
                               ({"stream_positions": [3, 2]}, {"stream_positions": [1, 4]}))
    (tmp_path / checkpoint.MARKER).write_text(json.dumps(record.to_json()))
    assert checkpoint.read(tmp_path) == record
    assert json.loads((tmp_path / checkpoint.MARKER).read_text())["ranks"][1] == {
        "ep_rank": 0, "expert_dp_rank": 1, "stream_positions": [1, 4]}


@pytest.mark.parametrize("text, reason", [
    ("", "Expecting value"),
    (FORMAT_1[:200], "Expecting"),  # cut short, e.g. a full disk
    ("[1, 2]", "a JSON object was expected"),
    (FORMAT_1.replace('"zero_stage": 2,', ""), "missing key 'zero_stage'"),
    (FORMAT_1.replace('"step": 3', '"step": "3"'), "'step' must be an integer"),
    (FORMAT_1.replace('"world_size": 2', '"world_size": 3'), "must list world_size=3 ranks"),
    (FORMAT_1.replace('"step": 3', '"format": 99, "step": 3'), "format 99"),
])
def test_an_unreadable_record_is_a_one_line_error_naming_the_file(tmp_path, text, reason):
    marker = tmp_path / checkpoint.MARKER
    marker.write_text(text)
    with pytest.raises(ValueError, match=reason) as error:
        checkpoint.read(tmp_path)
    assert str(error.value).startswith(f"{marker}: unreadable checkpoint record: ") and "\n" not in str(error.value)


def test_a_state_cannot_take_a_layout_key():
    layout = checkpoint.Layout(1, 2, (checkpoint.RankLayout(1, 0, 0, 0),))
    with pytest.raises(AssertionError):
        checkpoint.Record(1, layout, {"world_size": 3})
    with pytest.raises(AssertionError):
        checkpoint.Record(1, layout, {}, ({"ep_rank": 1},))


def test_evaluation_during_training_needs_the_val_splits_up_front(tiny_data, tmp_path):
    import shutil

    from condmoe.train.config import load_config

    root = tmp_path / "data"
    shutil.copytree(tiny_data, root)
    shutil.rmtree(root / "image" / "val")
    overrides = [f"data.root={root}", "run.save_every=2"]
    load_config(REPO / "configs" / "demo.yaml", overrides).validate_paths()  # no evaluation: fine
    with pytest.raises(FileNotFoundError, match="image/val"):
        load_config(REPO / "configs" / "demo.yaml", [*overrides, "run.eval_every=2"]).validate_paths()


# Real runs: 2 ranks, ep_size 2, ZeRO-2, 6 steps with a checkpoint at 3 and 6 (shared by the tests below).

@pytest.fixture(scope="module", name="reference")
def reference_fixture(tiny_data, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reference")
    cfg = small_config(tmp, tiny_data)
    run([*torchrun(2), "-m", "condmoe.train", "--config", str(cfg), f"run.output_dir={tmp / 'run'}"])
    return cfg, tmp / "run"


@pytest.mark.slow
def test_a_save_torn_by_sigkill_never_becomes_latest(reference, tmp_path):
    cfg, full = reference
    torn = tmp_path / "torn"
    proc = run([*torchrun(2), str(REPO / "tests" / "dist_check_faults.py"), "torn-save", "6", "--config", str(cfg),
                f"run.output_dir={torn}"], check=False)
    assert proc.returncode != 0
    ckpt = torn / "checkpoints"
    assert (ckpt / "latest").read_text().strip() == "step_3"
    assert (ckpt / "step_6").is_dir() and not checkpoint.is_complete(ckpt / "step_6")  # the torn one is there...
    assert checkpoint.find(torn, "auto") == ckpt / "step_3"  # ...and never chosen
    run([*torchrun(2), "-m", "condmoe.train", "--config", str(cfg), f"run.output_dir={torn}"])
    for rank in (0, 1):
        want, got = losses(full, rank), losses(torn, rank)  # later lines win: the rerun's
        assert [got[step] for step in range(6)] == [want[step] for step in range(6)], rank
    assert checkpoint.latest_tag(ckpt) == "step_6" and checkpoint.is_complete(ckpt / "step_6")


@pytest.mark.slow
def test_resharded_round_trip_is_exact(reference, tmp_path):
    """ep 2 on 2 ranks -> 1 rank -> 2 ranks with ep 1: each load-then-save reproduces every weight, Adam moment,
    step count and the schedule bit for bit."""
    cfg, full = reference
    source = full / "checkpoints" / "step_3"
    one, two = tmp_path / "one", tmp_path / "two"
    script = str(REPO / "tests" / "dist_check_reshard.py")
    assert "RESHARD-OK" in run([*torchrun(1), script, str(cfg), str(source), str(one), "moe.ep_size=1"]).stdout
    assert "RESHARD-OK" in run([*torchrun(2), script, str(cfg), str(one / "checkpoints" / "step_3"), str(two),
                                "moe.ep_size=1"]).stdout


@pytest.mark.slow
def test_resume_on_another_layout_continues_training_with_the_optimizer_state(reference, tmp_path):
    cfg, full = reference
    train = ["-m", "condmoe.train", "--config", str(cfg)]
    # Same ranks, ep_size 2 -> 1: the same data, so the same losses up to float summation order. Adam's moments
    # matter here: resuming with fresh moments moved these losses by 1e-4 to 6e-3 (relative); with them, ~2e-7.
    ep1 = tmp_path / "ep1"
    run([*torchrun(2), *train, f"run.output_dir={ep1}", "moe.ep_size=1", f"run.resume={full / 'checkpoints'}/step_3"])
    for rank in (0, 1):
        want, got = losses(full, rank), losses(ep1, rank)
        assert sorted(got) == [3, 4, 5]
        for step in (3, 4, 5):
            assert got[step][0] == want[step][0]
            assert got[step][1] == pytest.approx(want[step][1], rel=1e-5, abs=0), (rank, step)

    # 2 ranks / ep 2 -> 1 rank / ep 1 -> 2 ranks / ep 1, training on at each stage.
    one, two = tmp_path / "one", tmp_path / "two"
    run([*torchrun(1), *train, f"run.output_dir={one}", "moe.ep_size=1", "run.max_steps=5",
         f"run.resume={full / 'checkpoints' / 'step_3'}"])
    assert sorted(losses(one, 0)) == [3, 4]
    run([*torchrun(2), *train, f"run.output_dir={two}", "moe.ep_size=1", "run.max_steps=7",
         f"run.resume={one / 'checkpoints'}"])
    for rank in (0, 1):
        assert sorted(losses(two, rank)) == [5, 6]
        assert all(math.isfinite(loss) for _, loss in losses(two, rank).values())
    # The schedule went on: warmup at step 7 of 50 (lr 1e-3 x 8/50), not restarted.
    metrics = [json.loads(line) for line in (two / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["step"] == 7 and metrics[-1]["lr"] == pytest.approx(1e-3 * 8 / 50)
    assert checkpoint.read(two / "checkpoints" / "step_7").layout.world_size == 2


@pytest.mark.slow
@pytest.mark.parametrize("ds_config", ["zero1_cpu.json", "zero2_bf16.json"])
def test_resharding_zero1_and_bf16_checkpoints(tiny_data, tmp_path, ds_config):
    """ZeRO-1 shards, and bf16 training (bf16 weights, fp32 master copy in the shards), reshard exactly too."""
    cfg = small_config(tmp_path, tiny_data, **{"run.max_steps": 3, "deepspeed_config": f"ds_configs/{ds_config}"})
    run([*torchrun(2), "-m", "condmoe.train", "--config", str(cfg), f"run.output_dir={tmp_path / 'run'}"])
    source = tmp_path / "run" / "checkpoints" / "step_3"
    assert (source / f"{'bf16_' if 'bf16' in ds_config else ''}zero_pp_rank_1_mp_rank_00_optim_states.pt").is_file()
    assert checkpoint.verify(source) is True  # sha256 recorded; each file unpickles with weights_only + allow-list
    proc = run([*torchrun(1), str(REPO / "tests" / "dist_check_reshard.py"), str(cfg), str(source),
                str(tmp_path / "one"), "moe.ep_size=1"])
    assert "RESHARD-OK" in proc.stdout


@pytest.mark.slow
def test_a_bad_shard_found_by_rank_0_while_resharding_ends_every_rank(reference, tmp_path):
    """Rank 0 alone reads the shards when resharding: its error must reach the other ranks (not leave them waiting
    in a collective)."""
    import shutil

    import torch

    cfg, full = reference
    source = tmp_path / "source"
    shutil.copytree(full / "checkpoints" / "step_3", source)
    # A shard that verifies (its checksum re-committed) but lacks what resharding reads: a KeyError on rank 0.
    torch.save({"optimizer_state_dict": {}}, source / SHARD_1)
    record = json.loads((source / checkpoint.MARKER).read_text())
    record["files"][SHARD_1] = vars(checkpoint.file_sums(source, [SHARD_1])[SHARD_1])
    (source / checkpoint.MARKER).write_text(json.dumps(record))
    proc = run([*torchrun(2), "-m", "condmoe.train", "--config", str(cfg), f"run.output_dir={tmp_path / 'run'}",
                "moe.ep_size=1", f"run.resume={source}"], timeout=120, check=False)
    assert proc.returncode != 0
    assert proc.stderr.count("rank 0: ") >= 2, proc.stderr[-3000:]  # both ranks report rank 0's error


@pytest.mark.slow
def test_a_corrupt_record_stops_the_resume_with_a_one_line_error(reference, tmp_path):
    import shutil

    cfg, full = reference
    source = tmp_path / "source"
    shutil.copytree(full / "checkpoints" / "step_3", source)
    (source / checkpoint.MARKER).write_text('{"step": 3, "world_')
    proc = run([*torchrun(2), "-m", "condmoe.train", "--config", str(cfg), f"run.output_dir={tmp_path / 'run'}",
                f"run.resume={source}"], timeout=120, check=False)
    assert proc.returncode != 0
    message = f"condmoe-train: error: {source / checkpoint.MARKER}: unreadable checkpoint record: "
    assert proc.stderr.count(message) == 2, proc.stderr[-3000:]  # each rank's, exit code 2 (torchrun's is 1)
    assert "exitcode  : 2" in proc.stderr


@pytest.mark.slow
@pytest.mark.parametrize("ds_config, overrides", [("zero2_offload_bf16.json", []),
                                                  ("zero3_dense_bf16.json", ["moe.num_experts=0"])])
def test_shipped_deepspeed_configs_train(tiny_data, tmp_path, ds_config, overrides):
    cfg = small_config(tmp_path, tiny_data, **{"run.max_steps": 2, "deepspeed_config": f"ds_configs/{ds_config}"})
    if "zero3" in ds_config:  # ZeRO-3 takes one task type (train.engine.load_ds_config)
        data = yaml.safe_load(cfg.read_text())
        data["tasks"] = data["tasks"][:1]
        cfg.write_text(yaml.safe_dump(data))
    run([*torchrun(2), "-m", "condmoe.train", "--config", str(cfg), f"run.output_dir={tmp_path / 'run'}", *overrides])
    for rank in (0, 1):
        assert sorted(losses(tmp_path / "run", rank)) == [0, 1]
    assert checkpoint.is_complete(tmp_path / "run" / "checkpoints" / "step_2")
