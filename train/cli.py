"""Console scripts: ``condmoe-train`` (under torchrun, the deepspeed launcher, srun or mpirun), ``condmoe-eval`` and
``condmoe-export``.

All take ``--config FILE`` and any number of ``key.sub=value`` overrides. Eval and export build the model from the
run's own config.yaml and refuse overrides that change the model (``train/run_config.py``). User errors (bad config
value, missing data or checkpoint, a checkpoint of another model) end with a one-line message and exit code 2.
"""

import argparse
import json
import logging
import os
import re
import sys
from pathlib import Path


def help_text(doc: str) -> str:
    """A docstring as --help prints it: reStructuredText's ``literal`` quotes and :role: prefixes dropped."""
    return re.sub(r":(?:func|class|mod|meth):`([^`]*)`", r"\1", doc).replace("``", "")


def _parser(prog: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=help_text(description))
    parser.add_argument("--config", required=True, help="YAML config (see configs/ and docs/configs.md)")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. run.max_steps=10")
    # The deepspeed launcher appends --local_rank; the rank layout is read from the environment instead.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return parser


def _setup_logging(rank: int) -> None:
    level = logging.INFO if rank == 0 else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S", force=True)


def _fail(prog: str, exc: Exception) -> int:
    # Errors raised in a DataLoader worker arrive wrapped with the worker's traceback: keep the original last line.
    lines = [line for line in str(exc).splitlines() if line.strip()]
    print(f"{prog}: error: {lines[-1] if lines else type(exc).__name__}", file=sys.stderr)
    return 2


def train_main(argv: list[str] | None = None) -> int:
    parser = _parser("condmoe-train", "Pre-train a condmoe model with DeepSpeed.")
    parser.add_argument("--dry-run", action="store_true", help="print this process's rank layout and exit")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config (the file with its _base_ chain and the overrides) and exit")
    args = parser.parse_args(argv)
    from condmoe.train.config import load_config

    try:
        cfg = load_config(args.config, args.overrides)
        if args.print_config:
            print(cfg.to_yaml(), end="")
            return 0
        cfg.validate_paths()
    except (ValueError, FileNotFoundError) as exc:
        return _fail("condmoe-train", exc)
    if args.dry_run:
        from condmoe.train.dist import dry_run

        return dry_run(cfg.moe.ep_size if cfg.moe.num_experts else 1)

    from condmoe.train.dist import distributed
    from condmoe.train.trainer import Trainer

    # The trainer is closed before the process groups are destroyed, and both happen before the interpreter's exit
    # (train/dist.py shutdown_distributed says why the order matters).
    with distributed(cfg.run.dist_timeout_s) as info:
        _setup_logging(info.rank)
        if cfg.moe.num_experts and info.world_size % cfg.moe.ep_size:
            return _fail("condmoe-train", ValueError(f"moe.ep_size={cfg.moe.ep_size} does not divide the world size "
                                                     f"{info.world_size}"))
        torch_threads = os.environ.get("CONDMOE_TORCH_THREADS")
        if torch_threads:
            import torch

            torch.set_num_threads(int(torch_threads))
        try:
            with Trainer(cfg, info) as trainer:
                return trainer.train()  # 0, or EXIT_PREEMPTED (75) after a stop signal and a checkpoint
        except (ValueError, FileNotFoundError) as exc:
            return _fail("condmoe-train", exc)


def eval_main(argv: list[str] | None = None) -> int:
    parser = _parser("condmoe-eval", "Zero-shot evaluation of a checkpoint on every task's val split (one process).")
    parser.add_argument("--checkpoint", default="", help="checkpoint dir (step_N) or checkpoints folder; "
                                                         "default: the latest in run.output_dir")
    parser.add_argument("--batch-size", type=int, default=128, help="samples per evaluation batch (default 128; "
                                                                    "does not change the metrics)")
    parser.add_argument("--ema", action="store_true", help="evaluate the checkpoint's EMA of the weights "
                                                           "(run.ema_decay); results to eval.ema.json")
    parser.add_argument("--out", default="", help="metrics file; default: the run's eval.json, or "
                                                  "eval.<overrides>.json when overrides change the evaluation")
    parser.add_argument("--single-task", nargs="+", default=[], metavar="EVAL_JSON",
                        help="eval.json files of single-task runs: adds the multi-task delta Delta_m of the dense "
                             "tasks they share with this run (by task name, on each task's headline metric)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")

    from condmoe.train.evaluate import evaluate, format_table, multi_task_delta

    try:
        run, model, tokenizer = load_run_model("condmoe-eval", args.config, args.overrides, args.checkpoint, args.ema)
        metrics = evaluate(model, run.cfg, tokenizer, args.batch_size)
        if args.single_task:
            metrics["delta_m"] = multi_task_delta(metrics, args.single_task)
    except (ValueError, FileNotFoundError, KeyError) as exc:
        return _fail("condmoe-eval", exc)
    print(format_table(metrics))
    print(json.dumps(metrics))
    out = Path(args.out) if args.out else run.result_path("eval.ema.json" if args.ema else "eval.json")
    if args.out or out.parent.is_dir():
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(metrics, indent=2) + "\n")
        print(f"condmoe-eval: wrote {out}", file=sys.stderr)
    return 0


def load_run_model(prog: str, config: str, overrides: list[str], checkpoint: str = "", ema: bool = False,
                   master: bool = False):
    """The run's config with ``overrides`` (``train.run_config``: model keys refused), its tokenizer, and the model
    with the checkpoint's weights (``checkpoint``, default the run's latest; any ZeRO stage; ``master``: the fp32
    master copy, ``train/consolidate.py``; ``ema``: its average of the weights, ``train/ema.py``):
    ``(ResolvedRun, model, tokenizer)``."""
    from condmoe.models.text_tokenizer import TextTokenizer
    from condmoe.train.checkpoint import checkpoint_dir
    from condmoe.train.consolidate import plain_weights, step_dir
    from condmoe.train.ema import read_ema
    from condmoe.train.engine import build_model, load_weights
    from condmoe.train.run_config import load_run_config

    run = load_run_config(prog, config, overrides, checkpoint)
    tokenizer = TextTokenizer(run.cfg.tokenizer_dir, run.cfg.data.max_text_len)
    model = build_model(run.cfg, tokenizer.vocab_size, tokenizer.spe_id)
    path = step_dir(checkpoint or checkpoint_dir(run.run_dir))
    state = plain_weights(path, master)
    if ema:
        averaged = read_ema(path)
        if averaged is None:
            raise ValueError(f"--ema: {path} holds no EMA of the weights (train with run.ema_decay > 0)")
        state.update(averaged["weights"])
    load_weights(model, state)
    return run, model.eval(), tokenizer


def static_groups(cfg) -> dict:
    """The routing groups of a static level, each as the ``RoutingContext`` of one of its tokens."""
    import torch

    from condmoe.models.router import ATTRIBUTES, MODALITIES, RoutingContext

    level = cfg.moe.routing
    if level == "attribute":
        return {name: RoutingContext(attribute_BNA=torch.tensor(vector, dtype=torch.float32)[None, None])
                for name, vector in ATTRIBUTES.items()}
    if level == "modality":
        return {name: RoutingContext(modality_BN=torch.tensor([[i]])) for i, name in enumerate(MODALITIES)}
    if level == "task":
        return {task.name: RoutingContext(task_id=i) for i, task in enumerate(cfg.tasks)}
    raise ValueError(f"--merge-static needs a static routing level (attribute, modality, task), not moe.routing="
                     f"{level!r}")


def _travelling_files(cfg, out: Path) -> dict:
    """Copies the tokenizer files and the class names of the run's datasets into ``out``; their meta entries."""
    import shutil

    from condmoe.data_prep import schema

    out.mkdir(parents=True, exist_ok=True)
    shutil.copytree(cfg.tokenizer_dir, out / "tokenizer", dirs_exist_ok=True)
    datasets = sorted({t.dataset for t in cfg.tasks if t.spec.targets == "classes"})
    classes = {d: schema.read_classes(cfg.data.root)[d] for d in datasets} if datasets else {}
    (out / "classes.json").write_text(json.dumps(classes, indent=1))
    return {"classes": "classes.json"}


def export_main(argv: list[str] | None = None) -> int:
    """``condmoe-export``: a checkpoint (any ep_size, any ZeRO stage) as a folder that travels: ``model.safetensors``
    (the fp32 master weights), ``model_config.json`` (the model's arguments, the tasks, the class names), the
    tokenizer files (``tokenizer/``) and ``classes.json``; ``UniPerceiver.from_pretrained(folder)`` loads it with plain
    PyTorch. ``--merge-static`` also writes, for a model with linear experts and a static routing level, one dense
    model per routing group (attribute, modality or task) in ``<out>/<level>_<group>/``: Uni-Perceiver-MoE's
    deployment form."""
    parser = _parser("condmoe-export", export_main.__doc__)
    parser.add_argument("--checkpoint", default="", help="checkpoint dir; default: the latest in run.output_dir")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--merge-static", action="store_true", help="also write one merged dense model per group")
    parser.add_argument("--ema", action="store_true", help="export the checkpoint's EMA of the weights")
    args = parser.parse_args(argv)

    from condmoe.models.extract import merge_static

    try:
        run, model, _ = load_run_model("condmoe-export", args.config, args.overrides, args.checkpoint, args.ema,
                                       master=True)
        cfg = run.cfg
        out = Path(args.out)
        meta = {"tasks": [{"name": t.name, "type": t.type, "dataset": t.dataset} for t in cfg.tasks],
                "tokenizer": "tokenizer", "max_text_len": cfg.data.max_text_len, **_travelling_files(cfg, out)}
        model.save_pretrained(out, meta)
        if args.merge_static:
            for group, ctx in static_groups(cfg).items():
                dense = merge_static(model.eval(), ctx)
                print(dense.save_pretrained(out / f"{cfg.moe.routing}_{group}",
                                            {**meta, "tokenizer": "../tokenizer", "routing": cfg.moe.routing,
                                             "group": group}))
    except (ValueError, FileNotFoundError, KeyError) as exc:
        return _fail("condmoe-export", exc)
    print(out)
    return 0
