"""``torch.ops.distr.attention``: the registered operator, its autograd, and the Python entry point.

The op is a ``torch.library.triton_op``: Inductor and AOTInductor see (and compile) the Triton
kernels it launches on CUDA, ``torch.export`` keeps it as one node, and its body doubles as the
fake implementation. Dispatch, decided per call from the tensors:

* CUDA, fp16/bf16, head dim a power of two in [16, 256] with d/G >= 16, v's head dim equal to
  q's (at G = 1, any power of two in [16, 256]): the kernels. A fixed grouping
  (``grouping="fixed"``, any representative but "lstsq-visible") is the same linear map of q and k
  in every query block, so it takes the static path: q' = q A (B, Hq, Lq, d/G) and k' = k B
  (B, Hkv, Lk, d/G) once per call (two small matrix products), then one exact attention with a
  Q/K head dim of d/G and a V head dim of d; its backward maps dq', dk' back through A and B.
  Exact attention (G = 1, and the static path's) runs on cuDNN's fused attention where PyTorch's
  cuDNN backend takes the inputs (no mask; :func:`cudnn_applies`), on our Triton kernel otherwise.
  Other groupings (LSH, random) run the grouping kernel and the grouped forward, block by block.
  An eager call of ``distr_attention`` on the static path that cuDNN takes skips the op: q', k'
  and cuDNN's attention run as plain autograd ops (same kernels, far less host time);
* everything else (CPU, float32/float64 anywhere, other head dims): the PyTorch reference.
  float32 on CUDA takes the reference on purpose: the kernel would run the dots in tf32.

The backward follows the forward: the kernels' backward (cuDNN's or ours) where the forward ran the kernels
(unless an additive mask needs a gradient), through the internal op ``distr::attention_backward``
so that eager calls launch them directly; autograd through the reference otherwise. Inside an
autocast region the op casts its floating inputs to the autocast dtype first, as SDPA does.

Schema (version 1, stable; a change bumps ``SCHEMA_VERSION`` and gets a new overload):

    distr::attention(Tensor q, Tensor k, Tensor v, Tensor? attn_mask, bool is_causal,
                     float? scale, bool enable_gqa, int group_size, int block_m,
                     int num_hyperplanes, str representative, str grouping, int seed)
        -> (Tensor out, Tensor lse)

``out`` has q's shape with v's head dim; ``lse`` is float32 (float64 for float64 inputs) of shape
q.shape[:-1]: the natural-log log-sum-exp of each query row (-inf for a fully masked row).
"""

from __future__ import annotations

import contextlib
import functools
import math
import os

import torch
import torch.nn.functional as F
from torch.fx.experimental.symbolic_shapes import guard_int

from . import reference
from .config import DistrConfig
from .inputs import Canonical, canonicalize
from .projection import project
from .kernels.attention import distr_forward
from .kernels.attention_backward import distr_backward
from .kernels.grouping import lsh_group

SCHEMA_VERSION = 1
KERNEL_DTYPES = (torch.float16, torch.bfloat16)
KERNEL_HEAD_DIMS = (16, 32, 64, 128, 256)
AUTOCAST_DEVICES = ("cpu", "cuda")  # where the op (and distr_attention) follow autocast, as SDPA does


def uses_kernel(q: torch.Tensor, v: torch.Tensor, config: DistrConfig) -> bool:
    """Whether these inputs run the Triton kernels (else the PyTorch reference): CUDA, fp16/bf16,
    head dims in ``KERNEL_HEAD_DIMS`` with d/G >= 16, and v's head dim equal to q's, except at
    G = 1, where the exact kernel takes any two supported head dims (the static path's q', k')."""
    d, dv = q.shape[-1], v.shape[-1]
    return (
        q.is_cuda
        and q.dtype in KERNEL_DTYPES
        and d in KERNEL_HEAD_DIMS
        and d // config.group_size >= 16
        and (dv == d or (config.exact and dv in KERNEL_HEAD_DIMS))
    )


def group_columns(q: torch.Tensor, v: torch.Tensor, config: DistrConfig) -> torch.Tensor:
    """The grouping for canonical q, computed where the forward computes it, so the backward
    (which recomputes it) sees exactly the forward's grouping."""
    kernel = uses_kernel(q, v, config)
    if kernel and config.grouping == "lsh":
        return lsh_group(q, config)
    perm = reference.group_columns(q, config)
    return perm.to(torch.int32) if kernel else perm  # the kernels take int32


def kernel_grouping(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, config: DistrConfig,
                    is_causal: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """What the grouped kernels take for canonical inputs: the grouping and the representatives'
    weights in its order, (None, None) for G = 1. The forward and the backward both call this, so
    the backward (which recomputes them) sees exactly the forward's."""
    if config.exact:
        return None, None
    perm = group_columns(q, v, config)
    return perm, reference.representative_weights(k, perm, config, is_causal, q.shape[-2])


def is_static(config: DistrConfig) -> bool:
    """Whether every query block shares one grouping and one set of representative weights per
    head: then DistrAttention is exact attention on q' = q A, k' = k B (the static path)."""
    return not config.exact and config.grouping == "fixed" and config.representative != "lstsq-visible"


def static_maps(q: torch.Tensor, k: torch.Tensor, config: DistrConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The static path's maps for canonical q, k: A (D, D/G) or (B, Hq, D, D/G) and B (D, D/G), in
    the input dtype, with q' = q A and k' = k B. Group g is the G consecutive columns g*G..g*G+G-1:
    B sums them; A weights them by their representative weights (1/G for "mean", exact in
    half precision; per head from the keys for "lstsq"), so that q' k'^T equals q_tilde k^T."""
    D, G = q.shape[-1], config.group_size
    if config.representative == "mean":  # eager calls reuse them: no per-call eye/repeat/divide
        return (_cached_mean_maps if type(q) is torch.Tensor else _mean_maps)(D, G, q.device, q.dtype)
    member = _group_sums(D, G, q.device, q.dtype)
    B, H = q.shape[:2]
    weights = reference.representative_weights(k, torch.arange(D, device=q.device).expand(B, H, 1, D), config)
    return (weights.view(B, H, D, 1) * member).to(q.dtype), member


def _group_sums(D: int, G: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(D, D/G): column c goes to group c // G."""
    return torch.eye(D // G, device=device, dtype=dtype).repeat_interleave(G, dim=0)


def _mean_maps(D: int, G: int, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """A and B of the "mean" representative: each group's columns averaged, and summed."""
    member = _group_sums(D, G, device, dtype)
    return member / G, member


@functools.lru_cache(maxsize=64)
def _cached_mean_maps(D: int, G: int, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_mean_maps` for real (eager) tensors, built once per head dim, G, device and dtype:
    three small launches fewer per forward and per backward (host time dominates small eager
    calls). Traced calls (fake or functional tensors) build them in the graph instead. Built
    outside inference mode (a cached inference tensor could not meet autograd later), and finished
    before use (the first call's stream need not be the next one's)."""
    with torch.inference_mode(False):
        maps = _mean_maps(D, G, device, dtype)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return maps


def static_qk(q: torch.Tensor, k: torch.Tensor, config: DistrConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """q' = q A (B, Hq, Lq, D/G) and k' = k B (B, Hkv, Lk, D/G): two small matrix products (one
    read of q and k, fp32 accumulation), then one exact kernel runs on them."""
    a, b = static_maps(q, k, config)
    return q @ a, k @ b


_CUDNN = {"mode": os.environ.get("DISTR_COMPILE_CUDNN", "1")}  # process-wide: autograd runs backwards on its own threads
if _CUDNN["mode"] not in ("0", "1"):
    raise ValueError(f"DISTR_COMPILE_CUDNN={_CUDNN['mode']!r}: expected 0 or 1")


@contextlib.contextmanager
def cudnn_exact(enabled: bool):
    """Whether exact attention inside the op (G = 1 and the static path) may run on cuDNN in this
    block (default: DISTR_COMPILE_CUDNN, else on), for every thread: the eager backward runs on
    autograd's device threads. Off, it always runs our Triton kernel: for benchmarks and tests of
    that kernel. A compiled graph keeps the choice made when it was traced."""
    previous, _CUDNN["mode"] = _CUDNN["mode"], "1" if enabled else "0"
    try:
        yield
    finally:
        _CUDNN["mode"] = previous


def cudnn_applies(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None,
                  is_causal: bool) -> bool:
    """Whether exact attention on these canonical inputs runs on cuDNN's fused attention: CUDA, no
    mask, a causal mask only on square scores (ours is aligned top-left), static shapes, and
    PyTorch's own check for its cuDNN backend passes (enabled, dtype, head dims, strides, GQA,
    GPU). cuDNN takes a Q/K head dim below V's, which SDPA's flash kernel refuses: the static
    path's q', k' reach it too."""
    if _CUDNN["mode"] == "0" or attn_mask is not None or not q.is_cuda or not torch.backends.cuda.cudnn_sdp_enabled():
        return False
    if not all(isinstance(n, int) for t in (q, k, v) for n in t.shape):
        return False
    if is_causal and q.shape[-2] != k.shape[-2]:
        return False
    params = torch.backends.cuda.SDPAParams(q, k, v, None, 0.0, is_causal, q.shape[1] != k.shape[1])
    return torch.backends.cuda.can_use_cudnn_attention(params)


def exact_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None, is_causal: bool,
                  scale: float, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse) of exact attention on canonical inputs (q, k may have a smaller head dim than v):
    cuDNN's fused attention where it applies, our Triton kernel otherwise."""
    if cudnn_applies(q, k, v, attn_mask, is_causal):
        out, lse, *_ = torch.ops.aten._scaled_dot_product_cudnn_attention(
            q, k, v, None, True, 0.0, is_causal, False, scale=scale)
        return out, lse.reshape(q.shape[:-1])  # cuDNN's (B, H, L, 1): natural-log log-sum-exp
    return distr_forward(q, k, v, None, None, attn_mask, is_causal, scale, 1, block_m)


def exact_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None,
                   out: torch.Tensor, lse: torch.Tensor, grad_out: torch.Tensor, grad_lse: torch.Tensor | None,
                   is_causal: bool, scale: float, block_m: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) of :func:`exact_forward`: cuDNN's backward where cuDNN applies and no gradient
    reaches the lse (cuDNN's backward takes none), our Triton backward otherwise. Either reads the
    other's (out, lse): both are exact attention's."""
    if grad_lse is None and cudnn_applies(q, k, v, attn_mask, is_causal):
        no_dropout = torch.zeros((), dtype=torch.int64, device=q.device)  # philox seed and offset: unused
        if grad_out.stride() != out.stride():  # cuDNN reads both in one layout
            grad_out = torch.empty_like(out).copy_(grad_out)
        return torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
            grad_out, q, k, v, out, lse.unsqueeze(-1), no_dropout, no_dropout, None, None, None,
            q.shape[-2], k.shape[-2], 0.0, is_causal, scale=scale)
    return distr_backward(q, k, v, None, None, out, lse, grad_out, attn_mask, is_causal, scale, 1, block_m,
                          grad_lse=grad_lse)


def kernel_forward(c: Canonical, config: DistrConfig, is_causal: bool,
                   scale: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The op's forward on the kernels, for canonical inputs ``c``: exact attention (G = 1, or the
    static path: q', k' once per call, then exact attention with a Q/K head dim of D/G) or the
    grouped kernel."""
    scale = 1.0 / math.sqrt(c.q.shape[-1]) if scale is None else scale  # of the ORIGINAL head dim
    if config.exact:
        return exact_forward(c.q, c.k, c.v, c.attn_mask, is_causal, scale, config.block_m)
    if is_static(config):
        q, k = static_qk(c.q, c.k, config)
        return exact_forward(q, k, c.v, c.attn_mask, is_causal, scale, config.block_m)
    perm, weights = kernel_grouping(c.q, c.k, c.v, config, is_causal)
    return distr_forward(c.q, c.k, c.v, perm, weights, c.attn_mask, is_causal, scale, config.group_size, config.block_m)


def kernel_backward(c: Canonical, config: DistrConfig, is_causal: bool, scale: float | None, out: torch.Tensor,
                    lse: torch.Tensor, grad_out: torch.Tensor,
                    grad_lse: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (dq, dk, dv) of :func:`kernel_forward` on canonical tensors (out, lse and the
    incoming gradients canonical too)."""
    scale = 1.0 / math.sqrt(c.q.shape[-1]) if scale is None else scale
    if config.exact:
        return exact_backward(c.q, c.k, c.v, c.attn_mask, out, lse, grad_out, grad_lse, is_causal, scale,
                              config.block_m)
    if is_static(config):  # the maps are held fixed: dq = dq' A^T, dk = dk' B^T
        a, b = static_maps(c.q, c.k, config)
        dq, dk, dv = exact_backward(c.q @ a, c.k @ b, c.v, c.attn_mask, out, lse, grad_out, grad_lse, is_causal,
                                    scale, config.block_m)
        return dq @ a.mT, dk @ b.mT, dv
    perm, weights = kernel_grouping(c.q, c.k, c.v, config, is_causal)
    return distr_backward(c.q, c.k, c.v, perm, weights, out, lse, grad_out, c.attn_mask, is_causal, scale,
                          config.group_size, config.block_m, grad_lse=grad_lse)


def _config(*knobs: int | str | torch.SymInt) -> DistrConfig:
    """The op's knobs as a (validated, frozen) DistrConfig, built once per distinct set. A knob that
    Dynamo made symbolic (one compiled caller passing several configs) is specialised to its value:
    each config gets its own graph, as when the knobs are constants."""
    return _cached_config(*(guard_int(k) if isinstance(k, torch.SymInt) else k for k in knobs))


@functools.lru_cache(maxsize=256)
def _cached_config(group_size: int, block_m: int, num_hyperplanes: int, representative: str, grouping: str,
                   seed: int) -> DistrConfig:
    return DistrConfig(group_size, block_m, num_hyperplanes, representative, grouping, seed)


@torch.library.triton_op("distr::attention", mutates_args=())
def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None,
    is_causal: bool,
    scale: float | None,
    enable_gqa: bool,
    group_size: int,
    block_m: int,
    num_hyperplanes: int,
    representative: str,
    grouping: str,
    seed: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    config = _config(group_size, block_m, num_hyperplanes, representative, grouping, seed)
    c = canonicalize(q, k, v, attn_mask, 0.0, is_causal, scale, enable_gqa, config.group_size)
    if uses_kernel(c.q, c.v, config):
        out, lse = kernel_forward(c, config, is_causal, scale)
    else:
        out, lse = reference.distr_attention(c.q, c.k, c.v, c.attn_mask, is_causal, scale, config)
    return c.restore(out), c.restore(lse)


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, attn_mask, *args = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, attn_mask, out, lse)
    ctx.args = args
    ctx.set_materialize_grads(False)  # an unused lse gets None, not a zero tensor to read


def _first_order(ctx, grad_out: torch.Tensor | None, grad_lse: torch.Tensor | None) -> tuple:
    """Gradient of the approximate function with the grouping and the representatives' weights
    held fixed (recomputed: they are deterministic functions of q and k). Triton kernels (P
    recomputed from the saved lse, as in FlashAttention-2) where the forward ran them and the mask
    needs no gradient; autograd through the reference (exact attention on the
    representative-replaced q) otherwise."""
    q, k, v, attn_mask, out, lse = ctx.saved_tensors
    is_causal, scale, enable_gqa, *knobs = ctx.args
    config = _config(*knobs)
    wants = ctx.needs_input_grad[:4]
    grad_out = torch.zeros_like(out) if grad_out is None else grad_out
    if uses_kernel(q, v, config) and not wants[3]:  # dtype, device and head dims: same as canonical
        grads = torch.ops.distr.attention_backward(q, k, v, attn_mask, out, lse, grad_out, grad_lse, *ctx.args)
        return (*(g if w else None for g, w in zip(grads, wants)), None, *([None] * len(ctx.args)))
    with torch.enable_grad():
        inputs = [t if t is None else t.detach().requires_grad_(w) for t, w in zip((q, k, v, attn_mask), wants)]
        c = canonicalize(*inputs[:3], inputs[3], 0.0, is_causal, scale, enable_gqa, config.group_size)
        perm = None if config.exact else group_columns(c.q.detach(), c.v, config)
        out, lse = reference.distr_attention(c.q, c.k, c.v, c.attn_mask, is_causal, scale, config, perm=perm)
        outputs, grads = [c.restore(out)], [grad_out]
        if grad_lse is not None:
            outputs.append(c.restore(lse))
            grads.append(grad_lse)
        needed = [t for t, w in zip(inputs, wants) if w]
        found = iter(torch.autograd.grad(outputs, needed, grads, allow_unused=True))
    return (*(next(found) if w else None for w in wants), *([None] * len(ctx.args)))


def _backward(ctx, grad_out: torch.Tensor | None, grad_lse: torch.Tensor | None) -> tuple:
    """:func:`_first_order`; under ``create_graph=True`` its gradients carry a node that raises if
    differentiated again: the op has no second derivative, and gradients without a graph would
    make one silently zero (e.g. a gradient penalty through an approximated site)."""
    with torch.no_grad():
        grads = _first_order(ctx, grad_out, grad_lse)
    if not torch.is_grad_enabled():
        return grads
    present = [g.detach().requires_grad_() for g in grads if g is not None]
    if not present:
        return grads
    guarded = torch._C._functions.DelayedError(
        b"distr::attention has no second derivative (double backward); keep exact attention "
        b"(group_size=1) where you differentiate twice", len(present))(*present)
    guarded = iter(guarded if isinstance(guarded, tuple) else (guarded,))
    return tuple(None if g is None else next(guarded) for g in grads)


attention.register_autograd(_backward, setup_context=_setup_context)


@torch.library.triton_op("distr::attention_backward", mutates_args=())
def attention_backward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None,
    out: torch.Tensor,
    lse: torch.Tensor,
    grad_out: torch.Tensor,
    grad_lse: torch.Tensor | None,
    is_causal: bool,
    scale: float | None,
    enable_gqa: bool,
    group_size: int,
    block_m: int,
    num_hyperplanes: int,
    representative: str,
    grouping: str,
    seed: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) of ``distr::attention`` on the kernels' backward (internal). An op of its
    own, like the forward, so that eager calls launch the kernels directly: launched through
    ``wrap_triton`` outside an op, every call built a new autotuner and re-tuned every config (on an
    H200 an eager G=2 backward took 1.6 s instead of milliseconds)."""
    config = _config(group_size, block_m, num_hyperplanes, representative, grouping, seed)
    c = canonicalize(q, k, v, attn_mask, 0.0, is_causal, scale, enable_gqa, config.group_size)
    dq, dk, dv = kernel_backward(c, config, is_causal, scale, c.flatten(out), c.flatten(lse), c.flatten(grad_out),
                                 None if grad_lse is None else c.flatten(grad_lse))
    return c.unbroadcast((dq, dk, dv), (q, k, v))


_LIB = torch.library.Library("distr", "FRAGMENT")


def _autocast(device_type: str, *tensors: torch.Tensor | None) -> list[torch.Tensor | None]:
    """SDPA's autocast rule: floating tensors on ``device_type`` in the region's autocast dtype,
    except float64 ones, which autocast leaves alone."""
    dtype = torch.get_autocast_dtype(device_type)
    return [t.to(dtype) if t is not None and t.is_floating_point() and t.dtype != torch.float64
            and t.device.type == device_type else t for t in tensors]


def _register_autocast(device_type: str) -> None:
    """Autocast rule: like SDPA, cast q, k, v and a floating mask to the region's autocast dtype
    (read at call time, so bf16 and fp16 regions both work), then run with autocast off.
    ``torch.library.register_autocast`` takes one fixed dtype, hence this small version of it.
    Without it, a site rewritten inside an autocast region gets SDPA's mixed-dtype inputs
    (e.g. rotary-embedded fp32 q/k with a bf16 v)."""
    key = "Autocast" + torch._C._dispatch_key_for_device(device_type)
    excluded = torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, key))
    op = torch.ops.distr.attention.default

    @op.py_impl(getattr(torch._C.DispatchKey, key))  # the dispatcher seen by tracing (compile, export)
    def autocast_attention(q, k, v, attn_mask, *args):
        with torch._C._ExcludeDispatchKeyGuard(excluded):
            return op(*_autocast(device_type, q, k, v, attn_mask), *args)

    _LIB.impl("attention", lambda _, *args: autocast_attention(*args), key, with_keyset=True)


for _device_type in AUTOCAST_DEVICES:
    _register_autocast(_device_type)


def _eager_static(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None,
                  is_causal: bool, scale: float | None, enable_gqa: bool, config: DistrConfig,
                  projected: bool) -> torch.Tensor | None:
    """The static path of an eager call where cuDNN takes the mapped inputs: q' = q A, k' = k B
    (``projected``: q, k are q', k' already) and cuDNN's fused attention as plain autograd ops.
    The same kernels as the op, but the backward runs in C++ (cuDNN's and two matrix products)
    without the op's Python dispatch and recomputed q', k': an uncompiled model, bound by host
    time at small sizes, pays about what SDPA costs. None where this does not apply (tracing,
    a mask, broadcast batch dims, a grouping that is not static...): the op runs then."""
    if (attn_mask is not None or torch.compiler.is_compiling()
            or not all(type(t) is torch.Tensor for t in (q, k, v))
            or not q.dim() == k.dim() == v.dim() == 4 or not q.shape[0] == k.shape[0] == v.shape[0]):
        return None
    if not projected:
        if not uses_kernel(q, v, config):
            return None
        canonicalize(q, k, v, None, 0.0, is_causal, scale, enable_gqa, config.group_size)  # its errors
        with torch.no_grad():  # the maps are held fixed, as in the op's backward
            a, b = static_maps(q, k, config)
        scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale  # of the original head dim
        q, k = q @ a, k @ b
    if not cudnn_applies(q, k, v, None, is_causal):
        return None
    with_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))  # its backward reads the lse
    out = torch.ops.aten._scaled_dot_product_cudnn_attention(
        q, k, v, None, with_grad, 0.0, is_causal, False, scale=scale)[0]
    if with_grad:  # cuDNN's backward reads the incoming gradient in the output's layout (wrong dq otherwise)
        shape, strides = out.shape, out.stride()
        out.register_hook(lambda g: g if g.stride() == strides else g.new_empty_strided(shape, strides).copy_(g))
    return out


def distr_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    *,
    config: DistrConfig | None = None,
    maps: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """DistrAttention with the calling convention of ``F.scaled_dot_product_attention``.

    Shapes (..., L, E); masks bool (True = attend) or additive, broadcastable to
    (..., Hq, Lq, Lk); ``is_causal`` aligned top-left like SDPA; ``scale`` defaults to 1/sqrt(E)
    of the original head dim; GQA reads shared K/V heads without copies when ``enable_gqa``.
    ``config`` (default ``DistrConfig()``) sets G and the grouping; G = 1 is exactly SDPA.
    ``grouping="projection"`` takes its ``maps`` = (A (Hq, E, E/G), B (Hkv, E, E/G)), e.g. from
    ``distr_compile.projection.fit_projection``: exact attention on (q A, k B, v) at the scale of E.

    Runs the Triton kernels on CUDA in fp16/bf16 and the PyTorch reference otherwise (see
    ``distr_compile.ops``). ``dropout_p > 0`` runs the reference with dropout on the attention
    weights (no kernel). A fully masked row gives zeros, like SDPA; NaN in an input propagates to
    every output row it reaches, like SDPA's math backend.
    """
    config = DistrConfig() if config is None else config
    if not isinstance(config, DistrConfig):
        raise TypeError(f"config must be a DistrConfig, got {type(config).__name__}")
    if maps is not None and not (isinstance(maps, (tuple, list)) and len(maps) == 2
                                 and all(isinstance(m, torch.Tensor) for m in maps)):
        raise TypeError("maps must be a pair of tensors (A, B)")
    device_type = q.device.type if isinstance(q, torch.Tensor) else ""  # a non-tensor q: canonicalize says so
    if device_type in AUTOCAST_DEVICES and torch.is_autocast_enabled(device_type):
        # SDPA's rule, before any check: rotary-embedded fp32 q, k beside a bf16 v are fine in a region
        q, k, v, attn_mask = _autocast(device_type, q, k, v, attn_mask)
    if (maps is not None) != (config.grouping == "projection" and not config.exact):
        raise ValueError("maps=(A, B) go with grouping='projection' and G > 1, and that grouping needs them "
                         f"(got grouping={config.grouping!r}, G={config.group_size}, maps {'given' if maps else 'missing'}); "
                         "fit them with distr_compile.projection.fit_projection")
    if maps is not None:
        canonicalize(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa, config.group_size)
        if maps[0].shape[-1] * config.group_size != q.shape[-1]:
            raise ValueError(f"projection maps of rank {maps[0].shape[-1]} do not fit head dim {q.shape[-1]} "
                             f"at G={config.group_size} (rank = head dim / G)")
        q, k = project(q, k, *maps)
        scale = 1.0 / math.sqrt(maps[0].shape[-2]) if scale is None else scale  # of the original head dim
        config = config.replace(group_size=1)
    # Projected q, k have a smaller head dim than v: SDPA's flash kernel refuses that, the op's exact
    # path takes it (cuDNN or our kernel; as in a compiled graph, where the backend emits the op at G=1).
    projected_on_kernel = maps is not None and dropout_p == 0.0 and uses_kernel(q, v, config)
    if projected_on_kernel or (maps is None and dropout_p == 0.0 and is_static(config)):
        out = _eager_static(q, k, v, attn_mask, is_causal, scale, enable_gqa, config, projected=maps is not None)
        if out is not None:
            return out
    if config.exact and not projected_on_kernel:
        canonicalize(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa, 1)
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale, enable_gqa=enable_gqa
        )
    if dropout_p > 0.0:
        c = canonicalize(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa, config.group_size)
        out, _ = reference.distr_attention(c.q, c.k, c.v, c.attn_mask, is_causal, scale, config, dropout_p)
        return c.restore(out)
    return torch.ops.distr.attention(
        q, k, v, attn_mask, is_causal, scale, enable_gqa,
        config.group_size, config.block_m, config.num_hyperplanes, config.representative, config.grouping, config.seed,
    )[0]
