"""Where does backend="distr" (default: the guard calibrates) spend its compile time beyond
inductor's? cProfile of the first call, HF Llama as in benchmarks/compile_time.py; prints the
cumulative top entries of distr_compile and Inductor."""
import cProfile
import pstats
import sys
import time

import torch
import transformers as tf

options = {"always": {"approximate": "always"}, "default": {}, "inductor": None}[sys.argv[1]]
torch._inductor.config.force_disable_caches = True
torch.manual_seed(0)
config = tf.LlamaConfig(vocab_size=4096, hidden_size=576, intermediate_size=1536, num_hidden_layers=8,
                        num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=4096,
                        attn_implementation="sdpa")
model = tf.LlamaModel(config).cuda().bfloat16().eval()
ids = torch.randint(0, 4096, (1, 512), device="cuda")
compiled = torch.compile(model, backend="inductor") if options is None else \
    torch.compile(model, backend="distr", options=options)
profiler = cProfile.Profile()
with torch.no_grad():
    start = time.perf_counter()
    profiler.enable()
    compiled(input_ids=ids)
    torch.cuda.synchronize()
    profiler.disable()
print(sys.argv[1], f"first call {time.perf_counter() - start:.1f} s")
stats = pstats.Stats(profiler).sort_stats("cumulative")
stats.print_stats(r"distr_compile|compile_fx.py|codecache|async_compile|triton_heuristics|autotune|jit.py", 30)
