#!/bin/bash
# Multi-node pretraining on SLURM: one task per node, each running `accelerate launch` for its node's GPUs.
#   sbatch --nodes 2 tools/slurm_pretrain.sh configs/mae_vit_base_imagenet.yaml train.output_dir=/shared/runs
#   ACCELERATE_CONFIG=configs/accelerate/fsdp.yaml sbatch --nodes 2 tools/slurm_pretrain.sh configs/X.yaml  # FSDP
# Data and train.output_dir must be readable/writable from every node (docs/distributed.md).
#SBATCH --job-name=selfsup
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=48:00:00
#SBATCH --signal=B:TERM@120      # SIGTERM 2 minutes before the limit: the run checkpoints and exits 143
#SBATCH --requeue                # ... and the requeued job resumes (train.resume=auto)
set -euo pipefail
CONFIG=${1:?usage: sbatch tools/slurm_pretrain.sh CONFIG [section.key=value ...]}; shift

GPUS_PER_NODE=${SLURM_GPUS_ON_NODE:-8}
MAIN_HOST=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
EXTRA=()
if [[ -n "${ACCELERATE_CONFIG:-}" ]]; then EXTRA+=(--config_file "$ACCELERATE_CONFIG"); else EXTRA+=(--multi_gpu); fi

# srun starts one launcher per node; \$SLURM_NODEID is evaluated on each node for its machine rank.
srun --kill-on-bad-exit=1 bash -c "accelerate launch ${EXTRA[*]} \
    --num_machines $SLURM_NNODES --machine_rank \$SLURM_NODEID \
    --main_process_ip $MAIN_HOST --main_process_port 29500 \
    --num_processes $((SLURM_NNODES * GPUS_PER_NODE)) --rdzv_backend static \
    pretrain.py --config $CONFIG $*" &
SRUN=$!
# the batch shell gets SIGTERM (--signal=B:TERM); srun passes it on to every task, which checkpoints and exits
trap 'kill -TERM $SRUN; wait $SRUN' TERM
wait $SRUN
