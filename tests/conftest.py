"""Test setup: Triton kernels run under the interpreter on machines without CUDA.

TRITON_INTERPRET must be set before ``triton.jit`` decorates the kernels, i.e. before
``distr_compile`` is imported, so it is decided here, first.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
