"""FSDP2 through `accelerate launch --use_fsdp`, run for real: 2 CPU processes over gloo, against 1 process."""

import json
import math
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_config
from safetensors.torch import load_file
from test_training_run import _launch, _losses, _torchrun, _train

pytestmark = pytest.mark.slow

LOGIT_SCALE_MAX = 100.0


def _accelerate_fsdp2() -> tuple[str, ...]:
    """The launch command the README shows, with 2 processes on a free port."""
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or "accelerate"
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return (accelerate, "launch", "--num_processes", "2", "--num_machines", "1", "--main_process_port", str(port),
            "--mixed_precision", "no", "--dynamo_backend", "no", "--use_fsdp", "--fsdp_version", "2",
            "--fsdp_auto_wrap_policy", "TRANSFORMER_BASED_WRAP", "--fsdp_transformer_layer_cls_to_wrap",
            "HFClipEncoderLayer", "--fsdp_state_dict_type", "FULL_STATE_DICT", "-m", "hf_clip_train.train")


@pytest.fixture
def start_above_the_clamp(tmp_path, tokenizer):
    """A tiny model whose stored logit scale is ln(150), above ln(`logit_scale_max`) = ln(100)."""
    from hf_clip import HFClipModel, HFClipProcessor

    torch.manual_seed(0)
    layer = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2}
    config = make_config(tokenizer, projection_dim=32, text=layer, vision={**layer, "image_size": 32, "patch_size": 8})
    config.logit_scale_max = LOGIT_SCALE_MAX
    model = HFClipModel(config)
    with torch.no_grad():
        model.logit_scale.fill_(math.log(150.0))
    path = tmp_path / "start"
    model.save_pretrained(path)
    HFClipProcessor.from_tokenizer(tokenizer, image_size=32).save_pretrained(path)
    return path


def test_fsdp2_on_two_cpu_processes_trains_clamps_saves_and_resumes_like_one_process(tmp_path,
                                                                                      start_above_the_clamp):
    """2 FSDP2 ranks × 8 rows vs 2 DDP ranks (torchrun) and 1 process × 16 rows: FSDP's losses are DDP's to the bit
    and its weights agree to 1e-7; against one process the losses agree to 1e-5 over the 3 steps the DDP test checks
    and the weights as there. The logit scale is clamped; a run resumed from the FSDP checkpoint repeats the
    uninterrupted run's losses and weights.

    One process sums the gradient's 16 rows in another order than 2 ranks do, and at this logit scale (100) the
    loss magnifies the difference: the 4th step's loss differs from one process's by about 1e-5, the same for DDP
    and FSDP, so FSDP's own effect is measured against DDP."""
    from transformers import AutoModel

    common = ["--model_name_or_path", str(start_above_the_clamp), "--max_steps", "4", "--eval_splits", "test",
              "--max_eval_samples", "41", "--per_device_eval_batch_size", "4"]  # evaluation: 6 batches vs 5
    single = tmp_path / "single"
    _train(single, *common, "--per_device_train_batch_size", "16")
    sharded = tmp_path / "fsdp"
    result = _launch(sharded, *common, "--per_device_train_batch_size", "8", "--save_steps", "2",
                     launcher=_accelerate_fsdp2())
    assert "2 process(es)" in result.stderr
    assert (sharded / "checkpoint-2" / "pytorch_model_fsdp.bin").is_file()  # Accelerate's FSDP checkpoint layout

    data_parallel = tmp_path / "ddp"
    _launch(data_parallel, *common, "--per_device_train_batch_size", "8", launcher=_torchrun())

    single_losses, sharded_losses = _losses(single), _losses(sharded)
    assert sorted(sharded_losses) == [1, 2, 3, 4]
    assert sharded_losses == _losses(data_parallel)
    for step in (1, 2, 3):
        assert sharded_losses[step] == pytest.approx(single_losses[step], abs=1e-5), step

    evaluated = json.loads((single / "eval_results.json").read_text())["test"]
    for key, value in json.loads((sharded / "eval_results.json").read_text())["test"].items():
        assert value == pytest.approx(evaluated[key], abs=1e-6), key

    import hf_clip  # noqa: F401  (registers the model type for AutoModel)

    reloaded = AutoModel.from_pretrained(sharded)
    assert type(reloaded).__name__ == "HFClipModel"
    reference = load_file(single / "model.safetensors")
    data_parallel_weights = load_file(data_parallel / "model.safetensors")
    weights = reloaded.state_dict()
    assert set(weights) == set(reference)
    for name, tensor in reference.items():
        assert weights[name].shape == tensor.shape, name
        torch.testing.assert_close(weights[name], data_parallel_weights[name], atol=1e-7, rtol=0, msg=name)
        torch.testing.assert_close(weights[name], tensor, atol=2e-5, rtol=1e-4, msg=name)
    logit_scale = weights["logit_scale"].item()
    assert logit_scale <= math.log(LOGIT_SCALE_MAX) + 1e-6  # clamped on the sharded parameter after each step
    assert logit_scale > math.log(LOGIT_SCALE_MAX) - 0.05  # ... and not moved far by 4 small steps after that
    logged = [json.loads(line) for line in (sharded / "metrics.jsonl").read_text().splitlines()]
    assert all(line["logit_scale"] <= LOGIT_SCALE_MAX + 1e-4 for line in logged if "logit_scale" in line)

    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(sharded / "checkpoint-2", resumed / "checkpoint-2")
    _launch(resumed, *common, "--per_device_train_batch_size", "8", "--resume_from_checkpoint", "latest",
            launcher=_accelerate_fsdp2())
    resumed_losses = _losses(resumed)
    assert sorted(resumed_losses) == [3, 4]
    for step in resumed_losses:
        assert resumed_losses[step] == sharded_losses[step], step
    straight, again = load_file(sharded / "model.safetensors"), load_file(resumed / "model.safetensors")
    for name, tensor in straight.items():
        assert torch.equal(again[name], tensor), name


EXIT_PROBE = """
import atexit, logging, sys
import hf_clip_train.fsdp  # as the training script does
from hf_clip_train.cli import run_script
logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
atexit.register(print, "interpreter shutdown")

def main(argv):
    print("script done", end="")  # no newline: under a pipe it waits in stdout's buffer
    logging.getLogger("probe").info("logged")
    return {}

run_script(main, "probe")
"""


@pytest.mark.parametrize(("env", "shuts_down"), [
    ({"ACCELERATE_USE_FSDP": "true", "WORLD_SIZE": "2"}, False),
    ({"ACCELERATE_USE_FSDP": "true", "WORLD_SIZE": "1"}, True),
    ({"ACCELERATE_USE_FSDP": "false", "WORLD_SIZE": "2"}, True),
])
def test_a_process_of_a_multi_process_fsdp_run_ends_without_the_interpreter_shutdown(env, shuts_down):
    """`hf_clip_train.cli.run_script` ends a process of a multi-process FSDP launch with `os._exit` once its script
    returned (`exit_after_fsdp`: gloo's worker threads, kept alive by DTensor's caches, can abort the interpreter's
    shutdown): status 0, the script's output and logs flushed, and no atexit handler run. Any other process shuts
    down as usual."""
    result = subprocess.run([sys.executable, "-c", EXIT_PROBE], env={**os.environ, **env}, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("script done") and "logged" in result.stderr
    assert ("interpreter shutdown" in result.stdout) is shuts_down
