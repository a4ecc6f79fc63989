"""Tests of train.config: YAML loading, ``_base_`` inheritance, ``key.sub=value`` overrides, validation, paths, save."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pytest
import yaml

from condmoe.train.config import (
    REPO_ROOT,
    Config,
    DataConfig,
    ModelConfig,
    MoEConfig,
    OptimConfig,
    RunConfig,
    TaskConfig,
    apply_overrides,
    load_config,
)

DEMO = REPO_ROOT / "configs" / "demo.yaml"
ONE_TASK = "tasks=[{name: cls, type: image_classification}]"


def _write(path: Path, data: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _raises_naming(field: str, *overrides: str, path: Path | None = DEMO) -> str:
    """Loads with ``overrides``, asserts a ValueError whose message names ``field``, returns the message."""
    with pytest.raises(ValueError) as info:
        load_config(path, list(overrides))
    message = str(info.value)
    assert field in message, f"{field!r} not named in {message!r}"
    return message


# --------------------------------------------------------------------------------------------------------------------
# The demo config
# --------------------------------------------------------------------------------------------------------------------


def test_demo_config_loads_with_typed_values():
    raw = yaml.safe_load(DEMO.read_text())
    cfg = load_config(DEMO)
    assert isinstance(cfg, Config)
    assert isinstance(cfg.run, RunConfig) and isinstance(cfg.data, DataConfig)
    assert isinstance(cfg.model, ModelConfig) and isinstance(cfg.moe, MoEConfig) and isinstance(cfg.optim, OptimConfig)
    # Every value in the file arrives unchanged, with the field's declared type (ints stay ints, floats are floats).
    for section in ("run", "data", "model", "moe", "optim"):
        built = getattr(cfg, section)
        for key, value in raw[section].items():
            got = getattr(built, key)
            assert got == value, f"{section}.{key}"
            assert type(got) is type(getattr(type(built)(), key)), f"{section}.{key} has type {type(got).__name__}"
    assert cfg.deepspeed_config == raw["deepspeed_config"]
    assert all(isinstance(t, TaskConfig) for t in cfg.tasks)
    assert [asdict(t) for t in cfg.tasks] == [{**asdict(TaskConfig(name="x")), **t} for t in raw["tasks"]]
    # Spot checks of values the demo is built around, and of defaults for keys the file leaves out.
    assert type(cfg.optim.lr) is float and type(cfg.run.max_steps) is int and type(cfg.tasks[0].weight) is float
    assert [t.type for t in cfg.tasks] == ["image_classification", "image_text_retrieval"]
    assert "drop_tokens" not in raw["moe"] and cfg.moe.drop_tokens is True
    assert "betas" not in raw["optim"] and cfg.optim.betas == (0.9, 0.95) and isinstance(cfg.optim.betas, tuple)
    assert cfg.tokenizer_dir == Path(raw["data"]["root"]) / "tokenizer"


def test_no_file_gives_defaults():
    cfg = load_config(None, [ONE_TASK])
    assert cfg.run == RunConfig() and cfg.moe == MoEConfig() and cfg.optim == OptimConfig()
    assert cfg.tasks == [TaskConfig(name="cls")]


def test_missing_config_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_config(tmp_path / "nope.yaml")


def test_tokenizer_dir_prefers_explicit_path():
    assert load_config(DEMO, ["data.tokenizer=/tmp/clip"]).tokenizer_dir == Path("/tmp/clip")


# --------------------------------------------------------------------------------------------------------------------
# _base_ inheritance
# --------------------------------------------------------------------------------------------------------------------


def test_base_inheritance_overrides_one_nested_key(tmp_path, monkeypatch):
    base = {
        "run": {"max_steps": 50, "seed": 3},
        "moe": {"num_experts": 8, "top_k": 2, "ep_size": 2},
        "tasks": [{"name": "a", "weight": 2.0}, {"name": "b", "type": "image_text_retrieval"}],
    }
    _write(tmp_path / "configs" / "base.yaml", base)
    # The base path is relative to the child file, not to the working directory.
    child = _write(tmp_path / "configs" / "exp" / "child.yaml", {"_base_": "../base.yaml", "moe": {"top_k": 1}})
    monkeypatch.chdir(tmp_path)
    cfg = load_config(child)
    assert cfg.moe.top_k == 1
    assert cfg.moe.num_experts == 8 and cfg.moe.ep_size == 2  # siblings of the overridden key are kept
    assert cfg.run.max_steps == 50 and cfg.run.seed == 3
    assert [(t.name, t.weight) for t in cfg.tasks] == [("a", 2.0), ("b", 1.0)]


def test_base_chain_and_list_replacement(tmp_path):
    _write(tmp_path / "a.yaml", {"run": {"max_steps": 10, "seed": 1}, "tasks": [{"name": "x"}, {"name": "y"}]})
    _write(tmp_path / "b.yaml", {"_base_": "a.yaml", "run": {"seed": 2}})
    c = _write(tmp_path / "c.yaml", {"_base_": "b.yaml", "run": {"log_every": 5}, "tasks": [{"name": "z"}]})
    cfg = load_config(c)
    assert (cfg.run.max_steps, cfg.run.seed, cfg.run.log_every) == (10, 2, 5)
    assert [t.name for t in cfg.tasks] == ["z"]  # lists are replaced, not merged


def test_base_can_be_the_demo_by_absolute_path(tmp_path):
    child = _write(tmp_path / "child.yaml", {"_base_": str(DEMO), "optim": {"lr": 0.01}})
    cfg = load_config(child)
    demo = load_config(DEMO)
    assert cfg.optim.lr == pytest.approx(0.01)
    assert cfg.optim.min_lr == demo.optim.min_lr and cfg.tasks == demo.tasks and cfg.moe == demo.moe


def test_overrides_apply_after_base_merge(tmp_path):
    _write(tmp_path / "base.yaml", {"run": {"max_steps": 10}, "tasks": [{"name": "x"}]})
    child = _write(tmp_path / "child.yaml", {"_base_": "base.yaml", "run": {"max_steps": 20}})
    assert load_config(child, ["run.max_steps=30"]).run.max_steps == 30


def test_base_cycle_raises(tmp_path):
    _write(tmp_path / "a.yaml", {"_base_": "b.yaml", "tasks": [{"name": "x"}]})
    _write(tmp_path / "b.yaml", {"_base_": "a.yaml"})
    with pytest.raises(ValueError, match="cycle"):
        load_config(tmp_path / "a.yaml")


def test_base_self_cycle_raises(tmp_path):
    _write(tmp_path / "self.yaml", {"_base_": "self.yaml", "tasks": [{"name": "x"}]})
    with pytest.raises(ValueError, match="cycle"):
        load_config(tmp_path / "self.yaml")


def test_missing_base_raises(tmp_path):
    _write(tmp_path / "child.yaml", {"_base_": "gone.yaml", "tasks": [{"name": "x"}]})
    with pytest.raises(FileNotFoundError, match="gone.yaml"):
        load_config(tmp_path / "child.yaml")


# --------------------------------------------------------------------------------------------------------------------
# Overrides
# --------------------------------------------------------------------------------------------------------------------


def test_overrides_nested_keys_and_list_index():
    cfg = load_config(DEMO, ["moe.top_k=1", "tasks.0.weight=3", "tasks.1.batch_size=8", "run.seed=7"])
    assert cfg.moe.top_k == 1
    assert cfg.tasks[0].weight == 3.0 and type(cfg.tasks[0].weight) is float
    assert cfg.tasks[1].batch_size == 8
    assert cfg.tasks[1].weight == 1.0  # the other task is untouched
    assert cfg.run.seed == 7


def test_overrides_are_typed_as_yaml():
    cfg = load_config(DEMO, [
        "moe.drop_tokens=false",
        "optim.lr=0.5",
        "model.drop_path_rate=1",
        "run.max_steps=5.0",
        "run.output_dir=runs/x=y",
        "run.resume='123'",
        "optim.betas=[0.8, 0.99]",
        "moe.gate_noise_std=1.0e-2",
    ])
    assert cfg.moe.drop_tokens is False
    assert cfg.optim.lr == 0.5
    assert cfg.model.drop_path_rate == 1.0 and type(cfg.model.drop_path_rate) is float
    assert cfg.run.max_steps == 5 and type(cfg.run.max_steps) is int
    assert cfg.run.output_dir == "runs/x=y"  # only the first '=' separates key and value
    assert cfg.run.resume == "123"
    assert cfg.optim.betas == (0.8, 0.99)
    assert cfg.moe.gate_noise_std == pytest.approx(0.01)


def test_override_replaces_a_whole_list():
    cfg = load_config(DEMO, ["tasks=[{name: only, type: image_text_retrieval, batch_size: 4}]"])
    assert cfg.tasks == [TaskConfig(name="only", type="image_text_retrieval", batch_size=4)]


def test_override_creates_missing_sections(tmp_path):
    path = _write(tmp_path / "c.yaml", {"tasks": [{"name": "x"}]})
    cfg = load_config(path, ["moe.top_k=1", "model.size=small"])
    assert cfg.moe.top_k == 1 and cfg.moe.num_experts == MoEConfig().num_experts and cfg.model.size == "small"


def test_apply_overrides_on_plain_dict():
    data = {"a": {"b": 1}, "l": [{"x": 1}, {"x": 2}]}
    out = apply_overrides(data, ["a.b=2", "a.c=[1, 2]", "l.1.x=null", "l.0=hi", "new.deep.key=yes"])
    assert out == {"a": {"b": 2, "c": [1, 2]}, "l": ["hi", {"x": None}], "new": {"deep": {"key": True}}}


def test_override_without_equals_raises():
    _raises_naming("run.max_steps", "run.max_steps")


def test_empty_override_is_the_empty_string():
    assert load_config(None, [ONE_TASK, "run.freeze=experts", "run.freeze="]).run.freeze == ""


@pytest.mark.parametrize("override, field", [
    ("tasks.5.weight=3", "tasks.5"),
    ("tasks.x.weight=3", "tasks.x"),
    ("run.max_steps.foo=3", "run.max_steps"),
])
def test_override_bad_path_is_value_error_naming_it(override, field):
    _raises_naming(field, override)


# --------------------------------------------------------------------------------------------------------------------
# Validation: ValueError naming the bad field
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("overrides, field", [
    (["moe.num_expert=4"], "moe.num_expert"),
    (["tasks.0.extra=4"], "tasks[0].extra"),
    (["optimizer.lr=0.1"], "optimizer"),
    (["run.max_steps=abc"], "run.max_steps"),
    (["run.max_steps=5.5"], "run.max_steps"),
    (["run.max_steps=true"], "run.max_steps"),
    (["run.output_dir=123"], "run.output_dir"),
    (["moe.drop_tokens=0"], "moe.drop_tokens"),
    (["run=5"], "run"),
    (["tasks.0=oops"], "tasks[0]"),
    (["moe.num_experts=6", "moe.ep_size=4"], "moe.ep_size"),
    (["moe.top_k=0"], "moe.top_k"),
    (["moe.top_k=5"], "moe.top_k"),
    (["moe.num_experts=-1"], "moe.num_experts"),
    (["moe.capacity_factor=0"], "moe.capacity_factor"),
    (["moe.ep_size=0"], "moe.ep_size"),
    (["run.max_steps=0"], "run.max_steps"),
    (["run.save_every=4", "run.eval_every=6"], "run.eval_every"),
    (["run.eval_every=-4"], "run.eval_every"),
    (["run.progress_bar=on"], "run.progress_bar"),
    (["run.eval_batch_size=0"], "run.eval_batch_size"),
    (["run.gradient_accumulation_steps=0"], "run.gradient_accumulation_steps"),
    (["data.num_workers=-1"], "data.num_workers"),
    (["data.max_text_len=0"], "data.max_text_len"),
    (["optim.lr=0"], "optim.lr"),
    (["optim.warmup_steps=-1"], "optim.warmup_steps"),
    (["tasks.0.type=video_segmentation"], "tasks[shapes_classification].type"),
    (["tasks.1.name=shapes_classification"], "tasks"),
    (["tasks=[]"], "tasks"),
    (["tasks.0.name=''"], "tasks[].name"),
    (["model.size=huge"], "model.size"),
    (["tasks.0.label_smoothing=-0.1"], "tasks[shapes_classification].label_smoothing"),
    (["tasks.1.label_smoothing=1.0"], "tasks[shapes_caption_retrieval].label_smoothing"),
    (["tasks.0.weight=0"], "tasks[shapes_classification].weight"),
    (["tasks.0.batch_size=-2"], "tasks[shapes_classification]"),
])
def test_invalid_values_name_the_field(overrides, field):
    _raises_naming(field, *overrides)


def test_divisibility_message_names_both_fields():
    message = _raises_naming("moe.num_experts", "moe.num_experts=6", "moe.ep_size=4")
    assert "6" in message and "4" in message


def test_duplicate_task_names_are_listed():
    message = _raises_naming("unique", "tasks=[{name: a}, {name: b}, {name: a}]")
    assert "'a'" in message


def test_dense_model_skips_expert_checks():
    cfg = load_config(DEMO, ["moe.num_experts=0", "moe.top_k=0", "moe.ep_size=4"])
    assert cfg.moe.num_experts == 0


def test_dataclasses_validate_when_built_directly():
    with pytest.raises(ValueError, match="moe.top_k"):
        MoEConfig(num_experts=4, top_k=5)
    with pytest.raises(ValueError, match="model.size"):
        ModelConfig(size="giant")
    with pytest.raises(ValueError, match="label_smoothing"):
        TaskConfig(name="t", label_smoothing=-0.5)
    with pytest.raises(ValueError, match="tasks"):
        Config()


@pytest.mark.parametrize("value", ["abc", "[0.9]", "[0.9, x]"])
def test_betas_are_validated(value):
    _raises_naming("optim.betas", f"optim.betas={value}")


@pytest.mark.parametrize("override, field", [
    ("run.max_steps=.inf", "run.max_steps"),
    ("run.max_steps=.nan", "run.max_steps"),
    ("moe.capacity_factor=.nan", "moe.capacity_factor"),
    ("tasks.0.weight=.nan", "tasks[0].weight"),
])
def test_non_finite_numbers_are_rejected(override, field):
    _raises_naming(field, override)


def test_exponent_without_dot_is_a_number():
    # YAML 1.1 reads 1e-3 as a string; the config accepts it as the float the user meant.
    assert load_config(DEMO, ["optim.lr=1e-3"]).optim.lr == pytest.approx(1e-3)


# --------------------------------------------------------------------------------------------------------------------
# save
# --------------------------------------------------------------------------------------------------------------------


def test_save_round_trips(tmp_path):
    cfg = load_config(DEMO, ["optim.betas=[0.8, 0.9]", "moe.drop_tokens=false", "tasks.0.weight=3",
                             "data.tokenizer=/tmp/tok", "run.resume=none"])
    path = tmp_path / "out" / "config.yaml"
    path.parent.mkdir()
    cfg.save(path)
    raw = yaml.safe_load(path.read_text())  # plain YAML: no Python tags
    assert raw["optim"]["betas"] == [0.8, 0.9] and raw["tasks"][0]["weight"] == 3.0
    assert set(raw) == {"run", "data", "model", "moe", "moa", "optim", "tasks", "deepspeed_config"}
    assert load_config(path) == cfg
    assert load_config(path).to_dict() == cfg.to_dict()


def test_save_round_trips_defaults(tmp_path):
    cfg = load_config(None, [ONE_TASK])
    cfg.save(tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == cfg


@pytest.mark.parametrize("name", ["demo.yaml", "demo_attribute.yaml", "demo_modsquad.yaml", "demo_multitask.yaml",
                                  "dense_baseline.yaml", "uniperceiver_moe_b.yaml", "demo_prompt_tuning.yaml"])
def test_shipped_configs_load(name):
    cfg = load_config(REPO_ROOT / "configs" / name)
    assert cfg.tasks
    if name == "uniperceiver_moe_b.yaml":
        assert len(cfg.tasks) == 16
        assert sum(t.weight for t in cfg.tasks) == pytest.approx(10.0, abs=0.02)  # the published mix sums to 10
        assert cfg.moe.routing == "attribute" and cfg.model.size == "base"


@pytest.mark.parametrize("ds_config, stage, deepspeed_accumulates", [
    ("zero1_cpu.json", 1, False), ("zero2_cpu.json", 2, False), ("zero2_bf16.json", 2, False)])
def test_zero12_accumulation_moves_out_of_deepspeed(ds_config, stage, deepspeed_accumulates):
    """ZeRO-1/2 micro-steps are accumulated by train.engine.MicroSteps (one ordered reduction per step), so
    DeepSpeed sees gradient_accumulation_steps 1; the run's value stays what MicroSteps divides by."""
    from condmoe.train.engine import load_ds_config

    cfg = load_config(DEMO, [f"deepspeed_config=ds_configs/{ds_config}", "run.gradient_accumulation_steps=4"])
    ds = load_ds_config(cfg)
    assert ds["zero_optimization"]["stage"] == stage
    assert ds["gradient_accumulation_steps"] == 1 and cfg.run.gradient_accumulation_steps == 4


def test_zero0_keeps_deepspeeds_accumulation(tmp_path):
    from condmoe.train.engine import load_ds_config

    path = tmp_path / "zero0.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 0}}))
    cfg = load_config(DEMO, [f"deepspeed_config={path}", "run.gradient_accumulation_steps=4"])
    assert load_ds_config(cfg)["gradient_accumulation_steps"] == 4


def test_zero3_refuses_ranks_on_different_task_types():
    from condmoe.train.engine import load_ds_config

    cfg = load_config(DEMO, ["deepspeed_config=ds_configs/zero3_dense_bf16.json", "moe.num_experts=0"])
    with pytest.raises(ValueError, match="ZeRO stage 3 mis-reduces gradients when ranks run different task types "
                                         r"\(image_classification, image_text_retrieval\)"):
        load_ds_config(cfg)
    one = load_config(DEMO, ["deepspeed_config=ds_configs/zero3_dense_bf16.json", "moe.num_experts=0",
                             "tasks.1.type=image_classification", "tasks.1.name=second"])
    assert load_ds_config(one)["zero_optimization"]["stage"] == 3


@pytest.mark.parametrize("overrides, message", [
    (["optim.min_lr=0.01", "optim.lr=0.001"], "optim.min_lr=0.01 is above optim.lr=0.001"),
    (["model.img_size=33"], r"model.img_size=33 is not a multiple of model.patch_size=8 \(model.size=debug\)"),
    (["model.size=base", "model.img_size=0", "model.patch_size=15"],
     "model.img_size=224 is not a multiple of model.patch_size=15"),
    (["run.seed=-1"], "run.seed=-1 must be >= 0"),
    (["run.dist_timeout_s=0"], "run.dist_timeout_s must be > 0"),
    (["optim.lr=[1, 2"], r"override 'optim.lr=\[1, 2': malformed YAML value"),
])
def test_values_that_would_change_or_break_the_run_are_one_line(overrides, message):
    with pytest.raises(ValueError, match=message):
        load_config(DEMO, overrides)


def test_malformed_yaml_names_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("run:\n  seed: [1\n")
    with pytest.raises(ValueError, match=rf"{bad}: malformed YAML: "):
        load_config(bad)
    bad.write_text("- a list\n")
    with pytest.raises(ValueError, match=rf"{bad}: a config is a mapping of sections, not a list"):
        load_config(bad)


def test_print_config_prints_the_resolved_config_and_exits(capsys):
    from condmoe.train.cli import train_main

    config = str(REPO_ROOT / "configs" / "demo_multitask.yaml")
    assert train_main(["--config", config, "run.max_steps=7", "data.root=/nowhere", "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed == yaml.safe_load(load_config(config, ["run.max_steps=7", "data.root=/nowhere"]).to_yaml())
    assert printed["run"]["max_steps"] == 7 and len(printed["tasks"]) == 6 and printed["model"]["size"] == "debug"
