"""The examples run end to end with small arguments (each in a fresh process, as a user runs them),
print their table, and reject bad arguments with a message and a non-zero exit code.

    pytest -q tests/test_examples.py             # all (the SmolLM2 ones are marked slow)
    pytest -q tests/test_examples.py -m "not slow"
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def run(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / script), *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=600)


def check_table(proc: subprocess.CompletedProcess, *headers: str) -> None:
    assert proc.returncode == 0, proc.stderr[-3000:]
    for header in headers:
        assert header in proc.stdout, proc.stdout


def test_vit_runs():
    proc = run("examples/vit.py", "--preset", "tiny", "--layers", "1", "--image-sizes", "28", "--repeats", "1",
               "--approximate", "always")
    check_table(proc, "inductor ms", "distr ms", "mean cosine", "layers approximated")
    assert "1/1" in proc.stdout  # "always": the one attention layer is approximated


def test_quickstart_runs():
    proc = run("examples/quickstart.py", "--sentences", "2", "--max-length", "16", "--repeats", "1")
    check_table(proc, "median ms", "mean cosine vs exact")


@pytest.mark.slow
def test_llm_perplexity_runs():
    proc = run("examples/llm_perplexity.py", "--context", "32", "--windows", "1", "--approximate", "always")
    check_table(proc, "perplexity", "tokens/s", "layers approximated", "30/30")


@pytest.mark.slow
def test_adapt_runs(tmp_path):
    """The adaptation recipe on the CPU (tiny settings): distillation steps through the compiled
    layers, the four perplexities, both guards, a loadable checkpoint, the loss plot and its numbers."""
    proc = run("examples/adapt.py", "--steps", "2", "--seq-len", "32", "--eval-windows", "1",
               "--guard-batches", "1", "--out", str(tmp_path))
    check_table(proc, "held-out", "DistrAttention, after adaptation", "end to end vs the original model")
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["steps"] == 2 and len(results["perplexity"]) == 4 and len(results["training_loss"]) == 2
    assert results["guard"]["layers"] == 30 and isinstance(results["guard"]["end_to_end_ppl_increase"], float)
    assert "on the guard windows with that plan" in proc.stdout
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["step"] == 2
    assert (tmp_path / "loss.png").stat().st_size > 0


@pytest.mark.slow
def test_adapt_projection_with_trained_maps_runs(tmp_path):
    """The calibrated projection recipe: per-layer maps fitted on training windows, adapted with
    the weights (``--train-maps``: the checkpoint holds every layer's A and B)."""
    proc = run("examples/adapt.py", "--grouping", "projection", "--train-maps", "--steps", "2", "--seq-len", "32",
               "--eval-windows", "1", "--guard-batches", "1", "--calibration-windows", "1", "--out", str(tmp_path))
    check_table(proc, "held-out", "DistrAttention, after adaptation", "end to end vs the original model")
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    maps = [name for name in state["model"] if "distr_projection" in name]
    assert state["step"] == 2 and len(maps) == 2 * 30


@pytest.mark.slow
def test_adapt_sigterm_saves_the_current_step(tmp_path):
    """SIGTERM mid-training (preemption, ``timeout``) leaves a checkpoint at the step reached, with
    that many losses, and exits with 128 + SIGTERM instead of losing the steps since the last save."""
    proc = subprocess.Popen([sys.executable, str(ROOT / "examples/adapt.py"), "--steps", "100000", "--seq-len", "16",
                             "--eval-windows", "1", "--guard-batches", "1", "--out", str(tmp_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    seen = ""
    while not re.search(r"adapting:.*?\| *[1-9]\d*/100000", seen):  # tqdm's bar after the first step
        char = proc.stderr.read(1)
        assert char, f"the run ended before a training step: {seen[-3000:]}"
        seen += char
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, (seen + err)[-3000:]
    assert "SIGTERM: stopped at step" in out
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert 1 <= state["step"] < 100000 and len(state["extra"]["losses"]) == state["step"]


@pytest.mark.slow
def test_hf_finetune_runs():
    """Eager fine-tuning with attn_implementation="distr" and transformers' Trainer: the three
    held-out perplexities, on SmolLM2 for two tiny steps."""
    proc = run("examples/hf_finetune.py", "--device", "cpu", "--steps", "2", "--seq-len", "32", "--batch-size", "1",
               "--eval-windows", "1")
    check_table(proc, "held-out", "original model, exact attention", "DistrAttention, before fine-tuning",
                "DistrAttention, after 2 steps")


@pytest.mark.parametrize("script, args, message", [
    ("examples/llm_perplexity.py", ["--context", "9000"], "--context must be in [16, 8192]"),
    ("examples/llm_perplexity.py", ["--windows", "0"], "--windows must be >= 1"),
    ("examples/llm_perplexity.py", ["--approximate", "sometimes"], "invalid choice"),
    ("examples/vit.py", ["--image-sizes", "224", "500"], "multiples of the patch size 14, got [500]"),
    ("examples/vit.py", ["--batch", "0"], "must be >= 1"),
    ("examples/quickstart.py", ["--sentences", "0"], "--sentences must be in [1, 64]"),
    ("examples/export_and_load.py", ["--tolerance", "-1"], "--tolerance must be >= 0"),
    ("examples/tree_decode.py", ["--new-tokens", "0"], "--new-tokens must be >= 1"),
    ("examples/adapt.py", ["--train-maps"], "--train-maps trains projection maps: it needs --grouping projection"),
    ("examples/hf_finetune.py", ["--steps", "0"], "--steps must be >= 1"),
    ("examples/hf_finetune.py", ["--group-size", "3"], "group_size must be one of"),
    ("benchmarks/model.py", ["--device", "cpu", "--tokens", "8"], "--tokens must be >= 16"),
    ("benchmarks/compile_time.py", ["--model", "vit", "--image-size", "500"], "multiple of the patch size 14, got 500"),
    ("benchmarks/compile_time.py", ["--model", "gpt"], "invalid choice"),
])
def test_bad_arguments(script, args, message):
    proc = run(script, *args)
    assert proc.returncode != 0
    assert message in proc.stderr, proc.stderr


def test_docs_referred_to_are_in_the_repository():
    """Messages and docstrings of the package, examples and benchmarks send users only to docs
    that ship with the repository (a note kept elsewhere is no help to a user)."""
    sources = [p for folder in ("distr_compile", "examples", "benchmarks") for p in (ROOT / folder).rglob("*.py")]
    named = {name for p in sources for name in re.findall(r"\b[A-Z][A-Za-z_-]*\.md\b", p.read_text())}
    assert named and all((ROOT / name).is_file() for name in named), sorted(named)
