#!/bin/bash
# hf_clip on several nodes with SLURM: one `accelerate launch` per node, which starts one training process per GPU.
#
#   sbatch examples/slurm_multinode.sh --dataset_name DATA --preset ViT-B-32 --per_device_train_batch_size 256
#
# The script's arguments go to `python -m hf_clip_train.train` as they are. Submit it from the repository root with the
# environment active (or use `-m hf_clip_train.train` below for an installed package). To adapt it:
# - the #SBATCH lines: nodes, GPUs per node, CPUs for the data loaders, time, and your partition / account;
# - GPUS_PER_NODE, when SLURM does not set SLURM_GPUS_ON_NODE; MAIN_PROCESS_PORT, when 29500 is taken;
# - OUTPUT_DIR must be on a filesystem that every node sees: the first process writes the tokenizer it trains, the
#   checkpoints and the model there, and every process reads them back (the tokenizer, and `latest` on resume).
# hf_clip_train.train picks bf16 on GPUs that run it (--mixed_precision auto) and scores each example against the whole
# global batch: nodes x GPUs x --per_device_train_batch_size pairs.
#SBATCH --job-name=hf-clip
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=96
#SBATCH --time=24:00:00
#SBATCH --output=%x-%j.out

set -euo pipefail

export GPUS_PER_NODE=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}
export MAIN_PROCESS_IP=${MAIN_PROCESS_IP:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)}
export MAIN_PROCESS_PORT=${MAIN_PROCESS_PORT:-29500}
export OUTPUT_DIR=${OUTPUT_DIR:-outputs/$SLURM_JOB_NAME-$SLURM_JOB_ID}

# srun runs the quoted command once per node (--ntasks-per-node=1); each node's shell expands its own SLURM_NODEID.
srun --kill-on-bad-exit=1 bash -c 'exec accelerate launch --multi_gpu \
    --num_machines "$SLURM_NNODES" --machine_rank "$SLURM_NODEID" \
    --num_processes $((SLURM_NNODES * GPUS_PER_NODE)) \
    --main_process_ip "$MAIN_PROCESS_IP" --main_process_port "$MAIN_PROCESS_PORT" --dynamo_backend no \
    -m hf_clip_train.train --output_dir "$OUTPUT_DIR" "$@"' hf-clip "$@"
