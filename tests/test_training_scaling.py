"""`hf_clip_train.train` with patch dropout, GradCache and torch.compile, run as users run it."""

import json

import pytest
from conftest import finetune_in_process, hub_env
from safetensors.torch import load, load_file
from test_training_run import _launch, _losses, _train

pytestmark = pytest.mark.slow


def test_grad_cache_run_follows_the_plain_run(tmp_path):
    """Without dropout, K micro-batches with GradCache compute the same loss and gradients as one batch, so the
    loss curve follows the plain run's (a micro-batch loss, as plain accumulation gives, would not)."""
    _train(tmp_path / "plain", "--max_steps", "3", "--eval_splits", "test")
    _train(tmp_path / "cached", "--max_steps", "3", "--eval_splits", "test", "--grad_cache_micro_batches", "4")
    plain, cached = _losses(tmp_path / "plain"), _losses(tmp_path / "cached")
    assert sorted(cached) == [1, 2, 3]
    for step in plain:
        assert cached[step] == pytest.approx(plain[step], rel=1e-4), step


def test_compiled_patch_dropout_run_saves_resumes_and_pushes_without_orig_mod_keys(hub_server, tmp_path):
    """--torch_compile compiles the towers in place, so checkpoints, the saved model and the pushed files keep the
    model's own parameter names, and a compiled run resumes from its checkpoint. (The aot_eager backend traces and
    compiles the graphs without inductor's C++ code generation, which takes minutes on a small CPU.)"""
    out = tmp_path / "run"
    flags = ["--eval_splits", "test", "--torch_compile", "--torch_compile_backend", "aot_eager",
             "--patch_dropout", "0.5", "--grad_cache_micro_batches", "2", "--save_steps", "1",
             "--save_total_limit", "5"]
    env = hub_env(hub_server, tmp_path / "hf_home")
    _launch(out, "--max_steps", "2", *flags, "--push_to_hub", "--hub_model_id", "compiled-run",
            "--hub_push_checkpoints", env=env, timeout=600)
    expected_keys = set(load_file(out / "checkpoint-1" / "model.safetensors"))
    assert "vision_model.embeddings.patch_embedding.weight" in expected_keys
    assert not [key for key in expected_keys if "_orig_mod" in key]
    assert json.loads((out / "config.json").read_text())["vision_config"]["patch_dropout"] == 0.5

    repo = hub_server.hub.repos["alice/compiled-run"]
    pushed = [repo.history("main")[0].files["model.safetensors"],
              *(commit.files["model.safetensors"] for commit in repo.history("checkpoints")[:2])]
    saved = [load_file(path) for path in (out / "model.safetensors", out / "checkpoint-2" / "model.safetensors")]
    for state_dict in [*saved, *(load(blob) for blob in pushed)]:
        assert set(state_dict) == expected_keys

    _train(out, "--max_steps", "3", *flags, "--resume_from_checkpoint", "latest", "--allow_resume_changes")
    assert set(load_file(out / "model.safetensors")) == expected_keys
    assert sorted(_losses(out)) == [1, 2, 3]


def test_finetune_trainer_patch_dropout(tmp_path, saved_checkpoint):
    """--patch_dropout reaches the model Trainer fine-tunes, and the saved config keeps it."""
    out = tmp_path / "finetuned"
    finetune_in_process(["--model_name_or_path", saved_checkpoint, "--output_dir", out, "--patch_dropout", "0.5",
                         "--embedded_num_train", "64", "--eval_splits", "test", "--max_eval_samples", "32",
                         "--per_device_train_batch_size", "16", "--per_device_eval_batch_size", "32", "--max_steps",
                         "2", "--dataloader_num_workers", "0", "--report_to", "none"])
    assert json.loads((out / "config.json").read_text())["vision_config"]["patch_dropout"] == 0.5
    assert json.loads((saved_checkpoint / "config.json").read_text())["vision_config"]["patch_dropout"] == 0.0
