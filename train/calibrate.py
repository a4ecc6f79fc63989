"""``condmoe-calibrate``: loss weights that put every task's early loss on the same scale.

    condmoe-calibrate --config CFG [--steps 60] [--skip 10] [key=value ...]   # a short run of CFG, then the weights
    condmoe-calibrate --config CFG --from-run runs/x                         # from a run already trained

The short run is the trainer itself (one process; ``moe.ep_size`` set to 1, loss weights as configured) for
``--steps`` steps into ``--out`` (default ``runs/calibrate_<config>``); ``--from-run`` reads a run's
``metrics.jsonl`` instead, whatever launcher and world size trained it.

The rule: ``L_t`` is task t's unweighted training loss averaged over the micro-steps after step ``--skip`` (the
``task_loss`` / ``task_steps`` records of ``metrics.jsonl``), ``p_t`` its sampling share (``tasks[].weight``
normalised). The calibrated weight is ``w_t = (sum_s p_s L_s) / L_t``: every task then contributes the same
weighted loss ``w_t L_t`` when it is drawn, and the expected weighted loss of a step, ``sum_t p_t w_t L_t``, equals
that of unit weights, so a learning rate tuned with unit weights keeps its meaning. Uni-Perceiver's released
configs set the weights by hand (MoE-B: captioning 1.0, retrieval and MLM 0.5, video classification 0.1) and do not
say how they were chosen; this rule is condmoe's.
"""

import argparse
import json
import logging
import sys
from pathlib import Path

import yaml

from condmoe.train.cli import help_text
from condmoe.train.config import load_config
from condmoe.train.yaml_config import apply_overrides, load_yaml

log = logging.getLogger("condmoe.calibrate")


def loss_scale(records: list[dict], task_names: list[str], skip: int) -> dict[str, tuple[float, int]]:
    """``{task: (mean unweighted loss, micro-steps)}`` over the records after step ``skip``: each record's
    ``task_loss`` weighted by its ``task_steps`` (1 per record in logs without it). A task without a micro-step
    there is a ValueError naming it."""
    totals = dict.fromkeys(task_names, 0.0)
    counts = dict.fromkeys(task_names, 0)
    for record in records:
        if record["step"] <= skip:
            continue
        for task, loss in record.get("task_loss", {}).items():
            if task in totals:
                n = record.get("task_steps", {}).get(task, 1)
                totals[task] += loss * n
                counts[task] += n
    missing = [t for t in task_names if not counts[t]]
    if missing:
        last = records[-1]["step"] if records else 0
        raise ValueError(f"no loss recorded for {', '.join(missing)} after step {skip} (the log ends at step {last}):"
                         " train more steps (--steps) or lower --skip")
    return {t: (totals[t] / counts[t], counts[t]) for t in task_names}


def calibrated_weights(losses: dict[str, float], sampling: dict[str, float]) -> dict[str, float]:
    """``w_t = (sum_s p_s L_s) / L_t`` with ``p`` the sampling weights normalised (module docstring)."""
    if any(v <= 0 for v in losses.values()):
        raise ValueError(f"losses must be positive to calibrate: {losses}")
    total = sum(sampling[t] for t in losses)
    expected = sum(sampling[t] / total * loss for t, loss in losses.items())
    return {t: expected / loss for t, loss in losses.items()}


def config_fragment(config: str, overrides: list[str], weights: dict[str, float]) -> str:
    """The config's ``tasks:`` section (``_base_`` and overrides resolved) with the calibrated ``loss_weight`` of
    each task, as YAML to paste over the config's own."""
    tasks = apply_overrides(load_yaml(Path(config)), overrides).get("tasks", [])
    for task in tasks:
        task["loss_weight"] = float(f"{weights[task['name']]:.3g}")
    return yaml.safe_dump({"tasks": tasks}, sort_keys=False, default_flow_style=None, width=120)


def read_records(path: Path) -> list[dict]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (a run writes it every run.log_every steps)")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _short_run(args) -> Path:
    """Trains ``args.steps`` steps of the config in this process; returns the run folder."""
    from condmoe.train.cli import train_main

    out = Path(args.out or f"runs/calibrate_{Path(args.config).stem}")
    if (out / "metrics.jsonl").exists():
        raise ValueError(f"--out {out} holds a run already: pass --from-run {out} to read it, or remove it")
    argv = ["--config", args.config, *args.overrides, f"run.output_dir={out}", f"run.max_steps={args.steps}",
            "run.log_every=1", f"run.save_every={args.steps}", "run.eval_every=0", "run.tensorboard=false",
            "run.progress_bar=never", "moe.ep_size=1"]
    code = train_main(argv)
    if code:
        raise ValueError(f"the calibration run failed (exit {code}): condmoe-train {' '.join(argv)}")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="condmoe-calibrate", description=help_text(__doc__),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="run config (YAML)")
    parser.add_argument("--steps", type=int, default=60, help="steps of the short run (default 60)")
    parser.add_argument("--skip", type=int, default=10, help="steps left out at the start (default 10)")
    parser.add_argument("--from-run", default="", metavar="DIR", help="read DIR/metrics.jsonl instead of training")
    parser.add_argument("--out", default="", help="folder of the short run (default runs/calibrate_<config>); "
                                                  "the weights go to its calibration.yaml / .json")
    parser.add_argument("overrides", nargs="*", help="config overrides key.sub=value")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    try:
        cfg = load_config(args.config, args.overrides)
        if args.skip < 0 or args.steps <= args.skip:
            raise ValueError(f"--steps {args.steps} must exceed --skip {args.skip} >= 0")
        run_dir = Path(args.from_run) if args.from_run else _short_run(args)
        names = [t.name for t in cfg.tasks]
        scale = loss_scale(read_records(run_dir / "metrics.jsonl"), names, args.skip)
        weights = calibrated_weights({t: v[0] for t, v in scale.items()}, {t.name: t.weight for t in cfg.tasks})
    except (ValueError, FileNotFoundError, KeyError) as exc:
        print(f"condmoe-calibrate: error: {exc}", file=sys.stderr)
        return 2
    lines = ["| task | micro-steps | early loss | loss_weight now | calibrated |", "|---|---|---|---|---|"]
    for task in cfg.tasks:
        loss, steps = scale[task.name]
        lines.append(f"| {task.name} | {steps} | {loss:.4f} | {task.loss_weight:g} | {weights[task.name]:.3g} |")
    fragment = config_fragment(args.config, args.overrides, weights)
    (run_dir / "calibration.yaml").write_text(f"# condmoe-calibrate --config {args.config}: steps {args.skip + 1}.."
                                              f" of {run_dir}\n{fragment}")
    (run_dir / "calibration.json").write_text(json.dumps(
        {"skip": args.skip, "loss": {t: v[0] for t, v in scale.items()},
         "micro_steps": {t: v[1] for t, v in scale.items()}, "loss_weight": weights}, indent=1))
    print("\n".join(lines))
    print(f"\n# {run_dir / 'calibration.yaml'}: paste over the config's tasks\n{fragment}")
    print("overrides: " + " ".join(f"tasks.{i}.loss_weight={weights[t.name]:.3g}" for i, t in enumerate(cfg.tasks)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
