"""condmoe-eval, condmoe-export and condmoe-experts on a trained run: the model is built from the run's own
config.yaml, overrides that change the model are refused in one line, results of a changed evaluation never go over
the run's own, and a checkpoint of another model is one line naming the parameter (issue 16, item 5)."""

import json
import shutil
import sys

import pytest
import yaml
from conftest import REPO, run, torchrun

from condmoe.train.cli import eval_main, export_main
from condmoe.train.experts import main as experts_main
from condmoe.train.run_config import kind

CONFIG = str(REPO / "configs" / "demo.yaml")
SENTINEL = '{"the run\'s own": true}\n'


@pytest.fixture(scope="module")
def trained(tiny_data, tmp_path_factory):
    """A 2-step demo run (top-2, 4 experts) trained with moe.eval_capacity_factor=3 (demo.yaml: 2): a model key
    that only the run's config.yaml knows."""
    out = tmp_path_factory.mktemp("run") / "run"
    run([*torchrun(1), "-m", "condmoe.train", "--config", CONFIG, f"data.root={tiny_data}", f"run.output_dir={out}",
         "run.max_steps=2", "run.save_every=2", "run.log_every=1", "run.tensorboard=false", "moe.ep_size=1",
         "moe.eval_capacity_factor=3.0", "tasks.0.batch_size=8", "tasks.1.batch_size=8", "data.shuffle_buffer=50"])
    assert (out / "config.yaml").is_file() and (out / "checkpoints" / "step_2").is_dir()
    return out


def _args(trained, tiny_data, *overrides):
    return ["--config", CONFIG, f"data.root={tiny_data}", f"run.output_dir={trained}", *overrides]


def _one_error_line(capsys, prog: str) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), err
    assert "Traceback" not in err
    return lines[0]


def test_keys_are_sorted_into_model_evaluation_and_training_only():
    for key in ("moe.top_k", "moe.num_experts", "moa.num_heads", "model.img_size", "model.size", "data.tokenizer",
                "data.max_text_len", "tasks", "tasks.1.type"):
        assert kind(key) == "model", key
    for key in ("data.root", "data.num_frames", "tasks.0.dataset", "tasks.1.name", "moe.expert_backend"):
        assert kind(key) == "eval", key
    for key in ("run.max_steps", "run.output_dir", "optim.lr", "tasks.0.batch_size", "tasks.0.augment.hflip",
                "data.num_workers", "data.shuffle_buffer", "moe.ep_size", "deepspeed_config"):
        assert kind(key) == "none", key


def test_export_builds_the_runs_own_model_not_the_config_files(trained, tiny_data, tmp_path, capsys):
    assert export_main([*_args(trained, tiny_data), "--out", str(tmp_path / "export")]) == 0
    model_config = json.loads((tmp_path / "export" / "model_config.json").read_text())
    assert '"eval_capacity_factor": 3.0' in json.dumps(model_config), model_config  # demo.yaml says 2.0
    assert "eval_capacity_factor" in capsys.readouterr().err  # the note: --config differs there and is ignored


def _run_tool(tool: str, args: list[str], tmp_path) -> tuple[int, str]:
    """Runs condmoe-eval, condmoe-export or condmoe-experts usage in this process: (exit code, program name)."""
    if tool == "eval":
        return eval_main(args), "condmoe-eval"
    if tool == "export":
        return export_main([*args, "--out", str(tmp_path / "export")]), "condmoe-export"
    return experts_main(["usage", *args]), "condmoe-experts usage"


@pytest.mark.parametrize("tool", ["eval", "export", "experts"])
def test_overrides_that_change_the_model_are_refused_in_one_line(tool, trained, tiny_data, tmp_path, capsys):
    (trained / "eval.json").write_text(SENTINEL)
    (trained / "experts").mkdir(exist_ok=True)
    (trained / "experts" / "expert_usage.json").write_text(SENTINEL)
    args = _args(trained, tiny_data, "moe.top_k=1", "tasks.1.type=image_classification", "run.max_steps=7")
    code, prog = _run_tool(tool, args, tmp_path)
    assert code == 2
    line = _one_error_line(capsys, prog)
    assert "moe.top_k=1 (the run has 2)" in line and "tasks.1.type=image_classification" in line, line
    assert "run.max_steps" not in line  # training only: allowed
    assert (trained / "eval.json").read_text() == SENTINEL
    assert (trained / "experts" / "expert_usage.json").read_text() == SENTINEL
    assert not (tmp_path / "export").exists()


def test_changed_evaluations_are_written_beside_the_runs_own(trained, tiny_data, capsys):
    (trained / "eval.json").write_text(SENTINEL)
    assert eval_main(_args(trained, tiny_data, "data.num_frames=2", "--batch-size", "64")) == 0
    changed = trained / "eval.data.num_frames=2.json"
    assert f"condmoe-eval: wrote {changed}" in capsys.readouterr().err
    assert (trained / "eval.json").read_text() == SENTINEL
    metrics = json.loads(changed.read_text())
    assert set(metrics) == {"shapes_classification", "shapes_caption_retrieval"}

    # the run's own values again, and training-only keys: the run's own evaluation, into eval.json
    assert eval_main(_args(trained, tiny_data, "moe.top_k=2", "run.max_steps=99", "tasks.0.batch_size=2",
                           "--batch-size", "64")) == 0
    assert json.loads((trained / "eval.json").read_text()) == metrics  # num_frames only reaches video tasks

    (trained / "experts").mkdir(exist_ok=True)
    (trained / "experts" / "expert_usage.json").write_text(SENTINEL)
    assert experts_main(["usage", *_args(trained, tiny_data, "data.num_frames=2")]) == 0
    assert (trained / "experts" / "expert_usage.json").read_text() == SENTINEL
    usage = json.loads((trained / "experts.data.num_frames=2" / "expert_usage.json").read_text())
    assert usage["tasks"] == ["shapes_classification", "shapes_caption_retrieval"]


@pytest.fixture
def other_size(trained, tmp_path):
    """The trained run's folder whose config.yaml says another patch size: its checkpoint is of another model."""
    copy = tmp_path / "other"
    shutil.copytree(trained, copy)
    saved = yaml.safe_load((copy / "config.yaml").read_text())
    saved["model"]["patch_size"] = 16
    (copy / "config.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))
    return copy


@pytest.mark.parametrize("tool", ["eval", "export", "experts"])
def test_a_checkpoint_of_another_model_is_one_line_naming_the_parameter(tool, other_size, tiny_data, tmp_path,
                                                                         capsys):
    args = ["--config", str(other_size / "config.yaml"), f"data.root={tiny_data}"]
    code, prog = _run_tool(tool, args, tmp_path)
    assert code == 2
    line = _one_error_line(capsys, prog)
    assert "image_embed.pos_embed has shape (1, 16, 64) in the checkpoint, (1, 4, 64) in the model" in line, line


def test_a_data_root_with_another_tokenizer_is_refused(trained, tiny_data, tmp_path, capsys):
    """data.root names the tokenizer too (<root>/tokenizer): another vocabulary is another model."""
    other = tmp_path / "data"
    shutil.copytree(tiny_data / "tokenizer", other / "tokenizer")
    vocab = sorted((other / "tokenizer").iterdir())[0]
    vocab.write_bytes(vocab.read_bytes() + b"\n")
    assert eval_main(["--config", str(trained / "config.yaml"), f"data.root={other}"]) == 2
    assert f"data.root={other} (its tokenizer {other / 'tokenizer'} is not the run's" in _one_error_line(
        capsys, "condmoe-eval")


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
