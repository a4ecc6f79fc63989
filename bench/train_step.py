"""Training-step benchmark: images/s and MFU of a full step (forward, backward, AdamW) of condmoe's Uni-Perceiver-MoE
against its dense twin, its attribute-routed version, timm's ViT and timm's ViT with DeepSpeed's stock MoE layer.

Models (``--models``, all by default; each built from scratch with seed 0):

  * ``moe``: condmoe's Uni-Perceiver-MoE (``models.create_model(size)``, 8 experts top-2, token routing, MoE in every
    other block from block 0, the MoE defaults of ``train/config.py``: capacity 1.25, balance loss 0.01), trained on
    the image_classification task as the trainer runs it: the images AND the target set of class names (``--classes``
    x ``--target-len`` tokens) are encoded every step; loss = ``out.loss + pop_moe_stats(model).aux_loss``;
  * ``dense``: its dense twin (the same model without MoE layers);
  * ``moe-attribute``: the MoE model with attribute routing and static dispatch (the no-dispatch path: each routing
    group, here one per encoder pass, goes straight through its k experts);
  * ``moe-linear``: Uni-Perceiver-MoE's form: linear experts on qkv, attention output, fc1 and fc2 of the MoE blocks,
    attribute routing, the chosen experts' weights merged once per routing group (one dense matmul per linear);
  * ``moe-linear-ffn``: the same with linear experts on the FFN only;
  * ``timm``: timm ``vit_base_patch16_224`` (``pretrained=False``, ``num_classes=--classes``), cross-entropy;
  * ``timm-ds-moe``: the same timm ViT with DeepSpeed's stock ``deepspeed.moe.layer.MoE`` (8 experts, k=2, each a timm
    ``Mlp`` D -> 4D, the same capacity factor) in place of the MLP of the same blocks, loss + 0.01 x its l_aux
    (condmoe's balance weight), on a one-process group (``ep_size=1``).

Every model gets the same synthetic batch (``--batch-size`` images at ``--img-size`` px; the class-name targets only
mean something to the Uni-Perceiver models), the same precision and the same optimizer (torch AdamW, fused: the
trainer's default, ``optim.fused``).
The encoder geometry comes from ``--size`` (``models.registry.SIZES``; ``--dim``/``--depth``/``--heads`` override it)
and is used for the timm models too, so that with the GPU defaults they are exactly timm's ViT-B/16.

Precision (``--precision``): ``autocast-bf16`` (GPU default: float32 weights, ``torch.autocast`` to bfloat16),
``bf16`` (bfloat16 weights and inputs, no autocast: the precision of the DeepSpeed bf16 configs, though AdamW then
keeps bfloat16 states where DeepSpeed keeps float32 master weights), ``fp32`` (CPU default).

Per model: median milliseconds per step over ``--iters`` steps after ``--warmup`` (CUDA events on GPU, perf_counter
on CPU), images/s, the ratio to timm dense, MFU = 6 x active parameters x tokens per step / step time / peak
(``--peak-tflops``; active parameters count top_k experts per MoE layer and leave out embedding tables, whose lookups
do no matmul; tokens = images x (patches + 1) plus, for Uni-Perceiver, classes x target length), the same with the
attention matmuls added (12 x depth x D x sequence length^2 per sequence, forward + backward), and the peak GPU
memory (``torch.cuda.max_memory_allocated``).

    python bench/train_step.py                    # CPU: float32, a small encoder, batch 8 at 64 px, 100 classes
    python bench/train_step.py --device cuda      # GPU: ViT-B/16 geometry, batch 128 at 224 px, 1000 x 8 tokens
    python bench/train_step.py --device cuda --compile --models moe timm timm-ds-moe

Prints a table and writes JSON (``--json``). Not a test: numbers depend on the machine.
"""

import argparse
import contextlib
import gc
import importlib.metadata
import json
import os
import platform
import socket
import statistics
import sys
import time
import traceback
from pathlib import Path

# `python bench/x.py` from anywhere: the repository root on the path, models._compat before timm.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import condmoe.models._compat  # noqa: F401  (before timm)
import torch
import torch.nn.functional as F
from torch import nn
import timm
from timm.layers import Mlp
from condmoe.models import SIZES, MoEArgs, MoEMLP, create_model, moe_layer_indices, pop_moe_stats

MODELS = {
    "moe": "condmoe MoE, token routing",
    "dense": "condmoe dense twin",
    "moe-attribute": "condmoe MoE, attribute routing (static)",
    "moe-linear": "condmoe linear MoE attn+FFN, attribute (merged)",
    "moe-linear-ffn": "condmoe linear MoE FFN, attribute (merged)",
    "timm": "timm ViT dense",
    "timm-ds-moe": "timm ViT + DeepSpeed stock MoE",
}
BALANCE_WEIGHT = 0.01  # condmoe's default moe.balance_loss_weight, applied to DeepSpeed's l_aux as well


class DeepSpeedMoEMlp(nn.Module):
    """DeepSpeed's ``MoE`` as a timm block's ``mlp``: returns the output, keeps ``l_aux`` for the loss."""

    def __init__(self, moe: nn.Module, top_k: int):
        super().__init__()
        self.moe = moe
        self.top_k = top_k
        self.l_aux = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, self.l_aux, _ = self.moe(x)
        return out


def init_one_process_group(device: str) -> None:
    """DeepSpeed's expert groups need torch.distributed: a one-process group (gloo on CPU, nccl on GPU)."""
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if device == "cuda" else "cpu")
    import deepspeed

    if deepspeed.comm.is_initialized():
        return
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    deepspeed.init_distributed(dist_backend="nccl" if device == "cuda" else "gloo", auto_mpi_discovery=False,
                               distributed_port=int(os.environ["MASTER_PORT"]), verbose=False)


def geometry(args) -> dict:
    size = SIZES[args.size]
    dim = args.dim or size["dim"]
    return {"dim": dim, "depth": args.depth or size["depth"],
            "num_heads": args.heads or (size["num_heads"] if not args.dim else max(1, dim // 64)),
            "mlp_ratio": size.get("mlp_ratio", 4.0), "patch_size": size.get("patch_size", 16)}


def build(name: str, args, geo: dict) -> nn.Module:
    torch.manual_seed(0)
    depth, moe_blocks = geo["depth"], moe_layer_indices(geo["depth"])
    drop_path = {} if args.drop_path < 0 else {"drop_path_rate": args.drop_path}
    if name in ("moe", "dense", "moe-attribute", "moe-linear", "moe-linear-ffn"):
        linear = name.startswith("moe-linear")
        moe = MoEArgs(num_experts=args.experts, top_k=args.top_k, capacity_factor=args.capacity_factor,
                      routing="token" if name == "moe" else "attribute", static_dispatch=True,
                      expert_type="linear" if linear else "mlp",
                      targets=["attn", "ffn"] if name == "moe-linear" else ["ffn"])
        return create_model(args.size, vocab_size=args.vocab_size, spe_token_id=args.vocab_size - 1,
                            max_text_len=max(32, args.target_len), img_size=args.img_size, dim=geo["dim"],
                            depth=depth, num_heads=geo["num_heads"], mlp_ratio=geo["mlp_ratio"],
                            patch_size=geo["patch_size"], moe_layers=() if name == "dense" else moe_blocks,
                            moe=moe, **drop_path)
    model = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=args.classes,
                              img_size=args.img_size, embed_dim=geo["dim"], depth=depth, num_heads=geo["num_heads"],
                              mlp_ratio=geo["mlp_ratio"], patch_size=geo["patch_size"], **drop_path)
    if name == "timm-ds-moe":
        from deepspeed.moe.layer import MoE

        init_one_process_group(args.device)
        hidden = int(geo["dim"] * geo["mlp_ratio"])
        for i in moe_blocks:
            moe = MoE(hidden_size=geo["dim"], expert=Mlp(geo["dim"], hidden), num_experts=args.experts, ep_size=1,
                      k=args.top_k, capacity_factor=args.capacity_factor, eval_capacity_factor=args.capacity_factor,
                      min_capacity=4)
            moe.set_deepspeed_parallelism()
            model.blocks[i].mlp = DeepSpeedMoEMlp(moe, args.top_k)
    return model


def active_params(model: nn.Module) -> tuple[int, int]:
    """(all parameters, parameters a token meets: top_k experts per MoE layer, no embedding tables)."""
    total = sum(p.numel() for p in model.parameters())
    active = model.num_params(active_only=True) if hasattr(model, "num_params") else total
    for m in model.modules():
        if isinstance(m, DeepSpeedMoEMlp):
            experts = m.moe.deepspeed_moe.experts.deepspeed_experts
            active -= sum(p.numel() for p in experts[0].parameters()) * (len(experts) - m.top_k)
        elif isinstance(m, nn.Embedding):
            active -= m.weight.numel()
    return total, active


def synthetic_batch(args, device: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    images = torch.randn(args.batch_size, 3, args.img_size, args.img_size, generator=g)
    labels = torch.randint(0, args.classes, (args.batch_size,), generator=g)
    # Class names as the tokenizer writes them: <|spe|>, 1..L-1 name tokens, padding after.
    target_ids = torch.randint(5, args.vocab_size - 1, (args.classes, args.target_len), generator=g)
    target_ids[:, 0] = args.vocab_size - 1
    lengths = torch.randint(min(3, args.target_len), args.target_len + 1, (args.classes, 1), generator=g)
    target_mask = torch.arange(args.target_len)[None, :] < lengths
    batch = {"images": images.to(dtype), "labels": labels, "target_ids": target_ids, "target_mask": target_mask}
    return {k: v.to(device) for k, v in batch.items()}


def tokens_and_attention_flops(name: str, args, geo: dict) -> tuple[int, float]:
    """Tokens through the encoder per step, and forward + backward FLOPs of the attention matmuls."""
    seq = (args.img_size // geo["patch_size"]) ** 2 + 1  # <|spe|> / [CLS] + patches
    sequences = [(args.batch_size, seq)]
    if not name.startswith("timm"):
        sequences.append((args.classes, args.target_len))
    tokens = sum(n * length for n, length in sequences)
    attention = sum(12 * geo["depth"] * geo["dim"] * n * length ** 2 for n, length in sequences)
    return tokens, float(attention)


def measure(name: str, args, geo: dict, precision: str) -> dict:
    device = args.device
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    model = build(name, args, geo).to(device)
    total, active = active_params(model)
    if precision == "bf16":
        model = model.to(torch.bfloat16)
    model.train()
    batch = synthetic_batch(args, device, torch.bfloat16 if precision == "bf16" else torch.float32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05, fused=True)
    # What dtype reaches condmoe's MoE layers (first warm-up step, eager only: a hook would change what compiles).
    moe_input_dtypes = set()
    first_moe = next((m for m in model.modules() if isinstance(m, MoEMLP)), None)
    hooks = [] if first_moe is None or args.compile else [
        first_moe.register_forward_pre_hook(lambda _m, inputs: moe_input_dtypes.add(str(inputs[0].dtype)))]
    runner = torch.compile(model, backend=args.compile_backend) if args.compile else model
    autocast = (torch.autocast(device_type=device, dtype=torch.bfloat16) if precision == "autocast-bf16"
                else contextlib.nullcontext())

    def step() -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            if name.startswith("timm"):
                loss = F.cross_entropy(runner(batch["images"]).float(), batch["labels"])
                aux = [m.l_aux for m in model.modules() if isinstance(m, DeepSpeedMoEMlp)]
                if aux:
                    loss = loss + BALANCE_WEIGHT * torch.stack(aux).sum()
            else:
                loss = runner("image_classification", batch).loss
                stats = pop_moe_stats(model)
                if stats is not None:
                    loss = loss + stats.aux_loss
        loss.backward()
        if not args.no_optimizer:
            optimizer.step()
        return loss

    for i in range(args.warmup):
        loss = step()
        if i == 0:
            for hook in hooks:
                hook.remove()
    if device == "cuda":
        torch.cuda.synchronize()
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(args.iters)]
    start = time.perf_counter()
    times = []
    for i in range(args.iters):
        if device == "cuda":
            events[i][0].record()
            loss = step()
            events[i][1].record()
        else:
            step_start = time.perf_counter()
            loss = step()
            times.append((time.perf_counter() - step_start) * 1e3)
    if device == "cuda":
        torch.cuda.synchronize()
        times = [begin.elapsed_time(end) for begin, end in events]
    wall_ms = (time.perf_counter() - start) * 1e3 / args.iters
    tokens, attention_flops = tokens_and_attention_flops(name, args, geo)
    ms = statistics.median(times)
    result = {"model": name, "label": MODELS[name], "params": total, "active_params": active, "tokens": tokens,
              "ms": ms, "mean_ms": wall_ms, "times_ms": times, "images_per_s": args.batch_size * 1e3 / ms,
              "loss": float(loss.detach()), "moe_input_dtype": sorted(moe_input_dtypes) or None,
              "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None}
    if args.peak_tflops:
        peak = args.peak_tflops * 1e12 * ms / 1e3
        result["mfu"] = 6 * active * tokens / peak
        result["mfu_with_attention"] = (6 * active * tokens + attention_flops) / peak
    return result


def merge_rounds(previous: dict, new: dict, args) -> dict:
    """One model's result over the rounds so far: all timed steps, their median, and what follows from it."""
    times = previous["times_ms"] + new["times_ms"]
    ms = statistics.median(times)
    merged = {**new, "times_ms": times, "ms": ms, "mean_ms": statistics.mean(times),
              "images_per_s": args.batch_size * 1e3 / ms}
    if "mfu" in new:
        merged["mfu"] = new["mfu"] * new["ms"] / ms
        merged["mfu_with_attention"] = new["mfu_with_attention"] * new["ms"] / ms
    if new.get("peak_memory_gib") is not None:
        merged["peak_memory_gib"] = max(previous["peak_memory_gib"], new["peak_memory_gib"])
    return merged


def version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--no-optimizer", action="store_true", help="forward and backward only (no AdamW step)")
    parser.add_argument("--precision", default=None, choices=["autocast-bf16", "bf16", "fp32"],
                        help="default: autocast-bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--size", default=None, choices=list(SIZES), help="default: base on CUDA, small on CPU")
    parser.add_argument("--dim", type=int, default=None, help="width override (CPU default 192)")
    parser.add_argument("--depth", type=int, default=None, help="blocks override (CPU default 6)")
    parser.add_argument("--heads", type=int, default=None, help="attention heads (default: the size's, or dim/64)")
    parser.add_argument("--batch-size", type=int, default=None, help="default: 128 on CUDA, 8 on CPU")
    parser.add_argument("--img-size", type=int, default=None, help="default: 224 on CUDA, 64 on CPU")
    parser.add_argument("--classes", type=int, default=None, help="class names encoded per step and timm head "
                        "classes (default: 1000 on CUDA, 100 on CPU)")
    parser.add_argument("--target-len", type=int, default=8, help="tokens per class name")
    parser.add_argument("--vocab-size", type=int, default=49409, help="text vocabulary (CLIP BPE + <|spe|>)")
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--capacity-factor", type=float, default=1.25)
    parser.add_argument("--drop-path", type=float, default=-1.0,
                        help="stochastic depth for every model; negative keeps each model's default "
                        "(Uni-Perceiver sizes 0.1, timm 0)")
    parser.add_argument("--compile", action="store_true", help="torch.compile each model")
    parser.add_argument("--compile-backend", default="inductor",
                        help="torch.compile backend (eager or aot_eager: dynamo tracing without code generation)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="steps before timing (default: 5 on CUDA, 10 with --compile; 2 on CPU)")
    parser.add_argument("--iters", type=int, default=None, help="timed steps per round (default: 20 on CUDA, 5 on CPU)")
    parser.add_argument("--rounds", type=int, default=None,
                        help="rounds over all models, each model timed in turn (default: 1 on CUDA, 3 on CPU)")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="peak TFLOP/s for MFU (default: 989 on CUDA, an H100's dense bf16; none on CPU)")
    parser.add_argument("--json", default="bench/train_step.json")
    parser.add_argument("--json-each-model", action="store_true",
                        help="also write the JSON (results so far, env.partial) after every model: a run stopped "
                        "by a time limit keeps the models it finished")
    args = parser.parse_args()
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device")
    defaults = dict(precision="autocast-bf16" if cuda else "fp32", size="base" if cuda else "small",
                    dim=None if cuda else 192, depth=None if cuda else 6, batch_size=128 if cuda else 8,
                    img_size=224 if cuda else 64, classes=1000 if cuda else 100,
                    warmup=(10 if args.compile else 5) if cuda else 2,
                    iters=20 if cuda else 5, rounds=1 if cuda else 3, peak_tflops=989.0 if cuda else 0.0)
    if args.size is not None:  # an explicit size keeps its own width and depth unless overridden too
        defaults.update(dim=None, depth=None)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if cuda:
        torch.cuda.set_device(0)
    geo = geometry(args)
    load_before = os.getloadavg()[0]

    # Rounds: every model measured once per round, in turn, so that a drifting machine load spreads over all models
    # instead of landing on whichever ran during it; a model's figure is the median over all its rounds' steps.
    by_model: dict[str, dict] = {}
    for round_index in range(args.rounds):
        for name in args.models:
            if "error" in by_model.get(name, {}):
                continue
            try:
                row = measure(name, args, geo, args.precision)
                if name in by_model:
                    row = merge_rounds(by_model[name], row, args)
                by_model[name] = row
            except Exception as exc:  # e.g. out of memory: report it and go on with the other models
                traceback.print_exc()
                by_model[name] = {"model": name, "label": MODELS[name], "error": f"{type(exc).__name__}: {exc}"[:300]}
            if args.compile:
                torch._dynamo.reset()  # compiled code would keep the model alive
            gc.collect()  # the model, its gradients and optimizer states go before the next one is built
            if cuda:
                torch.cuda.empty_cache()
            row = by_model[name]
            print(f"round {round_index + 1}/{args.rounds} {row['label']}: "
                  + (row["error"] if "error" in row else f"{row['ms']:.1f} ms/step"), flush=True)
            if args.json_each_model:
                Path(args.json).parent.mkdir(parents=True, exist_ok=True)
                Path(args.json).write_text(json.dumps({"env": {"partial": True}, "results": list(by_model.values())},
                                                      indent=2) + "\n")
    results = [by_model[name] for name in args.models]

    timm_dense = next((r for r in results if r["model"] == "timm" and "error" not in r), None)
    for row in results:
        if "error" not in row and timm_dense:
            row["vs_timm_dense"] = row["images_per_s"] / timm_dense["images_per_s"]

    device_name = (torch.cuda.get_device_name() if cuda
                   else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)")
    env = {"device": device_name, "precision": args.precision, "torch": torch.__version__,
           "cuda": torch.version.cuda if cuda else None, "timm": timm.__version__, "deepspeed": version("deepspeed"),
           "python": platform.python_version(), "size": args.size, **geo, "batch_size": args.batch_size,
           "img_size": args.img_size, "classes": args.classes, "target_len": args.target_len,
           "vocab_size": args.vocab_size, "experts": args.experts, "top_k": args.top_k,
           "capacity_factor": args.capacity_factor, "drop_path": args.drop_path, "compile": args.compile,
           **({"compile_backend": args.compile_backend} if args.compile_backend != "inductor" else {}),
           "warmup": args.warmup, "iters": args.iters, "rounds": args.rounds, "peak_tflops": args.peak_tflops or None,
           "load_average_1min_before": round(load_before, 2), "load_average_1min_after": round(os.getloadavg()[0], 2)}
    precision = {"fp32": "float32", "bf16": "bfloat16 weights", "autocast-bf16": "bf16 autocast"}[args.precision]
    compiled = "" if not args.compile else ", torch.compile" + (
        f" (backend {args.compile_backend})" if args.compile_backend != "inductor" else "")
    print(f"\n# Training step, {device_name}, {precision}{compiled}: "
          f"batch {args.batch_size} at {args.img_size} px, {args.classes} classes x {args.target_len} tokens "
          f"(Uni-Perceiver targets), dim {geo['dim']} depth {geo['depth']} heads {geo['num_heads']}, "
          f"{args.experts} experts top-{args.top_k} in blocks {list(moe_layer_indices(geo['depth']))}, "
          f"median of {args.rounds} x {args.iters} after {args.warmup} warm-up, "
          f"1-min load {env['load_average_1min_before']} -> {env['load_average_1min_after']}")
    if not cuda:
        print("# CPU (float32), not the GPU figures" if args.precision == "fp32" else "# CPU, not the GPU figures")
    print(f"| {'model':<40} | active params | tokens/step | ms/step | images/s | vs timm dense |   MFU | "
          f"MFU incl. attention | peak memory |")
    print(f"|{'-' * 42}|---------------|-------------|---------|----------|---------------|-------|"
          f"---------------------|-------------|")
    for row in results:
        if "error" in row:
            print(f"| {row['label']:<40} | failed: {row['error']} |")
            continue
        ratio = f"{row['vs_timm_dense']:.2f}x" if "vs_timm_dense" in row else "-"
        mfu = f"{row['mfu']:.1%}" if "mfu" in row else "-"
        mfu_attention = f"{row['mfu_with_attention']:.1%}" if "mfu_with_attention" in row else "-"
        memory = f"{row['peak_memory_gib']:.1f} GiB" if row["peak_memory_gib"] is not None else "-"
        print(f"| {row['label']:<40} | {row['active_params'] / 1e6:11.1f} M | {row['tokens']:11d} | "
              f"{row['ms']:7.1f} | {row['images_per_s']:8.1f} | {ratio:>13} | {mfu:>5} | {mfu_attention:>19} | "
              f"{memory:>11} |")
    by_name = {r["model"]: r for r in results if "error" not in r}
    for a, b, what in (("moe", "timm-ds-moe", "MoE (token) vs timm + DeepSpeed stock MoE"),
                       ("moe-attribute", "dense", "MoE (attribute, static) vs dense twin"),
                       ("moe-linear", "dense", "linear MoE attn+FFN (attribute, merged) vs dense twin"),
                       ("moe-linear-ffn", "dense", "linear MoE FFN (attribute, merged) vs dense twin")):
        if a in by_name and b in by_name:
            line = f"{what}: {by_name[a]['images_per_s'] / by_name[b]['images_per_s']:.2f}x images/s"
            if "mfu" in by_name[a]:
                line += f", {by_name[a]['mfu'] / by_name[b]['mfu']:.2f}x MFU"
            print(line)
    if args.precision == "autocast-bf16" and any(r.get("moe_input_dtype") == ["torch.float32"] for r in results):
        print("note: under autocast condmoe's MoEMLP receives float32 activations (the residual stream and LayerNorm "
              "outputs are float32), so its expert matmuls that autocast does not cast (torch._grouped_mm, the "
              "token-routed path on GPU) run in float32")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"env": env, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    from condmoe.train.dist import shutdown_distributed

    main()
    shutdown_distributed()  # the process group this benchmark made: destroyed before the interpreter's exit
