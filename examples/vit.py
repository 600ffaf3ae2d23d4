"""A Vision Transformer compiled with ``backend="distr"`` vs ``backend="inductor"`` and uncompiled: latency, cosine.

The ViT is built from a ``transformers`` ViTConfig with random weights (speed does not need
trained ones): patch 14 (as DINOv2), head dim 64, one model per image size so that its position
embeddings fit (224 px: 257 tokens, 518 px: 1370 tokens). For each size it runs a batch of random
images through both compiled models and the uncompiled one, and prints median latencies, distr's
speedup over inductor and over the fastest exact run, and the cosine similarity of the distr
output to the exact one (per token; mean and min). The uncompiled model is the fair baseline to
keep in view: with torch 2.11 on CUDA, Inductor runs HF ViT's attention unfused (BENCHMARKS.md).

On a CPU ``approximate="auto"`` keeps every layer exact; ``--approximate always`` approximates
every layer (the cosine drops: random weights, zero-shot DistrAttention).

    python examples/vit.py
    python examples/vit.py --preset tiny --layers 2 --image-sizes 56 112 --approximate always
    python examples/vit.py --device cuda --preset base --image-sizes 224 518 --batch 16
"""

from __future__ import annotations

import argparse

import torch
from tabulate import tabulate
from tqdm import tqdm

from distr_compile import models
from distr_compile.config import APPROXIMATE

PATCH = 14


def parse_args() -> argparse.Namespace:
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image-sizes", type=int, nargs="+", default=[224, 518] if cuda else [224],
                        help=f"square image sizes in px, multiples of {PATCH}")
    parser.add_argument("--preset", choices=list(models.VIT_PRESETS), default="base" if cuda else "small")
    parser.add_argument("--layers", type=int, default=None, help="transformer layers (default: the preset's)")
    parser.add_argument("--batch", type=int, default=8 if cuda else 1)
    parser.add_argument("--approximate", choices=APPROXIMATE, default="auto")
    parser.add_argument("--group-size", type=int, default=2, choices=(1, 2, 4, 8))
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="bfloat16" if cuda else "float32")
    parser.add_argument("--repeats", type=int, default=10 if cuda else 3)
    parser.add_argument("--device", default="cuda" if cuda else "cpu")
    args = parser.parse_args()
    bad = [s for s in args.image_sizes if s < PATCH or s % PATCH]
    if bad:
        parser.error(f"--image-sizes must be positive multiples of the patch size {PATCH}, got {bad}")
    if (args.layers is not None and args.layers < 1) or args.batch < 1 or args.repeats < 1:
        parser.error("--layers, --batch and --repeats must be >= 1")
    if args.device.startswith("cuda") and not cuda:
        parser.error("--device cuda given but no CUDA GPU is available")
    return args


def run_size(args: argparse.Namespace, size: int) -> list:
    """One table row: both backends and the uncompiled model on a batch of random ``size`` px images."""
    dtype = getattr(torch, args.dtype)
    model = models.vit(size, args.preset, args.layers, PATCH).to(args.device, dtype)
    pixels = torch.randn(args.batch, 3, size, size, device=args.device, dtype=dtype)
    options = {"approximate": args.approximate, "group_size": args.group_size}
    with torch.no_grad():
        torch._dynamo.reset()
        exact = torch.compile(model, backend="inductor")
        ref, t_exact = models.timed(lambda: exact(pixel_values=pixels).last_hidden_state, args.repeats)
        _, t_eager = models.timed(lambda: model(pixel_values=pixels).last_hidden_state, args.repeats)
        torch._dynamo.reset()
        distr = torch.compile(model, backend="distr", options=options)
        out, t_distr = models.timed(lambda: distr(pixel_values=pixels).last_hidden_state, args.repeats)
    cosine = torch.nn.functional.cosine_similarity(out.float(), ref.float(), dim=-1)
    return [size, ref.shape[1], t_exact, t_eager, t_distr, t_exact / t_distr, min(t_exact, t_eager) / t_distr,
            cosine.mean().item(), cosine.min().item(), models.approximated(distr)]


def main() -> None:
    args = parse_args()
    depth = args.layers or models.VIT_PRESETS[args.preset][1]
    print(f"ViT-{args.preset} ({depth} layers, patch {PATCH}, random weights) on {args.device} ({args.dtype}), "
          f"batch {args.batch}, approximate={args.approximate}, G={args.group_size}")
    rows = [run_size(args, size) for size in tqdm(args.image_sizes, desc="image sizes", unit="size")]
    print()
    print(tabulate(rows, headers=["px", "tokens", "inductor ms", "eager ms", "distr ms", "vs inductor", "vs best exact",
                                  "mean cosine", "min cosine", "layers approximated"],
                   floatfmt=(None, None, ".2f", ".2f", ".2f", ".2f", ".2f", ".4f", ".4f", None)))


if __name__ == "__main__":
    main()
