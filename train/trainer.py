"""The training run, top to bottom: set up, resume, loop over steps, log, checkpoint.

One step (``train_step``) is separate from the run (``train``), like torchtitan's trainer.
"""

import contextlib
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

from condmoe.data_prep import schema
from condmoe.models import pop_moe_stats
from condmoe.models.ds_moe import expert_layout
from condmoe.models.extract import freeze_for_prompt_tuning, freeze_for_transfer
from condmoe.models.text_tokenizer import TextTokenizer
from condmoe.train import checkpoint, consolidate, launch, resume
from condmoe.train.checkpoint import RankLayout, Record, Stateful
from condmoe.train.collectives import DataParallelCollectives
from condmoe.train.config import Config
from condmoe.train.data import TaskSampler, TaskStream
from condmoe.train.data_specs import stream_workers
from condmoe.train.dist import DistInfo
from condmoe.train.ema import WeightEMA
from condmoe.train.engine import MicroSteps, build_model, create_engine, destroy_engine, initialise_from, load_weights
from condmoe.train.evaluate import vocabulary_targets
from condmoe.train.run_config import flatten
from condmoe.train.run_lock import RunLock, prepare_fresh_run
from condmoe.train.run_log import RunLog
from condmoe.train.signals import EXIT_PREEMPTED, StopRequest
from condmoe.train.transforms import stable_seed

log = logging.getLogger("condmoe.train")

STREAM_POSITIONS = "stream_positions"  # each rank's part of a checkpoint: batches drawn from each task stream


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
        self.engine = None
        self.streams: list[TaskStream] = []
        self.run_log: RunLog | None = None
        self.lock: RunLock | None = None
        try:
            self._build(cfg, info)
        except BaseException:
            # e.g. a user error (missing classes.json) after the engine exists: no `with` block runs close() for a
            # trainer that was never returned, and its engine would hold the process groups into finalization.
            self.close()
            raise

    def _build(self, cfg: Config, info: DistInfo) -> None:
        self.cfg = cfg
        self.info = info
        self.output_dir = Path(cfg.run.output_dir)
        self._claim_output_dir()
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
        active_params = model.num_params(active_only=True, embeddings=False)  # MFU: matmul parameters
        self.engine = create_engine(cfg, model)
        self.input_dtype = torch.bfloat16 if self.engine.bfloat16_enabled() else torch.float32
        self.layout = RankLayout(**expert_layout(self.model))  # this rank's place in expert parallelism
        # A step draws a unit: one task, or a group of tasks that share its batch (TaskConfig.group).
        self.units = cfg.units()
        self.sampler = TaskSampler([cfg.tasks[unit[0]] for unit in self.units], cfg.run.seed, info.rank,
                                   cfg.run.task_sampling == "synchronized")
        if info.world_size > 1:
            self.model.collectives = DataParallelCollectives()
        workers = stream_workers(cfg.data, [cfg.tasks[unit[0]].weight for unit in self.units])  # data.worker_budget
        self.streams = [TaskStream(cfg.tasks[unit[0]], unit[0], cfg.data, self.tokenizer, self.img_size, info.rank,
                                   info.world_size, cfg.run.seed, group=[cfg.tasks[i] for i in unit],
                                   num_workers=num_workers) for unit, num_workers in zip(self.units, workers)]
        # Class-name targets of each classification dataset: tokenised once, encoded every step (with gradients).
        needs_classes = any(t.spec.targets == "classes" for t in cfg.tasks)  # a dense-only root has no classes.json
        classes = schema.read_classes(cfg.data.root) if needs_classes else {}
        self.class_targets = {t.dataset: self.tokenizer(classes[t.dataset]) for t in cfg.tasks
                              if t.spec.targets == "classes"}
        self.vocab_targets = vocabulary_targets(self.tokenizer)  # MLM: every token as a one-token sentence
        self.mixups = {}
        for i, t in enumerate(cfg.tasks):
            if t.spec.mixup and (t.augment.mixup or t.augment.cutmix):
                from timm.data import Mixup

                self.mixups[i] = Mixup(mixup_alpha=t.augment.mixup, cutmix_alpha=t.augment.cutmix,
                                       label_smoothing=t.label_smoothing, num_classes=len(classes[t.dataset]))
        self.skipped_steps = 0  # micro-steps skipped for a non-finite loss (identical on every rank)
        self.run_log = RunLog(cfg, info, self.output_dir, self.engine, active_params)
        if cfg.run.ema_decay and self.engine.zero_optimization_stage() == 3:
            raise ValueError(f"run.ema_decay={cfg.run.ema_decay}: ZeRO stage 3 partitions the weights, the average "
                             "needs them whole on every rank (ZeRO 0-2)")
        self.ema = WeightEMA(self.model, cfg.run.ema_decay) if cfg.run.ema_decay else None

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
        micro_steps = MicroSteps(self.engine, cfg.run.gradient_accumulation_steps)
        with micro_steps:
            for micro in range(cfg.run.gradient_accumulation_steps):
                unit = self.sampler(step, micro)
                members = self.units[unit]
                index = members[0]
                task = cfg.tasks[index]
                batch = next(self.streams[unit])
                self.run_log.add_bad_samples(int(batch.pop("num_skipped")))
                # Dropout, drop-path, gate noise and mixup draw from generators seeded by (seed, rank, step, micro): a
                # resumed run replays them exactly without saving RNG states.
                step_seed = stable_seed(cfg.run.seed, self.info.rank, step, micro)
                torch.manual_seed(step_seed)
                np.random.seed(step_seed)
                smoothing = task.label_smoothing
                if task.spec.targets == "vocabulary":
                    batch["target_ids"], batch["target_mask"] = self.vocab_targets
                if task.spec.targets == "classes":
                    batch["target_ids"], batch["target_mask"] = self.class_targets[task.dataset]
                    if index in self.mixups:
                        batch["images"], batch["soft_labels"] = self.mixups[index](batch["images"], batch["labels"])
                        smoothing = 0.0  # already in the mixed targets
                samples += len(batch["labels"] if "labels" in batch else batch.get("images", batch.get("text_ids")))
                tokens += self._count_tokens(batch) * len(members)
                batch = {k: self._to_device(k, v) for k, v in batch.items()}
                if len(members) > 1:  # a group: one pass per task on the same batch, the losses stacked [T]
                    group = [cfg.tasks[i] for i in members]
                    out = self.engine(tuple(t.type for t in group), batch, task_id=tuple(members),
                                      head=tuple(t.name for t in group))
                    weights = torch.tensor([t.loss_weight for t in group], device=out.loss.device)
                    task_loss = (weights * out.loss).sum()
                else:
                    out = self.engine(task.type, batch, label_smoothing=smoothing, task_id=index,
                                      split_targets=task.split_targets, gather_negatives=task.gather_negatives,
                                      head=task.name if task.spec.targets == "pixels" else "")
                    task_loss = task.loss_weight * out.loss
                stats = pop_moe_stats(self.model)
                aux = stats.aux_loss if stats is not None else task_loss.new_zeros(())
                loss = task_loss + aux
                # Non-finite guard: every rank learns whether any rank's loss is NaN/inf (one tiny all-reduce) and
                # all skip this micro-step's backward together, so their collectives stay paired.
                bad = torch.logical_not(torch.isfinite(loss.detach())).float().reshape(1)
                dist.all_reduce(bad)
                if bad.item() > 0:
                    self.skipped_steps += 1
                    log.warning("step %d micro %d: non-finite loss on %d rank(s); skipped", step, micro,
                                int(bad.item()))
                    micro_steps.skip()
                    continue
                micro_steps.backward(loss)
                total = total + loss.detach()
                task_total = task_total + task_loss.detach()
                aux_total = aux_total + aux.detach()
                if len(members) > 1:
                    # Each pass routes under its own task id: the layers split the expert counts by it.
                    for i, loss_i in zip(members, out.loss):
                        self.run_log.add_micro_step(i, loss_i, stats.task_expert_counts_TLE[i] if stats else None)
                    if stats is not None:
                        self.run_log.add_layer_stats(stats.layer_stats_LS)
                else:
                    self.run_log.add_micro_step(index, out.loss, *((stats.expert_counts_LE, stats.layer_stats_LS)
                                                                    if stats is not None else (None, None)))
                if stats is not None:
                    counts = stats.expert_counts_LE if counts is None else counts + stats.expert_counts_LE
                names.append(task.group if len(members) > 1 else task.name)
        micro_steps.step()
        if self.ema is not None:
            self.ema.update()
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
        launch.announce()  # from here a stop signal checkpoints (condmoe-launch forwards its signals to this pid)
        try:
            status = self._train(stop)
            if status == EXIT_PREEMPTED:
                launch.announce(status)  # the stop checkpoint is committed on every rank
            return status
        finally:
            stop.uninstall()
            self._close_streams()

    def _close_streams(self) -> None:
        for stream in self.streams:
            stream.close()
        if self.run_log is not None:
            self.run_log.close()

    def _claim_output_dir(self) -> None:
        """Rank 0 takes the output folder's lock (one run per folder) and, for ``run.resume=none``, makes sure the
        folder holds no earlier run; every rank raises rank 0's error, if any."""
        error = ""
        if self.info.is_main:
            try:
                self.lock = RunLock.acquire(self.output_dir)
                if self.cfg.run.resume == "none":
                    moved = prepare_fresh_run(self.output_dir, self.cfg.run.overwrite)
                    if moved is not None:
                        log.warning("run.overwrite: the previous run in %s moved to %s", self.output_dir, moved)
            except ValueError as exc:
                error = str(exc)
        if self.info.world_size > 1:
            if torch.cuda.is_available():  # NCCL sends objects through the current device: this rank's own
                torch.cuda.set_device(self.info.local_rank)
            shared = [error]
            torch.distributed.broadcast_object_list(shared, src=0)
            error = shared[0]
        if error:
            raise ValueError(error)

    def close(self) -> None:
        """Releases what this trainer owns, in order: the task streams' loader workers, tensorboard's writer, then the
        engine and the model, which hold the expert-parallel process groups. Call it (or leave the ``with`` block)
        before ``train.dist.shutdown_distributed``: a group still referenced cannot be destroyed, and its threads
        would outlive the interpreter (see there). Idempotent; the trainer cannot train afterwards."""
        self._close_streams()
        self.streams = []
        self.ema = None  # it holds the parameters, and through their attributes the process groups
        if self.engine is not None:
            # DeepSpeed's own teardown: removes the ZeRO gradient hooks, whose closures hold the parameters (and
            # through their attributes the process groups) in a cycle through C++ that garbage collection cannot see.
            destroy_engine(self.engine)
            self.engine = None
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def __enter__(self) -> "Trainer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _train(self, stop: StopRequest) -> int:
        cfg = self.cfg
        previous = None
        if self.info.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            previous = _read_saved_config(self.output_dir / "config.yaml")
            cfg.save(self.output_dir / "config.yaml")
            log.info("resolved config (%s):\n%s", self.output_dir / "config.yaml", cfg.to_yaml().rstrip())
        start, record = resume.resume(self.engine, self.output_dir, cfg.run.resume, self.layout)
        if self.info.is_main:
            for warning in resume_warnings(cfg, self.output_dir, start, previous):
                log.warning("%s", warning)
        if record is not None:
            record.load_states(self._checkpoint_parts())
            if self.ema is not None and not self.ema.load(checkpoint.find(self.output_dir, cfg.run.resume)):
                log.warning("run.ema_decay=%g: the checkpoint has no EMA (trained without one): the average starts "
                            "from the resumed weights", cfg.run.ema_decay)
        for stream, position in zip(self.streams, self._stream_positions(start, record)):
            stream.position = position  # the stream seeks lazily on its first batch
        if self.info.is_main:
            log.info("training steps %d..%d on %d ranks (ep_size=%d), tasks: %s", start, cfg.run.max_steps,
                     self.info.world_size, cfg.moe.ep_size, ", ".join(t.name for t in cfg.tasks))
        self.run_log.open(start)
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
        t0 = time.time()
        for step in range(start, cfg.run.max_steps):
            pending.append(self.train_step(step))
            stopping = stop.agreed()
            last = step + 1 == cfg.run.max_steps or stopping
            if (step + 1) % cfg.run.log_every == 0 or last:
                record = self.run_log.write(pending, time.time() - t0, self.skipped_steps)
                pending, t0 = [], time.time()
                if bar is not None:
                    bar.set_postfix(loss=f"{record['loss']:.4f}", samples_s=f"{record['samples_per_s']:.0f}")
            if bar is not None:
                bar.update(1)
            # not on the way out after a stop signal: the checkpoint must be written before the job's time runs out
            evaluate_now = cfg.run.eval_every and not stopping and ((step + 1) % cfg.run.eval_every == 0 or last)
            if (step + 1) % cfg.run.save_every == 0 or last or evaluate_now:
                path = checkpoint.save(self.engine, self.output_dir, step + 1, cfg.run.keep_last, self.layout,
                                       states=self._checkpoint_parts(),
                                       rank_states={STREAM_POSITIONS: [stream.position for stream in self.streams]},
                                       rank_files=self._save_ema if self.ema is not None else None)
                if self.info.is_main:
                    consolidate.write_shim(path.parent)  # over DeepSpeed's zero_to_fp32.py copy
                    log.info("saved %s", path)
                if evaluate_now:
                    self._evaluate(step + 1, path)
                    t0 = time.time()  # evaluation time is not training throughput
            if stopping:
                return EXIT_PREEMPTED
        return 0

    def _save_ema(self, path: Path) -> None:
        self.ema.save(path, self.info.rank, self.layout.expert_dp_rank)

    def _checkpoint_parts(self) -> dict[str, Stateful]:
        """What checkpoints carry besides the engine and the stream positions, by name (the same on every rank)."""
        return {"expert_usage_ema": self.run_log, "trainer": self}

    def state_dict(self) -> dict:
        """The trainer's own counters (the step is the engine's)."""
        return {"skipped_micro_steps": self.skipped_steps}

    def load_state_dict(self, state: dict) -> None:
        self.skipped_steps = state["skipped_micro_steps"]

    def _stream_positions(self, start: int, record: Record | None) -> list[int]:
        """Where each task stream continues: the batches this rank's past steps drew from it. They follow from the
        task draws, but the checkpoint's own record wins where it has one for this layout and these tasks: a run
        resumed with another task mix must not replay or skip data."""
        positions = self.sampler.counts_until(start, self.cfg.run.gradient_accumulation_steps)
        saved = None
        if record is not None and record.layout.world_size == self.info.world_size:
            saved = record.rank_state(self.info.rank, STREAM_POSITIONS)
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
        from condmoe.train.evaluate import evaluate_task, format_table

        cfg, info = self.cfg, self.info
        t0 = time.time()
        mine = {task.name: {} for i, task in enumerate(cfg.tasks) if i % info.world_size == info.rank}
        # A failure here (a missing val split, memory for the full model) is reported per task and training goes on:
        # every rank must still reach the gather below.
        model = None
        try:
            if mine:
                model = build_model(cfg, self.tokenizer.vocab_size, self.tokenizer.spe_id)
                load_weights(model, checkpoint.load_plain_state_dict(path, verify=False))  # hashed at its commit
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
        self.run_log.write_eval(step, results)
        log.info("eval at step %d (%.1f s):\n%s", step, time.time() - t0, format_table(results))


# What the learning-rate schedule is made of: a resumed run that changes one follows another schedule from there on.
SCHEDULE_KEYS = ("run.max_steps", "optim.lr", "optim.min_lr", "optim.warmup_steps")


def _read_saved_config(path: Path) -> dict | None:
    """The config a previous run in this folder saved (None if there is none or it does not parse)."""
    import yaml

    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return None
    return data if isinstance(data, dict) else None


def resume_warnings(cfg: Config, output_dir: Path, start: int, previous: dict | None) -> list[str]:
    """What a user should hear about where the run starts: past max_steps, only torn checkpoints, a changed
    schedule."""
    warnings = []
    if start > 0 and start >= cfg.run.max_steps:
        warnings.append(f"the checkpoint is at step {start}, at or past run.max_steps={cfg.run.max_steps}: nothing to "
                        f"train (raise run.max_steps to continue)")
    ckpt_dir = checkpoint.checkpoint_dir(output_dir)
    if start == 0 and cfg.run.resume == "auto" and ckpt_dir.is_dir():
        torn = sorted(p.name for p in ckpt_dir.glob("step_*") if p.is_dir() and not checkpoint.is_complete(p))
        if torn:
            warnings.append(f"{ckpt_dir} holds no complete checkpoint, only unfinished ones ({', '.join(torn)}): "
                            f"starting from step 0")
    if start > 0 and previous is not None:
        before, now = flatten(previous), flatten(cfg.to_dict())
        changed = [(key, before.get(key), now.get(key)) for key in SCHEDULE_KEYS if before.get(key) != now.get(key)]
        if changed:
            what = ", ".join(f"{key} {old} -> {new}" for key, old, new in changed)
            warnings.append(f"resuming at step {start} with another learning-rate schedule ({what}): the steps from "
                            f"{start} on follow the new one")
    return warnings
