"""The training run, top to bottom: set up, resume, loop over steps, log, checkpoint.

One step (``train_step``) is separate from the run (``train``), like torchtitan's trainer.
"""

import contextlib
import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from deepspeed import comm as dist
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from data_prep import schema
from models import pop_moe_stats
from models.ds_moe import expert_layout, plain_name
from models.extract import freeze_for_prompt_tuning, freeze_for_transfer
from models.text_tokenizer import TextTokenizer
from train import checkpoint, resume
from train.collectives import DataParallelCollectives
from train.config import Config
from train.data import TaskSampler, TaskStream
from train.dist import DistInfo
from train.engine import build_model, create_engine, destroy_engine, initialise_from
from train.evaluate import vocabulary_targets
from train.signals import EXIT_PREEMPTED, StopRequest
from train.transforms import stable_seed

log = logging.getLogger("condmoe.train")


@dataclass
class StepRecord:
    step: int
    task: str
    loss: torch.Tensor  # weighted task loss + MoE aux loss, summed over micro-steps (kept on device until logged)
    task_loss: torch.Tensor
    aux_loss: torch.Tensor
    expert_counts_LE: torch.Tensor | None
    samples: int = 0  # inputs processed in this step (over micro-steps)
    tokens: int = 0  # encoder tokens of both passes (inputs and targets)


class Trainer:
    def __init__(self, cfg: Config, info: DistInfo):
        self.cfg = cfg
        self.info = info
        self.output_dir = Path(cfg.run.output_dir)
        self.tokenizer = TextTokenizer(cfg.tokenizer_dir, cfg.data.max_text_len)
        model = build_model(cfg, self.tokenizer.vocab_size, self.tokenizer.spe_id)
        if cfg.run.init_from:
            partial = initialise_from(model, cfg.run.init_from)
            if info.is_main:
                log.info("initialised from %s (new task rows in %d router tensors)", cfg.run.init_from, len(partial))
        if cfg.run.freeze:
            trainable = (freeze_for_transfer if cfg.run.freeze == "experts" else freeze_for_prompt_tuning)(model)
            if info.is_main:
                log.info("run.freeze=%s: training %d tensors (%s, ...)", cfg.run.freeze, len(trainable),
                         ", ".join(trainable[:3]))
        self.img_size = model.image_embed.patch_embed.img_size[0]
        self.model_active_params = model.num_params(active_only=True)
        self.engine = create_engine(cfg, model)
        self.input_dtype = torch.bfloat16 if self.engine.bfloat16_enabled() else torch.float32
        self.layout = expert_layout(self.model)  # this rank's place in expert parallelism, recorded by checkpoints
        self.sampler = TaskSampler(cfg.tasks, cfg.run.seed, info.rank, cfg.run.task_sampling == "synchronized")
        if info.world_size > 1:
            self.model.collectives = DataParallelCollectives()
        self.streams = [TaskStream(task, i, cfg.data, self.tokenizer, self.img_size, info.rank, info.world_size,
                                   cfg.run.seed) for i, task in enumerate(cfg.tasks)]
        # Class-name targets of each classification dataset: tokenised once, encoded every step (with gradients).
        classes = schema.read_classes(cfg.data.root)
        self.class_targets = {t.dataset: self.tokenizer(classes[t.dataset]) for t in cfg.tasks
                              if t.type.endswith("classification")}
        self.vocab_targets = vocabulary_targets(self.tokenizer)  # MLM: every token as a one-token sentence
        self.mixups = {}
        for i, t in enumerate(cfg.tasks):
            if t.type == "image_classification" and (t.augment.mixup or t.augment.cutmix):
                from timm.data import Mixup

                self.mixups[i] = Mixup(mixup_alpha=t.augment.mixup, cutmix_alpha=t.augment.cutmix,
                                       label_smoothing=t.label_smoothing, num_classes=len(classes[t.dataset]))
        self.data_errors = 0  # bad samples skipped by this rank's streams since the last log
        self.skipped_steps = 0  # micro-steps skipped for a non-finite loss (identical on every rank)
        # Expert selections per task since the last log ([X, L, E]), folded into a running EMA at each log.
        self.usage_counts: torch.Tensor | None = None
        self.usage_ema: torch.Tensor | None = None
        # Per task: unweighted loss sum and micro-steps since the last log (on the device: no sync per step).
        self.task_losses = torch.zeros(len(cfg.tasks), 2, device=self.engine.device)
        self.peak_tflops = device_peak_tflops(cfg.run.peak_tflops, self.engine.device)
        self.tensorboard = None  # rank 0's SummaryWriter, opened by train()

    @property
    def model(self):
        return self.engine.module

    def train_step(self, step: int) -> StepRecord:
        """One optimizer step: ``gradient_accumulation_steps`` micro-steps, each on a task this rank draws."""
        cfg = self.cfg
        total = task_total = aux_total = 0.0
        counts = None
        samples = tokens = 0
        names = []
        for micro in range(cfg.run.gradient_accumulation_steps):
            index = self.sampler(step, micro)
            task = cfg.tasks[index]
            batch = next(self.streams[index])
            self.data_errors += int(batch.pop("num_skipped"))
            # Dropout, drop-path, gate noise and mixup draw from generators seeded by (seed, rank, step, micro): a
            # resumed run replays them exactly without saving RNG states.
            step_seed = stable_seed(cfg.run.seed, self.info.rank, step, micro)
            torch.manual_seed(step_seed)
            np.random.seed(step_seed)
            smoothing = task.label_smoothing
            if task.type in ("mlm", "captioning"):
                batch["target_ids"], batch["target_mask"] = self.vocab_targets
            if task.type.endswith("classification"):
                batch["target_ids"], batch["target_mask"] = self.class_targets[task.dataset]
                if index in self.mixups:
                    batch["images"], batch["soft_labels"] = self.mixups[index](batch["images"], batch["labels"])
                    smoothing = 0.0  # already in the mixed targets
            samples += len(batch["labels"]) if "labels" in batch else len(batch["text_ids"])
            tokens += self._count_tokens(batch)
            batch = {k: self._to_device(k, v) for k, v in batch.items()}
            out = self.engine(task.type, batch, label_smoothing=smoothing, task_id=index,
                              split_targets=task.split_targets, gather_negatives=task.gather_negatives)
            stats = pop_moe_stats(self.model)
            task_loss = task.loss_weight * out.loss
            aux = stats.aux_loss if stats is not None else task_loss.new_zeros(())
            loss = task_loss + aux
            # Non-finite guard: every rank learns whether any rank's loss is NaN/inf (one tiny all-reduce) and all
            # skip this micro-step's backward and step together, so their collectives stay paired.
            bad = torch.logical_not(torch.isfinite(loss.detach())).float().reshape(1)
            dist.all_reduce(bad)
            if bad.item() > 0:
                self.skipped_steps += 1
                log.warning("step %d micro %d: non-finite loss on %d rank(s); skipped", step, micro, int(bad.item()))
                if cfg.run.gradient_accumulation_steps == 1:
                    continue  # no optimizer step at all
                # Mid-accumulation, DeepSpeed counts micro-steps to place the optimizer step: this one must still run
                # backward and step, contributing an exact-zero gradient to every trainable parameter.
                self.engine.backward(sum(p.sum() for p in self.model.parameters() if p.requires_grad) * 0.0)
                self.engine.step()
                continue
            self.engine.backward(loss)
            self.engine.step()
            total = total + loss.detach()
            self.task_losses[index, 0] += out.loss.detach().float()
            self.task_losses[index, 1] += 1
            task_total = task_total + task_loss.detach()
            aux_total = aux_total + aux.detach()
            if stats is not None:
                counts = stats.expert_counts_LE if counts is None else counts + stats.expert_counts_LE
                if self.usage_counts is None:
                    self.usage_counts = torch.zeros(len(cfg.tasks), *stats.expert_counts_LE.shape)
                self.usage_counts[index] += stats.expert_counts_LE.detach().float().cpu()
            names.append(task.name)
        return StepRecord(step, "+".join(names), total, task_total, aux_total, counts, samples, tokens)

    def _to_device(self, key: str, value: torch.Tensor) -> torch.Tensor:
        """Pixels in the engine's precision (bf16 when the DeepSpeed config enables it); targets stay as they are."""
        if value.is_floating_point() and key in ("images", "videos"):
            return value.to(self.engine.device, self.input_dtype, non_blocking=True)
        return value.to(self.engine.device, non_blocking=True)

    def _count_tokens(self, batch: dict[str, torch.Tensor]) -> int:
        patches = self.model.image_embed.num_patches
        tokens = 0
        for key in ("images", "videos"):
            if key in batch:
                frames = batch[key].shape[1] if key == "videos" else 1
                tokens += batch[key].shape[0] * (frames * patches + 1)
        for key in ("text_mask", "target_mask"):
            if key in batch:
                tokens += int(batch[key].numel())
        return tokens

    def train(self) -> int:
        """Runs to ``max_steps`` (exit code 0) or until a stop signal (checkpoint, then ``EXIT_PREEMPTED``)."""
        stop = StopRequest(self.engine.device).install()
        try:
            return self._train(stop)
        finally:
            stop.uninstall()
            self._close_streams()

    def _close_streams(self) -> None:
        for stream in self.streams:
            stream.close()
        if self.tensorboard is not None:
            self.tensorboard.close()
            self.tensorboard = None

    def close(self) -> None:
        """Releases what this trainer owns, in order: the task streams' loader workers, tensorboard's writer, then the
        engine and the model, which hold the expert-parallel process groups. Call it (or leave the ``with`` block)
        before ``train.dist.shutdown_distributed``: a group still referenced cannot be destroyed, and its threads
        would outlive the interpreter (see there). Idempotent; the trainer cannot train afterwards."""
        self._close_streams()
        self.streams = []
        if self.engine is not None:
            # DeepSpeed's own teardown: removes the ZeRO gradient hooks, whose closures hold the parameters (and
            # through their attributes the process groups) in a cycle through C++ that garbage collection cannot see.
            destroy_engine(self.engine)
            self.engine = None

    def __enter__(self) -> "Trainer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _train(self, stop: StopRequest) -> int:
        cfg = self.cfg
        if self.info.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            cfg.save(self.output_dir / "config.yaml")
        start, record = resume.resume(self.engine, self.output_dir, cfg.run.resume, self.layout)
        self._restore_usage_ema(record)
        for stream, position in zip(self.streams, self._stream_positions(start, record)):
            stream.position = position  # the stream seeks lazily on its first batch
        if self.info.is_main:
            log.info("training steps %d..%d on %d ranks (ep_size=%d), tasks: %s", start, cfg.run.max_steps,
                     self.info.world_size, cfg.moe.ep_size, ", ".join(t.name for t in cfg.tasks))
            if cfg.run.tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                # purge_step drops what a killed run logged after the checkpoint it resumes from
                self.tensorboard = SummaryWriter(str(self.output_dir / "tensorboard"), purge_step=start)
        bar = self._progress_bar(start)
        with logging_redirect_tqdm() if bar is not None else contextlib.nullcontext():
            try:
                return self._loop(start, stop, bar)
            finally:
                if bar is not None:
                    bar.close()

    def _loop(self, start: int, stop: StopRequest, bar) -> int:
        cfg = self.cfg
        pending = []
        metrics_file = self.output_dir / f"train_rank{self.info.rank}.jsonl"
        t0 = time.time()
        for step in range(start, cfg.run.max_steps):
            pending.append(self.train_step(step))
            stopping = stop.agreed()
            last = step + 1 == cfg.run.max_steps or stopping
            if (step + 1) % cfg.run.log_every == 0 or last:
                record = self._log(pending, metrics_file, time.time() - t0)
                pending, t0 = [], time.time()
                if bar is not None:
                    bar.set_postfix(loss=f"{record['loss']:.4f}", samples_s=f"{record['samples_per_s']:.0f}")
            if bar is not None:
                bar.update(1)
            # not on the way out after a stop signal: the checkpoint must be written before the job's time runs out
            evaluate_now = cfg.run.eval_every and not stopping and ((step + 1) % cfg.run.eval_every == 0 or last)
            if (step + 1) % cfg.run.save_every == 0 or last or evaluate_now:
                layout = {**self.layout, "stream_positions": [stream.position for stream in self.streams]}
                if self.usage_ema is not None:  # the same on every rank (its counts are summed over ranks)
                    layout["expert_usage_ema"] = {"share": self.usage_ema.tolist(),
                                                  "started": self.usage_ema_started.tolist()}
                path = checkpoint.save(self.engine, self.output_dir, step + 1, cfg.run.keep_last, layout)
                if self.info.is_main:
                    log.info("saved %s", path)
                if evaluate_now:
                    self._evaluate(step + 1, path)
                    t0 = time.time()  # evaluation time is not training throughput
            if stopping:
                return EXIT_PREEMPTED
        return 0

    def _restore_usage_ema(self, record: dict | None) -> None:
        saved = (record or {}).get("expert_usage_ema")
        if saved is None:
            return
        share = torch.tensor(saved["share"])
        if share.shape[0] != len(self.cfg.tasks):
            return  # another task list: start the averages afresh
        self.usage_ema, self.usage_ema_started = share, torch.tensor(saved["started"])

    def _stream_positions(self, start: int, record: dict | None) -> list[int]:
        """Where each task stream continues: the batches this rank's past steps drew from it. They follow from the
        task draws, but the checkpoint's own record wins where it has one for this layout and these tasks: a run
        resumed with another task mix must not replay or skip data."""
        positions = self.sampler.counts_until(start, self.cfg.run.gradient_accumulation_steps)
        saved = None
        if record is not None and record["world_size"] == self.info.world_size:
            saved = record["ranks"][self.info.rank].get("stream_positions")
        if saved is None or len(saved) != len(positions):
            return positions
        if saved != positions:
            log.warning("the task mix differs from the checkpoint's: streams continue from their saved positions %s "
                        "(this config's draws would give %s)", saved, positions)
        return saved

    def _progress_bar(self, start: int):
        mode = self.cfg.run.progress_bar
        if not self.info.is_main or mode == "never" or (mode == "auto" and not sys.stderr.isatty()):
            return None
        return tqdm(total=self.cfg.run.max_steps, initial=start, unit="step", dynamic_ncols=True, desc="train")

    def _evaluate(self, step: int, path: Path) -> None:
        """Zero-shot metrics of every task on its val split, from the checkpoint just written: each rank loads the
        plain model (all experts) and evaluates tasks ``rank, rank + world, ...``; rank 0 collects and writes them to
        ``eval.jsonl`` and tensorboard."""
        from train.evaluate import evaluate_task, format_table

        cfg, info = self.cfg, self.info
        t0 = time.time()
        mine = {task.name: {} for i, task in enumerate(cfg.tasks) if i % info.world_size == info.rank}
        # A failure here (a missing val split, memory for the full model) is reported per task and training goes on:
        # every rank must still reach the gather below.
        model = None
        try:
            if mine:
                model = build_model(cfg, self.tokenizer.vocab_size, self.tokenizer.spe_id)
                model.load_state_dict(checkpoint.load_plain_state_dict(path))
                model.to(self.engine.device)
            for i, task in enumerate(cfg.tasks):
                if task.name in mine:
                    try:
                        mine[task.name] = evaluate_task(model, cfg, i, self.tokenizer,
                                                        batch_size=cfg.run.eval_batch_size)
                    except Exception as exc:  # reported in eval.jsonl
                        mine[task.name] = {"error": f"{type(exc).__name__}: {exc}"}
        except Exception as exc:  # reported for each of this rank's tasks
            mine = {name: {"error": f"evaluation on rank {info.rank} failed: {type(exc).__name__}: {exc}"}
                    for name in mine}
        finally:
            del model
            if self.engine.device.type == "cuda":
                torch.cuda.empty_cache()
        for name, values in mine.items():
            if "error" in values:
                log.warning("eval of %s at step %d: %s", name, step, values["error"])
        gathered = [None] * info.world_size
        dist.all_gather_object(gathered, mine)
        if not info.is_main:
            return
        results = {task.name: next(part[task.name] for part in gathered if task.name in part) for task in cfg.tasks}
        with (self.output_dir / "eval.jsonl").open("a") as f:
            f.write(json.dumps({"step": step, **results}) + "\n")
        if self.tensorboard is not None:
            for task, values in results.items():
                for name, value in values.items():
                    if isinstance(value, float):
                        self.tensorboard.add_scalar(f"eval/{task}/{name}", value, step)
        log.info("eval at step %d (%.1f s):\n%s", step, time.time() - t0, format_table(results))

    def _interval_expert_counts(self) -> torch.Tensor | None:
        """Expert selections per task since the last log, summed over ranks ([X, L, E]); resets the tally."""
        if self.usage_counts is None:
            return None
        counts = self.usage_counts.to(self.engine.device, copy=True)  # a copy: the tally is reset below
        dist.all_reduce(counts)
        self.usage_counts.zero_()
        return counts.cpu()

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

    def _log(self, records: list[StepRecord], metrics_file: Path, seconds: float) -> dict | None:
        """Writes this rank's per-step losses and, on rank 0, one line of run metrics to ``metrics.jsonl`` and
        tensorboard, and a summary to the log. Two all-reduces and one host sync per log interval; returns rank 0's
        record."""
        with metrics_file.open("a") as f:
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
        if not self.info.is_main:
            return None
        loss_sum, aux_sum, errors, samples, tokens = totals.tolist()
        steps = len(records) * self.info.world_size
        counts = counts_XLE.sum(0) if counts_XLE is not None else None
        share = counts / counts.sum(dim=-1, keepdim=True).clamp_min(1) if counts is not None else None
        lr = self.engine.get_lr()[0]
        grad_norm = self.engine.get_global_grad_norm()
        record = {"step": last.step + 1, "loss": loss_sum / steps, "aux_loss": aux_sum / steps,
                  "task_loss": {t.name: total / n for t, (total, n) in zip(self.cfg.tasks, per_task.tolist()) if n},
                  "lr": lr, "grad_norm": float(grad_norm) if grad_norm is not None else None,
                  "samples_per_s": samples / seconds, "tokens_per_s": tokens / seconds,
                  "seconds_per_step": seconds / len(records), "bad_samples": int(errors),
                  "skipped_micro_steps": self.skipped_steps,
                  "expert_counts": counts.long().tolist() if counts is not None else None,
                  "expert_share": share.tolist() if share is not None else None}
        if self.peak_tflops > 0:
            # 6 x active parameters per token (forward + backward), the usual dense estimate
            flops = 6 * self.model_active_params * tokens / seconds
            record["mfu"] = flops / (self.peak_tflops * 1e12 * self.info.world_size)
        with (self.output_dir / "metrics.jsonl").open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tensorboard is not None:
            self._tensorboard(record)
        usage = ""
        if share is not None:
            usage = " | expert share " + " ".join("[" + ",".join(f"{v:.2f}" for v in row) + "]"
                                                  for row in share.tolist())
        skipped = f" | {int(errors)} bad samples skipped" if errors else ""
        if self.skipped_steps:
            skipped += f" | {self.skipped_steps} non-finite micro-steps skipped so far"
        mfu = f" | MFU {record['mfu']:.1%}" if "mfu" in record else ""
        log.info("step %d | loss %.4f (mean over ranks) | rank0 %s %.4f aux %.4f | lr %.2e | %.2f s/step | "
                 "%.0f samples/s%s%s%s", last.step + 1, record["loss"], last.task, float(last.task_loss),
                 float(last.aux_loss), lr, seconds / len(records), samples / seconds, mfu, skipped, usage)
        return record

    def _tensorboard(self, record: dict) -> None:
        tb, step = self.tensorboard, record["step"]
        for key in ("loss", "aux_loss", "lr", "grad_norm", "samples_per_s", "tokens_per_s", "seconds_per_step", "mfu",
                    "bad_samples", "skipped_micro_steps"):
            if record.get(key) is not None:
                tb.add_scalar(f"train/{key}", record[key], step)
        for task, value in record["task_loss"].items():
            tb.add_scalar(f"task_loss/{task}", value, step)
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
    from models.moe import RoutedLayer

    return [(plain_name(name), m) for name, m in model.named_modules() if isinstance(m, RoutedLayer)]
