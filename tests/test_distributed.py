"""Tier 2: real 2-process DeepSpeed runs on CPU over gloo (expert parallelism, ZeRO-2, checkpoint and resume)."""

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO, free_port, run, torchrun

pytestmark = pytest.mark.slow


def small_config(tmp_path: Path, data: Path, name: str = "cfg.yaml", **extra) -> Path:
    """The demo config shrunk: batch 8, 1 worker, ep_size 2 over 2 ranks, ZeRO-2."""
    cfg = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    cfg["data"].update(root=str(data), shuffle_buffer=50)
    cfg["run"].update(output_dir=str(tmp_path / "run"), log_every=1, save_every=3, keep_last=2, max_steps=6)
    for task in cfg["tasks"]:
        task["batch_size"] = 8
    for key, value in extra.items():
        section, _, field = key.rpartition(".")
        (cfg[section] if section else cfg)[field] = value
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg))
    return path


def losses(output_dir: Path, rank: int) -> dict[int, tuple[str, float]]:
    lines = (output_dir / f"train_rank{rank}.jsonl").read_text().splitlines()
    return {r["step"]: (r["task"], r["loss"]) for r in map(json.loads, lines)}


def test_ep2_zero2_checkpoint_resume_continues_exactly(tiny_data, tmp_path):
    cfg = small_config(tmp_path, tiny_data)
    data = yaml.safe_load(cfg.read_text())  # seeded augmentation and mixup must replay exactly too
    data["tasks"][0]["augment"] = {"random_resized_crop": True, "mixup": 0.8, "cutmix": 1.0}
    cfg.write_text(yaml.safe_dump(data))
    full, split = tmp_path / "full", tmp_path / "split"
    train = [*torchrun(2), "-m", "condmoe.train", "--config", str(cfg)]
    run([*train, f"run.output_dir={full}"])
    run([*train, f"run.output_dir={split}", "run.max_steps=3"])
    run([*train, f"run.output_dir={split}"])  # resumes from step_3 (auto)

    for rank in (0, 1):
        uninterrupted, resumed = losses(full, rank), losses(split, rank)
        assert sorted(uninterrupted) == sorted(resumed) == list(range(6))
        for step in range(6):
            assert resumed[step] == uninterrupted[step], (rank, step)  # same task, bitwise-equal loss
    # the per-task expert-usage EMA is carried through the checkpoint too
    usage = [json.loads((run_dir / "expert_usage_ema.json").read_text()) for run_dir in (full, split)]
    assert usage[0] == usage[1] and torch.tensor(usage[0]["share"]).sum() > 0
    tasks = {task for rank in (0, 1) for task, _ in losses(full, rank).values()}
    assert tasks == {"shapes_classification", "shapes_caption_retrieval"}  # ranks drew different tasks

    ckpt = full / "checkpoints"
    assert (ckpt / "latest").read_text().strip() == "step_6"
    assert sorted(p.name for p in ckpt.iterdir() if p.is_dir()) == ["step_3", "step_6"]
    # DeepSpeed's per-global-expert files: 2 MoE layers (blocks 0 and 2) x 4 experts, written by both EP ranks.
    names = {p.name for p in (ckpt / "step_6").iterdir()}
    for layer in range(2):
        for expert in range(4):
            assert f"layer_{layer}_expert_{expert}_mp_rank_00_model_states.pt" in names
    assert {"zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"} <= names

    # Each rank's stream positions are recorded (batches drawn per task), and win over a changed task mix.
    record = json.loads((ckpt / "step_3" / "condmoe.json").read_text())
    for rank in (0, 1):
        drawn = [task for task, _ in (losses(full, rank)[step] for step in range(3))]
        names = [t["name"] for t in data["tasks"]]
        assert record["ranks"][rank]["stream_positions"] == [drawn.count(name) for name in names]
    proc = run([*train, f"run.output_dir={tmp_path / 'remix'}", f"run.resume={ckpt / 'step_3'}", "run.max_steps=4",
                "tasks.0.weight=50"])
    assert "the task mix differs from the checkpoint's" in proc.stderr


def test_each_rank_holds_different_experts(tiny_data, tmp_path):
    cfg = small_config(tmp_path, tiny_data)
    proc = run([*torchrun(2), str(REPO / "tests" / "dist_check_experts.py"), str(cfg)])
    assert "EXPERT-CHECKS-OK" in proc.stdout


def test_deepspeed_launcher_two_ranks(tiny_data, tmp_path):
    cfg = small_config(tmp_path, tiny_data, **{"run.max_steps": 2})
    launcher = shutil.which("deepspeed", path=str(Path(sys.executable).parent))
    assert launcher, "the deepspeed launcher is installed with deepspeed"
    run([launcher, "--num_gpus", "2", "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
         "--module", "condmoe.train", "--config", str(cfg)])
    for rank in (0, 1):
        assert sorted(losses(tmp_path / "run", rank)) == [0, 1]
    assert (tmp_path / "run" / "checkpoints" / "step_2").is_dir()


@pytest.mark.parametrize("config", ["demo_modsquad.yaml", "demo_attribute.yaml"])
def test_conditional_configs_train_on_two_ranks(tiny_data, tmp_path, config):
    """Mod-Squad (task gates, MoA, MI over ranks, ep_size 2) and attribute routing train and checkpoint."""
    run([*torchrun(2), "-m", "condmoe.train", "--config", str(REPO / "configs" / config), f"data.root={tiny_data}",
         f"run.output_dir={tmp_path / 'run'}", "run.max_steps=3", "run.log_every=1", "tasks.0.batch_size=8",
         "tasks.1.batch_size=8", "data.shuffle_buffer=50"])
    for rank in (0, 1):
        assert sorted(losses(tmp_path / "run", rank)) == [0, 1, 2]
    assert (tmp_path / "run" / "checkpoints" / "step_3").is_dir()
    ema = json.loads((tmp_path / "run" / "expert_usage_ema.json").read_text())
    share = torch.tensor(ema["share"])  # [tasks, routed layers, experts]
    assert share.shape[:2] == (2, len(ema["layers"])) and len(ema["layers"]) >= 2
    ran = share.sum(dim=(1, 2)) > 0
    assert ran.any()  # the EMA holds real shares (it once held zeros: the tally was reset through an alias)
    assert torch.allclose(share[ran].sum(-1), torch.ones_like(share[ran].sum(-1)), atol=1e-5)


def test_sigusr1_checkpoints_every_rank_and_exits_for_requeue(tiny_data, tmp_path):
    """A stop signal reaching one rank: both ranks finish the step, checkpoint, exit 75; the run then resumes."""
    import signal
    import subprocess
    import time

    import psutil
    from conftest import subprocess_env

    cfg = small_config(tmp_path, tiny_data, **{"run.max_steps": 10000, "run.save_every": 10000})
    out = tmp_path / "run"
    proc = subprocess.Popen([*torchrun(2), "-m", "condmoe.train", "--config", str(cfg)], cwd=REPO, env=subprocess_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not (out / "train_rank1.jsonl").is_file():
            time.sleep(0.5)
        assert (out / "train_rank1.jsonl").is_file(), "training did not start"
        workers = psutil.Process(proc.pid).children()  # the two ranks (their data workers are grandchildren)
        assert len(workers) == 2
        workers[0].send_signal(signal.SIGUSR1)  # only one rank hears it
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    tag = (out / "checkpoints" / "latest").read_text().strip()
    stopped_at = int(tag.removeprefix("step_"))
    assert 0 < stopped_at < 10000
    for rank in (0, 1):
        assert max(losses(out, rank)) == stopped_at - 1  # both ranks stopped after the same step
    output = proc.stdout.read()
    # torchrun's elastic agent turns any rank's non-zero exit into its own 1 and names the rank's code in its report
    # (docs/slurm.md); srun and the deepspeed launcher exit 75 themselves (tests/test_slurm.py).
    assert proc.returncode == 1 and "exitcode  : 75" in output, output[-3000:]
    assert "terminate called" not in output and "communication threads still run" not in output, output[-3000:]
    run([*torchrun(2), "-m", "condmoe.train", "--config", str(cfg), f"run.max_steps={stopped_at + 2}"])
    assert sorted(losses(out, 0))[-1] == stopped_at + 1


def test_transfer_to_a_new_task_on_frozen_experts(tiny_data, tmp_path):
    """Train Mod-Squad, then fit a third task's gates and the heads with every expert frozen (2 ranks, ep_size 2)."""
    from condmoe.train.checkpoint import load_plain_state_dict

    common = [f"data.root={tiny_data}", "tasks.0.batch_size=8", "tasks.1.batch_size=8", "data.shuffle_buffer=50",
              "run.log_every=1"]
    config = str(REPO / "configs" / "demo_modsquad.yaml")
    source, target = tmp_path / "source", tmp_path / "target"
    run([*torchrun(2), "-m", "condmoe.train", "--config", config, *common, f"run.output_dir={source}",
         "run.max_steps=2"])
    new_task = ("tasks=[{name: shapes_classification, type: image_classification, dataset: image, batch_size: 8},"
                " {name: shapes_caption_retrieval, type: image_text_retrieval, dataset: image, batch_size: 8},"
                " {name: new_task, type: image_classification, dataset: image, batch_size: 8, weight: 10}]")
    run([*torchrun(2), "-m", "condmoe.train", "--config", config, *common[:1], new_task, "data.shuffle_buffer=50",
         f"run.output_dir={target}", "run.max_steps=3", f"run.init_from={source / 'checkpoints'}",
         "run.freeze=experts"])
    before = load_plain_state_dict(source / "checkpoints")
    after = load_plain_state_dict(target / "checkpoints")
    experts = [k for k in before if "experts.deepspeed_experts" in k or k.endswith(("q_weight", "o_weight"))]
    assert experts and all(torch.equal(before[k], after[k]) for k in experts)
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("blocks.0.attn.kv"))
    gates = [k for k in after if k.endswith("router.weight")]
    assert after[gates[0]].shape[0] == 3 and before[gates[0]].shape[0] == 2
    assert any(not torch.equal(after[k][2], torch.zeros_like(after[k][2])) for k in gates)  # the new task's gates


def test_synchronized_sampling_with_split_targets_and_gathered_negatives(tiny_data, tmp_path):
    cfg = small_config(tmp_path, tiny_data, **{"run.max_steps": 3})
    run([*torchrun(2), "-m", "condmoe.train", "--config", str(cfg), "run.task_sampling=synchronized",
         "tasks.0.split_targets=true", "tasks.1.gather_negatives=true"])
    tasks = [[losses(tmp_path / "run", rank)[s][0] for s in range(3)] for rank in (0, 1)]
    assert tasks[0] == tasks[1]  # every rank ran the same task at every step


@pytest.mark.parametrize("accumulation, poisoned_call", [(1, 2), (2, 1), (2, 2)])
def test_non_finite_loss_on_one_rank_is_skipped_by_all(tiny_data, tmp_path, accumulation, poisoned_call):
    """Also mid-accumulation (call 1 of 2) and at the accumulation boundary (call 2 of 2): DeepSpeed still takes one
    optimizer step per trainer step (it once drifted by a micro-step, and the schedule with it)."""
    cfg = small_config(tmp_path, tiny_data, **{"run.gradient_accumulation_steps": accumulation})
    proc = run([*torchrun(2), str(REPO / "tests" / "dist_check_guard.py"), str(cfg), str(poisoned_call)])
    assert "GUARD-OK" in proc.stdout


def test_sigkill_mid_run_then_resume_gives_the_uninterrupted_losses(tiny_data, tmp_path):
    """kill -9 the launcher at some step: the ranks follow it (parent-death signal) instead of training on as orphans;
    the rerun resumes from the last complete checkpoint and every step's loss equals the uninterrupted run's."""
    import os
    import signal
    import subprocess
    import time

    import psutil
    from conftest import subprocess_env

    reference = tmp_path / "reference"
    cfg = small_config(tmp_path, tiny_data, **{"run.max_steps": 8, "run.save_every": 2})
    run([*torchrun(2), "-m", "condmoe.train", "--config", str(cfg), f"run.output_dir={reference}"])

    killed = tmp_path / "killed"
    cmd = [*torchrun(2), "-m", "condmoe.train", "--config", str(cfg), f"run.output_dir={killed}", "run.max_steps=1000"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    ranks = []
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            log = killed / "train_rank0.jsonl"
            if log.is_file() and len(log.read_text().splitlines()) >= 5:
                break
            time.sleep(0.2)
        ranks = psutil.Process(proc.pid).children()  # in sessions of their own: the killpg below misses them
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # no handler runs in torchrun: a crash of the launcher
        proc.wait(timeout=60)
    # The ranks must not train on as orphans (they did: a relaunch then shared the folder with them). They get the
    # stop signal when their launcher dies and leave within a step and a save.
    assert len(ranks) == 2
    gone, alive = psutil.wait_procs(ranks, timeout=60)
    for orphan in alive:
        orphan.kill()
    assert not alive, f"ranks {[p.pid for p in alive]} outlived their killed launcher"
    resumed_from = int((killed / "checkpoints" / "latest").read_text().strip().removeprefix("step_"))
    assert resumed_from >= 2
    run([*torchrun(2), "-m", "condmoe.train", "--config", str(cfg), f"run.output_dir={killed}"])
    for rank in (0, 1):
        want, got = losses(reference, rank), losses(killed, rank)  # later lines win: the rerun's
        assert all(got[step] == want[step] for step in range(8)), rank


def test_prompt_tuning_run_from_a_checkpoint(tiny_data, tmp_path):
    """Pre-train, then prompt-tune (new prompts; everything but prompts, norms and temperatures frozen) on 2 ranks."""
    from condmoe.train.checkpoint import load_plain_state_dict

    source, tuned = tmp_path / "source", tmp_path / "tuned"
    cfg = small_config(tmp_path, tiny_data, **{"run.max_steps": 2})
    run([*torchrun(2), "-m", "condmoe.train", "--config", str(cfg), f"run.output_dir={source}"])
    run([*torchrun(2), "-m", "condmoe.train", "--config", str(cfg), f"run.output_dir={tuned}", "run.max_steps=2",
         "model.num_prompts=4", "run.freeze=prompt", f"run.init_from={source / 'checkpoints'}"])
    before, after = load_plain_state_dict(source / "checkpoints"), load_plain_state_dict(tuned / "checkpoints")
    assert after["prompts"].shape == (2, 4, 4, 64)
    frozen = [k for k in before if "norm" not in k and not k.startswith(("ln_post", "logit_scale"))]
    assert all(torch.equal(before[k], after[k]) for k in frozen)
    assert not torch.equal(before["blocks.0.norm1.weight"], after["blocks.0.norm1.weight"])


def test_an_exception_mid_run_ends_the_job_instead_of_hanging(tiny_data, tmp_path):
    """Loader workers ignore SIGTERM (a stop signal to the process group must not kill them): after an exception the
    trainer must stop them itself, else the interpreter's exit waits for them forever."""
    cfg = small_config(tmp_path, tiny_data)
    proc = run([*torchrun(2), str(REPO / "tests" / "dist_check_faults.py"), "raise", "2", "--config", str(cfg)],
               timeout=120, check=False)
    assert proc.returncode != 0 and "injected fault at step 2" in proc.stderr


def test_activation_checkpointing_keeps_the_losses_with_expert_parallelism(tiny_data, tmp_path):
    """Recomputed blocks redo their all-to-alls in the backward pass; the losses stay bitwise those without."""
    cfg = small_config(tmp_path, tiny_data, **{"run.max_steps": 3})
    train = [*torchrun(2), "-m", "condmoe.train", "--config", str(cfg)]
    run([*train, f"run.output_dir={tmp_path / 'plain'}"])
    run([*train, f"run.output_dir={tmp_path / 'recomputed'}", "model.grad_checkpointing=true"])
    for rank in (0, 1):
        assert losses(tmp_path / "plain", rank) == losses(tmp_path / "recomputed", rank)
