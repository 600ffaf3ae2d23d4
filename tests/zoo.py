"""A zoo of small attention modules, one per spelling the ``distr`` pass must handle.

Each :class:`Case` builds a seeded module in eval mode and its inputs, says how many attention
sites the pass must rewrite and how many it must leave alone, and gives an *oracle*: a module with
the same weights that computes the same attention through ``F.scaled_dot_product_attention``.
Run under :func:`sdpa_as_distr`, the oracle is "the model with ``distr_attention`` in place of
attention", which the compiled model must match when G > 1.
"""

from __future__ import annotations

import contextlib
import copy
import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from distr_compile import DistrConfig, distr_attention

B, L, DIM, HEADS = 2, 12, 64, 4
HEAD_DIM = DIM // HEADS


@contextlib.contextmanager
def sdpa_as_distr(config: DistrConfig):
    """Route every ``F.scaled_dot_product_attention`` call through ``distr_attention``."""
    original = F.scaled_dot_product_attention

    def sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        return distr_attention(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, config=config)

    F.scaled_dot_product_attention = sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


class Spelled(nn.Module):
    """q, k, v (B, H, L, D) from one projection; subclasses spell ``attention`` and state its
    meaning in ``sdpa`` (used when ``self.oracle`` is set)."""

    kv_heads = HEADS

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(DIM, DIM + 2 * self.kv_heads * HEAD_DIM)
        self.oracle = False
        keep = torch.rand(L, L, generator=torch.Generator().manual_seed(1)) > 0.3
        self.register_buffer("keep", keep | torch.eye(L, dtype=torch.bool))
        self.register_buffer("additive", torch.randn(L, L, generator=torch.Generator().manual_seed(2)))
        self.register_buffer("tril", torch.tril(torch.ones(L, L)).view(1, 1, L, L))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = self.qkv(x).split([DIM, self.kv_heads * HEAD_DIM, self.kv_heads * HEAD_DIM], dim=-1)
        q = q.view(b, t, HEADS, HEAD_DIM).transpose(1, 2)
        k = k.view(b, t, self.kv_heads, HEAD_DIM).transpose(1, 2)
        v = v.view(b, t, self.kv_heads, HEAD_DIM).transpose(1, 2)
        out = self.sdpa(q, k, v) if self.oracle else self.attention(q, k, v)
        return out.transpose(1, 2).reshape(b, t, DIM)

    def sdpa(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v)


class SdpaPositionalBoolMask(Spelled):
    def attention(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, self.keep)

    sdpa = attention


class SdpaKeywordAdditiveScale(Spelled):
    def attention(self, q, k, v):
        return F.scaled_dot_product_attention(query=q, key=k, value=v, attn_mask=self.additive, scale=0.2)

    sdpa = attention


class SdpaCausalPositional(Spelled):
    def attention(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, None, 0.0, True)

    sdpa = attention


class SdpaGqa(Spelled):
    kv_heads = 2

    def attention(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    sdpa = attention


class SdpaDropoutActive(Spelled):
    """SDPA applies dropout_p in eval mode too: left alone."""

    def attention(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, dropout_p=0.1)


class MatmulScaleAdditive(Spelled):
    def attention(self, q, k, v):
        s = (q @ k.transpose(-2, -1)) * 0.3 + self.additive
        return F.softmax(s, dim=-1) @ v

    def sdpa(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, self.additive, scale=0.3)


class TorchMatmulPermuteDivSqrt(Spelled):
    def attention(self, q, k, v):
        s = torch.matmul(q, k.permute(0, 1, 3, 2)) / math.sqrt(q.size(-1))
        return torch.matmul(torch.softmax(s, dim=-1), v)


class BmmMTTensorScale(Spelled):
    """3-d (B*H, L, D) bmm, k^T via .mT, scale by a 0-dim tensor buffer, method softmax."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("scale", torch.tensor(0.35))

    def attention(self, q, k, v):
        q3, k3, v3 = (t.flatten(0, 1) for t in (q, k, v))
        p = (torch.bmm(q3, k3.mT) * self.scale).softmax(-1)
        return torch.bmm(p, v3).view(q.shape)

    def sdpa(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, scale=0.35)


class EinsumPrescaledFloatSoftmax(Spelled):
    """Pre-scaled q, einsum both products, float32 softmax cast back."""

    def attention(self, q, k, v):
        s = torch.einsum("bhqd,bhkd->bhqk", q * HEAD_DIM**-0.5, k)
        p = F.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype)
        return torch.einsum("bhqk,bhkd->bhqd", p, v)


class MaskedFillTrilDropoutEval(Spelled):
    """nanoGPT's slow path: causal mask from a tril buffer, nn.Dropout (eval) on the weights."""

    def __init__(self) -> None:
        super().__init__()
        self.attn_dropout = nn.Dropout(0.1)

    def attention(self, q, k, v):
        t = q.size(-2)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        att = att.masked_fill(self.tril[:, :, :t, :t] == 0, float("-inf"))
        return self.attn_dropout(F.softmax(att, dim=-1)) @ v

    def sdpa(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


class MaskedFillFinfoMin(Spelled):
    def attention(self, q, k, v):
        s = q @ k.transpose(-2, -1) * HEAD_DIM**-0.5
        s = s.masked_fill(~self.keep, torch.finfo(s.dtype).min)
        return s.softmax(dim=-1) @ v

    def sdpa(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, self.keep)


class WhereNegInfFloatCast(Spelled):
    def attention(self, q, k, v):
        s = torch.where(self.keep, q @ k.transpose(-1, -2) / 4.0, float("-inf"))
        return F.softmax(s.float(), dim=-1).type_as(q) @ v

    def sdpa(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, self.keep, scale=0.25)


class RepeatInterleaveGqa(Spelled):
    kv_heads = 2

    def attention(self, q, k, v):
        k, v = k.repeat_interleave(2, dim=1), torch.repeat_interleave(v, 2, dim=1)
        return F.softmax(q @ k.transpose(-2, -1) * 0.25, dim=-1) @ v

    def sdpa(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """Hugging Face's K/V head copy for GQA."""
    b, h, t, d = x.shape
    return x[:, :, None, :, :].expand(b, h, n_rep, t, d).reshape(b, h * n_rep, t, d)


class ExpandReshapeGqa(Spelled):
    kv_heads = 1

    def attention(self, q, k, v):
        s = torch.matmul(q, repeat_kv(k, HEADS).transpose(2, 3)) * 0.25 + self.additive
        return torch.matmul(F.softmax(s, dim=-1), repeat_kv(v, HEADS))

    def sdpa(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, self.additive, enable_gqa=True)


class WeightsReturned(Spelled):
    """The attention weights are also an output: left alone."""

    def attention(self, q, k, v):
        p = F.softmax(q @ k.transpose(-2, -1) * 0.25, dim=-1)
        return p @ v + p.sum(-1, keepdim=True)


class SmallFillValue(Spelled):
    """masked_fill with -1e4 is not a mask softmax treats exactly: left alone."""

    def attention(self, q, k, v):
        s = (q @ k.transpose(-2, -1) * 0.25).masked_fill(~self.keep, -1e4)
        return F.softmax(s, dim=-1) @ v


class SoftmaxClassifier(nn.Module):
    """A softmax that is not attention: nothing to find, nothing to report."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(DIM, 10)

    def forward(self, x):
        return F.softmax(self.head(x), dim=-1) @ torch.ones(10, 3)


class NanoGPTCausalSelfAttention(nn.Module):
    """nanoGPT's CausalSelfAttention (both paths), written inline."""

    def __init__(self, flash: bool = False, block_size: int = 32) -> None:
        super().__init__()
        self.c_attn = nn.Linear(DIM, 3 * DIM)
        self.c_proj = nn.Linear(DIM, DIM)
        self.attn_dropout, self.resid_dropout = nn.Dropout(0.1), nn.Dropout(0.1)
        self.n_head, self.n_embd, self.dropout, self.flash = HEADS, DIM, 0.1, flash
        self.register_buffer("bias", torch.tril(torch.ones(block_size, block_size)).view(1, 1, block_size, block_size))

    def forward(self, x):
        b, t, c = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        k = k.view(b, t, self.n_head, c // self.n_head).transpose(1, 2)
        q = q.view(b, t, self.n_head, c // self.n_head).transpose(1, 2)
        v = v.view(b, t, self.n_head, c // self.n_head).transpose(1, 2)
        if self.flash:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=None,
                                               dropout_p=self.dropout if self.training else 0, is_causal=True)
        else:
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
            att = att.masked_fill(self.bias[:, :, :t, :t] == 0, float("-inf"))
            att = F.softmax(att, dim=-1)
            att = self.attn_dropout(att)
            y = att @ v
        y = y.transpose(1, 2).contiguous().view(b, t, c)
        return self.resid_dropout(self.c_proj(y))


class TimmAttention(nn.Module):
    """timm's ViT ``Attention`` (fused and explicit paths), written inline."""

    def __init__(self, fused_attn: bool = False) -> None:
        super().__init__()
        self.num_heads, self.head_dim = HEADS, HEAD_DIM
        self.scale = self.head_dim**-0.5
        self.fused_attn = fused_attn
        self.qkv = nn.Linear(DIM, DIM * 3)
        self.q_norm, self.k_norm = nn.Identity(), nn.Identity()
        self.attn_drop, self.proj, self.proj_drop = nn.Dropout(0.0), nn.Linear(DIM, DIM), nn.Dropout(0.0)

    def forward(self, x):
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        if self.fused_attn:
            x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop.p if self.training else 0.0)
        else:
            q = q * self.scale
            attn = q @ k.transpose(-2, -1)
            attn = attn.softmax(dim=-1)
            attn = self.attn_drop(attn)
            x = attn @ v
        x = x.transpose(1, 2).reshape(b, n, c)
        return self.proj_drop(self.proj(x))


# --------------------------------------------------------------------------- Hugging Face


def _hf(kind: str, attn: str) -> nn.Module:
    import transformers as tf

    common = dict(hidden_size=DIM, num_hidden_layers=2, num_attention_heads=HEADS, intermediate_size=128,
                  attn_implementation=attn)
    if kind == "llama":
        return tf.LlamaModel(tf.LlamaConfig(vocab_size=97, num_key_value_heads=2, max_position_embeddings=64, **common))
    if kind == "bert":
        return tf.BertModel(tf.BertConfig(vocab_size=97, max_position_embeddings=64, **common), add_pooling_layer=False)
    return tf.ViTModel(tf.ViTConfig(image_size=32, patch_size=8, **common), add_pooling_layer=False)


class HF(nn.Module):
    """A random-initialised Hugging Face model returning its last hidden state."""

    def __init__(self, kind: str, attn: str) -> None:
        super().__init__()
        self.kind = kind
        self.model = _hf(kind, attn)

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs).last_hidden_state


def _hf_oracle(m: HF) -> HF:
    oracle = _seeded(lambda: HF(m.kind, "sdpa"))
    oracle.load_state_dict(m.state_dict())
    return oracle.eval()


def _hf_inputs(kind: str) -> Callable[[], dict]:
    def inputs() -> dict:
        g = torch.Generator().manual_seed(3)
        if kind == "vit":
            return {"pixel_values": torch.randn(B, 3, 32, 32, generator=g)}
        ids = torch.randint(0, 97, (B, L), generator=g)
        if kind == "llama":
            return {"input_ids": ids}
        mask = torch.ones(B, L, dtype=torch.long)
        mask[1, -3:] = 0
        return {"input_ids": ids, "attention_mask": mask}
    return inputs


# ------------------------------------------------------------------------------- the cases


@dataclass
class Case:
    """One zoo entry: how to build it, its inputs, what the pass must find, and its oracle."""

    name: str
    build: Callable[[], nn.Module]
    inputs: Callable[[], Any]
    sites: int
    skipped: int = 0
    oracle: Callable[[nn.Module], nn.Module] | None = None


def _seeded(build: Callable[[], nn.Module]) -> nn.Module:
    torch.manual_seed(0)
    return build().eval()


def _spelled_oracle(m: nn.Module) -> nn.Module:
    oracle = copy.deepcopy(m)
    oracle.oracle = True
    return oracle


def _x() -> torch.Tensor:
    return torch.randn(B, L, DIM, generator=torch.Generator().manual_seed(4))


def _spelled(cls, sites: int = 1, skipped: int = 0) -> Case:
    return Case(cls.__name__, lambda: _seeded(cls), _x, sites, skipped, _spelled_oracle if sites else None)


CASES = [
    _spelled(SdpaPositionalBoolMask),
    _spelled(SdpaKeywordAdditiveScale),
    _spelled(SdpaCausalPositional),
    _spelled(SdpaGqa),
    _spelled(SdpaDropoutActive, sites=0, skipped=1),
    _spelled(MatmulScaleAdditive),
    _spelled(TorchMatmulPermuteDivSqrt),
    _spelled(BmmMTTensorScale),
    _spelled(EinsumPrescaledFloatSoftmax),
    _spelled(MaskedFillTrilDropoutEval),
    _spelled(MaskedFillFinfoMin),
    _spelled(WhereNegInfFloatCast),
    _spelled(RepeatInterleaveGqa),
    _spelled(ExpandReshapeGqa),
    _spelled(WeightsReturned, sites=0, skipped=1),
    _spelled(SmallFillValue, sites=0, skipped=1),
    Case("SoftmaxClassifier", lambda: _seeded(SoftmaxClassifier), _x, 0),
    Case("nanoGPT", lambda: _seeded(NanoGPTCausalSelfAttention), _x, 1,
         oracle=lambda m: _oracle_attr(m, "flash", True)),
    Case("nanoGPT-flash", lambda: _seeded(lambda: NanoGPTCausalSelfAttention(flash=True)), _x, 1,
         oracle=lambda m: m),
    Case("timm", lambda: _seeded(TimmAttention), _x, 1, oracle=lambda m: _oracle_attr(m, "fused_attn", True)),
    Case("timm-fused", lambda: _seeded(lambda: TimmAttention(fused_attn=True)), _x, 1, oracle=lambda m: m),
    *(
        Case(f"hf-{kind}-{attn}", (lambda kind=kind, attn=attn: _seeded(lambda: HF(kind, attn))), _hf_inputs(kind), 2,
             oracle=_hf_oracle)
        for kind in ("llama", "bert", "vit")
        for attn in ("eager", "sdpa")
    ),
]


def _oracle_attr(m: nn.Module, attr: str, value: Any) -> nn.Module:
    oracle = copy.deepcopy(m)
    setattr(oracle, attr, value)
    return oracle


def call(module: nn.Module, inputs: Any) -> torch.Tensor:
    """Call ``module`` with a case's inputs (a tensor or a dict of keyword arguments)."""
    return module(**inputs) if isinstance(inputs, dict) else module(inputs)
