"""What a resumed run says about where it starts (train.trainer.resume_warnings), and a real run that says it."""

import pytest
from conftest import REPO, run, torchrun

from condmoe.train.config import load_config
from condmoe.train.trainer import resume_warnings

DEMO = REPO / "configs" / "demo.yaml"


def test_resuming_at_or_past_max_steps_says_nothing_will_train(tmp_path):
    cfg = load_config(DEMO, ["run.max_steps=10"])
    assert "nothing to train" in " ".join(resume_warnings(cfg, tmp_path, 10, None))
    assert resume_warnings(cfg, tmp_path, 9, None) == []


def test_a_folder_of_unfinished_checkpoints_only_is_named(tmp_path):
    (tmp_path / "checkpoints" / "step_3").mkdir(parents=True)  # no commit marker: torn
    cfg = load_config(DEMO)
    [warning] = resume_warnings(cfg, tmp_path, 0, None)
    assert "holds no complete checkpoint, only unfinished ones (step_3): starting from step 0" in warning
    assert resume_warnings(load_config(DEMO, ["run.resume=none"]), tmp_path, 0, None) == []


def test_a_changed_schedule_on_resume_names_the_keys():
    previous = load_config(DEMO, ["run.max_steps=40", "optim.warmup_steps=5"]).to_dict()
    cfg = load_config(DEMO, ["run.max_steps=60", "optim.warmup_steps=5"])
    [warning] = resume_warnings(cfg, REPO / "nonexistent", 20, previous)
    assert "resuming at step 20 with another learning-rate schedule (run.max_steps 40 -> 60)" in warning
    assert resume_warnings(cfg, REPO / "nonexistent", 20, cfg.to_dict()) == []


@pytest.mark.slow
def test_a_real_resume_warns_about_the_schedule_and_about_max_steps(tiny_data, tmp_path):
    from test_distributed import small_config

    cfg = small_config(tmp_path, tiny_data, **{"run.max_steps": 2, "run.save_every": 2, "moe.ep_size": 1})
    train = [*torchrun(1), "-m", "condmoe.train", "--config", str(cfg), f"run.output_dir={tmp_path / 'run'}"]
    run(train)
    again = run(train)  # at max_steps already
    assert "the checkpoint is at step 2, at or past run.max_steps=2: nothing to train" in again.stderr
    longer = run([*train, "run.max_steps=3"])
    assert "resuming at step 2 with another learning-rate schedule (run.max_steps 2 -> 3)" in longer.stderr
