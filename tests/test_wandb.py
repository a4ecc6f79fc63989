"""run.wandb: rank 0 logs to Weights & Biases, offline here (WANDB_MODE=offline), with the resolved config; a resume
continues the same run id."""

import pytest
from conftest import REPO, run, torchrun

from condmoe.train.run_log import _wandb_scalars


def test_wandb_scalars_by_hand():
    record = {"loss": 2.0, "aux_loss": 0.1, "lr": 1e-3, "grad_norm": None, "mfu": None, "eta_s": 5.0,
              "task_loss": {"a": 1.5}}
    assert _wandb_scalars(record) == {"train/loss": 2.0, "train/aux_loss": 0.1, "train/lr": 1e-3, "train/eta_s": 5.0,
                                      "task_loss/a": 1.5}


@pytest.mark.slow
def test_an_offline_wandb_run_with_the_config_resumes_the_same_run(tiny_data, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    args = ["-m", "condmoe.train", "--config", str(REPO / "configs" / "demo.yaml"), f"data.root={tiny_data}",
            f"run.output_dir={out}", "run.wandb=true", "run.log_every=1", "run.tensorboard=false",
            "data.shuffle_buffer=50", "tasks.0.batch_size=8", "tasks.1.batch_size=8"]
    run([*torchrun(1), *args, "run.max_steps=2", "moe.ep_size=1"])
    run_id = (out / "wandb_id").read_text().strip()
    runs = sorted((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and runs[0].name.endswith(run_id)
    # offline, the run's records are protobuf in run-<id>.wandb (wandb-core writes no files/config.yaml): the config
    # and the metrics' keys are in it as written
    data = (runs[0] / f"run-{run_id}.wandb").read_bytes()
    assert all(key in data for key in (b"wandb_project", b"num_experts", b"train/loss", b"task_loss/", b"train/eta_s"))
    run([*torchrun(1), *args, "run.max_steps=3", "moe.ep_size=1"])  # resumed: the same id again
    assert (out / "wandb_id").read_text().strip() == run_id
    assert sorted(r.name.rsplit("-", 1)[1] for r in (out / "wandb").glob("offline-run-*")) == [run_id, run_id]
