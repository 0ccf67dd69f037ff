"""The real training entry point, run as users run it: `python -m hf_clip_train.train` and `torchrun`."""

import io
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FAST_TRAINING_ARGS as FAST
from conftest import save_tiny_transformers_clip, script_in_process, train_in_process
from PIL import Image
from safetensors.torch import load_file

from hf_clip_train import evaluate
from hf_clip_train.checkpointing import DamagedCheckpointError

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow

def _launch(output_dir, *extra, launcher=(sys.executable, "-m", "hf_clip_train.train"), env=None, timeout=300):
    """The training script as its own process (or processes), as users start it; `env` replaces this process's
    environment (for example to reach the test Hub server)."""
    env = {**(env or os.environ), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([*launcher, "--output_dir", str(output_dir), *FAST, *extra], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-6000:]
    return result


def _torchrun(module: str = "hf_clip_train.train") -> tuple[str, ...]:
    """The launch command for `module` in 2 processes on this machine (`torchrun --standalone`)."""
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
    return torchrun, "--standalone", "--nproc_per_node", "2", "-m", module


def _train(output_dir, *extra) -> str:
    """The training script in this process, for runs whose outcome is read from their files and what they print."""
    return train_in_process(["--output_dir", output_dir, *FAST, *extra])[1]


def _losses(output_dir) -> dict[int, float]:
    lines = [json.loads(line) for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines()]
    return {line["step"]: line["loss"] for line in lines if "loss" in line}


def test_main_job_trains_evaluates_saves_and_runs_the_pipeline(tmp_path):
    result = _launch(tmp_path / "run", "--max_steps", "4", "--save_steps", "2")
    out = tmp_path / "run"
    assert "ZS top1" in result.stdout and "test_unseen" in result.stdout
    assert "pipeline on one image of a" in result.stdout
    results = json.loads((out / "eval_results.json").read_text())
    assert set(results) == {"test", "test_unseen"}
    test = results["test"]
    assert test["num_samples"] == 48 and test["skipped_samples"] == 0
    assert (48 * test["zero_shot_top1"]) == pytest.approx(round(48 * test["zero_shot_top1"]), abs=1e-4)
    assert test["zero_shot_top1"] <= test["zero_shot_top5"]
    for direction in ("image_to_text", "text_to_image"):
        assert test[f"{direction}_R@1"] <= test[f"{direction}_R@5"] <= test[f"{direction}_R@10"]
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {k.removeprefix("eval/test/"): v for k, v in logged[-2].items() if k.startswith("eval/test/")} == test
    assert (out / "model.safetensors").exists() and not list(out.glob("*.bin"))
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert len(_losses(out)) == 4

    script = (f"import hf_clip; from transformers import AutoModel, AutoProcessor; "
              f"m = AutoModel.from_pretrained({str(out)!r}); p = AutoProcessor.from_pretrained({str(out)!r}); "
              f"print(type(m).__name__, type(p).__name__)")
    loaded = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO)
    assert loaded.stdout.split() == ["HFClipModel", "HFClipProcessor"], loaded.stderr

    script_in_process(evaluate.main, ["--model_name_or_path", out, "--max_eval_samples", "48",
                                      "--dataloader_num_workers", "0", "--output_file", tmp_path / "eval.json"])
    standalone = json.loads((tmp_path / "eval.json").read_text())
    assert standalone["test"]["zero_shot_top1"] == pytest.approx(results["test"]["zero_shot_top1"], abs=1e-6)


def test_resume_continues_with_identical_losses(tmp_path):
    k = 3
    straight = tmp_path / "straight"
    _train(straight, "--max_steps", str(2 * k), "--save_steps", str(k), "--save_total_limit", "5")
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(straight / f"checkpoint-{k}", resumed / f"checkpoint-{k}")
    shutil.copytree(straight / ".tokenizer", resumed / ".tokenizer")
    _train(resumed, "--max_steps", str(2 * k), "--resume_from_checkpoint", "latest")
    expected, got = _losses(straight), _losses(resumed)
    assert sorted(got) == list(range(k + 1, 2 * k + 1))
    for step in got:
        assert got[step] == expected[step], step  # exactly equal: same data position, RNG and optimizer state


def test_streamed_resume_continues_with_identical_losses(tmp_path):
    """--streaming with 2 DataLoader workers over 80 rows in 8 shards, batches of 16: per epoch each worker reads 40
    rows, 2 batches and 8 left over, merged into a fifth batch. Resumed from step 3 (mid-epoch), steps 4 (a worker's
    batch), 5 (the merged leftovers) and 6 (the next epoch) repeat the uninterrupted run exactly."""
    streamed = ["--streaming", "--dataloader_num_workers", "2", "--embedded_num_train", "80", "--shuffle_buffer_size",
                "16", "--eval_splits", "test"]
    straight = tmp_path / "straight"
    _train(straight, *streamed, "--max_steps", "6", "--save_steps", "3", "--save_total_limit", "5")
    state = json.loads((straight / "checkpoint-3" / "run_state.json").read_text())
    assert state["stream_states"] == [{"epoch": 0, "streams": 2, "positions": state["stream_states"][0]["positions"],
                                       "next_stream": 1, "merged_batches": 0}]
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(straight / "checkpoint-3", resumed / "checkpoint-3")
    shutil.copytree(straight / ".tokenizer", resumed / ".tokenizer")
    _train(resumed, *streamed, "--max_steps", "6", "--resume_from_checkpoint", "latest")
    expected, got = _losses(straight), _losses(resumed)
    assert sorted(got) == [4, 5, 6]
    for step in got:
        assert got[step] == expected[step], step


def test_sigkill_during_checkpoint_save_leaves_previous_checkpoint_usable(tmp_path):
    out = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "hf_clip_train.train", "--output_dir", str(out), *FAST, "--max_steps", "1000",
         "--save_steps", "2"],
        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    try:
        while not (out / ".tmp-checkpoint-4").exists():
            assert process.poll() is None and time.monotonic() < deadline, "training ended before step 4"
            time.sleep(0.001)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert (out / "checkpoint-2" / "run_state.json").exists()
    assert not (out / "checkpoint-4").exists() or (out / "checkpoint-4" / "run_state.json").exists()
    _train(out, "--max_steps", "6", "--resume_from_checkpoint", "latest", "--eval_splits", "test",
           "--allow_resume_changes")  # a shorter run than the killed one's 1,000 steps
    losses = _losses(out)
    assert max(losses) == 6 and all(torch.isfinite(torch.tensor(v)) for v in losses.values())


def _log_lines(path) -> list[dict]:
    lines = []
    for line in Path(path).read_text().splitlines():
        try:
            lines.append(json.loads(line))
        except json.JSONDecodeError:  # a line half-written when the run was killed
            pass
    return lines


def _truncate(path) -> None:
    with open(path, "r+b") as handle:
        handle.truncate(path.stat().st_size // 2)


def test_resume_after_sigkill_skips_damaged_checkpoints_and_logs_each_step_once(tmp_path, caplog):
    out = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "hf_clip_train.train", "--output_dir", str(out), *FAST, "--max_steps", "10",
         "--save_steps", "2", "--save_total_limit", "4", "--log_sample_ids"],
        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    try:
        while not (out / "metrics.jsonl").exists() or max(
                (line["step"] for line in _log_lines(out / "metrics.jsonl")), default=0) < 9:
            assert process.poll() is None and time.monotonic() < deadline, "training ended before step 9"
            time.sleep(0.01)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    killed_losses = {line["step"]: line["loss"] for line in _log_lines(out / "metrics.jsonl") if "loss" in line}
    assert sorted(p.name for p in out.glob("checkpoint-*")) == [f"checkpoint-{k}" for k in (2, 4, 6, 8)]
    state = out / "checkpoint-8" / "run_state.json"
    state.write_text(state.read_text()[:40])
    _truncate(out / "checkpoint-6" / "optimizer.bin")
    _truncate(out / "checkpoint-4" / "model.safetensors")

    with pytest.raises(DamagedCheckpointError, match="checkpoint-6: optimizer.bin has"):
        _train(out, "--max_steps", "10", "--resume_from_checkpoint", str(out / "checkpoint-6"))

    caplog.clear()
    with caplog.at_level(logging.INFO):
        _train(out, "--max_steps", "10", "--resume_from_checkpoint", "latest", "--log_sample_ids", "--eval_splits",
               "test")
    for checkpoint, file in ((8, "run_state.json"), (6, "optimizer.bin"), (4, "model.safetensors")):
        assert f"checkpoint-{checkpoint}: {file}" in caplog.text, (checkpoint, file)
    assert f"Resumed from {out / 'checkpoint-2'} at step 2" in caplog.text

    lines = _log_lines(out / "metrics.jsonl")
    assert [line["step"] for line in lines if "loss" in line] == list(range(1, 11))
    assert [line["step"] for line in lines if "eval/test/zero_shot_top1" in line] == [10]
    losses = _losses(out)
    for step in range(1, 10):
        assert losses[step] == killed_losses[step], step  # the resumed run repeats the killed run's steps exactly
    ids = [line["step"] for line in _log_lines(out / "sample_ids_rank0.jsonl")]
    assert ids == list(range(1, 11))


def _jpeg(seed: int) -> bytes:
    buffer = io.BytesIO()
    pixels = np.random.default_rng(seed).integers(0, 255, (24, 32, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buffer, format="JPEG")
    return buffer.getvalue()


def _webdataset_shards(folder, shards: int, rows: int, corrupt_jpg, corrupt_png) -> None:
    """WebDataset `.tar` shards of `key.jpg` + `key.png` + `key.txt`, as LAION / DataComp downloads are, with corrupt
    images at the positions (within each shard) that `corrupt_jpg` / `corrupt_png` select."""
    folder.mkdir()
    words = ("red", "green", "blue", "small", "big", "circle", "square", "photo", "dog", "cat")
    for shard in range(shards):
        with tarfile.open(folder / f"shard-{shard:03d}.tar", "w") as tar:
            for position in range(rows):
                jpg = _jpeg(shard * rows + position)
                if corrupt_jpg(position):
                    jpg = jpg[: len(jpg) // 2] if position % 2 else b"not a jpeg at all"
                png = b"\x89PNG broken" if corrupt_png(position) else _jpeg(position)
                caption = " ".join(words[(position * k + shard) % len(words)] for k in (1, 3, 7))
                for extension, data in (("jpg", jpg), ("png", png), ("txt", f"a photo of a {caption}".encode())):
                    info = tarfile.TarInfo(f"{shard:03d}{position:05d}.{extension}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))


def test_streaming_webdataset_with_corrupt_images_trains_from_scratch_and_counts_them(tmp_path):
    """4 shards x 150 rows, 6 corrupt JPEGs per shard (24 in all) plus corrupt images in another column. With a
    shuffle buffer of 1 the stream keeps each shard's order, whose last row is good, so the 36 steps x 16 rows read
    every row once, and the skip count must be exactly 24."""
    shards = tmp_path / "shards"
    _webdataset_shards(shards, shards=4, rows=150, corrupt_jpg=lambda p: p % 25 == 7,
                       corrupt_png=lambda p: p % 10 == 0)
    out = tmp_path / "run"
    stdout = _train(out, "--dataset_name", str(shards), "--streaming", "--image_column", "jpg", "--caption_column",
                    "txt", "--shuffle_buffer_size", "1", "--max_steps", "36")
    lines = _log_lines(out / "metrics.jsonl")
    assert [line["step"] for line in lines] == list(range(1, 37))
    assert lines[-1]["skipped_samples"] == 24
    assert "(16 images per step, 24 unusable rows skipped)" in stdout
    assert "Nothing to evaluate" in stdout and "ZS top1" not in stdout
    assert (out / "model.safetensors").exists()


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="2 DataLoader workers need 2 CPUs")
def test_a_streamed_resume_refuses_another_dataloader_worker_count_and_keeps_exact_skip_counts_with_the_same(
        tmp_path):
    """Issue 29: a streamed run resumed from 2 DataLoader workers to 0 counted 2 skipped rows where the uninterrupted
    run counted 9 (each worker's place in its own shards cannot carry over to another count, and the epoch was read
    again). Such a resume is now refused, naming both counts and the flag; with the same count the resumed run's
    losses and skip counts are the uninterrupted run's; --allow_resume_changes reads the epoch again, as logged and
    recorded in the card."""
    shards = tmp_path / "shards"
    _webdataset_shards(shards, shards=2, rows=40, corrupt_jpg=lambda p: p % 9 == 4, corrupt_png=lambda p: False)
    streamed = ["--dataset_name", str(shards), "--streaming", "--image_column", "jpg", "--caption_column", "txt",
                "--shuffle_buffer_size", "1", "--eval_splits", "none", "--max_steps", "4"]
    straight = tmp_path / "straight"
    _train(straight, *streamed, "--dataloader_num_workers", "2", "--save_steps", "2")
    skipped = {line["step"]: line["skipped_samples"] for line in _log_lines(straight / "metrics.jsonl")}
    assert skipped[4] > skipped[2] > 0

    def resume(name, *flags):
        resumed = tmp_path / name
        resumed.mkdir()
        shutil.copytree(straight / "checkpoint-2", resumed / "checkpoint-2")
        shutil.copytree(straight / ".tokenizer", resumed / ".tokenizer")
        _train(resumed, *streamed, "--resume_from_checkpoint", "latest", *flags)
        return resumed

    same = resume("same", "--dataloader_num_workers", "2")
    assert {line["step"]: (line["loss"], line["skipped_samples"]) for line in _log_lines(same / "metrics.jsonl")} == {
        step: (loss, skipped[step]) for step, loss in _losses(straight).items() if step > 2}
    with pytest.raises(ValueError, match=r"Cannot resume from .*checkpoint-2 with flags that differ .*: the "
                                         r"DataLoader workers reading the streamed split \(--dataloader_num_workers, "
                                         r"0 counted as 1 and capped at the CPU count\) 2 in the checkpoint, 1 now"):
        resume("fewer", "--dataloader_num_workers", "0")
    allowed = resume("allowed", "--dataloader_num_workers", "0", "--allow_resume_changes")
    assert "step 2: the DataLoader workers reading the streamed split" in (allowed / "README.md").read_text()


def test_torchrun_two_processes_match_one_process(tmp_path):
    """2 ranks × 8 rows vs 1 process × 16 rows: different data per rank, same losses and weights."""
    steps = ["--max_steps", "3", "--log_sample_ids", "--eval_splits", "test"]
    single = tmp_path / "single"
    _train(single, *steps, "--per_device_train_batch_size", "16")
    double = tmp_path / "double"
    _launch(double, *steps, "--per_device_train_batch_size", "8", launcher=_torchrun())

    def ids(path):
        return [json.loads(line)["row_ids"] for line in path.read_text().splitlines()]
    rank0, rank1 = ids(double / "sample_ids_rank0.jsonl"), ids(double / "sample_ids_rank1.jsonl")
    reference = ids(single / "sample_ids_rank0.jsonl")
    for step in range(3):
        assert set(rank0[step]).isdisjoint(rank1[step])
        assert rank0[step] + rank1[step] == reference[step]

    single_losses, double_losses = _losses(single), _losses(double)
    for step in single_losses:
        assert double_losses[step] == pytest.approx(single_losses[step], abs=1e-5), step
    single_weights, double_weights = load_file(single / "model.safetensors"), load_file(double / "model.safetensors")
    for name, tensor in single_weights.items():
        torch.testing.assert_close(double_weights[name], tensor, atol=2e-5, rtol=1e-4, msg=name)


def test_torchrun_lit_on_a_composed_model_matches_one_process(tmp_path, tokenizer):
    """LiT (a locked pretrained ViT beside the preset's text tower) in 2 torchrun processes × 8 rows and in 1 process
    × 16 rows: the same losses and weights, and the locked tower saved as it was in the pretrained folder."""
    from tiny_towers import save_vision_folder

    vision = save_vision_folder(tmp_path, "vit")
    steps = ["--max_steps", "3", "--eval_splits", "test", "--vision_model_name_or_path", str(vision), "--lock_image",
             "--projection_dim", "16"]
    single, double = tmp_path / "single", tmp_path / "double"
    _train(single, *steps, "--per_device_train_batch_size", "16")
    _launch(double, *steps, "--per_device_train_batch_size", "8", launcher=_torchrun())
    single_losses, double_losses = _losses(single), _losses(double)
    assert set(double_losses) == set(single_losses) == {1, 2, 3}
    for step in single_losses:
        assert double_losses[step] == pytest.approx(single_losses[step], abs=1e-5), step
    single_weights, double_weights = load_file(single / "model.safetensors"), load_file(double / "model.safetensors")
    for name, tensor in single_weights.items():
        torch.testing.assert_close(double_weights[name], tensor, atol=2e-5, rtol=1e-4, msg=name)
    for name, tensor in load_file(vision / "model.safetensors").items():
        assert torch.equal(double_weights[f"vision_model.{name}"], tensor), name


def test_fine_tune_a_transformers_clip_checkpoint_with_locked_towers(tmp_path, tokenizer):
    """--model_name_or_path with a Transformers CLIP directory; locked weights stay put, unlocked ones move."""
    start = save_tiny_transformers_clip(tmp_path / "clip", tokenizer, num_hidden_layers=2)

    out = tmp_path / "tuned"
    _train(out, "--model_name_or_path", str(start), "--max_steps", "2", "--lock_image",
           "--lock_image_unlocked_layers", "1", "--lock_text", "--activation_checkpointing",
           "--gradient_accumulation_steps", "2", "--eval_splits", "test")
    before, after = load_file(start / "model.safetensors"), load_file(out / "model.safetensors")
    assert torch.equal(before["vision_model.encoder.layers.0.mlp.fc1.weight"],
                       after["vision_model.encoder.layers.0.mlp.fc1.weight"])
    assert not torch.equal(before["vision_model.encoder.layers.1.mlp.fc1.weight"],
                           after["vision_model.encoder.layers.1.mlp.fc1.weight"])
    assert not torch.equal(before["visual_projection.weight"], after["visual_projection.weight"])
    for name in ("text_model.encoder.layers.1.mlp.fc1.weight", "text_projection.weight",
                 "text_model.embeddings.token_embedding.weight"):
        assert torch.equal(before[name], after[name]), name
    assert not torch.equal(before["logit_scale"], after["logit_scale"])
    assert json.loads((out / "config.json").read_text())["model_type"] == "hf_clip"


def test_streaming_run_is_reproducible_from_its_seed(tmp_path):
    runs = {}
    for name, seed in (("first", "7"), ("again", "7"), ("other", "8")):
        _train(tmp_path / name, "--streaming", "--max_steps", "3", "--seed", seed, "--eval_splits", "test")
        runs[name] = _losses(tmp_path / name)
    assert sorted(runs["first"]) == [1, 2, 3]
    assert runs["first"] == runs["again"]  # same seed: bit-identical losses
    assert runs["first"] != runs["other"]
