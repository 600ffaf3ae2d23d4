"""Training with DistrAttention in the loop: the adaptation options and checkpoints.

Zero-shot, DistrAttention is far from exact on pretrained models (BENCHMARKS.md); the paper
got its accuracy by fine-tuning with it in the loop. ``adaptation_options`` are the
``torch.compile(..., backend="distr", options=...)`` for that: every supported site approximated,
no guard, forward and backward through ``torch.ops.distr.attention``; ``distillation_loss`` is the
objective of both adaptation examples. Checkpoints hold the plain
module's state (never the compiled wrapper's ``_orig_mod.`` keys), so they load into an
uncompiled model as well as a compiled one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .config import DistrConfig


def adaptation_options(**overrides: Any) -> dict[str, Any]:
    """Backend options of the adaptation mode: ``approximate="always"`` (every matched site runs
    DistrAttention in training and evaluation, whatever the guard would say) plus ``overrides``
    (``group_size``, ``block_m``, ...), validated now rather than at the first call."""
    options = {"approximate": "always", **overrides}
    if options["approximate"] != "always":
        raise ValueError(f"the adaptation mode approximates every site; got approximate={options['approximate']!r}")
    DistrConfig.from_options(options)
    return options


def distillation_loss(logits: torch.Tensor, original_logits: torch.Tensor) -> torch.Tensor:
    """KL(original || adapted) per token, in float32: how far the adapted model's next-token
    distributions are from the original model's (a richer target than the text's next tokens, and
    one that keeps the adapted model close to the original rather than to the training text)."""
    log_p = F.log_softmax(original_logits.float().flatten(0, -2), dim=-1)
    log_q = F.log_softmax(logits.float().flatten(0, -2), dim=-1)
    return F.kl_div(log_q, log_p, log_target=True, reduction="batchmean")


def save_checkpoint(path: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                    step: int, **extra: Any) -> Path:
    """Write model (and optimizer) state, the step and ``extra`` (losses, arguments) with
    ``torch.save``, through a temporary file so an interrupted save never leaves a broken one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {"model": _plain(model).state_dict(), "step": step, "extra": extra,
             "optimizer": None if optimizer is None else optimizer.state_dict()}
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(state, tmp)
    tmp.replace(path)
    return path


def load_checkpoint(path: str | Path, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer | None = None) -> tuple[int, dict[str, Any]]:
    """Load a :func:`save_checkpoint` file into ``model`` (and ``optimizer``); returns
    ``(step, extra)``. ``extra`` must hold plain types (it loads with ``weights_only=True``).
    Raises if the checkpoint has no optimizer state but one is asked for."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    _plain(model).load_state_dict(state["model"])
    if optimizer is not None:
        if state["optimizer"] is None:
            raise ValueError(f"{path} holds no optimizer state")
        optimizer.load_state_dict(state["optimizer"])
    return state["step"], state["extra"]


def _plain(model: torch.nn.Module) -> torch.nn.Module:
    """The module under a ``torch.compile`` wrapper (or the module itself)."""
    return getattr(model, "_orig_mod", model)
