"""Which attention kernel do ``backend="inductor"`` and ``backend="distr"`` emit for HF ViT and BERT here?

With torch 2.11 on H100/H200 GPUs (2026-11), Inductor ran HF ViT's SDPA call as the unfused fp32
math decomposition (bmm + ``_safe_softmax``), while a plain SDPA call on tensors of the same shape,
dtype and strides compiled to cuDNN. End to end, ``backend="inductor"`` was then several times
slower than the uncompiled model (ViT-base at 518 px: 30.6 ms against 6.4 ms), and any compiled
kernel "beats inductor". Run this before reading a speedup over ``backend="inductor"`` on your
torch build: for each case it compiles with Inductor (caches off) and prints the attention ops of
the post-grad graph (``_scaled_dot_product_cudnn_attention``, ``..._flash_attention``, or ``bmm``
for the math path).

    python benchmarks/sdpa_lowering.py                       # GPU: plain SDPA, HF ViT-base, BERT-base, a decoder
    python benchmarks/sdpa_lowering.py --sizes 224 --why     # also the reasons SDPA gives with math off
    python benchmarks/sdpa_lowering.py --device cpu --sizes 28 --batch 1   # a quick check of the script
"""

from __future__ import annotations

import argparse
import warnings

import torch
import torch.nn.functional as F

from distr_compile import models

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", choices=DTYPES, default="bf16")
    parser.add_argument("--sizes", type=int, nargs="+", default=[224, 518], help="ViT image sizes (px, multiples of 14)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--bert-tokens", type=int, default=512, help="BERT-base sequence length (padded batch)")
    parser.add_argument("--layers", type=int, default=1, help="ViT-base / BERT-base layers (the lowering is per layer)")
    parser.add_argument("--decoder", type=lambda s: tuple(map(int, s.split("x"))), nargs="*", default=[(4, 2048), (1, 8192)],
                        help="SmolLM2-shaped decoder (9 / 3 heads of dim 64, random weights) cases as BATCHxTOKENS")
    parser.add_argument("--why", action="store_true",
                        help="then disable the math SDPA backend and print every warning of the failed selection")
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("no CUDA device here; pass --device cpu to check the script")
    if any(s % 14 for s in args.sizes):
        parser.error(f"image sizes must be multiples of the patch size 14, got {args.sizes}")

    torch._inductor.config.force_disable_caches = True  # the post-grad pass runs on every compile
    warnings.filterwarnings("ignore", message="dynamo_pgo force disabled")
    seen: list[set[str]] = []

    def attention_ops(graph) -> None:
        names = {str(n.target) for n in graph.nodes if n.op == "call_function"}
        seen.append({n for n in names if "scaled_dot" in n or "softmax" in n or n.endswith("bmm.default")})

    torch._inductor.config.post_grad_custom_pre_pass = attention_ops

    def probe(label, fn, *fargs, mode=torch.no_grad, chars=200, backend="inductor", **kwargs) -> None:
        torch._dynamo.reset()
        seen.clear()
        try:
            with mode():
                torch.compile(fn, backend=backend)(*fargs, **kwargs)
            print(f"{label:60s} {sorted(set().union(*seen))}", flush=True)
        except Exception as e:  # report and go on to the next case
            print(f"{label:60s} FAILED {type(e).__name__}: {str(e)[:chars]}", flush=True)

    dev, dt = args.device, DTYPES[args.dtype]
    sdpa = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=None, dropout_p=0.0, scale=0.125)
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name() if dev.startswith('cuda') else dev}, {args.dtype}")
    for size in args.sizes:
        L = (size // 14) ** 2 + 1
        contiguous = [torch.randn(args.batch, 12, L, 64, device=dev, dtype=dt) for _ in range(3)]
        strided = [torch.randn(args.batch, L, 12, 64, device=dev, dtype=dt).transpose(1, 2) for _ in range(3)]
        probe(f"plain SDPA, L={L}, (B, H, L, D) contiguous", sdpa, *contiguous)
        probe(f"plain SDPA, L={L}, (B, L, H, D) storage (HF's layout)", sdpa, *strided)
        pixels = torch.randn(args.batch, 3, size, size, device=dev, dtype=dt)
        for attn in ("sdpa", "eager"):
            vit = models.vit(size, "base", layers=args.layers, attn_implementation=attn).to(dev, dt)
            probe(f"HF ViT-base {size} px, {args.layers} layer(s), {attn} attention", vit, pixel_values=pixels)
        vit = models.vit(size, "base", layers=args.layers).to(dev, dt).requires_grad_(False)
        probe(f"HF ViT-base {size} px, inference_mode, frozen", vit, pixel_values=pixels, mode=torch.inference_mode)
        probe(f"HF ViT-base {size} px, backend=distr", vit, pixel_values=pixels, backend="distr")
    bert = models.bert(args.layers).to(dev, dt)
    padded = models.padded_batch(args.batch, args.bert_tokens, bert.config.vocab_size, dev)
    for backend in ("inductor", "distr"):
        probe(f"HF BERT-base {args.bert_tokens} tokens, padding mask, backend={backend}", bert, backend=backend, **padded)
    decoder = models.smollm2_shaped(args.layers).to(dev, dt)
    for batch, tokens in args.decoder:
        ids = torch.randint(0, decoder.config.vocab_size, (batch, tokens), device=dev)
        for backend in ("inductor", "distr"):
            probe(f"SmolLM2-shaped decoder, {batch} x {tokens} tokens, backend={backend}", decoder, backend=backend,
                  input_ids=ids, use_cache=False)

    if args.why and dev.startswith("cuda"):
        torch.backends.cuda.enable_math_sdp(False)
        size = args.sizes[-1]
        vit = models.vit(size, "base", layers=args.layers).to(dev, dt)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            probe(f"HF ViT-base {size} px, math SDPA disabled", vit, chars=6000,
                  pixel_values=torch.randn(args.batch, 3, size, size, device=dev, dtype=dt))
        for w in caught:
            print("   warning:", w.category.__name__, str(w.message))


if __name__ == "__main__":
    main()
