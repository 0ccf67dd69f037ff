"""`hf-clip-train` from pretrained towers: `--vision_model_name_or_path` [`--text_model_name_or_path`], LiT
(`--lock_image`) in a real run (the locked tower saved bit-identical, left out of the optimiser and of DDP's gradient
all-reduce), the image processor of a composed vision tower on the training data path, and the flags refused."""

import json
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FAST_TRAINING_ARGS as FAST
from conftest import free_port, start_two_ranks, train_in_process
from hub_workers import LABELS, probe_image
from PIL import Image
from safetensors.torch import load_file
from tiny_towers import save_text_folder, save_vision_folder
from transformers import AutoImageProcessor, ViTConfig, ViTForImageClassification, ViTImageProcessor, pipeline

from hf_clip import HFClipConfig, HFClipModel, HFClipProcessor
from hf_clip_train.data import image_transform_for, normalize_pixels
from hf_clip_train.train import parse_args

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, tokenizer) -> dict[str, Path]:
    """Tiny "pretrained" folders: a ViT with its ViTImageProcessor (mean and std 0.5), a BERT with its tokenizer."""
    root = tmp_path_factory.mktemp("pretrained")
    return {"vision": save_vision_folder(root, "vit"), "text": save_text_folder(root, "bert", tokenizer)}


@pytest.mark.parametrize("text_tower", ["bert", "built-in"])
def test_lit_run_through_the_cli_saves_the_locked_tower_bit_identical_and_the_pipeline_reloads_it(
        pretrained, tmp_path, text_tower):
    """Train -> save -> reload -> zero-shot pipeline: the vision tower's saved weights are the pretrained folder's
    tensors bit for bit, the text tower trained, and the card and config say where each tower came from."""
    out = tmp_path / "lit"
    towers = ["--vision_model_name_or_path", pretrained["vision"], "--projection_dim", "16", "--lock_image"]
    if text_tower == "bert":
        towers += ["--text_model_name_or_path", pretrained["text"]]
    train_in_process(["--output_dir", out, *FAST, *towers, "--max_steps", "2", "--eval_splits", "test"])

    saved = load_file(out / "model.safetensors")
    vision = load_file(pretrained["vision"] / "model.safetensors")
    assert {name.removeprefix("vision_model.") for name in saved if name.startswith("vision_model.")} == set(vision)
    for name, tensor in vision.items():
        assert torch.equal(saved[f"vision_model.{name}"], tensor), name
    config = HFClipConfig.from_pretrained(out)
    assert config.tower_sources["vision"]["name_or_path"] == str(pretrained["vision"])
    card = (out / "README.md").read_text()
    assert "| composed from | `local model vision-vit` |" in card and str(pretrained["vision"]) not in card
    assert card.count("local model vision-vit") == 2  # the tower table and the recipe
    if text_tower == "bert":
        text = load_file(pretrained["text"] / "model.safetensors")
        assert any(not torch.equal(saved[f"text_model.{name}"], tensor) for name, tensor in text.items())
        assert config.tower_sources["text"]["name_or_path"] == str(pretrained["text"])
        assert "`local model text-bert` |" in card
        assert config.text_config.model_type == "bert"
    else:
        assert config.text_config.model_type == "hf_clip_text_model"
        assert "text" not in config.tower_sources
        assert len(HFClipProcessor.from_pretrained(out).tokenizer) == config.text_config.vocab_size

    processor = HFClipProcessor.from_pretrained(out)
    assert isinstance(processor.image_processor, ViTImageProcessor)
    assert list(processor.image_processor.image_mean) == [0.5, 0.5, 0.5]
    classifier = pipeline("zero-shot-image-classification", model=str(out))
    scores = classifier(probe_image(), candidate_labels=LABELS)
    assert sorted(score["label"] for score in scores) == sorted(LABELS)
    assert sum(score["score"] for score in scores) == pytest.approx(1.0, abs=1e-4)


def test_a_resume_refuses_another_pretrained_tower_and_resumes_with_the_same(pretrained, tmp_path):
    """The pretrained towers and --lock_image are part of the recipe a checkpoint fixes: a resume that names
    another vision backbone is refused, naming the flag and both values; the same flags resume."""
    out = tmp_path / "lit"
    towers = ["--vision_model_name_or_path", pretrained["vision"], "--projection_dim", "16", "--lock_image"]
    common = ["--output_dir", out, *FAST, "--max_steps", "2", "--save_steps", "1", "--eval_splits", "none"]
    train_in_process([*common, *towers])
    other = save_vision_folder(tmp_path, "vit", seed=1)
    with pytest.raises(ValueError, match=f"--vision_model_name_or_path {str(pretrained['vision'])!r} in the "
                                         f"checkpoint, {str(other)!r} now"):
        train_in_process([*common, "--vision_model_name_or_path", other, "--projection_dim", "16", "--lock_image",
                          "--resume_from_checkpoint", out / "checkpoint-1"])
    train_in_process([*common, *towers, "--resume_from_checkpoint", out / "checkpoint-1"])
    assert (out / "model.safetensors").exists()


def test_training_path_gives_a_composed_vision_tower_the_pixels_of_its_own_image_processor(pretrained, tokenizer):
    """The evaluation transform and the training path (uint8 crop of the whole image, `normalize_pixels`) against the
    ViT's own image processor (the whole image resized to 16 x 16, bilinear, mean and std 0.5) on the same image."""
    processor = HFClipProcessor(image_processor=AutoImageProcessor.from_pretrained(pretrained["vision"]),
                                tokenizer=tokenizer)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 44, 3), dtype=np.uint8))
    reference = processor.image_processor(image, return_tensors="pt").pixel_values[0]
    assert reference.shape == (3, 16, 16)

    evaluation = image_transform_for(processor, train=False)(image)
    training = normalize_pixels(image_transform_for(processor, train=True)(image)[None], *_mean_std(processor))[0]
    torch.testing.assert_close(evaluation, reference, atol=2 / 255 / 0.5, rtol=0)  # PIL's and torchvision's bilinear
    assert (evaluation - reference).abs().mean() < 1e-3
    torch.testing.assert_close(training, evaluation, atol=1 / 255 / 0.5 + 1e-6, rtol=0)  # uint8 rounding


def _mean_std(processor):
    return processor.image_processor.image_mean, processor.image_processor.image_std


def test_clip_image_processor_still_resizes_the_short_side_and_centre_crops_bicubic(tokenizer):
    transform = image_transform_for(HFClipProcessor.from_tokenizer(tokenizer, image_size=16), train=False)
    assert (transform.size, transform.center_crop, transform.resample) == (16, True, Image.Resampling.BICUBIC)


def _refusal(argv) -> str:
    with pytest.raises((ValueError, FileNotFoundError)) as error:
        parse_args([str(arg) for arg in argv])
    return str(error.value)


def test_flags_that_cannot_apply_are_refused_naming_them(pretrained, tmp_path):
    vision, text = str(pretrained["vision"]), str(pretrained["text"])
    assert "--vision_model_name_or_path" in _refusal(["--lock_image"])
    assert "patch dropout" in _refusal(["--vision_model_name_or_path", vision, "--patch_dropout", "0.5"])
    assert "--text_model_name_or_path needs --vision_model_name_or_path" in _refusal(
        ["--text_model_name_or_path", text])
    assert "cls, mean" in _refusal(["--vision_model_name_or_path", vision, "--vision_pooling", "max"])
    assert "--text_pooling" in _refusal(["--vision_model_name_or_path", vision, "--text_pooling", "mean"])
    assert "--patch_size" in _refusal(["--vision_model_name_or_path", vision, "--patch_size", "16"])
    assert "pass one" in _refusal(["--vision_model_name_or_path", vision, "--model_name_or_path", vision])
    assert "no such directory" in _refusal(["--vision_model_name_or_path", str(tmp_path / "missing")])
    assert "--projection_dim" in _refusal(["--model_name_or_path", vision, "--projection_dim", "16"])


@pytest.mark.slow
def test_patch_dropout_on_a_composed_tower_is_refused_at_start_up(pretrained, tmp_path):
    """The console script stops before loading data or models, with the message on stderr."""
    result = subprocess.run(
        [sys.executable, "-m", "hf_clip_train.train", "--output_dir", str(tmp_path / "out"),
         "--vision_model_name_or_path", str(pretrained["vision"]), "--patch_dropout", "0.5"],
        cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "--patch_dropout 0.5: patch dropout is a step of hf_clip's built-in ViT" in result.stderr
    assert not (tmp_path / "out").exists()


def test_a_classifier_checkpoint_without_pooler_weights_asks_for_another_vision_pooling(tmp_path):
    """A ViTForImageClassification holds no pooler: its default 'pooler' would start random (and stay so, locked)."""
    folder = tmp_path / "classifier"
    config = ViTConfig(image_size=16, patch_size=8, hidden_size=24, num_hidden_layers=1, num_attention_heads=2,
                       intermediate_size=48, num_labels=3)
    ViTForImageClassification(config).save_pretrained(folder)
    ViTImageProcessor(size={"height": 16, "width": 16}).save_pretrained(folder)
    with pytest.raises(ValueError, match="holds no pooler weights.*--vision_pooling cls"):
        train_in_process(["--output_dir", tmp_path / "out", *FAST, "--vision_model_name_or_path", folder,
                          "--lock_image", "--max_steps", "1"])
    train_in_process(["--output_dir", tmp_path / "out", *FAST, "--vision_model_name_or_path", folder,
                      "--vision_pooling", "cls", "--lock_image", "--max_steps", "1", "--eval_splits", "none"])
    saved = load_file(tmp_path / "out" / "model.safetensors")
    for name, tensor in load_file(folder / "model.safetensors").items():
        if name.startswith("vit."):
            assert torch.equal(saved[f"vision_model.{name.removeprefix('vit.')}"], tensor), name


def test_lit_locked_tower_has_no_optimiser_state_no_all_reduce_and_stays_in_eval_mode(pretrained, tmp_path):
    """2 gloo ranks, the training script's own model building, locking, optimiser and `accelerator.prepare` (DDP):
    DDP's gradient buckets hold exactly the trainable parameters, the locked tower has no optimiser state after a
    step, runs in eval mode under no_grad, and is unchanged."""
    from distributed_workers import lit_ddp_step

    start_two_ranks(lit_ddp_step, 2, free_port(), str(tmp_path), str(pretrained["vision"]))
    report = json.loads((tmp_path / "lit_report.json").read_text())
    assert report["all_reduced"] == report["trainable"]
    assert not any(name.startswith("vision_model.") for name in report["all_reduced"])
    assert any(name.startswith("text_model.") for name in report["all_reduced"])
    assert not any(name.startswith(("vision_model.", "visual_projection.")) for name in report["optimiser_state"])
    assert report["vision_training"] is False and report["text_training"] is True
    assert report["image_features_require_grad"] is False
    assert report["vision_unchanged"] is True


@pytest.mark.slow
def test_docs_lit_commands_pretrain_a_backbone_and_run_lit_as_written(tmp_path, monkeypatch):
    """docs/towers.md's LiT commands as written, with tiny overrides after them (pretraining 2 steps on 64 scenes,
    LiT and the scratch baseline 3 steps of the suite's fast recipe), in `tmp_path`."""
    from test_readme import command_in

    sys.path.insert(0, str(REPO / "examples"))
    try:
        import pretrain_vision
    finally:
        sys.path.remove(str(REPO / "examples"))
    monkeypatch.chdir(tmp_path)
    readme_commands = (r"python examples/pretrain_vision\.py .*",
                       r"python -m hf_clip_train\.train --output_dir outputs/lit .*")
    for pattern in readme_commands:  # the README shows the same commands
        assert command_in("README.md", pattern) == command_in("docs/towers.md", pattern)
    pretrain = shlex.split(command_in("docs/towers.md", r"python examples/pretrain_vision\.py .*"))
    lit = shlex.split(command_in("docs/towers.md", r"python -m hf_clip_train\.train --output_dir outputs/lit .*"))
    scratch = shlex.split(command_in("docs/towers.md",
                                     r"python -m hf_clip_train\.train --output_dir outputs/scratch .*"))
    pretrain_vision.main([*pretrain[2:], "--max_steps", "2", "--num_train", "64"])
    backbone = Path(pretrain[2])
    assert (backbone / "preprocessor_config.json").exists()
    tiny = [*FAST, "--max_steps", "3", "--eval_steps", "2"]
    train_in_process([*lit[3:], *tiny])
    train_in_process([*scratch[3:], *tiny])
    out = Path(lit[lit.index("--output_dir") + 1])
    saved = load_file(out / "model.safetensors")
    for name, tensor in load_file(backbone / "model.safetensors").items():
        if name.startswith("vit."):
            assert torch.equal(saved[f"vision_model.{name.removeprefix('vit.')}"], tensor), name
    assert HFClipModel.from_pretrained(out).config.vision_pooling == "cls"
    for run in (out, Path("outputs/scratch")):
        results = json.loads((run / "eval_results.json").read_text())
        assert set(results) == {"test", "test_unseen"}
