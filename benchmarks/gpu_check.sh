#!/usr/bin/env bash
# One run on a lent GPU (the `device` tool): install, then the CUDA checks of docs/sharding.md, each
# under its own time limit so one hang cannot eat the others. Logs go to $OUT (at most 8 files).
#   cd .dev22 && bash benchmarks/gpu_check.sh            # with ../.whl carried (make_wheels.sh)
# Dry run on a CPU machine: GPU_CHECK_DEVICE=cpu OUT=/tmp/out bash benchmarks/gpu_check.sh
set -u
OUT=${OUT:-/tmp/gpu-check}; mkdir -p "$OUT"
DEVICE=${GPU_CHECK_DEVICE:-cuda}
WHEELS=${WHEELS:-../.whl}
LOG="$OUT/log.txt"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export RLHF_CLI_CACHE=/tmp/rlhf-cache COLUMNS=160
say() { echo "=== $(date -u +%T) $*" | tee -a "$LOG"; }
step() {  # step NAME SECONDS COMMAND...: run with a limit, log, record rc
  local name=$1 limit=$2; shift 2
  [[ "$name" =~ ${ONLY:-.} ]] || return 0  # ONLY=regex runs a subset (dry runs)
  say "$name (limit ${limit}s): $*"
  local t0=$SECONDS
  timeout "$limit" "$@" >>"$LOG" 2>&1; local rc=$?
  say "$name rc=$rc in $((SECONDS - t0))s"
  echo "{\"step\": \"$name\", \"rc\": $rc, \"seconds\": $((SECONDS - t0))}" >>"$OUT/steps.jsonl"
}

if [ -d "$WHEELS" ] && [ "$DEVICE" = cuda ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/*.whl >>"$LOG" 2>&1
  rm -rf /tmp/site/rlhf_cli /tmp/site/rlhf_cli-*  # the source tree below is what runs
  export PYTHONPATH=$PWD:/tmp/site
  export PATH=/tmp/site/bin:$PATH
else
  export PYTHONPATH=$PWD
fi
# Every installed package's declared requirements present (the second H200 run lost `rlhf train`: the
# carried transformers 5.25 needs `kernels`, which was not carried; the device's own 5.17 now runs).
say "pip check"; python3 -m pip check >>"$LOG" 2>&1
say "versions"; python3 -c "import torch, transformers, accelerate; print(torch.__version__, transformers.__version__, accelerate.__version__, torch.cuda.is_available() and torch.cuda.get_device_name())" >>"$LOG" 2>&1
[ "$DEVICE" = cuda ] && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >>"$LOG" 2>&1

TRAIN="python3 -m rlhf_cli train eval_prompts=4 logging.progress=false overwrite=true"
# 1. `rlhf train` (the default model, review GPT-2) on CUDA in bf16: a few steps, then the same in fp32.
step train_default_bf16 120 $TRAIN output_dir=/tmp/r-bf16 steps=4 ppo.precision=bf16 threads=null
cp /tmp/r-bf16/metrics.jsonl "$OUT/metrics_default_bf16.jsonl" 2>/dev/null
# 2. One FSDP2 process on the GPU: ppo.sharding=fsdp2 alone (a world of one over NCCL), then through
#    Accelerate's FSDP config (fsdp_version: 2), both with checkpoints and a resume.
step fsdp2_one_process 90 $TRAIN +recipe=smoke output_dir=/tmp/r-fsdp2 ppo.sharding=fsdp2 ppo.precision=bf16 checkpoint.every=2
cp /tmp/r-fsdp2/metrics.jsonl "$OUT/metrics_fsdp2.jsonl" 2>/dev/null
step fsdp2_resume 45 $TRAIN +recipe=smoke output_dir=/tmp/r-fsdp2 ppo.sharding=fsdp2 ppo.precision=bf16 checkpoint.every=2 steps=4 checkpoint.resume=auto overwrite=false
step fsdp2_accelerate_config 90 accelerate launch --config_file configs/accelerate/fsdp.yaml --num_processes 1 --main_process_port 0 \
  -m rlhf_cli train +recipe=smoke output_dir=/tmp/r-fsdp2-acc eval_prompts=4 logging.progress=false overwrite=true
# 3. Rollout generation throughput, with and without a static KV cache and torch.compile.
step generation_throughput 120 python3 benchmarks/generation_throughput.py --device "$DEVICE" --dtype bfloat16 --out "$OUT/generation.json"
# 4. The integration and CLI tests with the models on CUDA, in whatever time is left.
LEFT=$(( ${GPU_CHECK_BUDGET:-330} - SECONDS - 10 ))
[ "$DEVICE" = cuda ] && export RLHF_TEST_DEVICE=cuda
step pytest_integration_cli "$(( LEFT > 30 ? LEFT : 30 ))" python3 -m pytest -v -rfE -p no:randomly -p no:cacheprovider -n "${PYTEST_WORKERS:-8}" \
  --junitxml="$OUT/pytest.xml" -o junit_family=xunit1 tests/integration tests/cli
grep -cE "PASSED" "$LOG" | sed 's/^/tests passed: /'; grep -E "(FAILED|ERROR) tests/" "$LOG" | sort -u | head -40
say "done"
