"""Which attention op does Inductor emit for HF ViT on CUDA, and what sends it to the math path?

Session 2 saw Inductor run HF ViT-base's SDPA as the fp32 math decomposition while eager SDPA on the
same tensors takes a fused kernel. Each variant below is compiled with Inductor (caches off, so the
post-grad pass always runs) and prints the attention ops of its post-grad graph.
"""
import warnings

import torch
import torch.nn.functional as F

from distr_compile import models

torch._inductor.config.force_disable_caches = True
seen: list[set] = []


def attention_ops(graph) -> None:
    names = {str(n.target) for n in graph.nodes if n.op == "call_function"}
    seen.append({n for n in names if "scaled_dot" in n or "softmax" in n or n.endswith("bmm.default")})


torch._inductor.config.post_grad_custom_pre_pass = attention_ops


def probe(label, fn, *args, mode=torch.no_grad, chars=200, **kwargs):
    torch._dynamo.reset()
    seen.clear()
    try:
        with mode():
            torch.compile(fn)(*args, **kwargs)
        print(f"{label:58s} {sorted(set().union(*seen))}", flush=True)
    except Exception as e:  # a probe: report and go on
        print(f"{label:58s} FAILED {type(e).__name__}: {str(e)[:chars]}", flush=True)


B, H, L, D = 8, 12, 1370, 64
dev, dt = "cuda", torch.bfloat16
contiguous = [torch.randn(B, H, L, D, device=dev, dtype=dt) for _ in range(3)]
strided = [torch.randn(B, L, H, D, device=dev, dtype=dt).transpose(1, 2) for _ in range(3)]
sdpa = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=None, dropout_p=0.0, scale=0.125)
print("eager _fused_sdp_choice (contiguous, strided):",
      torch._fused_sdp_choice(*contiguous, scale=0.125), torch._fused_sdp_choice(*strided, scale=0.125))
probe("sdpa (B,H,L,D) contiguous", sdpa, *contiguous)
probe("sdpa (B,L,H,D) storage, transposed", sdpa, *strided)
probe("sdpa strided, inference_mode", sdpa, *strided, mode=torch.inference_mode)

x518 = torch.randn(2, 3, 518, 518, device=dev, dtype=dt)
for layers in (1, 12):
    vit = models.vit(518, "base", layers=layers).to(dev, dt)
    probe(f"HF ViT-base {layers} layer(s) 518px no_grad", vit, pixel_values=x518)
vit = models.vit(518, "base", layers=1).to(dev, dt)
probe("HF ViT 1 layer 518px inference_mode", vit, pixel_values=x518, mode=torch.inference_mode)
vit.requires_grad_(False)
probe("HF ViT 1 layer 518px, parameters requires_grad=False", vit, pixel_values=x518)
vit = models.vit(224, "base", layers=1).to(dev, dt)
probe("HF ViT 1 layer 224px no_grad", vit, pixel_values=torch.randn(2, 3, 224, 224, device=dev, dtype=dt))
vit = models.vit(518, "base", layers=1, attn_implementation="eager").to(dev, dt)
probe("HF ViT 1 layer 518px eager attention", vit, pixel_values=x518)

# Session 3: every HF variant above lowers to bmm (math), the plain SDPA calls to cuDNN. With the math
# backend disabled, SDPA's selection must fail and its warnings say why each fused kernel refused.
torch.backends.cuda.enable_math_sdp(False)
vit = models.vit(518, "base", layers=1).to(dev, dt)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    probe("HF ViT 1 layer 518px, math SDPA disabled", vit, pixel_values=x518, chars=6000)
for w in caught:  # session 3 cut these at 300 characters and filtered them: the reason was lost
    print("   warning:", w.category.__name__, str(w.message))
