"""Issue 18's fault probes, each as a user met it: bad rows, the end of a run, config overrides, resumes with other
flags, diverging losses, a Hub outage, exact resumes with patch dropout, publishing, loss arguments, CLI values and
verified loading."""

import io
import json
import math
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from conftest import ALICE_TOKEN, FAST_TRAINING_ARGS, free_port, hub_env, train_in_process
from PIL import Image
from preloaded import run_python
from safetensors.torch import load_file

from hf_clip import ContrastiveDataCollator, HFClipConfig, HFClipModel, HFClipProcessor, contrastive_loss, sigmoid_loss
from hf_clip_train import finetune_trainer
from hf_clip_train import train as train_script
from hf_clip_train.args import DatasetArguments
from hf_clip_train.data import ProcessShare, TrainBatches, build_train_dataset, columns_of, image_transform_for

REPO = Path(__file__).resolve().parents[1]
# Small images and few patches: the probes are about the loop, not the model.
SMALL = ["--image_size", "16", "--patch_size", "8", "--dataloader_num_workers", "0"]


def _png(seed: int, size: int = 8) -> bytes:
    buffer = io.BytesIO()
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


WORDS = ("red", "green", "blue", "small", "big", "circle", "square", "dog", "cat", "tree")


def _caption(row: int) -> str:
    return "a photo of a " + " ".join(WORDS[(row * k) % len(WORDS)] for k in (1, 3, 7))


def _rows(num_rows: int, bad: set[int]) -> dict:
    return {"image": [{"bytes": b"not an image" if row in bad else _png(row), "path": None} for row in range(num_rows)],
            "caption": [_caption(row) for row in range(num_rows)]}


def _saved_dataset(folder: Path, splits: dict[str, dict], features: datasets.Features | None = None) -> str:
    features = features or datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string")})
    datasets.DatasetDict({name: datasets.Dataset.from_dict(rows, features=features)
                          for name, rows in splits.items()}).save_to_disk(folder)
    return str(folder)


def _train(output_dir, *flags):
    """The trainer in this process (`conftest.train_in_process`) on FAST_TRAINING_ARGS, the flags and `SMALL`."""
    return train_in_process(["--output_dir", output_dir, *FAST_TRAINING_ARGS, *SMALL, *flags])[0]


def _losses(output_dir) -> dict[int, float]:
    lines = [json.loads(line) for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines()]
    return {line["step"]: line["loss"] for line in lines if "loss" in line}


def _processor(tokenizer) -> HFClipProcessor:
    return HFClipProcessor.from_tokenizer(tokenizer, image_size=8)


def _epoch(split, tokenizer, batch_size: int, process: ProcessShare = ProcessShare(), seed: int = 0):
    """One epoch of map-style training micro-batches of `split` as this process reads them."""
    data_args = DatasetArguments(dataset_name="probe")
    dataset = build_train_dataset(split, columns_of(data_args), image_transform_for(_processor(tokenizer), train=True),
                                  seed, process)
    batches = TrainBatches(dataset, ContrastiveDataCollator(_processor(tokenizer)), batch_size, seed=seed,
                           process=process)
    iterator = batches.iterate()
    return [next(iterator)[1] for _ in range(len(batches.sampler))]


# 1. Bad rows in map-style data.

def test_a_block_of_66_bad_rows_in_2000_is_skipped_and_counted_once_each(tokenizer):
    """The issue's probe at the data level: 66 consecutive undecodable rows (1001-1066) in 2,000, batch 50. A whole
    epoch reads 40 full batches, counts each bad row once, and never puts a bad or repeated row in a batch."""
    bad = set(range(1001, 1067))
    split = datasets.Dataset.from_dict(_rows(2000, bad), features=datasets.Features(
        {"image": datasets.Image(), "caption": datasets.Value("string")}))
    epoch = _epoch(split, tokenizer, batch_size=50)
    assert len(epoch) == 40 and all(len(batch["row_ids"]) == 50 for batch in epoch)
    assert sum(int(batch["skipped"]) for batch in epoch) == 66
    for batch in epoch:
        rows = batch["row_ids"].tolist()
        assert len(set(rows)) == len(rows) and not bad & set(rows)


def test_35_bad_rows_two_adjacent_count_35_and_no_row_repeats_in_a_batch(tokenizer, tmp_path):
    """The issue's JSON probe: 35 bad rows, two of them adjacent; it reported 40 skipped and a row twice in a batch."""
    (tmp_path / "images").mkdir()
    bad = {*range(3, 3 + 17 * 33, 17), 100, 101}
    assert len(bad) == 35 and {100, 101} <= bad
    with open(tmp_path / "data.jsonl", "w") as handle:
        for row in range(600):
            (tmp_path / "images" / f"{row}.png").write_bytes(b"\x89PNG broken" if row in bad else _png(row))
            handle.write(json.dumps({"image": f"images/{row}.png", "caption": _caption(row)}) + "\n")
    split = datasets.load_dataset("json", data_files=str(tmp_path / "data.jsonl"), split="train")
    data_args = DatasetArguments(dataset_name=str(tmp_path / "data.jsonl"))
    dataset = build_train_dataset(split, columns_of(data_args), image_transform_for(_processor(tokenizer), train=True),
                                  seed=0)
    batches = TrainBatches(dataset, ContrastiveDataCollator(_processor(tokenizer)), 24, seed=0).iterate()
    epoch = [next(batches)[1] for _ in range(25)]
    assert sum(int(batch["skipped"]) for batch in epoch) == 35
    for batch in epoch:
        rows = batch["row_ids"].tolist()
        assert len(rows) == 24 and len(set(rows)) == 24 and not bad & set(rows)


def test_replacements_never_repeat_a_row_across_the_processes_of_a_global_batch(tokenizer):
    bad = set(range(0, 200, 3))
    split = datasets.Dataset.from_dict(_rows(200, bad), features=datasets.Features(
        {"image": datasets.Image(), "caption": datasets.Value("string")}))
    ranks = [_epoch(split, tokenizer, 10, ProcessShare(rank, 2)) for rank in range(2)]
    assert sum(int(batch["skipped"]) for epoch in ranks for batch in epoch) == len(bad)
    for first, second in zip(*ranks):
        rows = first["row_ids"].tolist() + second["row_ids"].tolist()
        assert len(rows) == 20 and len(set(rows)) == 20 and not bad & set(rows)


def test_a_whole_pass_without_a_usable_row_stops_with_a_clear_error(tokenizer):
    split = datasets.Dataset.from_dict(_rows(8, bad=set(range(1, 8))), features=datasets.Features(
        {"image": datasets.Image(), "caption": datasets.Value("string")}))
    with pytest.raises(RuntimeError, match=r"No usable row is left to replace unusable row \d+: a whole pass over the "
                                           r"8 rows of the training split found none"):
        _epoch(split, tokenizer, batch_size=4)


@pytest.mark.slow
def test_a_block_of_bad_rows_never_stops_a_run_or_its_resume_and_max_bad_fraction_does(tmp_path):
    """Failure 1, in training: 66 consecutive undecodable rows in 2,000, batch 50. With seed 8, the second batch holds
    row 1002, from which 64 rows in a row are bad: the former "next row" replacement died there, and so did every
    resume. Now the run trains through it, a resume from step 1 repeats its loss exactly, and --max_bad_fraction
    stops a run, naming the flag."""
    data = _saved_dataset(tmp_path / "data", {"train": _rows(2000, set(range(1001, 1067)))})
    flags = ["--dataset_name", data, "--per_device_train_batch_size", "50", "--seed", "8", "--max_steps", "2",
             "--eval_splits", "none"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    _train(straight, *flags, "--save_steps", "1")
    skipped = [json.loads(line)["skipped_samples"] for line in (straight / "metrics.jsonl").read_text().splitlines()]
    assert skipped == [3, 6]  # 3 bad rows in each of the first two batches, each counted once
    resumed.mkdir()
    for name in ("checkpoint-1", ".tokenizer"):
        os.symlink(straight / name, resumed / name)
    _train(resumed, *flags, "--resume_from_checkpoint", "latest")
    assert _losses(resumed) == {2: _losses(straight)[2]}
    with pytest.raises(RuntimeError, match=r"6 of the 100 training rows read so far \(6.0%\) were unusable, more than "
                                           r"--max_bad_fraction 0.05"):
        _train(resumed, *flags, "--resume_from_checkpoint", str(straight / "checkpoint-1"), "--max_bad_fraction",
               "0.05")


@pytest.mark.slow
def test_nothing_that_fails_at_the_end_of_a_run_loses_it(tmp_path, capsys):
    """Failure 2. Templates without '{}' and a label column of strings are refused at start-up, before any step; an
    eval split with no decodable image is that split's recorded failure, after the model was saved; and the saved
    weights are verified when loaded: flipped bytes in model.safetensors raise, naming the file."""
    with pytest.raises(ValueError, match=r"Template 'a photo' must hold exactly one '\{\}'"):
        train_script.parse_args(["--templates", "a photo"])
    labelled = datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string"),
                                  "label": datasets.Value("string")})
    strings = _saved_dataset(tmp_path / "strings", {"train": {**_rows(32, set()), "label": ["cat"] * 32},
                                                    "test": {**_rows(8, set()), "label": ["dog"] * 8}}, labelled)
    with pytest.raises(ValueError, match=r"Column 'label' of .* \(split 'test'\) is Value\('string'.*not a "
                                         r"ClassLabel.* --label_column ''"):
        _train(tmp_path / "strings_run", "--dataset_name", strings, "--max_steps", "1", "--eval_splits", "test")
    assert not (tmp_path / "strings_run" / "metrics.jsonl").exists()

    data = _saved_dataset(tmp_path / "data", {"train": _rows(32, set()), "test": _rows(8, set(range(8))),
                                              "val": _rows(8, set())})
    out = tmp_path / "run"
    results = _train(out, "--dataset_name", data, "--max_steps", "1", "--eval_splits", "test", "val")
    assert results["test"] == {"error": "ValueError: No usable row among the 8 rows of the split (image column "
                                        "'image', caption column 'caption')."}
    assert results["val"]["num_samples"] == 8
    assert json.loads((out / "eval_results.json").read_text()) == results
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert logged[-2] == {"step": 1, "eval/test/error": results["test"]["error"]}
    assert "test          evaluation failed: ValueError: No usable row" in capsys.readouterr().out
    card = (out / "README.md").read_text()
    assert "The evaluation on split 'test' failed (ValueError: No usable row" in card and "| val |" in card
    HFClipModel.from_pretrained(out)

    weights = bytearray((out / "model.safetensors").read_bytes())
    weights[-100] ^= 0xFF  # a byte of the last tensor's data: the header still parses
    (out / "model.safetensors").write_bytes(bytes(weights))
    with pytest.raises(OSError, match=r"model.safetensors does not match its saved SHA-256. The folder's "
                                      r"hf_clip_manifest.json records"):
        HFClipModel.from_pretrained(out)


def test_config_overrides_are_validated_at_start_up_naming_the_flag(saved_checkpoint):
    """Failure 3 (`--patch_dropout 1.0` on a pretrained model) and the fine-tune script's `--patch_dropout -0.1`."""
    checkpoint = ["--model_name_or_path", str(saved_checkpoint)]
    with pytest.raises(ValueError, match=r"--patch_dropout 1.0: HFClipVisionConfig: `patch_dropout` must be in"):
        train_script.parse_args([*checkpoint, "--patch_dropout", "1.0"])
    with pytest.raises(ValueError, match=r"--patch_dropout -0.1: HFClipVisionConfig: `patch_dropout` must be in"):
        finetune_trainer.parse_args([*checkpoint, "--patch_dropout", "-0.1", "--output_dir", "unused"])
    with pytest.raises(ValueError, match=r"--loss_chunk_size -2: HFClipConfig: chunk_size must be None"):
        train_script.parse_args(["--loss_chunk_size", "-2"])
    with pytest.raises(ValueError, match=r"--loss_type 'softmax': HFClipConfig: loss_type must be one of"):
        finetune_trainer.parse_args([*checkpoint, "--loss_type", "softmax", "--output_dir", "unused"])


@pytest.mark.parametrize("flags, message", [
    (["--logging_steps", "0"], "--logging_steps must be at least 1, got 0"),
    (["--save_steps", "-1"], r"--save_steps must be 0 \(never\) or a positive number of steps, got -1"),
    (["--eval_steps", "-1"], r"--eval_steps must be 0 \(never\) or a positive number of steps, got -1"),
    (["--max_bad_fraction", "1.5"], r"--max_bad_fraction must be in \[0, 1\)"),
    (["--nonfinite_loss", "ignore"], r"--nonfinite_loss must be one of \('stop', 'skip'\), got 'ignore'"),
])
def test_cli_values_that_would_crash_or_act_every_step_are_refused(flags, message):
    with pytest.raises(ValueError, match=message):
        train_script.parse_args(flags)


@pytest.mark.slow
def test_resume_refuses_changed_recipe_flags_unless_allowed_and_repeats_patch_dropout_exactly(tmp_path):
    """Failure 4 and the patch-dropout resume. A resume with another learning rate, batch size, seed,
    max_train_samples or dataset is refused naming each flag, its old and new value; clip -> siglip is refused
    (even when changes are allowed) instead of failing on a missing logit_bias; --allow_resume_changes applies,
    logs and records a change. An unchanged resume with patch dropout repeats the losses exactly."""
    flags = ["--patch_dropout", "0.5", "--max_steps", "4", "--eval_splits", "none"]
    straight = tmp_path / "straight"
    _train(straight, *flags, "--save_steps", "2")
    checkpoint = ["--resume_from_checkpoint", str(straight / "checkpoint-2")]

    exact = tmp_path / "exact"
    exact.mkdir()
    os.symlink(straight / ".tokenizer", exact / ".tokenizer")
    _train(exact, *flags, *checkpoint)
    assert _losses(exact) == {step: _losses(straight)[step] for step in (3, 4)}  # max |Δloss| = 0

    other = _saved_dataset(tmp_path / "other", {"train": _rows(64, set())})
    changed = ["--learning_rate", "5e-4", "--per_device_train_batch_size", "8", "--seed", "7",
               "--max_train_samples", "256", "--dataset_name", other]
    with pytest.raises(ValueError) as refused:
        _train(straight, *flags, *checkpoint, *changed)
    message = str(refused.value)
    for expected in ("--learning_rate 0.001 in the checkpoint, 0.0005 now", "--per_device_train_batch_size 16 in "
                     "the checkpoint, 8 now", "--seed 42 in the checkpoint, 7 now", "--max_train_samples None in "
                     "the checkpoint, 256 now", f"--dataset_name None in the checkpoint, {other!r} now",
                     "or pass --allow_resume_changes"):
        assert expected in message, expected
    with pytest.raises(ValueError, match=r"--loss_type 'clip' in the checkpoint, 'siglip' now. The loss type cannot "
                                         r"change in a resume, even with --allow_resume_changes"):
        _train(straight, *flags, *checkpoint, "--loss_type", "siglip", "--allow_resume_changes")

    changed = tmp_path / "changed"
    changed.mkdir()
    os.symlink(straight / ".tokenizer", changed / ".tokenizer")
    _train(changed, *flags, *checkpoint, "--learning_rate", "5e-4", "--allow_resume_changes")
    rates = {line["step"]: line["learning_rate"] for line in map(json.loads, (changed / "metrics.jsonl").open())
             if "learning_rate" in line}
    straight_rates = {line["step"]: line["learning_rate"] for line in map(json.loads, (straight / "metrics.jsonl")
                                                                          .open()) if "learning_rate" in line}
    assert rates[3] == pytest.approx(straight_rates[3] / 2)  # the cosine schedule from step 2 on, at the new peak
    assert "| `resume_changes` | step 2: --learning_rate 0.001 -> 0.0005 |" in (changed / "README.md").read_text()
    assert "| `learning_rate` | 0.0005 |" in (changed / "README.md").read_text()


@pytest.mark.slow
def test_resume_with_patch_dropout_and_grad_cache_repeats_the_losses_exactly(tmp_path):
    flags = ["--patch_dropout", "0.5", "--grad_cache_micro_batches", "2", "--max_steps", "2", "--eval_splits", "none"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    _train(straight, *flags, "--save_steps", "1")
    resumed.mkdir()
    for name in ("checkpoint-1", ".tokenizer"):
        os.symlink(straight / name, resumed / name)
    _train(resumed, *flags, "--resume_from_checkpoint", "latest")
    assert _losses(resumed) == {2: _losses(straight)[2]}  # max |Δloss| = 0


@pytest.mark.slow
def test_a_diverging_run_stops_before_saving_or_skips_the_updates(tmp_path):
    """Failure 5: at --learning_rate 1e3 the gradient norm turns NaN at step 4 (1.2e16 at step 3). 'stop' raises at
    that logging step, naming the steps; nothing is saved and the step-2 checkpoint stays, finite. 'skip' skips the
    updates on the device, counts them, and saves finite weights. The checkpoint's weights are verified when loaded."""
    flags = ["--learning_rate", "1e3", "--max_steps", "5", "--save_steps", "2", "--eval_splits", "none"]
    stopped = tmp_path / "stopped"
    with pytest.raises(train_script.NonFiniteTrainingError,
                       match=r"Non-finite loss or gradient norm in steps 4-4 \(--nonfinite_loss stop\): training "
                             rf"stopped at step 4.* The last finite checkpoint is {stopped / 'checkpoint-2'}"):
        _train(stopped, *flags)
    assert sorted(path.name for path in stopped.iterdir()) == [".tokenizer", "checkpoint-2", "metrics.jsonl"]
    assert [json.loads(line)["step"] for line in (stopped / "metrics.jsonl").open()] == [1, 2, 3]
    assert all(tensor.isfinite().all() for tensor in load_file(stopped / "checkpoint-2" / "model.safetensors").values())

    skipped = tmp_path / "skipped"
    _train(skipped, *flags, "--nonfinite_loss", "skip")
    logged = [json.loads(line) for line in (skipped / "metrics.jsonl").open() if "loss" in line]
    assert [line["nonfinite_steps"] for line in logged] == [0, 0, 0, 1, 2]
    assert all(math.isfinite(line["loss"]) for line in logged)
    assert all(tensor.isfinite().all() for tensor in load_file(skipped / "model.safetensors").values())
    assert "| `nonfinite_steps_skipped` | 2 |" in (skipped / "README.md").read_text()

    config = HFClipConfig.from_pretrained(skipped)
    HFClipModel.from_pretrained(stopped / "checkpoint-2", config=config)
    weights = bytearray((stopped / "checkpoint-2" / "model.safetensors").read_bytes())
    weights[-8] ^= 0x01
    (stopped / "checkpoint-2" / "model.safetensors").write_bytes(bytes(weights))
    with pytest.raises(OSError, match=r"checkpoint-2: model.safetensors does not match its saved SHA-256. The "
                                      r"folder's run_state.json records"):
        HFClipModel.from_pretrained(stopped / "checkpoint-2", config=config)


def _wait_for(condition, what: str, process: subprocess.Popen, timeout: float = 600):
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, f"training ended before {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def _logged_steps(path: Path) -> list[int]:
    steps = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            steps.append(json.loads(line)["step"])
        except json.JSONDecodeError:  # a line being written
            pass
    return steps


class _HubProcess:
    """tests/hub_server.py in its own process on 127.0.0.1:`port`, for one user whose token is `token`: killing it is
    an outage (open connections die with it)."""

    def __init__(self, port: int, token: str):
        self.url = f"http://127.0.0.1:{port}"
        self.process = subprocess.Popen([sys.executable, str(REPO / "tests" / "hub_server.py"), "--port", str(port),
                                         "--user", "alice", "--token", token], stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return
            except OSError:
                assert self.process.poll() is None and time.monotonic() < deadline, "the Hub server did not start"
                time.sleep(0.05)

    def checkpoint_commits(self, repo_id: str) -> list[str]:
        """Titles of the checkpoint commits on the `checkpoints` branch, newest first ([] when there is none)."""
        request = urllib.request.Request(f"{self.url}/api/models/{repo_id}/commits/checkpoints",
                                         headers={"Authorization": f"Bearer {ALICE_TOKEN}"})
        try:
            with urllib.request.urlopen(request, timeout=5) as answer:
                titles = [commit["title"] for commit in json.loads(answer.read())]
        except (urllib.error.URLError, OSError):
            return []
        return [title for title in titles if title.startswith("Checkpoint at step ")]

    def kill(self) -> None:
        self.process.kill()
        self.process.wait()


@pytest.mark.slow
def test_a_hub_outage_never_stops_training_and_only_the_final_push_can_fail_the_run(tmp_path):
    """Failure 6: with --hub_push_checkpoints, the Hub server is killed after the first checkpoint push. The failed
    pushes are logged and training goes on; when a server is back, the next checkpoint push lands; and when the final
    push is refused (a server that no longer knows the token), the run fails after saving the model, card and
    results locally."""
    data = _saved_dataset(tmp_path / "data", {"train": _rows(64, set())})
    out, logs, port, repo_id = tmp_path / "run", tmp_path / "logs", free_port(), "alice/outage-run"
    logs.mkdir()
    server = _HubProcess(port, ALICE_TOKEN)
    env = {**hub_env(server, tmp_path / "hf_home"), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "hf_clip_train.train", "--output_dir", str(out), *FAST_TRAINING_ARGS, *SMALL,
               "--dataset_name", data, "--max_steps", "8", "--save_steps", "1", "--eval_splits", "none",
               "--push_to_hub", "--hub_push_checkpoints", "--hub_model_id", "outage-run"]
    with open(logs / "stdout", "w") as stdout, open(logs / "stderr", "w") as stderr:
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=stdout, stderr=stderr)
    try:
        _wait_for(lambda: server.checkpoint_commits(repo_id), "the first checkpoint push", process)
        before_outage = server.checkpoint_commits(repo_id)
        server.kill()
        _wait_for(lambda: max(_logged_steps(out / "metrics.jsonl"), default=0) >= 3, "step 3", process)
        server = _HubProcess(port, ALICE_TOKEN)  # back, and empty
        _wait_for(lambda: server.checkpoint_commits(repo_id), "a checkpoint push after the outage", process)
        after_outage = server.checkpoint_commits(repo_id)
        server.kill()
        server = _HubProcess(port, "hf_a_token_that_is_not_alices")  # every push is now refused (HTTP 401)
        process.wait(timeout=600)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        server.kill()
    output = (logs / "stdout").read_text() + (logs / "stderr").read_text()
    assert process.returncode == 1, output[-4000:]
    assert before_outage == ["Checkpoint at step 1"]
    assert after_outage and int(after_outage[-1].split()[-1]) >= 3  # the first push after the outage
    assert _logged_steps(out / "metrics.jsonl") == list(range(1, 9))  # every step trained
    assert "Pushing the step-2 checkpoint to outage-run failed" in output and "training goes on" in output
    assert "The push to outage-run failed (PermissionError" in output and f"are saved in {out}" in output
    assert (out / "README.md").exists() and (out / "eval_results.json").exists()
    HFClipModel.from_pretrained(out)
    assert ALICE_TOKEN not in output


@pytest.mark.slow
def test_a_wrong_hub_token_is_refused_at_start_up(hub_server, tmp_path):
    data = _saved_dataset(tmp_path / "data", {"train": _rows(32, set())})
    wrong = "hf_wrongTokenForTheTestHub0123456789"
    out = tmp_path / "run"
    env = {**hub_env(hub_server, tmp_path / "hf_home", token=wrong), "OMP_NUM_THREADS": "1"}
    result = run_python(["-m", "hf_clip_train.train", "--output_dir", str(out), *FAST_TRAINING_ARGS, *SMALL,
                         "--dataset_name", data, "--max_steps", "2", "--push_to_hub", "--hub_model_id",
                         "never-trained"], cwd=REPO, env=env, timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr  # a user error (issue 29): one line
    assert result.stderr.splitlines()[-1].startswith(
        f"hf-clip-train: error: --push_to_hub: The Hub at {hub_server.url} refused the push to 'never-trained' "
        "(HTTP 401")
    assert not (out / "metrics.jsonl").exists() and wrong not in result.stdout + result.stderr


SECRET = "s3cr3t-value-0042"
CREDENTIAL_KEYS = ["apikey", "hfToken", "accessToken", "api-key", "github_pat", "bearer", "session_cookie",
                   "database_url"]
CREDENTIAL_VALUES = {"notes": "hf_" + "A1b2C3d4E5" * 3 + "f6g7", "mirror": "ghp_" + "x" * 36,
                     "service": "sk-proj-0123456789abcdef", "upstream": "postgres://me:hunter2@db.local/clip"}


def _card_text(model, hyperparameters: dict, extra=()) -> str:
    from hf_clip import ModelCardInfo, render_model_card

    return str(render_model_card(model, "me/m", ModelCardInfo(hyperparameters=hyperparameters,
                                                              extra_hyperparameters=[*extra])))


def test_publishing_normalises_credential_keys_refuses_credential_values_and_scrubs_paths(saved_checkpoint, caplog):
    from hf_clip import ModelCardInfo, render_model_card

    model = HFClipModel.from_pretrained(saved_checkpoint)
    hyperparameters = {**{key: SECRET for key in CREDENTIAL_KEYS}, **CREDENTIAL_VALUES, "learning_rate": 1e-3,
                       "data_note": "shards in /home/me/private/laion and ~/cache/x.parquet, see https://hf.co/a/b"}
    text = _card_text(model, hyperparameters, [*CREDENTIAL_KEYS, *CREDENTIAL_VALUES, "data_note"])
    for value in (SECRET, *CREDENTIAL_VALUES.values(), "/home/me", "~/cache"):
        assert value not in text and value not in caplog.text, value
    assert "| `learning_rate` | 0.001 |" in text
    assert ("| `data_note` | shards in local path laion and local path x.parquet, see https://hf.co/a/b |") in text
    for key in CREDENTIAL_VALUES:
        assert f"Not publishing hyper-parameter {key!r}: its value looks like" in caplog.text

    for bad in (np.float32("nan"), torch.tensor(float("nan")), np.array(float("inf"))):
        with pytest.raises(ValueError, match=r"metrics\['test'\]\['zero_shot_top1'\] is (nan|inf): NaN or infinite"):
            render_model_card(model, "me/m", ModelCardInfo(metrics={"test": {"zero_shot_top1": bad}}))
    card = render_model_card(model, "me/m", ModelCardInfo(metrics={"test": {"zero_shot_top1": np.float32(0.5),
                                                                             "zero_shot_top5": torch.tensor(1.0)}}))
    assert "| test | 50.0 | 100.0 |" in str(card)


@pytest.mark.slow
def test_pushed_hyperparameters_are_valid_json_without_credentials(hub_server, saved_checkpoint, tmp_path):
    hyperparameters = {"learning_rate": float("nan"), "max_grad_norm": float("inf"), "seed": 1,
                       **{key: SECRET for key in CREDENTIAL_KEYS}, **CREDENTIAL_VALUES}
    job = {"checkpoint": str(saved_checkpoint), "repo_id": "alice/nan-recipe",
           "card": {"hyperparameters": hyperparameters, "extra_hyperparameters": [*CREDENTIAL_KEYS,
                                                                                  *CREDENTIAL_VALUES]}}
    result = run_python([str(REPO / "tests" / "hub_workers.py"), "push", json.dumps(job)],
                        env=hub_env(hub_server, tmp_path / "hf_home"), cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    files = hub_server.hub.repos["alice/nan-recipe"].history("main")[0].files

    def refuse(constant):
        raise ValueError(f"invalid JSON constant {constant}")

    published = json.loads(files["hyperparameters.json"], parse_constant=refuse)
    assert published == {"learning_rate": "nan", "max_grad_norm": "inf", "seed": 1}
    for content in files.values():
        for value in (SECRET, *CREDENTIAL_VALUES.values()):
            assert value.encode() not in content


def test_loss_arguments_out_of_range_are_refused():
    """A negative logit_scale fails (on the device, no host read in the step); label_smoothing outside [0, 1) is
    refused; a NaN scale passes through to the training loop's non-finite check."""
    embeddings = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    with pytest.raises(RuntimeError, match="contrastive_loss: `logit_scale` is negative"):
        contrastive_loss(embeddings, embeddings, torch.tensor(-5.0))
    with pytest.raises(RuntimeError, match="sigmoid_loss: `logit_scale` is negative"):
        sigmoid_loss(embeddings, embeddings, torch.tensor([-1.0]), torch.tensor(-10.0))
    for smoothing in (1.0, 1.5, -0.1):
        with pytest.raises(ValueError, match=r"label_smoothing must be a number in \[0, 1\)"):
            contrastive_loss(embeddings, embeddings, torch.tensor(10.0), label_smoothing=smoothing)
    assert contrastive_loss(embeddings, embeddings, torch.tensor(0.0)).item() == pytest.approx(math.log(4))
    assert contrastive_loss(embeddings, embeddings, torch.tensor(float("nan"))).isnan()
