"""What a training run records besides the training itself: each rank's per-step losses (``train_rank{r}.jsonl``),
rank 0's interval metrics (``metrics.jsonl``, the log line, tensorboard), evaluation results (``eval.jsonl``), the
per-task expert-usage EMA (``expert_usage_ema.json``, carried by checkpoints) and the MFU estimate.

The trainer feeds it per micro-step (``add_micro_step``, ``add_bad_samples``: device tensors, no host sync) and calls
``write`` once per log interval: two small all-reduces and one host sync there, plus one for the expert counts.
"""

import json
import logging
import time
import uuid
from pathlib import Path

import torch
from deepspeed import comm as dist

from condmoe.models.ds_moe import plain_name
from condmoe.models.moe import LAYER_STATS
from condmoe.train.config import Config
from condmoe.train.dist import DistInfo

log = logging.getLogger("condmoe.train")


class RunLog:
    def __init__(self, cfg: Config, info: DistInfo, output_dir: Path, engine, model_active_params: int):
        self.cfg = cfg
        self.info = info
        self.output_dir = output_dir
        self.engine = engine
        self.model_active_params = model_active_params
        self.metrics_file = output_dir / f"train_rank{info.rank}.jsonl"
        self.data_errors = 0  # bad samples skipped by this rank's streams since the last log
        # Expert selections per task since the last log ([X, L, E]), folded into a running EMA at each log.
        self.usage_counts: torch.Tensor | None = None
        self.usage_ema: torch.Tensor | None = None
        self.usage_ema_started: torch.Tensor | None = None
        # Per task: unweighted loss sum and micro-steps since the last log (on the device: no sync per step).
        self.task_losses = torch.zeros(len(cfg.tasks), 2, device=engine.device)
        # Routing health per routed layer since the last log: sums of the LAYER_STATS and the micro-step count.
        self.layer_stats: torch.Tensor | None = None
        self.layer_steps = 0
        self.warned_drops: set[str] = set()  # layers already warned about (once per run)
        self.peak_tflops = device_peak_tflops(cfg.run.peak_tflops, engine.device)
        self.tensorboard = None  # rank 0's SummaryWriter, opened by open()
        self.wandb = None  # rank 0's wandb run (run.wandb), opened by open()

    @property
    def model(self):
        return self.engine.module

    def open(self, start: int) -> None:
        """Rank 0 opens tensorboard (``run.tensorboard``) at the step the run starts or resumes from; the clock of
        the elapsed time and the ETA starts."""
        self.start_step, self.started = start, time.time()
        if self.info.is_main and self.cfg.run.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step drops what a killed run logged after the checkpoint it resumes from
            self.tensorboard = SummaryWriter(str(self.output_dir / "tensorboard"), purge_step=start)
        if self.info.is_main and self.cfg.run.wandb:
            self.wandb = _open_wandb(self.cfg, self.output_dir)

    def close(self) -> None:
        """Closes tensorboard and Weights & Biases and lets go of the engine (the trainer destroys it next)."""
        if self.tensorboard is not None:
            self.tensorboard.close()
            self.tensorboard = None
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None
        self.engine = None

    def add_bad_samples(self, count: int) -> None:
        self.data_errors += count

    def add_micro_step(self, task_index: int, task_loss: torch.Tensor, expert_counts_LE: torch.Tensor | None,
                       layer_stats_LS: torch.Tensor | None = None) -> None:
        """A micro-step that stepped: its task's unweighted loss and, for MoE models, its expert selections and each
        routed layer's routing health (``MoEStats.layer_stats_LS``)."""
        self.task_losses[task_index, 0] += task_loss.detach().float()
        self.task_losses[task_index, 1] += 1
        if layer_stats_LS is not None:
            self.add_layer_stats(layer_stats_LS)
        if expert_counts_LE is not None:
            if self.usage_counts is None:
                self.usage_counts = torch.zeros(len(self.cfg.tasks), *expert_counts_LE.shape)
            self.usage_counts[task_index] += expert_counts_LE.detach().float().cpu()

    def add_layer_stats(self, layer_stats_LS: torch.Tensor) -> None:
        """Each routed layer's routing health of a micro-step (``MoEStats.layer_stats_LS``)."""
        stats = layer_stats_LS.detach().float()
        self.layer_stats = stats if self.layer_stats is None else self.layer_stats + stats
        self.layer_steps += 1

    def state_dict(self) -> dict:
        """What checkpoints carry of this log: the expert-usage EMA (the same on every rank: its counts are summed
        over ranks); empty before the first log interval of a MoE run, and for a dense one."""
        if self.usage_ema is None:
            return {}
        return {"share": self.usage_ema.tolist(), "started": self.usage_ema_started.tolist()}

    def load_state_dict(self, state: dict) -> None:
        """The expert-usage EMA of the checkpoint a run resumes from (a checkpoint of another task list: afresh)."""
        if not state:
            return
        share = torch.tensor(state["share"])
        if share.shape[0] != len(self.cfg.tasks):
            return  # another task list: start the averages afresh
        self.usage_ema, self.usage_ema_started = share, torch.tensor(state["started"])

    def write_eval(self, step: int, results: dict[str, dict]) -> None:
        """Rank 0: one line of ``eval.jsonl`` and the float metrics as tensorboard scalars."""
        with (self.output_dir / "eval.jsonl").open("a") as f:
            f.write(json.dumps({"step": step, **results}) + "\n")
        if self.tensorboard is not None:
            for task, values in results.items():
                for name, value in values.items():
                    if isinstance(value, float):
                        self.tensorboard.add_scalar(f"eval/{task}/{name}", value, step)

    def _interval_expert_counts(self) -> torch.Tensor | None:
        """Expert selections per task since the last log, summed over ranks ([X, L, E]); resets the tally."""
        if self.usage_counts is None:
            return None
        counts = self.usage_counts.to(self.engine.device, copy=True)  # a copy: the tally is reset below
        dist.all_reduce(counts)
        self.usage_counts.zero_()
        return counts.cpu()

    def _interval_routing(self, counts_XLE: torch.Tensor | None) -> dict | None:
        """Per routed layer since the last log, over every rank: the LAYER_STATS means and the expert-load CV
        (std / mean of the assignments per expert). Warns once per layer whose dropped share exceeds 5%."""
        if self.layer_stats is None:
            return None
        sums = torch.cat([self.layer_stats.reshape(-1), self.layer_stats.new_tensor([self.layer_steps])])
        sums = sums.to(self.engine.device)
        dist.all_reduce(sums)
        means_LS = (sums[:-1] / sums[-1].clamp_min(1)).reshape(self.layer_stats.shape).cpu()
        self.layer_stats, self.layer_steps = None, 0
        names = [name for name, _ in _routed_layer_names(self.model)]
        routing = {"layers": names, **{key: means_LS[:, i].tolist() for i, key in enumerate(LAYER_STATS)}}
        if counts_XLE is not None:
            load_LE = counts_XLE.sum(0)
            routing["expert_load_cv"] = (load_LE.std(-1, unbiased=False) / load_LE.mean(-1).clamp_min(1e-9)).tolist()
        for name, share in zip(names, routing["dropped_share"]):
            if share > 0.05 and name not in self.warned_drops and self.info.is_main:
                self.warned_drops.add(name)
                log.warning("%s drops %.1f%% of its expert assignments (capacity): raise moe.capacity_factor or set "
                            "moe.drop_tokens=false", name, 100 * share)
        return routing

    def _update_usage_ema(self, counts: torch.Tensor, decay: float = 0.95) -> None:
        """Per-task expert shares of this log interval folded into an EMA (Mod-Squad's 0.95) and written to
        ``<output_dir>/expert_usage_ema.json`` by rank 0."""
        share = counts / counts.sum(-1, keepdim=True).clamp_min(1)
        seen = counts.sum(dim=(1, 2)) > 0
        if self.usage_ema is None:
            self.usage_ema = torch.zeros_like(share)
            self.usage_ema_started = torch.zeros(len(share), dtype=torch.bool)
        first, later = seen & ~self.usage_ema_started, seen & self.usage_ema_started
        self.usage_ema[first] = share[first]  # a task's first interval starts its average
        self.usage_ema[later] = decay * self.usage_ema[later] + (1 - decay) * share[later]
        self.usage_ema_started |= seen
        if self.info.is_main:
            record = {"decay": decay, "tasks": [t.name for t in self.cfg.tasks],
                      "layers": [name for name, _ in _routed_layer_names(self.model)],
                      "share": self.usage_ema.tolist()}
            (self.output_dir / "expert_usage_ema.json").write_text(json.dumps(record))

    def write(self, records: list, seconds: float, skipped_steps: int) -> dict | None:
        """Writes this rank's per-step losses and, on rank 0, one line of run metrics to ``metrics.jsonl`` and
        tensorboard, and a summary to the log. Two all-reduces and one host sync per log interval; returns rank 0's
        record."""
        with self.metrics_file.open("a") as f:
            for r in records:
                f.write(json.dumps({"step": r.step, "task": r.task, "loss": float(r.loss),
                                    "task_loss": float(r.task_loss), "aux_loss": float(r.aux_loss)}) + "\n")
        last = records[-1]
        # [loss sum, aux sum, bad samples, samples, tokens] summed over ranks in one all-reduce
        totals = torch.tensor([float(sum(float(r.loss) for r in records)),
                               float(sum(float(r.aux_loss) for r in records)), float(self.data_errors),
                               float(sum(r.samples for r in records)), float(sum(r.tokens for r in records))],
                              device=self.engine.device)
        dist.all_reduce(totals)
        per_task = self.task_losses.clone()  # [X, 2]: unweighted loss sum, micro-steps
        dist.all_reduce(per_task)
        self.task_losses.zero_()
        self.data_errors = 0
        counts_XLE = self._interval_expert_counts()
        if counts_XLE is not None:
            self._update_usage_ema(counts_XLE)
        routing = self._interval_routing(counts_XLE)
        if not self.info.is_main:
            return None
        loss_sum, aux_sum, errors, samples, tokens = totals.tolist()
        steps = len(records) * self.info.world_size
        counts = counts_XLE.sum(0) if counts_XLE is not None else None
        share = counts / counts.sum(dim=-1, keepdim=True).clamp_min(1) if counts is not None else None
        lr = max(self.engine.get_lr())  # the peak: with layer-wise decay the groups' lrs differ
        grad_norm = self.engine.get_global_grad_norm()
        record = {"step": last.step + 1, "loss": loss_sum / steps, "aux_loss": aux_sum / steps,
                  "task_loss": {t.name: total / n for t, (total, n) in zip(self.cfg.tasks, per_task.tolist()) if n},
                  "task_steps": {t.name: int(n) for t, (_, n) in zip(self.cfg.tasks, per_task.tolist()) if n},
                  "lr": lr, "grad_norm": float(grad_norm) if grad_norm is not None else None,
                  "samples_per_s": samples / seconds, "tokens_per_s": tokens / seconds,
                  "seconds_per_step": seconds / len(records), "bad_samples": int(errors),
                  "skipped_micro_steps": skipped_steps,
                  "expert_counts": counts.long().tolist() if counts is not None else None,
                  "expert_share": share.tolist() if share is not None else None,
                  "routing": routing}
        elapsed = time.time() - self.started
        record["elapsed_s"] = elapsed
        record["eta_s"] = elapsed / max(1, record["step"] - self.start_step) * (self.cfg.run.max_steps - record["step"])
        if self.peak_tflops > 0:
            # 6 x active parameters per token (forward + backward), the usual dense estimate
            flops = 6 * self.model_active_params * tokens / seconds
            record["mfu"] = flops / (self.peak_tflops * 1e12 * self.info.world_size)
        with (self.output_dir / "metrics.jsonl").open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            self.wandb.log(_wandb_scalars(record), step=record["step"])
        if self.tensorboard is not None:
            self._tensorboard(record)
            if counts_XLE is not None:
                self._usage_images(counts_XLE, record["step"])
        usage = ""
        if share is not None:
            usage = " | expert share " + " ".join("[" + ",".join(f"{v:.2f}" for v in row) + "]"
                                                  for row in share.tolist())
        skipped = f" | {int(errors)} bad samples skipped" if errors else ""
        if skipped_steps:
            skipped += f" | {skipped_steps} non-finite micro-steps skipped so far"
        mfu = f" | MFU {record['mfu']:.1%}" if "mfu" in record else ""
        log.info("step %d/%d | loss %.4f (mean over ranks) | rank0 %s %.4f aux %.4f | lr %.2e | %.2f s/step | "
                 "%.0f samples/s%s | elapsed %s | ETA %s%s%s", last.step + 1, self.cfg.run.max_steps, record["loss"],
                 last.task, float(last.task_loss), float(last.aux_loss), lr, seconds / len(records), samples / seconds,
                 mfu, _hms(elapsed), _hms(record["eta_s"]), skipped, usage)
        return record

    def _usage_images(self, counts_XLE: torch.Tensor, step: int) -> None:
        """Tensorboard images ``expert_usage/<task>``: the interval's expert shares, routed layers x experts, each
        cell 8 px, white the layer's busiest expert (drawn only for tasks that ran)."""
        for task, counts_LE in zip(self.cfg.tasks, counts_XLE.float().cpu()):
            if counts_LE.sum() > 0:
                share = counts_LE / counts_LE.sum(-1, keepdim=True).clamp_min(1)
                image = share / share.amax(-1, keepdim=True).clamp_min(1e-12)
                self.tensorboard.add_image(f"expert_usage/{task.name}", image.repeat_interleave(8, 0)
                                           .repeat_interleave(8, 1), step, dataformats="HW")

    def _tensorboard(self, record: dict) -> None:
        tb, step = self.tensorboard, record["step"]
        for key in ("loss", "aux_loss", "lr", "grad_norm", "samples_per_s", "tokens_per_s", "seconds_per_step", "mfu",
                    "bad_samples", "skipped_micro_steps"):
            if record.get(key) is not None:
                tb.add_scalar(f"train/{key}", record[key], step)
        for task, value in record["task_loss"].items():
            tb.add_scalar(f"task_loss/{task}", value, step)
        if record["routing"] is not None:
            routing = record["routing"]
            for key in (*LAYER_STATS, "expert_load_cv"):
                for name, value in zip(routing["layers"], routing.get(key, ())):
                    tb.add_scalar(f"routing/{name}/{key}", value, step)
        if record["expert_share"] is not None:
            names = [name for name, _ in _routed_layer_names(self.model)]
            for name, row in zip(names, record["expert_share"]):
                for expert, value in enumerate(row):
                    tb.add_scalar(f"expert_share/{name}/expert{expert}", value, step)


# Dense bf16 peak TFLOP/s per device, for the MFU estimate when run.peak_tflops is not given.
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 70.0}


def device_peak_tflops(configured: float, device: torch.device) -> float:
    if configured > 0 or device.type != "cuda":
        return configured
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_TFLOPS.items() if key in name), 0.0)


def _routed_layer_names(model) -> list[tuple[str, object]]:
    from condmoe.models.moe import RoutedLayer

    return [(plain_name(name), m) for name, m in model.named_modules() if isinstance(m, RoutedLayer)]


def _hms(seconds: float) -> str:
    """``1:02:03`` (hours unbounded)."""
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


WANDB_KEYS = ("loss", "aux_loss", "lr", "grad_norm", "samples_per_s", "tokens_per_s", "seconds_per_step", "mfu",
              "bad_samples", "eta_s")


def _open_wandb(cfg: Config, output_dir: Path):
    """``wandb.init`` with the resolved config; the run id is kept in <output_dir>/wandb_id so that a resume continues
    the same run."""
    try:
        import wandb
    except ImportError:
        raise ValueError("run.wandb=true needs the wandb package: pip install wandb") from None
    id_file = output_dir / "wandb_id"
    run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:12]
    id_file.write_text(run_id + "\n")
    return wandb.init(project=cfg.run.wandb_project, dir=str(output_dir), name=output_dir.name, id=run_id,
                      resume="allow", config=cfg.to_dict())


def _wandb_scalars(record: dict) -> dict[str, float]:
    """The record's scalars as wandb keys: ``train/<key>`` and ``task_loss/<task>``."""
    scalars = {f"train/{key}": record[key] for key in WANDB_KEYS if record.get(key) is not None}
    scalars.update({f"task_loss/{task}": value for task, value in record["task_loss"].items()})
    return scalars
