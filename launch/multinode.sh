#!/usr/bin/env bash
# Launch an rlkit recipe on several machines (default 2 nodes x 8 GPUs) with launch/multinode_ddp.yaml.
# Run this same script on every node; only MACHINE_RANK differs.
#
#   node 0:  MACHINE_RANK=0 MAIN_IP=10.0.0.1 bash launch/multinode.sh recipes/grpo/<recipe>.yaml trainer.max_steps=500
#   node 1:  MACHINE_RANK=1 MAIN_IP=10.0.0.1 bash launch/multinode.sh recipes/grpo/<recipe>.yaml trainer.max_steps=500
#
# Under SLURM (one task per node: #SBATCH --nodes=2 --ntasks-per-node=1 --gpus-per-node=8):
#   srun bash launch/multinode.sh recipes/grpo/<recipe>.yaml
# MACHINE_RANK, MAIN_IP and NUM_MACHINES are then taken from SLURM_NODEID / SLURM_JOB_NODELIST / SLURM_NNODES.
#
# Environment:
#   MACHINE_RANK   this node's index, 0 .. NUM_MACHINES-1 (node 0 hosts the rendezvous)
#   MAIN_IP        address of node 0, reachable from every node
#   MAIN_PORT      free TCP port on node 0 (default 29500)
#   NUM_MACHINES   number of nodes (default 2)
#   GPUS_PER_NODE  processes per node (default: GPUs visible here, via nvidia-smi)
#   CONFIG         accelerate config (default launch/multinode_ddp.yaml; any launch/*.yaml works)
#   EXTRA_ARGS     extra `rlkit train` flags, e.g. "--resume"
# Other variables worth setting on clusters: NCCL_SOCKET_IFNAME (the interface between nodes),
# NCCL_DEBUG=WARN. Extra arguments after the recipe are recipe overrides (dotted.key=value).
set -euo pipefail

if [[ $# -lt 1 ]]; then
  echo "usage: MACHINE_RANK=<i> MAIN_IP=<node0 address> bash $0 RECIPE.yaml [key=value ...]" >&2
  exit 2
fi
RECIPE="$1"; shift

if [[ -n "${SLURM_JOB_ID:-}" ]]; then
  MACHINE_RANK="${MACHINE_RANK:-${SLURM_NODEID}}"
  NUM_MACHINES="${NUM_MACHINES:-${SLURM_NNODES}}"
  MAIN_IP="${MAIN_IP:-$(scontrol show hostnames "${SLURM_JOB_NODELIST}" | head -n 1)}"
fi
: "${MACHINE_RANK:?set MACHINE_RANK (0 on the main node, 1.. on the others)}"
: "${MAIN_IP:?set MAIN_IP to the address of node 0}"
MAIN_PORT="${MAIN_PORT:-29500}"
NUM_MACHINES="${NUM_MACHINES:-2}"
GPUS_PER_NODE="${GPUS_PER_NODE:-$(nvidia-smi --list-gpus 2>/dev/null | wc -l)}"
if [[ "${GPUS_PER_NODE}" -lt 1 ]]; then
  echo "no GPU visible on $(hostname); set GPUS_PER_NODE" >&2
  exit 2
fi
CONFIG="${CONFIG:-$(dirname "$0")/multinode_ddp.yaml}"
NUM_PROCESSES=$(( NUM_MACHINES * GPUS_PER_NODE ))

set -x
# shellcheck disable=SC2086
exec accelerate launch \
  --config_file "${CONFIG}" \
  --num_machines "${NUM_MACHINES}" \
  --num_processes "${NUM_PROCESSES}" \
  --machine_rank "${MACHINE_RANK}" \
  --main_process_ip "${MAIN_IP}" \
  --main_process_port "${MAIN_PORT}" \
  -m rlkit train "${RECIPE}" "$@" ${EXTRA_ARGS:-}
