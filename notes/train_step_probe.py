"""Session 4: examples/adapt.py on an H100 did not finish its first training step in ~8 minutes
(session 2, H200: 400 steps in 300 s, compile included). Time the first steps of a small
SmolLM2-shaped Llama (d=64, 9/3 heads, 4 layers, 8 x 1024 tokens, bf16 autocast) trained through
backend="distr" in adaptation mode with dynamic=True; if the first step is still running after 90 s,
every thread's Python stack is dumped once."""
import faulthandler
import sys
import time

import torch
import transformers as tf

from distr_compile.training import adaptation_options

faulthandler.dump_traceback_later(90, repeat=False)
torch.manual_seed(0)
config = tf.LlamaConfig(vocab_size=4096, hidden_size=576, intermediate_size=1536, num_hidden_layers=4,
                        num_attention_heads=9, num_key_value_heads=3, attn_implementation="sdpa")
model = tf.LlamaForCausalLM(config).cuda()
dynamic = sys.argv[1:] != ["static"]
compiled = torch.compile(model, backend="distr", dynamic=dynamic, options=adaptation_options(group_size=2, block_m=64))
ids = torch.randint(0, 4096, (8, 1024), device="cuda")
for step in range(3):
    start = time.perf_counter()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = compiled(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()
    torch.cuda.synchronize()
    print(f"dynamic={dynamic} step {step}: {time.perf_counter() - start:.1f} s, loss {loss.item():.3f}", flush=True)
    if step == 0:
        faulthandler.cancel_dump_traceback_later()
