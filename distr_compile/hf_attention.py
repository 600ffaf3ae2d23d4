"""The "distr" attention function of transformers' ``AttentionInterface`` (imports transformers).

Imported by :mod:`distr_compile.hf` once transformers' modeling code is loaded. It registers
"distr" as its import ends (:func:`register`), so that importing it first works too: the
transformers import it starts runs that hook within this import. The function follows
transformers' "sdpa" one (``integrations/sdpa_attention.py``) call for call: the same causal
inference (``is_causal`` unless a mask is given or one query row is left), the same crop of an
empty static cache's keys at prefill, a position bias (T5) added to the mask, the output
transposed to (B, L, H, d). Where a layer is not approximated it IS the "sdpa" function, so
those layers match "sdpa" bit for bit. Where it is, grouped-query attention reads the shared K/V
heads in place (``enable_gqa``, never ``repeat_kv``) and ``distr_attention`` runs the Triton
kernels forward and backward on CUDA. Calibrating projection maps runs the model with a
recording variant of "sdpa" (:func:`capturing`).
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from typing import Iterator

import torch
from transformers.integrations.sdpa_attention import create_position_bias_mask, sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.modeling_utils import AttentionInterface

from .hf import AttentionCall, layer_config, layer_maps, say_once, select_attention
from .ops import distr_attention

NAME = "distr"
CAPTURE = "distr_calibration"  # exact attention that records each layer's q and k (while fitting maps)

NO_WEIGHTS = ("attn_implementation='distr' returns no attention weights (output_attentions=True), as 'sdpa' "
              "returns none: set the attention to 'eager' to get them")

# Arguments that change what attention computes and that "distr" cannot apply, exact or not: "sdpa"
# would drop them without a word (all but softcap; softcap too in older transformers), so they are an error.
UNSUPPORTED = {
    "softcap": "attention logit soft-capping",
    "s_aux": "attention sinks",
    "sinks": "attention sinks",
    "indices": "the keys a sparse attention selected",
    "block_indices": "the key blocks a sparse attention selected",
}


def register() -> None:
    """Make ``attn_implementation="distr"`` available, with SDPA's masks (:func:`distr_mask`):
    without a mask function transformers would pass no mask at all."""
    AttentionInterface.register(NAME, distr_attention_forward)
    AttentionMaskInterface.register(NAME, distr_mask)


def distr_mask(*args, config=None, **kwargs) -> torch.Tensor | None:
    """SDPA's mask: bool, or None where ``is_causal`` says it all, except in models with KV-shared
    layers (Gemma 4), which slice their queries to ``logits_to_keep`` after making the masks unless
    the implementation is named "sdpa": a missing mask would then stand for a causal one aligned
    to the wrong queries, or for none over a static cache's empty slots."""
    if getattr(config, "num_kv_shared_layers", 0):
        kwargs |= {"allow_is_causal_skip": False, "allow_is_bidirectional_skip": False}
    return sdpa_mask(*args, config=config, **kwargs)


def check_supported(module: torch.nn.Module, kwargs: dict) -> None:
    """A ValueError for an argument of :data:`UNSUPPORTED` that the model passes (not None)."""
    for name, what in UNSUPPORTED.items():
        if kwargs.get(name) is not None:
            raise ValueError(f"{type(module).__name__} passes {name} ({what}) to its attention function, which "
                             "attn_implementation='distr' cannot apply: load this model with attn_implementation='eager'")


def sdpa_inputs(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: torch.Tensor | None, is_causal: bool | None,
                position_bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, bool]:
    """(key, value, mask, is_causal) as transformers' "sdpa" passes them to SDPA: causal unless a
    mask is given or one query row is left; at a prefill into an empty static cache, its first
    keys only; a position bias (T5) added to the mask, which then carries causality too."""
    q_length = query.shape[2]
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    is_causal = q_length > 1 and attention_mask is None and is_causal
    if is_causal and key.shape[2] > q_length:
        key, value = key[:, :, :q_length], value[:, :, :q_length]
        position_bias = None if position_bias is None else position_bias[..., :q_length]
    if position_bias is not None:
        return key, value, create_position_bias_mask(position_bias, attention_mask, is_causal, query, key), False
    return key, value, attention_mask, is_causal


def distr_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Attention of one layer: q (B, Hq, Lq, d), k and v (B, Hkv, Lk, d) -> ((B, Lq, Hq, d), None).
    DistrAttention with the layer's configured DistrConfig (``distr_compile.configure``) and, for a
    projection, the layer's own maps; else exactly transformers' "sdpa". Arguments that change the
    math and that neither applies (:data:`UNSUPPORTED`) are an error in every layer; asked for
    attention weights, both warn that they give none."""
    check_supported(module, kwargs)
    config = layer_config(module, dropout)
    if config is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    if kwargs.get("output_attentions"):
        say_once(NO_WEIGHTS)
    key, value, mask, is_causal = sdpa_inputs(module, query, key, value, attention_mask, is_causal,
                                              kwargs.get("position_bias"))
    out = distr_attention(query, key, value, mask, 0.0, is_causal, scaling,
                          enable_gqa=query.shape[1] != key.shape[1], config=config, maps=layer_maps(module, config))
    return out.transpose(1, 2).contiguous(), None


@contextlib.contextmanager
def capturing(model: torch.nn.Module) -> Iterator[dict[torch.nn.Module, list[AttentionCall]]]:
    """Within the block, ``model`` runs transformers' "sdpa" and records every attention call
    (float32 copies of q and k, the mask, the causal flag and the scale) per attention module in
    the dict it yields; its attention implementation is restored on exit."""
    calls: dict[torch.nn.Module, list[AttentionCall]] = defaultdict(list)

    def record(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
        check_supported(module, kwargs)
        k, _, mask, causal = sdpa_inputs(module, query, key, value, attention_mask, is_causal,
                                         kwargs.get("position_bias"))
        mask = None if mask is None else mask.detach()
        calls[module].append(AttentionCall(query.detach().float(), k.detach().float(), mask, causal, scaling))
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)

    AttentionInterface.register(CAPTURE, record)
    AttentionMaskInterface.register(CAPTURE, distr_mask)
    previous = model.config._attn_implementation
    select_attention(model, CAPTURE)
    try:
        yield calls
    finally:
        select_attention(model, previous)


register()
