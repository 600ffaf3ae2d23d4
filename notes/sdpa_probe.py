"""Which SDPA backend does HF ViT's sdpa attention get on this GPU, and why not flash?"""
import warnings

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from distr_compile import models

seen = []
original = F.scaled_dot_product_attention


def spy(*args, **kwargs):
    if not seen:
        seen.append((args, kwargs))
    return original(*args, **kwargs)


F.scaled_dot_product_attention = spy
model = models.vit(518, "base").cuda().bfloat16()
with torch.no_grad():
    model(pixel_values=torch.randn(8, 3, 518, 518, device="cuda", dtype=torch.bfloat16))
F.scaled_dot_product_attention = original
args, kwargs = seen[0]
print({k: v for k, v in kwargs.items() if not isinstance(v, torch.Tensor)})
for t in args:
    print(tuple(t.shape), t.dtype, t.stride(), t.requires_grad)
for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION):
    with warnings.catch_warnings(record=True) as caught, sdpa_kernel(backend), torch.no_grad():
        warnings.simplefilter("always")
        try:
            original(*args, **kwargs)
            print(backend, "ok")
        except RuntimeError as e:
            print(backend, "refused:", str(e)[:200], [str(w.message)[:200] for w in caught])
