"""Checkpoints that are checked before they load: sizes and sha256 in the commit record, weights_only=True
unpickling with an allow-list, the fallback to the newest checkpoint that verifies, condmoe-ckpt verify."""

import json
from pathlib import Path

import pytest
from conftest import REPO, run, torchrun
from test_checkpoints import (
    EXPERT,
    MODEL,
    SHARD_1,
    _commit,
    _fake_checkpoint,
    reference_fixture,  # noqa: F401  (the fixture `reference`: a real 2-rank run)
)
from test_distributed import losses

from condmoe.train import checkpoint

# Integrity: sizes and sha256 in the record, weights_only=True unpickling, fallback (train/checkpoint.py verify).

def _flip(file: Path, offset: int, count: int) -> None:
    data = bytearray(file.read_bytes())
    data[offset:offset + count] = bytes(b ^ 0xFF for b in data[offset:offset + count])
    file.write_bytes(bytes(data))


@pytest.mark.parametrize("damage, reason", [
    (lambda p: _flip(p / EXPERT, 600, 64), r"sha256 \w+\.\.\., \w+\.\.\. when committed \(corrupted\)"),
    (lambda p: (p / MODEL).write_bytes((p / MODEL).read_bytes()[:300]), "bytes, .* when committed"),
    (lambda p: (p / EXPERT).unlink(), "missing"),
    (lambda p: (p / "layer_0_expert_1_mp_rank_00_model_states.pt").write_bytes(b"x"), "not one of the checkpoint's"),
], ids=["64 bytes flipped", "cut short", "missing", "not recorded"])
def test_verify_names_a_damaged_file(tmp_path, damage, reason):
    path = _fake_checkpoint(tmp_path, 3)
    assert checkpoint.verify(path)
    damage(path)
    with pytest.raises(ValueError, match=reason) as error:
        checkpoint.verify(path)
    assert str(error.value).startswith(str(path / "layer_0_expert_")) or str(error.value).startswith(str(path / MODEL))
    assert "\n" not in str(error.value)


def test_auto_resume_falls_back_to_the_newest_checkpoint_that_verifies(tmp_path, caplog):
    ckpt = tmp_path / "run" / "checkpoints"
    for step in (2, 4, 6):
        _fake_checkpoint(ckpt, step)
    (ckpt / "latest").write_text("step_6")
    _flip(ckpt / "step_6" / MODEL, 700, 4096)
    with caplog.at_level("WARNING", logger="condmoe.checkpoint"):
        assert checkpoint.find(tmp_path / "run", "auto") == ckpt / "step_4"
    assert [r.getMessage() for r in caplog.records] == [
        f"skipping step_6: {ckpt / 'step_6' / MODEL}: " + caplog.records[0].getMessage().split(f"{MODEL}: ")[1]]
    assert checkpoint.find(tmp_path / "run", str(ckpt)) == ckpt / "step_4"  # a checkpoints folder: the same rule
    # A checkpoint named explicitly: no fallback, one line naming the file.
    with pytest.raises(ValueError, match=f"^{ckpt / 'step_6' / MODEL}: sha256 .* when committed"):
        checkpoint.find(tmp_path / "run", str(ckpt / "step_6"))
    # None verifies: one line.
    for step in (2, 4):
        (ckpt / f"step_{step}" / EXPERT).write_bytes(b"")
    with pytest.raises(ValueError, match="no committed checkpoint verifies") as error:
        checkpoint.find(tmp_path / "run", "auto")
    assert "\n" not in str(error.value) and str(ckpt / "step_2" / EXPERT) in str(error.value)


def test_latest_naming_a_missing_step_warns_once_and_uses_the_newest(tmp_path, caplog):
    ckpt = tmp_path / "run" / "checkpoints"
    _fake_checkpoint(ckpt, 2)
    _fake_checkpoint(ckpt, 4)
    (ckpt / "latest").write_text("step_9")
    with caplog.at_level("WARNING", logger="condmoe.checkpoint"):
        assert checkpoint.find(tmp_path / "run", "auto") == ckpt / "step_4"
    assert len(caplog.records) == 1 and "'step_9', which is not a committed checkpoint" in caplog.text


def test_a_checkpoint_without_checksums_loads_with_one_warning(tmp_path, caplog):
    path = _fake_checkpoint(tmp_path / "checkpoints", 2, committed=False)
    _commit(path, 2, files=False)  # format 2
    assert checkpoint.read(path).files is None and not checkpoint.verify(path)
    with caplog.at_level("WARNING", logger="condmoe.checkpoint"):
        assert checkpoint.find(tmp_path, "auto") == path
        assert checkpoint.load_plain_state_dict(path)["w"][0] == 2  # read again (as a reshard does): no new warning
    assert [r.getMessage() for r in caplog.records] == [f"{path} was committed without checksums ({checkpoint.MARKER} "
                                                        "before format 3): its files cannot be verified, only their "
                                                        "unpickling with weights_only=True was checked"]
    (path / MODEL).write_bytes(b"PK\x03\x04 cut short")  # unverifiable, yet still refused unread
    with pytest.raises(ValueError, match=f"^{path / MODEL}: "):
        checkpoint.find(tmp_path, str(path))


class RunsCode:
    """What a hostile checkpoint holds: unpickling it runs a shell command."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


def _hostile(path: Path, name: str, marker: Path) -> None:
    """Replaces a checkpoint file with one whose pickle runs code, and re-commits so its checksum matches (a whole
    checkpoint handed over by someone else)."""
    import torch

    record = json.loads((path / checkpoint.MARKER).read_text())
    torch.save({"module": {}, "optimizer_state_dict": RunsCode(marker)}, path / name)
    record["files"][name] = {"size": (path / name).stat().st_size, "sha256": checkpoint.file_sums(path, [name])[name]
                             .sha256}
    (path / checkpoint.MARKER).write_text(json.dumps(record))


def test_a_checkpoint_file_whose_pickle_runs_code_is_refused_unexecuted(tmp_path):
    marker = tmp_path / "pwned"
    path = _fake_checkpoint(tmp_path / "checkpoints", 2)
    _hostile(path, MODEL, marker)
    assert checkpoint.verify(path.parent / "step_2", []) is True  # checksums alone pass: the record was rewritten
    message = f"^{path / MODEL}: refused to unpickle posix.system "
    for load in (checkpoint.verify, checkpoint.load_plain_state_dict, lambda p: checkpoint.safe_load(p / MODEL),
                 lambda p: checkpoint.find(tmp_path, str(p))):
        with pytest.raises(ValueError, match=message):
            load(path)
    assert not marker.exists()


def test_condmoe_ckpt_verify_prints_a_line_per_checkpoint(tmp_path, capsys):
    import subprocess
    import sys

    from conftest import subprocess_env

    from condmoe.train import ckpt_cli

    def verify(target: Path) -> tuple[int, list[str], str]:
        code = ckpt_cli.main(["verify", str(target)])
        out = capsys.readouterr()
        return code, out.out.splitlines(), out.err

    ckpt = tmp_path / "run" / "checkpoints"
    for step in (2, 4):
        _fake_checkpoint(ckpt, step)
    _fake_checkpoint(ckpt, 6, committed=False)
    code, lines, _ = verify(tmp_path / "run")
    assert code == 0 and len(lines) == 3, lines
    assert lines[0].startswith(f"{ckpt / 'step_2'}: ok (2 files, ") and "sha256 and weights_only" in lines[0]
    assert lines[2].startswith(f"{ckpt / 'step_6'}: incomplete")
    _flip(ckpt / "step_4" / EXPERT, 900, 64)
    code, lines, _ = verify(ckpt)
    assert code == 1 and lines[1].startswith(f"{ckpt / 'step_4'}: FAILED: {ckpt / 'step_4' / EXPERT}: sha256")
    code, lines, _ = verify(ckpt / "step_2")
    assert code == 0 and len(lines) == 1 and lines[0].startswith(f"{ckpt / 'step_2'}: ok (")
    code, _, err = verify(tmp_path / "nowhere")
    assert code == 2 and err.startswith("condmoe-ckpt: error: ")
    # As a command (condmoe-ckpt once installed: setup.cfg console_scripts).
    proc = subprocess.run([sys.executable, "-m", "condmoe.train.ckpt_cli", "verify", str(ckpt / "step_4")], cwd=REPO,
                          env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and proc.stdout.startswith(f"{ckpt / 'step_4'}: FAILED: "), proc.stdout + proc.stderr


# The same on real checkpoints (the reference run: 2 ranks, ep_size 2, ZeRO-2, checkpoints at steps 3 and 6).

@pytest.mark.slow
def test_real_checkpoint_files_hold_only_allowed_types(reference):
    """What DeepSpeed writes (module, experts, ZeRO shards) unpickles with weights_only=True and the allow-list, and
    every allowed type is needed (ZeRO-1 and bf16 shards: test_resharding_zero1_and_bf16_checkpoints)."""
    import torch

    _, full = reference
    path = full / "checkpoints" / "step_6"
    assert checkpoint.verify(path) is True
    needed = set().union(*(torch.serialization.get_unsafe_globals_in_checkpoint(path / name)
                           for name in checkpoint.data_files(path)))
    assert needed == {f"{t.__module__}.{t.__qualname__}" for t in checkpoint.allowed_globals()}


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["4 KiB flipped in rank 1's ZeRO shard", "the module file cut short"])
def test_a_damaged_checkpoint_resumes_from_the_previous_one(reference, tmp_path, damage):
    """It used to load silently (the flipped shard: diverging losses) or crash with a PytorchStreamReader traceback
    (the cut file)."""
    import shutil

    cfg, full = reference
    copy = tmp_path / "run"
    shutil.copytree(full, copy)
    bad = copy / "checkpoints" / "step_6" / (SHARD_1 if "ZeRO" in damage else MODEL)
    if "flipped" in damage:
        _flip(bad, bad.stat().st_size // 2, 4096)
    else:
        bad.write_bytes(bad.read_bytes()[:bad.stat().st_size // 2])
    proc = run([*torchrun(2), "-m", "condmoe.train", "--config", str(cfg), f"run.output_dir={copy}"])
    assert proc.stderr.count(f"skipping step_6: {bad}: ") == 1, proc.stderr[-3000:]
    for rank in (0, 1):
        assert len((copy / f"train_rank{rank}.jsonl").read_text().splitlines()) == 6 + 3  # steps 3-5 again
        assert losses(copy, rank) == losses(full, rank)  # the rerun's (later lines win): the uninterrupted losses
    assert checkpoint.verify(copy / "checkpoints" / "step_6")  # written again


@pytest.mark.slow
def test_a_damaged_checkpoint_named_explicitly_is_a_one_line_error(reference, tmp_path, capsys):
    import shutil

    from condmoe.train.cli import eval_main

    cfg, full = reference
    source = tmp_path / "step_6"
    shutil.copytree(full / "checkpoints" / "step_6", source)
    _flip(source / MODEL, 50_000, 64)  # inside a weight tensor: condmoe-eval reported a wrong accuracy, exit 0
    proc = run([*torchrun(2), "-m", "condmoe.train", "--config", str(cfg), f"run.output_dir={tmp_path / 'run'}",
                f"run.resume={source}"], timeout=120, check=False)
    message = f"condmoe-train: error: {source / MODEL}: sha256 "
    assert proc.returncode != 0 and proc.stderr.count(message) == 2, proc.stderr[-3000:]  # each rank's
    assert eval_main(["--config", str(cfg), "--checkpoint", str(source)]) == 2
    assert capsys.readouterr().err.startswith(f"condmoe-eval: error: {source / MODEL}: sha256 ")
    proc = run([*torchrun(1), "-m", "condmoe.train", "--config", str(cfg), f"run.output_dir={tmp_path / 'init'}",
                "moe.ep_size=1", f"run.init_from={source}"], timeout=120, check=False)
    assert f"condmoe-train: error: {source / MODEL}: sha256 " in proc.stderr, proc.stderr[-3000:]


@pytest.mark.slow
def test_a_checkpoint_whose_pickle_runs_code_is_refused_before_deepspeed_reads_it(reference, tmp_path):
    """DeepSpeed's loader unpickles with weights_only=False: the verification's weights_only=True pass refuses the
    file first (it used to run the code)."""
    import shutil

    cfg, full = reference
    source, marker = tmp_path / "step_3", tmp_path / "pwned"
    shutil.copytree(full / "checkpoints" / "step_3", source)
    _hostile(source, SHARD_1, marker)  # the checksums match: a whole checkpoint someone handed over
    proc = run([*torchrun(2), "-m", "condmoe.train", "--config", str(cfg), f"run.output_dir={tmp_path / 'run'}",
                f"run.resume={source}"], timeout=120, check=False)
    message = f"condmoe-train: error: {source / SHARD_1}: refused to unpickle posix.system "
    assert proc.returncode != 0 and proc.stderr.count(message) == 2, proc.stderr[-3000:]
    assert not marker.exists()
