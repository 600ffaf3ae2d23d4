"""Minimal repro for upstream: AOTInductor (torch 2.13, CPU) returns float32 for ``2 ** arange``.

Eager and torch.compile give int64; the AOTI package gives float32, and int64 arithmetic built on
it (here: LSH codes) comes out wrong. Found through distr_compile's CPU AOTI test.
"""
import tempfile

import torch


class Codes(torch.nn.Module):
    def forward(self, proj):
        pow_codes = ((proj > 0).long() * (2 ** torch.arange(16))[:, None]).sum(-2)
        shift_codes = ((proj > 0).long() << torch.arange(16)[:, None]).sum(-2)
        return pow_codes, shift_codes, 2 ** torch.arange(16) + 0 * proj.long().sum()


proj = torch.randn(2, 4, 3, 16, 32, generator=torch.Generator().manual_seed(0))
model = Codes()
path = torch._inductor.aoti_compile_and_package(torch.export.export(model, (proj,)), package_path=tempfile.mktemp(suffix=".pt2"))
for name, got, want in zip(("2 ** arange codes", "shift codes", "2 ** arange"), torch._inductor.aoti_load_package(path)(proj), model(proj)):
    print(f"{name}: AOTI {got.dtype}, eager {want.dtype}, equal {torch.equal(got.to(want.dtype), want)}")
