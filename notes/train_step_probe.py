"""Session 4: examples/adapt.py on an H100 did not finish its first training step in ~8 minutes
(session 2, H200: 400 steps in 300 s, compile included). Time the first steps of a small
SmolLM2-shaped Llama (d=64, 9/3 heads, 8 x 1024 tokens, bf16 autocast) trained through
backend="distr" in adaptation mode, and profile step 0 (cProfile, cut by an alarm after
--budget seconds) so a slow compile says where it spends its time.

    python notes/train_step_probe.py --layers 4 [--static] [--budget 200]
"""
import argparse
import cProfile
import io
import pstats
import signal
import time

import torch
import transformers as tf

from distr_compile.training import adaptation_options

parser = argparse.ArgumentParser()
parser.add_argument("--layers", type=int, default=4)
parser.add_argument("--static", action="store_true")
parser.add_argument("--budget", type=int, default=200, help="seconds before step 0's profile is cut")
parser.add_argument("--backend", default="distr")
args = parser.parse_args()


class OutOfTime(Exception):
    pass


def alarm(*_):
    raise OutOfTime


torch.manual_seed(0)
config = tf.LlamaConfig(vocab_size=4096, hidden_size=576, intermediate_size=1536, num_hidden_layers=args.layers,
                        num_attention_heads=9, num_key_value_heads=3, attn_implementation="sdpa")
model = tf.LlamaForCausalLM(config).cuda()
options = adaptation_options(group_size=2, block_m=64) if args.backend == "distr" else None
compiled = torch.compile(model, backend=args.backend, dynamic=not args.static, options=options)
ids = torch.randint(0, 4096, (8, 1024), device="cuda")


def step():
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = compiled(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()
    torch.cuda.synchronize()
    return loss.item()


tag = f"backend={args.backend} layers={args.layers} dynamic={not args.static}"
profile = cProfile.Profile()
signal.signal(signal.SIGALRM, alarm)
signal.alarm(args.budget)
start = time.perf_counter()
try:
    profile.runcall(step)
    print(f"{tag} step 0: {time.perf_counter() - start:.1f} s", flush=True)
    finished = True
except OutOfTime:
    print(f"{tag} step 0: cut after {time.perf_counter() - start:.1f} s", flush=True)
    finished = False
signal.alarm(0)
for key in ("cumulative", "tottime"):
    text = io.StringIO()
    pstats.Stats(profile, stream=text).sort_stats(key).print_stats(45)
    print(f"--- {tag}: top by {key}\n" + "\n".join(text.getvalue().splitlines()[6:60]), flush=True)
print(torch._dynamo.utils.compile_times(), flush=True)
if finished:
    for i in range(1, 3):
        start = time.perf_counter()
        loss = step()
        print(f"{tag} step {i}: {time.perf_counter() - start:.2f} s, loss {loss:.3f}", flush=True)
