#!/usr/bin/env bash
# Every GPU measurement of the engine (W and SDXL beside plain diffusers, the loop, CUDA graphs and compile tests, cold
# start, kernel variants) in one run on a GPU machine (289 s and 342 s on an H100):
#
#   device run: command="bash bench/gpu_session.sh", carry=[".whl"], timeout_s=540
#   here, first: TINY=1 bash bench/gpu_session.sh      # the same steps on the tiny models, on a CPU
#   the kernel bench alone (step 5): command="KERNEL_BENCH=only bash bench/gpu_session.sh", carry=[".whl"],
#   timeout_s=420
#
# To measure a change against the code before it in the same run, put that code's src/ in .baseline/src (ignored by
# git: `echo /.baseline/ >> .git/info/exclude; git archive REV src | tar -x -C .baseline`) and carry ".baseline" too.
#
# .whl holds the wheels the GPU image lacks (bench/gpu-wheels.txt says which, and how to fetch them); they are
# installed into /tmp/site. Each step has its own time limit, so that one running long cannot take the others
# down, and writes under $OUT (what a device call brings back; /tmp/gpu-session elsewhere):
#   1. bench/gpu_bench.py: plain diffusers against the server (and .baseline's), W and SDXL -> gpu.jsonl, gpu_bench.log
#   2. bench/loop_bench.py: where a batched round's time goes, in process       -> loop.jsonl, loop_bench.log
#   3. pytest: CUDA graphs and compiled models on the device (PYTEST_GPU_FILES chooses, SKIP_PYTEST_GPU=1 skips) -> pytest-gpu.log
#   4. bench/cold_start.py --model sd21: process start to first image (SKIP_COLD_START=1 skips it)
#   5. bench/kernel_bench.py, with KERNEL_BENCH=1 (KERNEL_BENCH=only: this step alone): SDPA backends, torchao fp8 and,
#      with KERNEL_BENCH_ARGS=--with-compile, max-autotune against plain diffusers, W and SDXL -> kernel.jsonl,
#      kernel_bench.log. Sized for ~2.5 min on an H200 (an estimate); its --budget-s (240 s unless KERNEL_BENCH_ARGS
#      says otherwise) and KERNEL_BENCH_TIMEOUT (default 300 s) bound it.
# SKIP_GPU_BENCH=1 and SKIP_LOOP_BENCH=1 skip steps 1 and 2.
# GPU_BENCH_ARGS adds options to gpu_bench.py (e.g. --skip-sdxl, --variant compiled:COMPILE=1), and
# GPU_BENCH_TIMEOUT (seconds, default 330) bounds it.
# Then it prints what each step reported, for the reply's output tail.
set -uo pipefail
OUT=${OUT:-/tmp/gpu-session}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
if [ -z "${TINY:-}" ] && [ -d .whl ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD/src
else
  export PYTHONPATH=$PWD/src
fi
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
TINY_FLAG=${TINY:+--tiny}
if [ "${KERNEL_BENCH:-}" = only ]; then
  SKIP_GPU_BENCH=1 SKIP_LOOP_BENCH=1 SKIP_PYTEST_GPU=1 SKIP_COLD_START=1
fi

{ nvidia-smi || true; $PY -c 'import torch, diffusers; print("torch", torch.__version__, "diffusers", diffusers.__version__)'; } \
  >"$OUT/env.txt" 2>&1

BASELINE=()
[ -d .baseline/src ] && BASELINE=(--baseline-src .baseline/src)
if [ -z "${SKIP_GPU_BENCH:-}" ]; then
  timeout ${GPU_BENCH_TIMEOUT:-330} $PY bench/gpu_bench.py $TINY_FLAG "${BASELINE[@]}" ${GPU_BENCH_ARGS:-} --out "$OUT/gpu.jsonl" >"$OUT/gpu_bench.log" 2>&1
  echo "gpu_bench: exit $?"
fi
if [ -z "${SKIP_LOOP_BENCH:-}" ]; then
  timeout 120 $PY bench/loop_bench.py $TINY_FLAG --out "$OUT/loop.jsonl" >"$OUT/loop_bench.log" 2>&1
  echo "loop_bench: exit $?"
fi
# The GPU image's library versions differ from CI's (its starlette warns at import): their warnings are not this
# run's concern, so pytest's warnings plugin (which makes them errors) is off.
if [ -z "${SKIP_PYTEST_GPU:-}" ]; then
  timeout 200 $PY -m pytest -q -p no:cacheprovider -p no:warnings -m gpu \
    ${PYTEST_GPU_FILES:-tests/unit/test_graphs.py tests/integration/test_compiled_models.py} >"$OUT/pytest-gpu.log" 2>&1
  echo "pytest -m gpu: exit $?"
fi
if [ -z "${SKIP_COLD_START:-}" ]; then
  if [ -n "${TINY:-}" ]; then model=builtin/tiny-sd; else model=sd21; fi
  timeout 90 $PY bench/cold_start.py --model $model --runs 2 --out "$OUT/cold_start.jsonl" >"$OUT/cold_start.log" 2>&1
  echo "cold_start: exit $?"
fi
if [ -n "${KERNEL_BENCH:-}" ]; then
  rm -f "$OUT/kernel.jsonl"  # kernel_bench appends; a local OUT outlives a run
  timeout ${KERNEL_BENCH_TIMEOUT:-300} $PY bench/kernel_bench.py $TINY_FLAG ${KERNEL_BENCH_ARGS:-} --out "$OUT/kernel.jsonl" \
    >"$OUT/kernel_bench.log" 2>&1
  echo "kernel_bench: exit $?"
fi

echo "--- results"
cat "$OUT/env.txt" | grep -E "torch|NVIDIA H|MiB" | head -3
grep -h '"what"' "$OUT/gpu.jsonl" "$OUT/loop.jsonl" "$OUT/cold_start.jsonl" 2>/dev/null | cut -c1-700
[ -f "$OUT/pytest-gpu.log" ] && tail -2 "$OUT/pytest-gpu.log"
if [ -f "$OUT/kernel.jsonl" ]; then $PY bench/kernel_bench.py --show "$OUT/kernel.jsonl"; fi
