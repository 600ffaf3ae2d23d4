"""Why is inductor's ViT-base at 518 px slow, and why is distr with the exact G=1 kernel at every
site (12.0 ms) slower than eager (6.4 ms) when the kernel alone matches cuDNN? Top CUDA kernels of
three forwards per setting (session 3's question)."""
import torch
from torch.profiler import ProfilerActivity, profile

from distr_compile import models

SETTINGS = (
    ("eager", None, {}),
    ("inductor", "inductor", {}),
    ("distr G=1", "distr", {"options": {"approximate": "always", "group_size": 1}}),
    ("distr G=2", "distr", {"options": {"approximate": "always"}}),
)
for name, backend, options in SETTINGS:
    torch._dynamo.reset()
    model = models.vit(518, "base").cuda().bfloat16()
    x = torch.randn(8, 3, 518, 518, device="cuda", dtype=torch.bfloat16)
    compiled = model if backend is None else torch.compile(model, backend=backend, **options)
    with torch.no_grad():
        for _ in range(3):
            compiled(pixel_values=x)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                compiled(pixel_values=x)
            torch.cuda.synchronize()
    print(f"===== {name}")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=8, max_name_column_width=70))
