"""Test setup: Triton kernels run under the interpreter on machines without CUDA, and Inductor
caches in a directory of this run.

TRITON_INTERPRET must be set before ``triton.jit`` decorates the kernels, i.e. before
``distr_compile`` is imported, so it is decided here, first. Inductor's caches key a graph that
calls ``distr::attention`` on the op's name and its Triton kernels, not on its PyTorch code (the
CPU path), so a cache left by an older checkout can serve code built from the old op: each test
run gets a fresh cache directory.
"""

import atexit
import os
import shutil
import tempfile

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="distr-compile-inductor-")
    atexit.register(shutil.rmtree, os.environ["TORCHINDUCTOR_CACHE_DIR"], ignore_errors=True)

import pytest  # noqa: E402


@pytest.fixture
def eager_backend(monkeypatch):
    """Run the distr backend's rewritten graphs with FX instead of Inductor (Inductor takes 10-20 s
    a graph on a 2-core CPU); collects every graph the backend built."""
    from distr_compile import backend

    graphs = []

    def run_graph(gm, example_inputs, config_patches=None):
        graphs.append(gm)
        return gm

    monkeypatch.setattr(backend, "compile_fx", run_graph)
    torch._dynamo.reset()
    yield graphs
    torch._dynamo.reset()


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
