#!/usr/bin/env bash
# One device-machine session, in steps (each fits one device call; logs go to $OUT). Every call
# carries .whl; steps that need the package run `setup` first if this machine has not.
#   bash benchmarks/gpu_session.sh setup      # wheels from .whl + editable install (entry point)
#   bash benchmarks/gpu_session.sh tests [PATHS]  # every `gpu` test (in PATHS), 8 workers, autotune off
#   bash benchmarks/gpu_session.sh kernels [ARGS]  # benchmarks/kernel.py ARGS: the public op vs SDPA, fwd and f+b
#   bash benchmarks/gpu_session.sh tma [ARGS]  # the exact forward's TMA path: its gpu tests, then pointer vs
#                                             # TMA loads against SDPA (fwd, d 128/64, L 4096; ARGS: more
#                                             # kernel.py options); under 150 s with setup on an H100/H200
#   bash benchmarks/gpu_session.sh backward ARGS  # backward kernels at d=128, L=4096 (benchmarks/backward.py ARGS)
#   bash benchmarks/gpu_session.sh weights    # keep the SmolLM2 GGUF chunk(s) carried in .weights/
#                                             # (one per call: the carry limit is 64 MiB); join them
#   bash benchmarks/gpu_session.sh models ARGS  # benchmarks/model.py ARGS (SmolLM2 rows need `weights`)
#   bash benchmarks/gpu_session.sh zoo ARGS   # benchmarks/zoo.py ARGS (MiniLM from carried .weights/minilm)
#   bash benchmarks/gpu_session.sh compile ARGS # compile time, cold and warm Triton cache (--model llama bert vit,
#                                             # --cold-only: see benchmarks/compile_time.py)
#   bash benchmarks/gpu_session.sh adapt ARGS # the adaptation recipe (needs `weights`)
#   bash benchmarks/gpu_session.sh adapts SECONDS "ARGS1" "ARGS2" ...  # several recipes at once, each
#                                             # its own process (one alone leaves the GPU mostly idle),
#                                             # each stopped after SECONDS; logs adapt-N.log
#   bash benchmarks/gpu_session.sh hf ARGS     # benchmarks/hf_eager.py ARGS: attn_implementation="distr"
#                                             # in eager mode vs compiled, SmolLM2-135M's shape (no weights)
#   bash benchmarks/gpu_session.sh hf-finetune ARGS  # examples/hf_finetune.py on the GPU (needs `weights`)
#   bash benchmarks/gpu_session.sh host       # host time per eager op call vs SDPA (benchmarks/host_overhead.py)
#   bash benchmarks/gpu_session.sh lowering   # which attention kernel Inductor emits for HF ViT
#   bash benchmarks/gpu_session.sh sweep [ARGS]  # every forward autotune config's time per shape class
# The device machine has no network: .whl holds the pure-Python wheels it lacks.
set -uo pipefail
OUT=${OUT:-/tmp/out}
WEIGHTS=/tmp/weights/smollm2
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
mkdir -p "$OUT"
log() { "$@" 2>&1 | tee -a "$OUT/$STEP.log"; }

STEP=$1
if [ "$STEP" != setup ] && [ ! -d /tmp/site ]; then bash "$0" setup; fi
case $STEP in
  setup)
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    python3 -m pip install -q --no-deps --no-build-isolation --no-index -e .
    nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
    python3 -c "import torch, triton; print(torch.__version__, triton.__version__)" ;;
  tests)  # the preload: this image's AOTI loader crashes without it (README, AOTInductor)
    paths=("${@:2}"); [ ${#paths[@]} -eq 0 ] && paths=(tests/)  # the suite outgrew 420 s: split it if needed
    LD_PRELOAD=$(c++ -print-file-name=libstdc++.so.6) DISTR_COMPILE_AUTOTUNE=0 log python3 -m pytest -q -m gpu -n 8 -p no:cacheprovider "${paths[@]}" -rf --durations=5 ;;
  kernels)
    log python3 benchmarks/kernel.py --json "$OUT/kernel.json" "${@:2}" ;;
  tma)  # each part time-boxed so that one call holds both; the logs keep what finished
    DISTR_COMPILE_AUTOTUNE=0 log timeout 50 python3 -m pytest -q -m gpu -n 8 -p no:cacheprovider tests/test_kernels.py \
      -k forward_tma -rf --durations=5
    log timeout 85 python3 benchmarks/kernel.py --json "$OUT/kernel-tma.json" --dims 128 64 --lengths 4096 \
      --causal 0 1 --variants G=1 --exact triton --tma 0 1 --no-backward --no-compiled "${@:2}" ;;
  backward)
    log python3 benchmarks/backward.py --dims 128 --lengths 4096 --out "$OUT/BENCHMARKS.md" "${@:2}" ;;
  weights)
    cp .weights/smollm2.part* /tmp/ && mkdir -p "$WEIGHTS" && ls -la /tmp/smollm2.part*
    if [ -f /tmp/smollm2.part00 ] && [ -f /tmp/smollm2.part01 ]; then
      cat /tmp/smollm2.part00 /tmp/smollm2.part01 > "$WEIGHTS/SmolLM2-135M-Instruct.Q4_1.gguf" && ls -la "$WEIGHTS"
    fi ;;
  models)
    log python3 benchmarks/model.py --model-dir "$WEIGHTS" --out "$OUT/BENCHMARKS.md" --plot "$OUT/model.png" "${@:2}" ;;
  zoo)
    log python3 benchmarks/zoo.py --smollm2-dir "$WEIGHTS" --minilm-dir .weights/minilm --out "$OUT/BENCHMARKS.md" "${@:2}" ;;
  compile)
    log python3 benchmarks/compile_time.py --device cuda --dtype bfloat16 --out "$OUT/BENCHMARKS.md" "${@:2}" ;;
  adapt)
    # checkpoints stay in /tmp/adapt (too large to come back; --resume on the same machine)
    log python3 examples/adapt.py --device cuda --model-path "$WEIGHTS" --out /tmp/adapt "${@:2}"
    mkdir -p "$OUT/adapt" && cp /tmp/adapt/*.json /tmp/adapt/*.png "$OUT/adapt/" ;;
  adapts)
    for i in $(seq 3 $#); do
      n=$((i - 2))
      ( echo "adapt-$n: ${!i}" > "$OUT/adapt-$n.log"
        timeout "$2" python3 examples/adapt.py --device cuda --model-path "$WEIGHTS" --out /tmp/adapt-$n ${!i} \
          >> "$OUT/adapt-$n.log" 2>&1
        mkdir -p "$OUT/adapt-$n" && cp /tmp/adapt-$n/*.json /tmp/adapt-$n/*.png "$OUT/adapt-$n/" ) &
    done
    wait
    grep -a -o "^adapt-.*\|held-out perplexity.*\|Guard accepts.*\|[A-Za-z]*Error.*" "$OUT"/adapt-*.log ;;
  hf)
    log python3 benchmarks/hf_eager.py "${@:2}" ;;
  hf-finetune)
    log python3 examples/hf_finetune.py --device cuda --model-path "$WEIGHTS" "${@:2}" ;;
  host)
    log python3 benchmarks/host_overhead.py "${@:2}" ;;
  lowering)
    log python3 benchmarks/sdpa_lowering.py "${@:2}" ;;
  sweep)
    log python3 benchmarks/autotune_sweep.py "${@:2}" ;;
  *) echo "unknown step $STEP"; exit 2 ;;
esac
