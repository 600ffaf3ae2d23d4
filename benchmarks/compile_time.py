"""Compile time of ``backend="distr"`` against ``backend="inductor"`` on random-init HF models.

Models (``--model``, several at once make one table): ``llama``, Llama-3.2-1B's shape
(``distr_compile.models.llama``; 4 layers, 2048 tokens); ``bert``, BERT-base with a right-padding
mask (16 x 512 tokens); ``vit``, ViT-base at 518 px (patch 14, batch 8).

Each measurement runs in a fresh process with Inductor's caches disabled, and times the first
call (Dynamo trace + our pass and guard + Inductor) minus a warm call. Triton's own on-disk cache
(compiled kernels) is reported both ways, for every backend alike: "cold" runs get an empty
TRITON_CACHE_DIR each (a first compile on a new machine), "warm" runs share one that an unmeasured
run of the same setting filled (every later compile of the same model); ``--cold-only`` skips the
warm runs. "distr's own s" is the part of a cold first call spent in the backend's own stages
(matching, calibration, mask rewrite, rewrite; Inductor excluded), from the stage times the
backend logs. Prints a table and appends it to BENCHMARKS.md with --out; the target is distr
within 1.25x of inductor.

    python benchmarks/compile_time.py --device cuda --dtype bfloat16 --model llama bert vit --repeats 3 --out BENCHMARKS.md
    python benchmarks/compile_time.py --device cpu --dtype float32 --model llama bert vit --smoke  # a CPU check
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import pathlib
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

SETTINGS = {
    "inductor": ("inductor", None),
    "distr (default: guard calibrates)": ("distr", {}),
    "distr (approximate='always')": ("distr", {"approximate": "always"}),
}
MODELS = ("llama", "bert", "vit")
DEFAULTS = {  # per model: the realistic sizes of the 1.25x target
    "llama": {"layers": 4, "tokens": 2048, "batch": 1},
    "bert": {"layers": 12, "tokens": 512, "batch": 16},
    "vit": {"layers": 12, "batch": 8, "image_size": 518, "preset": "base"},
}
SMOKE = {  # --smoke: tiny sizes that compile in seconds on a CPU
    "llama": {"layers": 1, "tokens": 32, "batch": 1},
    "bert": {"layers": 1, "tokens": 32, "batch": 2},
    "vit": {"layers": 1, "batch": 2, "image_size": 28, "preset": "tiny"},
}
PATCH = 14


def sizes(model: str, args: argparse.Namespace) -> dict[str, Any]:
    """``model``'s sizes: its defaults (or ``--smoke``'s), overridden by the flags given."""
    chosen = dict((SMOKE if args.smoke else DEFAULTS)[model])
    for key in chosen:
        if getattr(args, key, None) is not None:
            chosen[key] = getattr(args, key)
    return chosen


def describe(model: str, args: argparse.Namespace) -> str:
    """A short description of ``model`` at its sizes, for the table."""
    s = sizes(model, args)
    layers = f"{s['layers']} layer{'s' * (s['layers'] != 1)}"
    if model == "llama":
        return f"Llama-3.2-1B shape, {layers}, {s['batch']}x{s['tokens']} tokens"
    if model == "bert":
        return f"BERT-base shape, {layers}, {s['batch']}x{s['tokens']} tokens padded"
    return f"ViT-{s['preset']}, {layers}, {s['batch']}x{s['image_size']} px"


def build(model: str, args: argparse.Namespace) -> tuple[Any, dict[str, Any]]:
    """The random-init model (eval mode, on ``args.device`` in ``args.dtype``) and its keyword inputs."""
    import torch

    from distr_compile import models

    s, dtype = sizes(model, args), getattr(torch, args.dtype)
    if model == "llama":
        net = models.llama(s["layers"], attn_implementation=args.attn)
        gen = torch.Generator().manual_seed(0)
        inputs = {"input_ids": torch.randint(0, net.config.vocab_size, (s["batch"], s["tokens"]), generator=gen)}
    elif model == "bert":
        net = models.bert(s["layers"], attn_implementation=args.attn)
        inputs = models.padded_batch(s["batch"], s["tokens"], net.config.vocab_size, "cpu")
    else:
        net = models.vit(s["image_size"], s["preset"], s["layers"], patch_size=PATCH, attn_implementation=args.attn)
        gen = torch.Generator().manual_seed(0)
        inputs = {"pixel_values": torch.randn(s["batch"], 3, s["image_size"], s["image_size"], generator=gen,
                                              dtype=dtype)}
    return net.to(args.device, dtype), {k: v.to(args.device) for k, v in inputs.items()}


class StageTimes(logging.Handler):
    """Collects the stage times the distr backend logs (records with ``distr_stage``)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.seconds: dict[str, float] = {}

    def emit(self, record: logging.LogRecord) -> None:
        stage = getattr(record, "distr_stage", None)
        if stage is not None:
            self.seconds[stage] = self.seconds.get(stage, 0.0) + record.seconds

    def own(self) -> float | None:
        """Seconds in the backend's own stages (None when no distr backend ran)."""
        from distr_compile.backend import INDUCTOR

        return sum(t for stage, t in self.seconds.items() if stage != INDUCTOR) if self.seconds else None


def measure(model: str, backend: str, options: dict | None, args: argparse.Namespace) -> dict[str, float | None]:
    """One compile in this process: seconds of the first call beyond a warm call, and of the
    backend's own stages within it."""
    import torch

    torch._inductor.config.force_disable_caches = True
    net, inputs = build(model, args)
    stages = StageTimes()
    logger = logging.getLogger("distr_compile")
    logger.addHandler(stages)
    logger.setLevel(logging.INFO)
    kwargs = {"backend": backend} if options is None else {"backend": backend, "options": options}
    compiled = torch.compile(net, **kwargs)
    with torch.no_grad():
        first = _timed_call(compiled, inputs, args.device)
        warm = _timed_call(compiled, inputs, args.device)
    return {"seconds": first - warm, "own": stages.own()}


def _timed_call(fn: Any, inputs: dict, device: str) -> float:
    """Wall seconds of ``fn(**inputs)``, synchronized on CUDA."""
    import torch

    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    sync()
    start = time.perf_counter()
    fn(**inputs)
    sync()
    return time.perf_counter() - start


def run_one(model: str, name: str, cache_dir: str) -> dict[str, float | None]:
    """One measurement of setting ``name`` on ``model`` in a fresh process using Triton cache ``cache_dir``."""
    env = os.environ | {"TRITON_CACHE_DIR": cache_dir}
    out = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--one", model, name],
                         capture_output=True, text=True, env=env)
    if out.returncode:
        sys.exit(f"{model} / {name} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def parse_args() -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", nargs="+", choices=MODELS, default=["llama"], help="one row group each")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--layers", type=int, help="every model's layers (default: llama 4, bert 12, vit 12)")
    parser.add_argument("--tokens", type=int, help="llama and bert tokens per sequence (default 2048, 512)")
    parser.add_argument("--batch", type=int, help="every model's batch (default: llama 1, bert 16, vit 8)")
    parser.add_argument("--image-size", type=int, help=f"vit image size in px, a multiple of {PATCH} (default 518)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (1 layer, a few tokens), for a CPU check")
    parser.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"])
    parser.add_argument("--repeats", type=int, default=3, help="runs per setting and cache state")
    parser.add_argument("--cold-only", action="store_true", help="skip the warm Triton cache runs")
    parser.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=list(SETTINGS),
                        help="which settings to run (the first is the baseline of the ratios)")
    parser.add_argument("--out", type=pathlib.Path, help="append the table to this markdown file")
    parser.add_argument("--one", nargs=2, metavar=("MODEL", "SETTING"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    for name in ("layers", "tokens", "batch", "image_size", "repeats"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.image_size is not None and args.image_size % PATCH:
        parser.error(f"--image-size must be a multiple of the patch size {PATCH}, got {args.image_size}")
    return parser, args


def collect(args: argparse.Namespace) -> dict[tuple[str, str, str], list[dict]]:
    """Every measurement, by (model, setting, cache state), settings interleaved within each
    repeat so a drifting machine hits all alike."""
    states = ("cold",) if args.cold_only else ("cold", "warm")
    runs = {(m, name, state): [] for m in args.model for name in args.settings for state in states}
    with tempfile.TemporaryDirectory() as tmp:
        warm_dirs = {(m, name): tempfile.mkdtemp(dir=tmp) for m in args.model for name in args.settings}
        if not args.cold_only:
            for m, name in warm_dirs:
                run_one(m, name, warm_dirs[m, name])  # fills the cache, not counted
        for _ in range(args.repeats):
            for m in args.model:
                for name in args.settings:
                    runs[m, name, "cold"].append(run_one(m, name, tempfile.mkdtemp(dir=tmp)))
                    if not args.cold_only:
                        runs[m, name, "warm"].append(run_one(m, name, warm_dirs[m, name]))
                    print(m, name, {state: runs[m, name, state][-1]["seconds"] for state in states}, flush=True)
    return runs


def table(runs: dict[tuple[str, str, str], list[dict]], args: argparse.Namespace) -> list[dict]:
    """One row per model and setting: median seconds per cache state, the ratio to the first
    setting's, distr's own seconds (cold runs) and every run."""
    states = ("cold",) if args.cold_only else ("cold", "warm")
    median = lambda m, name, state: statistics.median(r["seconds"] for r in runs[m, name, state])  # noqa: E731
    rows = []
    for m in args.model:
        for name in args.settings:
            row = {"model": describe(m, args), "backend": name}
            for state in states:
                seconds = median(m, name, state)
                row[f"{state} Triton cache s"] = seconds
                row[f"vs inductor ({state})"] = f"{seconds / median(m, args.settings[0], state):.2f}x"
            own = [r["own"] for r in runs[m, name, "cold"] if r["own"] is not None]
            row["distr's own s"] = statistics.median(own) if own else None
            row["runs " + " / ".join(states)] = " / ".join(
                " ".join(f"{r['seconds']:.1f}" for r in runs[m, name, state]) for state in states)
            rows.append(row)
    return rows


def _without_out(argv: list[str]) -> list[str]:
    """The command line's arguments less ``--out FILE`` (for the table's description)."""
    if "--out" not in argv:
        return argv
    i = argv.index("--out")
    return argv[:i] + argv[i + 2:]


def main() -> None:
    parser, args = parse_args()
    if args.one:
        model, name = args.one
        backend, options = SETTINGS[name]
        print(json.dumps(measure(model, backend, options, args)))
        return
    sys.path.insert(0, str(pathlib.Path(__file__).parent))
    from results import append_section

    rows = table(collect(args), args)
    flags = shlex.join(_without_out(sys.argv[1:]))
    append_section(
        args.out, 'Compile time: backend="distr" vs "inductor"',
        f"random-init HF models, {args.attn} attention, {args.dtype}. `python benchmarks/compile_time.py {flags}`: "
        "each run a fresh process with Inductor's caches off; seconds of the first call beyond a warm call; "
        f"medians of {args.repeats} runs per cache state, settings interleaved (cold: empty Triton cache"
        + ("" if args.cold_only else "; warm: filled by one unmeasured run of the same setting")
        + "); distr's own s: its matching, calibration and rewrites in the cold runs (Inductor excluded). "
        f"Forward autotune space: DISTR_COMPILE_AUTOTUNE={os.environ.get('DISTR_COMPILE_AUTOTUNE', '1')}.",
        rows, device=args.device, floatfmt=".3g",  # 3 digits: own seconds are often ms
    )


if __name__ == "__main__":
    main()
