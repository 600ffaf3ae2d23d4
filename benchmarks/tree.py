"""Tree Attention vs Ring Attention vs one device: per-step decode latency, bytes, peak memory,
and a latency/bytes model vs the number of GPUs calibrated on the measured collectives.

    PYTHONPATH=. torchrun --nproc-per-node 2 benchmarks/tree.py               # 2 GPUs, NCCL
    PYTHONPATH=. torchrun --nproc-per-node 2 benchmarks/tree.py --smoke       # CPU, gloo, tiny

One decode step: q (B, Hq, 1, d) replicated, the KV cache of N tokens split evenly over p ranks.
  tree:   local split-KV partial + log-depth combine (distr_compile.distributed.tree_attention)
  ring:   pass-KV ring (ring_attention_decode), p - 1 shard transfers overlapped with compute
  single: rank 0 alone attends the whole cache (the same local kernel)
A step's latency is the max over ranks (ranks start together after a barrier); the table gives
its median, p90 and max over iterations. The model (below ``model_*``) extrapolates to 128 GPUs
from alpha-beta fits of the measured all-reduce, all-gather and point-to-point times and a linear
fit of the local attention time; links between nodes are not measurable here and are parameters.
Results are printed and appended to BENCHMARKS.md; the model is plotted with matplotlib. ``--json``
saves the raw measurements and ``--from-json`` rebuilds report and plot from them elsewhere (for
machines without matplotlib, or to re-run the model with other node parameters).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time
from datetime import date
from pathlib import Path

import torch
import torch.distributed as dist

from distr_compile.distributed import CommCounter, local_partial, ring_attention_decode, tree_attention, tree_comm
from distr_compile.distributed.combine import choose_mode
from distr_compile.distributed.comm import all_gather


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--contexts", type=int, nargs="+", default=[1 << 16, 1 << 17, 1 << 18, 1 << 19, 1 << 20])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=32, help="query heads")
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16")
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--max-gpus", type=int, default=128, help="model: largest GPU count")
    p.add_argument("--gpus-per-node", type=int, default=8, help="model: GPUs per node")
    p.add_argument("--inter-node-gbps", type=float, default=50.0, help="model: GB/s per GPU between nodes (400 Gb/s IB)")
    p.add_argument("--inter-node-latency-us", type=float, default=10.0, help="model: latency per hop between nodes")
    p.add_argument("--md", default=None, help="append results to this markdown file (default BENCHMARKS.md, none with --smoke)")
    p.add_argument("--plot", default="benchmarks/tree_model.png", help="model plot ('' for none)")
    p.add_argument("--smoke", action="store_true", help="tiny sizes that run on CPU with gloo in seconds")
    p.add_argument("--json", default="", help="also save the raw measurements here")
    p.add_argument("--from-json", default="", help="no run: rebuild the report, model and plot from a --json file")
    args = p.parse_args()
    if args.smoke:
        args.contexts, args.heads, args.kv_heads, args.head_dim = [256, 1024], 4, 2, 16
        args.dtype, args.iters, args.warmup = "float32", 5, 2
    if args.heads % args.kv_heads:
        p.error("--heads must be a multiple of --kv-heads")
    return args


# --------------------------------------------------------------------------- measuring


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(fn, iters: int, warmup: int, device: torch.device) -> list[float]:
    """Milliseconds of each of ``iters`` calls, max over ranks (every rank must call this)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        dist.barrier()
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    t = torch.tensor(times, dtype=torch.float64, device=device if device.type == "cuda" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def summary(times: list[float]) -> dict[str, float]:
    ordered = sorted(times)
    return {"median": statistics.median(ordered), "p90": ordered[min(len(ordered) - 1, math.ceil(0.9 * len(ordered)) - 1)], "max": ordered[-1]}


def peak_gib(fn, device: torch.device) -> float:
    """Peak allocated GiB during one call, max over ranks (NaN off CUDA)."""
    if device.type != "cuda":
        return float("nan")
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    peak = torch.tensor([torch.cuda.max_memory_allocated(device) / 2**30], device=device)
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    return peak.item()


def measure_decode(args, N: int, rank: int, world: int, device: torch.device, dtype: torch.dtype) -> list[dict]:
    """Tree and ring rows for one context length N split evenly over the ranks."""
    B, Hq, Hkv, d = args.batch, args.heads, args.kv_heads, args.head_dim
    lengths = [N // world + (r < N % world) for r in range(world)]
    g = torch.Generator(device=device).manual_seed(rank)
    q = torch.randn(B, Hq, 1, d, device=device, dtype=dtype, generator=torch.Generator(device=device).manual_seed(0))
    k = torch.randn(B, Hkv, lengths[rank], d, device=device, dtype=dtype, generator=g)
    v = torch.randn(B, Hkv, lengths[rank], d, device=device, dtype=dtype, generator=g)
    runs = {
        "tree": lambda c=None: tree_attention(q, k, v, counter=c),
        "ring": lambda c=None: ring_attention_decode(q, k, v, shard_lengths=lengths, counter=c),
    }
    rows = []
    for name, fn in runs.items():
        counter = CommCounter()
        fn(counter)
        rows.append({"method": name, "N": N, "ranks": world, **summary(time_steps(fn, args.iters, args.warmup, device)),
                     "wire_MiB": counter.stats.wire_bytes / 2**20, "peak_GiB": peak_gib(fn, device)})
    return rows


def measure_single(args, N: int, rank: int, device: torch.device, dtype: torch.dtype) -> dict:
    """Rank 0 alone attends the whole cache of N tokens (the other ranks hold nothing and wait)."""
    B, Hq, Hkv, d = args.batch, args.heads, args.kv_heads, args.head_dim
    n = N if rank == 0 else 0
    q = torch.randn(B, Hq, 1, d, device=device, dtype=dtype)
    k, v = (torch.randn(B, Hkv, n, d, device=device, dtype=dtype) for _ in range(2))
    fn = lambda: local_partial(q, k, v)  # noqa: E731
    return {"method": "single", "N": N, "ranks": 1, **summary(time_steps(fn, args.iters, args.warmup, device)),
            "wire_MiB": 0.0, "peak_GiB": peak_gib(fn, device)}


def fit_line(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares (intercept, slope), both clipped at 0 (a negative latency is noise)."""
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    var = sum((x - mx) ** 2 for x in xs)
    slope = max(0.0, sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var) if var else 0.0
    return max(0.0, my - slope * mx), slope


def hops(p: int) -> int:
    """Latency terms of a log-depth collective over p ranks."""
    return math.ceil(math.log2(p))


def volume(kind: str, p: int) -> float:
    """Bytes each rank sends per message byte: ring all-reduce 2 (p-1)/p, all-gather p - 1, p2p 1."""
    return {"all_reduce": 2 * (p - 1) / p, "all_gather": p - 1, "p2p": 1}[kind]


def calibrate_collectives(args, rank: int, world: int, device: torch.device) -> dict[str, tuple[float, float]]:
    """Per-hop alpha (ms) and per-byte beta (ms per byte sent, i.e. 1 / bus bandwidth) of
    all-reduce, all-gather and one p2p exchange: median times over message sizes, fitted to
    t = alpha * hops(p) + beta * volume(p) * bytes on the measured world size."""
    sizes = [1 << s for s in (range(10, 17, 2) if args.smoke else range(12, 27, 2))]
    peer, prev = (rank + 1) % world, (rank - 1) % world
    ops = {
        "all_reduce": lambda t: dist.all_reduce(t),
        "all_gather": lambda t: all_gather(t, None, None),
        "p2p": lambda t: [r.wait() for r in dist.batch_isend_irecv(
            [dist.P2POp(dist.isend, t, peer), dist.P2POp(dist.irecv, torch.empty_like(t), prev)])],
    }
    fits = {}
    for name, op in ops.items():
        med = []
        for n in sizes:
            t = torch.ones(n // 4, device=device)
            med.append(statistics.median(time_steps(lambda: op(t), args.iters, args.warmup, device)))
        alpha, beta = fit_line([float(n) for n in sizes], med)
        fits[name] = (alpha / (1 if name == "p2p" else hops(world)), beta / volume(name, world))
    return fits


# --------------------------------------------------------------------------- model


def model_rows(args, fits, attn_fit, world_measured: int) -> list[dict]:
    """Predicted step latency and wire bytes per rank for p = 2, 4, ... max_gpus at every context.

    Inside a node the fitted alpha grows with log2(p) hops and the fitted 1/beta is the bus bandwidth;
    between nodes the CLI latency and bandwidth apply. Tree: local attention on N/p tokens, then the
    two-level combine (auto mode per level, as the code does). Ring: p attention steps, p - 1 of them
    overlapped with a shard transfer over the slowest link the ring crosses."""
    B, Hq, Hkv, d = args.batch, args.heads, args.kv_heads, args.head_dim
    rows_q, itemsize = B * Hq, torch.finfo(getattr(torch, args.dtype)).bits // 8
    inter_alpha, inter_beta = args.inter_node_latency_us / 1e3, 1e3 / (args.inter_node_gbps * 1e9)
    attn = lambda n: attn_fit[0] + attn_fit[1] * n  # noqa: E731

    def collective(kind: str, nbytes: float, p: int, inter: bool) -> float:
        alpha, beta = (inter_alpha, inter_beta) if inter else fits[kind]
        return alpha * hops(p) + beta * volume(kind, p) * nbytes

    out = []
    p = 2
    while p <= args.max_gpus:
        local = min(p, args.gpus_per_node)
        levels = [(local, False)] + ([(p // local, True)] if p > local else [])
        for N in args.contexts:
            combine_ms = wire = 0.0
            for size, inter in levels:
                mode = choose_mode(rows_q, d, size)
                stats = tree_comm(rows_q, d, mode, (size,))
                wire += stats.wire_bytes
                if mode == "allgather":
                    combine_ms += collective("all_gather", rows_q * (d + 1) * 4, size, inter)
                else:
                    combine_ms += collective("all_reduce", rows_q * 4, size, inter)
                    combine_ms += collective("all_reduce", rows_q * (d + 1) * 4, size, inter)
            shard_bytes = B * Hkv * (N / p) * 2 * d * itemsize
            alpha, beta = (inter_alpha, inter_beta) if p > local else fits["p2p"]
            ring_ms = attn(N / p) + (p - 1) * max(attn(N / p), alpha + beta * shard_bytes)
            out.append({"gpus": p, "N": N, "tree_ms": attn(N / p) + combine_ms, "ring_ms": ring_ms,
                        "tree_MiB": wire / 2**20, "ring_MiB": (p - 1) * shard_bytes / 2**20,
                        "measured": p == world_measured})
        p *= 2
    return out


def plot(rows: list[dict], N: int, path: str, title: str) -> str:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib not installed: no plot"
    sel = [r for r in rows if r["N"] == N]
    gpus = [r["gpus"] for r in sel]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for key, label in (("tree", "Tree (all-reduce)"), ("ring", "Ring (pass-KV)")):
        ax1.plot(gpus, [r[f"{key}_ms"] for r in sel], marker="o", label=label)
        ax2.plot(gpus, [r[f"{key}_MiB"] for r in sel], marker="o", label=label)
    for ax, ylabel in ((ax1, "modelled decode step (ms)"), (ax2, "bytes sent per GPU per step (MiB)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("GPUs")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return f"plot written to {path}"


# --------------------------------------------------------------------------- report


def markdown(rows: list[dict], columns: list[str]) -> str:
    def fmt(x):
        return f"{x:.4g}" if isinstance(x, float) else str(x)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r[c]) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


SHAPE_ARGS = ("contexts", "batch", "heads", "kv_heads", "head_dim", "dtype", "iters", "warmup", "smoke")


def run(args) -> dict | None:
    """The measurements (every rank takes part); rank 0 returns them, the others None."""
    cuda = torch.cuda.is_available() and not args.smoke
    if cuda:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if world < 2:
        raise SystemExit("run with at least 2 ranks, e.g. torchrun --nproc-per-node 2 benchmarks/tree.py")
    dtype = getattr(torch, args.dtype)
    measured = []
    for N in args.contexts:
        measured += measure_decode(args, N, rank, world, device, dtype)
        measured.append(measure_single(args, N, rank, device, dtype))
        if cuda:
            torch.cuda.empty_cache()
    fits = calibrate_collectives(args, rank, world, device)
    dist.destroy_process_group()
    if rank != 0:
        return None
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    device_name = torch.cuda.get_device_name(device) if cuda else f"CPU ({os.cpu_count()} cores, gloo)"
    return {"measured": measured, "fits": fits, "world": world, "device": device_name, "date": str(date.today()),
            "versions": f"torch {torch.__version__}, triton {triton_version}",
            "config": {a: getattr(args, a) for a in SHAPE_ARGS}}


def report(results: dict, args) -> str:
    """Markdown: measured table, calibration, model table (and the plot as a side effect)."""
    measured, fits, world = results["measured"], results["fits"], results["world"]
    single = [r for r in measured if r["method"] == "single"]
    attn_fit = fit_line([float(r["N"]) for r in single], [r["median"] for r in single])
    model = model_rows(args, fits, attn_fit, world)
    by = {(r["method"], r["N"]): r for r in measured}
    for r in measured:
        r["vs_ring"] = by[("ring", r["N"])]["median"] / r["median"]
    header = (
        f"### Tree vs Ring decode ({results['date']}{', smoke' if args.smoke else ''})\n\n"
        f"{world} x {results['device']}; {results['versions']}; {args.dtype}; "
        f"B={args.batch}, Hq={args.heads}, Hkv={args.kv_heads}, d={args.head_dim}, Tq=1, KV split evenly; "
        f"{args.iters} steps after {args.warmup} warm-up; step latency = max over ranks. "
        f"`benchmarks/tree.py{' --smoke' if args.smoke else ''}`\n"
    )
    table = markdown(measured, ["method", "N", "ranks", "median", "p90", "max", "vs_ring", "wire_MiB", "peak_GiB"])
    fit_text = "; ".join(f"{k}: {a * 1e3:.1f} us + {1 / b / 1e6 if b else float('inf'):.1f} GB/s" for k, (a, b) in fits.items())
    N = max(args.contexts)
    model_table = markdown([r for r in model if r["N"] == N], ["gpus", "N", "tree_ms", "ring_ms", "tree_MiB", "ring_MiB", "measured"])
    plot_note = plot(model, N, args.plot, f"Tree vs Ring decode model, N={N}") if args.plot else "no plot"
    return (
        f"{header}\nMeasured (times in ms; vs_ring = ring median / this median; wire = bytes sent per rank per step):\n\n"
        f"{table}\n\nCollectives fitted on {world} ranks: {fit_text}; local attention: {attn_fit[0]:.3g} ms + "
        f"{attn_fit[1] * 1e6:.3g} ms per 1M tokens.\nModel at N={N} ({args.gpus_per_node} GPUs per node, "
        f"{args.inter_node_gbps} GB/s and {args.inter_node_latency_us} us between nodes; {plot_note}):\n\n{model_table}\n"
    )


def main() -> None:
    args = parse_args()
    if args.from_json:
        results = json.loads(Path(args.from_json).read_text())
        vars(args).update(results["config"])
    else:
        results = run(args)
        if results is None:
            return
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=1))
    text = report(results, args)
    print(text)
    md = args.md if args.md is not None else ("" if args.smoke else "BENCHMARKS.md")
    if md:
        with open(md, "a") as f:
            f.write("\n" + text)
        print(f"appended to {md}")


if __name__ == "__main__":
    main()
