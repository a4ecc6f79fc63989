"""MoE layer benchmark: condmoe's MoE MLP vs DeepSpeed's stock ``deepspeed.moe.layer.MoE`` vs the dense FFN floor.

Forward + backward time per call (median over iterations, after warm-up) of:
  * dense FFN (timm ``Mlp``) on k x the tokens: the compute floor of a top-k MoE;
  * DeepSpeed's stock MoE layer (top-k gate, capacity einsum dispatch, experts in a Python loop);
  * condmoe ``MoEMLP`` with token routing (sort-based dispatch; grouped GEMM on GPU, loop on CPU);
  * condmoe ``MoEMLP`` with attribute routing (two attribute segments, static no-dispatch path);
  * condmoe ``LinearMoEMLP`` (Uni-Perceiver-MoE's linear experts): attribute routing merges the two experts' weights
    per segment (its floor is the dense FFN on 1x the tokens: that is what it computes), token routing mixes per token;
  * expert compute alone on the same k x T rows sorted by expert, each against its own dense floor at equal shapes:
    condmoe's ``Experts`` (GELU MLPs; grouped GEMM where ``--grouped``, else its loop) and DeepSpeed AutoEP's
    ``deepspeed.moe.ep_experts.GroupedExperts`` (gated SwiGLU FFNs, w1/w3/w2), whose floor is a dense SwiGLU FFN.

Each row's ratio is to its own floor (``vs floor``): the dense FFN (GELU or SwiGLU) on the tokens it computes.

    python bench/moe_layer.py                                  # CPU, float32, small sizes
    python bench/moe_layer.py --device cuda --dtype bfloat16 --tokens 12608 --dim 768 --hidden 3072

Prints a table and writes JSON (``--json``). Not a test: numbers depend on the machine.
"""

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

# `python bench/x.py` from anywhere: the repository root on the path, models._compat before timm.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import condmoe.models._compat  # noqa: F401  (before timm)
import torch
import torch.nn.functional as F
from timm.layers import Mlp
from condmoe.models import MoEArgs, MoEMLP, pop_moe_stats
from condmoe.models.moe import RoutedLayer
from condmoe.models.router import ATTRIBUTES, RoutingContext


def timed(fn, iters: int, warmup: int, device: str) -> float:
    """Median milliseconds of ``fn`` (forward + backward)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--grouped", action="store_true", help="condmoe and AutoEP expert compute with grouped GEMMs")
    parser.add_argument("--json", default="bench/moe_layer.json")
    args = parser.parse_args()
    device, dtype = args.device, getattr(torch, args.dtype)
    torch.manual_seed(0)

    from condmoe.train.dist import init_distributed  # DeepSpeed's stock layer needs a (one-rank) process group

    init_distributed()
    from deepspeed.moe.ep_experts import GroupedExperts
    from deepspeed.moe.layer import MoE

    from condmoe.models.linear_moe import LinearMoEMLP
    from condmoe.models.moe import Experts

    x = torch.randn(1, args.tokens, args.dim, device=device, dtype=dtype, requires_grad=True)
    rows = []

    def run_layer(layer, inputs, extra=()):
        def step():
            out = layer(inputs, *extra)
            out = out[0] if isinstance(out, tuple) else out
            out.float().sum().backward()
            pop_moe_stats(layer) if isinstance(layer, RoutedLayer) else None
        return step

    def run_plain(fn, *inputs):
        def step():
            fn(*inputs).float().sum().backward()
        return step

    attributes = torch.tensor(ATTRIBUTES["visual_input"], device=device, dtype=dtype).repeat(1, args.tokens, 1)
    attributes[:, args.tokens // 2:] = torch.tensor(ATTRIBUTES["text_target"], device=device, dtype=dtype)
    ctx = RoutingContext(attribute_BNA=attributes)
    for k in (2, 1):
        dense = Mlp(args.dim, args.hidden).to(device, dtype)
        x_dense = torch.randn(1, k * args.tokens, args.dim, device=device, dtype=dtype, requires_grad=True)
        floor = f"dense FFN on {k}x tokens (floor)"
        rows.append((floor, k, timed(run_layer(dense, x_dense), args.iters, args.warmup, device), floor))
        stock = MoE(hidden_size=args.dim, expert=Mlp(args.dim, args.hidden), num_experts=args.experts, k=k,
                    capacity_factor=1.25, eval_capacity_factor=1.25, min_capacity=4).to(device, dtype)
        stock.set_deepspeed_parallelism()
        rows.append(("DeepSpeed stock MoE", k, timed(run_layer(stock, x), args.iters, args.warmup, device), floor))
        token = MoEArgs(num_experts=args.experts, top_k=k, capacity_factor=1.25)
        ours = MoEMLP(args.dim, args.hidden, args=token).to(device, dtype)
        rows.append(("condmoe MoEMLP, token routing", k, timed(run_layer(ours, x), args.iters, args.warmup, device),
                     floor))
        attr = MoEMLP(args.dim, args.hidden, args=MoEArgs(num_experts=args.experts, top_k=k, routing="attribute"))
        attr = attr.to(device, dtype)
        rows.append(("condmoe MoEMLP, attribute routing (static)", k,
                     timed(run_layer(attr, x, (ctx,)), args.iters, args.warmup, device), floor))
        for routing in ("attribute", "token"):
            linear = LinearMoEMLP(args.dim, args.hidden, args=MoEArgs(num_experts=args.experts, top_k=k,
                                                                      routing=routing, expert_type="linear",
                                                                      capacity_factor=1.25)).to(device, dtype)
            merged = routing == "attribute"
            rows.append((f"condmoe LinearMoEMLP, {routing} routing{' (merged)' if merged else ''}", k,
                         timed(run_layer(linear, x, (ctx,)), args.iters, args.warmup, device),
                         "dense FFN on 1x tokens (floor)" if merged else floor))

        # Expert compute alone: k x T rows sorted by expert, balanced counts, each form against its own floor.
        counts = torch.full((args.experts,), k * args.tokens // args.experts, device=device)
        rows_x = torch.randn(int(counts.sum()), args.dim, device=device, dtype=dtype, requires_grad=True)
        experts = Experts([Mlp(args.dim, args.hidden) for _ in range(args.experts)],
                          backend="grouped" if args.grouped else "loop").to(device, dtype)
        rows.append((f"condmoe Experts (GELU MLPs), {'grouped' if args.grouped else 'loop'}", k,
                     timed(run_plain(experts, rows_x, counts), args.iters, args.warmup, device), floor))
        swiglu = [(0.02 * torch.randn(a, b, device=device, dtype=dtype)).requires_grad_()
                  for a, b in ((args.hidden, args.dim), (args.hidden, args.dim), (args.dim, args.hidden))]

        def dense_swiglu(r, w=swiglu):
            return (F.silu(r @ w[0].t()) * (r @ w[1].t())) @ w[2].t()

        swiglu_floor = f"dense SwiGLU FFN on {k}x tokens (floor)"
        rows.append((swiglu_floor, k, timed(run_plain(dense_swiglu, rows_x), args.iters, args.warmup, device),
                     swiglu_floor))
        try:
            autoep = GroupedExperts(args.dim, args.hidden, args.experts, use_grouped_mm=args.grouped)
            for w in (autoep.w1, autoep.w2, autoep.w3):
                torch.nn.init.normal_(w, std=0.02)
            autoep = autoep.to(device, dtype)
            rows.append((f"DeepSpeed AutoEP GroupedExperts (SwiGLU), {'grouped' if args.grouped else 'loop'}", k,
                         timed(run_plain(autoep, rows_x, counts), args.iters, args.warmup, device), swiglu_floor))
        except (RuntimeError, ValueError) as exc:  # no grouped GEMM in this build: say so in the table
            print(f"AutoEP GroupedExperts skipped: {exc}")

    env = {"device": torch.cuda.get_device_name() if device == "cuda" else f"CPU ({platform.processor() or 'x86_64'}"
                     f", {torch.get_num_threads()} threads)",
           "dtype": args.dtype, "torch": torch.__version__, "tokens": args.tokens, "dim": args.dim,
           "hidden": args.hidden, "experts": args.experts}
    print(f"# MoE layer, forward+backward, {env['device']}, {args.dtype}, {args.tokens} tokens, "
          f"{args.dim}/{args.hidden}, {args.experts} experts")
    print(f"| {'layer':<55} | k | ms (median) | vs floor |")
    print(f"|{'-' * 57}|---|-------------|----------|")
    results = []
    by_name = {(name, k): ms for name, k, ms, _ in rows}
    for name, k, ms, floor_name in rows:
        floor = by_name.get((floor_name, k)) or by_name[(floor_name, 1)]  # the 1x floor is measured in the k=1 pass
        print(f"| {name:<55} | {k} | {ms:11.2f} | {ms / floor:7.2f}x |")
        results.append({"layer": name, "top_k": k, "ms": ms, "floor": floor_name, "vs_floor": ms / floor})
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"env": env, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    from condmoe.train.dist import shutdown_distributed

    main()
    shutdown_distributed()  # the process group this benchmark made: destroyed before the interpreter's exit
