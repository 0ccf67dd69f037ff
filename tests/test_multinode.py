"""Several nodes, on one machine: the SLURM example starts one `accelerate launch` per node, and two nodes of one
process each train exactly as one process with the same global batch."""

import json
import os
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import FAST_TRAINING_ARGS as FAST
from conftest import train_in_process
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "examples" / "slurm_multinode.sh"

pytestmark = pytest.mark.slow

# Stand-ins for the two SLURM commands the script calls, for a job of SLURM_NNODES nodes that all are this machine.
SRUN = """#!/bin/bash
# srun: run the command once per node, each with its SLURM_NODEID, side by side; fail if any fails.
while [[ $1 == -* ]]; do shift; done
pids=()
for ((node = 0; node < SLURM_NNODES; node++)); do
    SLURM_NODEID=$node "$@" > "$NODE_LOGS/node$node.log" 2>&1 &
    pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
"""
SCONTROL = """#!/bin/bash
# scontrol show hostnames LIST: one host name per line.
[[ $1 == show && $2 == hostnames ]] && tr ',' '\\n' <<< "$3"
"""


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _losses(output_dir: Path) -> dict[int, float]:
    lines = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return {line["step"]: line["loss"] for line in lines if "loss" in line}


def _row_ids(path: Path) -> list[list[int]]:
    return [json.loads(line)["row_ids"] for line in path.read_text().splitlines()]


def _slurm_job(tmp_path: Path, nodes: int) -> dict[str, str]:
    """The environment of a SLURM job step on `nodes` nodes, with srun and scontrol stand-ins first on PATH."""
    bin_dir, logs = tmp_path / "bin", tmp_path / "node_logs"
    bin_dir.mkdir()
    logs.mkdir()
    for name, text in (("srun", SRUN), ("scontrol", SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(stat.S_IRWXU)
    path = os.pathsep.join([str(bin_dir), str(Path(sys.executable).parent), os.environ["PATH"]])
    return {**os.environ, "PATH": path, "NODE_LOGS": str(logs), "OMP_NUM_THREADS": "1", "SLURM_NNODES": str(nodes),
            "SLURM_JOB_NODELIST": ",".join(["127.0.0.1"] * nodes), "SLURM_JOB_NAME": "hf-clip", "SLURM_JOB_ID": "1",
            "GPUS_PER_NODE": "1", "MAIN_PROCESS_PORT": str(_free_port())}


def test_slurm_script_is_valid_bash():
    checked = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stderr
    assert "#SBATCH --ntasks-per-node=1" in SCRIPT.read_text()  # one launcher per node, not one per GPU


def test_two_nodes_from_the_slurm_script_match_one_process(tmp_path):
    """examples/slurm_multinode.sh on a 2-node "job" of this machine runs `accelerate launch --multi_gpu
    --num_machines 2 --machine_rank {0,1} --main_process_ip 127.0.0.1 --num_processes 2 -m hf_clip_train.train` once per
    node: 2 nodes × 1 process × 8 rows against 1 process × 16 rows read the same rows and reach the same losses (to
    1e-5), weights and evaluation."""
    steps = ["--max_steps", "3", "--log_sample_ids", "--eval_splits", "test"]
    single = tmp_path / "single"
    train_in_process(["--output_dir", single, *FAST, *steps, "--per_device_train_batch_size", "16"])

    nodes = tmp_path / "nodes"
    env = {**_slurm_job(tmp_path, nodes=2), "OUTPUT_DIR": str(nodes)}
    job = subprocess.run(["bash", str(SCRIPT), *FAST, *steps, "--per_device_train_batch_size", "8"], cwd=REPO,
                         env=env, capture_output=True, text=True, timeout=400)
    logs = {path.name: path.read_text() for path in sorted((tmp_path / "node_logs").glob("*.log"))}
    assert job.returncode == 0, "\n".join(f"== {name}\n{text[-3000:]}" for name, text in logs.items())
    assert "2 process(es)" in logs["node0.log"]

    reference = _row_ids(single / "sample_ids_rank0.jsonl")
    node0, node1 = _row_ids(nodes / "sample_ids_rank0.jsonl"), _row_ids(nodes / "sample_ids_rank1.jsonl")
    for step in range(3):
        assert node0[step] + node1[step] == reference[step]
    single_losses, node_losses = _losses(single), _losses(nodes)
    assert sorted(node_losses) == [1, 2, 3]
    for step, loss in single_losses.items():
        assert node_losses[step] == pytest.approx(loss, abs=1e-5), step
    evaluated = json.loads((single / "eval_results.json").read_text())["test"]
    for key, value in json.loads((nodes / "eval_results.json").read_text())["test"].items():
        assert value == pytest.approx(evaluated[key], abs=1e-6), key  # each node embedded its share of the rows
    expected, got = load_file(single / "model.safetensors"), load_file(nodes / "model.safetensors")
    for name, tensor in expected.items():
        torch.testing.assert_close(got[name], tensor, atol=2e-5, rtol=1e-4, msg=name)


def test_accelerate_cpu_launch_of_several_machines_is_refused(tmp_path, monkeypatch):
    """`accelerate launch --cpu` starts one lone process per machine unless MPI runs them; with the environment that
    launcher gives its process, hf_clip_train.train stops at start-up instead of training each node alone into the same
    folder. A process that torchrun (or `accelerate launch --multi_gpu`) started among others is let through."""
    from hf_clip_train.train import check_cpu_launch

    command = [str(Path(sys.executable).parent / "accelerate"), "launch", "--cpu", "--num_machines", "2",
               "--machine_rank", "0", "--num_processes", "2", "--main_process_ip", "127.0.0.1",
               "--main_process_port", str(_free_port()), "--mixed_precision", "no", "--dynamo_backend", "no",
               "--no_python", "env"]
    launched = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert launched.returncode == 0, launched.stderr[-3000:]
    environment = dict(line.split("=", 1) for line in launched.stdout.splitlines() if "=" in line)
    assert "WORLD_SIZE" not in environment and "RANK" not in environment  # nothing tells it of the other machine
    for name in ("ACCELERATE_USE_CPU", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.setenv(name, environment[name])
    with pytest.raises(RuntimeError, match="--mpirun_hostfile") as refused:
        check_cpu_launch(num_processes=1)
    assert "--multi_gpu" in str(refused.value)
    check_cpu_launch(num_processes=2)
    monkeypatch.delenv("MASTER_ADDR")
    check_cpu_launch(num_processes=1)  # a plain single-process `accelerate launch --cpu`
