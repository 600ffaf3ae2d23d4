"""Why is inductor's ViT-base at 518 px slow? Top CUDA kernels of one compiled forward."""
import torch
from torch.profiler import ProfilerActivity, profile

from distr_compile import models

for backend, options in (("inductor", {}), ("distr", {"options": {"approximate": "always"}})):
    torch._dynamo.reset()
    model = models.vit(518, "base").cuda().bfloat16()
    x = torch.randn(8, 3, 518, 518, device="cuda", dtype=torch.bfloat16)
    compiled = torch.compile(model, backend=backend, **options)
    with torch.no_grad():
        for _ in range(3):
            compiled(pixel_values=x)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                compiled(pixel_values=x)
            torch.cuda.synchronize()
    print(f"===== {backend}")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=8, max_name_column_width=70))
