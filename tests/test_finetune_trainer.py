"""Fine-tuning with transformers.Trainer: hf_clip_train/finetune_trainer.py run as users run it, plus its pieces."""

import io
import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import finetune_in_process
from PIL import Image
from safetensors.torch import load_file
from test_training_run import _torchrun
from transformers import (
    AutoModel,
    AutoModelForImageClassification,
    AutoProcessor,
    Trainer,
    TrainingArguments,
    pipeline,
)

from hf_clip import (
    ContrastiveDataCollator,
    HFClipConfig,
    HFClipModel,
    HFClipProcessor,
    ImageClassificationDataCollator,
    match_special_tokens,
    train_clip_tokenizer,
)

REPO = Path(__file__).resolve().parents[1]
SMALL = ["--embedded_num_train", "1024", "--eval_splits", "test", "--per_device_train_batch_size", "32",
         "--per_device_eval_batch_size", "64", "--logging_steps", "10", "--seed", "0", "--dataloader_num_workers", "0"]


def _finetune(output_dir, *flags) -> str:
    """The fine-tuning script in this process: what it printed."""
    return finetune_in_process(["--output_dir", output_dir, *flags])[1]


def _launch(output_dir, *flags, launcher):
    """The fine-tuning script as its own processes, as users start it."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([*launcher, "--output_dir", str(output_dir), *flags], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=300)
    print(result.stdout)  # the script's report: shown with `pytest -s`, and by pytest when a test fails
    assert result.returncode == 0, result.stderr[-6000:]


def _tiny_model_and_processor():
    from hf_clip_train.synthetic import caption_corpus

    tokenizer = train_clip_tokenizer(caption_corpus(), vocab_size=700, model_max_length=24)
    layer = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2}
    config = HFClipConfig.from_preset("tiny", tokenizer=tokenizer, projection_dim=32, text_config=layer,
                                      vision_config={**layer, "image_size": 32, "patch_size": 8})
    torch.manual_seed(0)
    return HFClipModel(config), HFClipProcessor.from_tokenizer(tokenizer, image_size=32)


@pytest.fixture(scope="module")
def start_checkpoint(tmp_path_factory):
    model, processor = _tiny_model_and_processor()
    path = tmp_path_factory.mktemp("start")
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def contrastive_run(start_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("contrastive")
    printed = _finetune(out, "--model_name_or_path", str(start_checkpoint), *SMALL, "--max_eval_samples", "128",
                       "--max_steps", "60", "--learning_rate", "2e-3", "--save_strategy", "steps", "--save_steps", "30",
                       "--eval_strategy", "steps", "--eval_steps", "30")
    return out, printed


@pytest.mark.slow
def test_contrastive_fine_tuning_lowers_eval_loss_and_saves_loadable_checkpoints(contrastive_run):
    out, printed = contrastive_run
    results = json.loads((out / "eval_results.json").read_text())
    assert results["after"]["eval_loss"] < results["before"]["eval_loss"]
    for direction in ("image_to_text", "text_to_image"):
        assert results["after"][f"eval_{direction}_accuracy"] > results["before"][f"eval_{direction}_accuracy"]
    assert "pipeline on one image of a" in printed
    image = Image.new("RGB", (64, 64), (220, 40, 40))
    labels = ["red circle", "blue square"]
    for path in (out / "checkpoint-60", out):  # the checkpoint Trainer saved, and the final model
        model, processor = AutoModel.from_pretrained(path).eval(), AutoProcessor.from_pretrained(path)
        assert type(model) is HFClipModel
        with torch.no_grad():
            inputs = processor(text=[f"This is a photo of {label}." for label in labels], images=image, padding=True,
                               return_tensors="pt")
            probs = model(**inputs).logits_per_image.softmax(-1)[0]
        scores = pipeline("zero-shot-image-classification", model=str(path))(image, candidate_labels=labels)
        assert {s["label"]: s["score"] for s in scores} == pytest.approx(dict(zip(labels, probs.tolist())), abs=1e-6)


@pytest.mark.slow
def test_classifier_from_zero_shot_fine_tuned_with_trainer_beats_zero_shot(contrastive_run, tmp_path):
    trained, _ = contrastive_run
    out = tmp_path / "classifier"
    printed = _finetune(out, "--task", "image-classification", "--model_name_or_path", str(trained),
                       "--label_column", "shape", *SMALL, "--max_eval_samples", "300", "--max_steps", "100",
                       "--learning_rate", "3e-3", "--save_strategy", "no", "--wise_ft_alpha", "0.5")
    results = json.loads((out / "eval_results.json").read_text())
    assert results["fine_tuned"]["eval_accuracy"] > results["zero_shot"]["eval_accuracy"]
    assert "pipeline on one image of a" in printed
    config = json.loads((out / "config.json").read_text())
    assert config["id2label"] == {"0": "circle", "1": "square", "2": "triangle", "3": "cross"}

    # The saved model is the WiSE-FT ensemble: its accuracy on the 300 eval rows, recomputed here, is the reported one.
    from hf_clip_train.synthetic import build_shapes_dataset

    rows = build_shapes_dataset(num_train=1024)["test"].select(range(300))
    classifier = AutoModelForImageClassification.from_pretrained(out).eval()
    processor = AutoProcessor.from_pretrained(out)
    images = rows["image"]
    with torch.no_grad():
        batches = [processor(images=images[i : i + 100], return_tensors="pt") for i in range(0, 300, 100)]
        logits = torch.cat([classifier(**batch).logits for batch in batches])
    accuracy = (logits.argmax(-1) == torch.tensor(rows["shape"])).float().mean().item()
    assert accuracy == pytest.approx(results["wise_ft_0.5"]["eval_accuracy"], abs=1e-6)
    top = pipeline("image-classification", model=str(out))(images[0])[0]
    probs = logits[0].softmax(-1)
    assert top["label"] == config["id2label"][str(int(probs.argmax()))]
    assert top["score"] == pytest.approx(probs.max().item(), abs=1e-5)


@pytest.mark.slow
def test_trainer_under_torchrun_uses_the_global_batch(start_checkpoint, tmp_path):
    """2 ranks × 8 rows vs 1 process × 16 rows: each rank's loss sees all 16 captions, so losses and weights agree."""
    from hf_clip_train.synthetic import build_shapes_dataset

    data = build_shapes_dataset(num_train=64, num_test=16, num_unseen=8)
    data.map(lambda row: {"caption": row["caption"][0]}).save_to_disk(tmp_path / "data")  # no caption sampling
    flags = ["--model_name_or_path", str(start_checkpoint), "--dataset_name", str(tmp_path / "data"),
             "--eval_splits", "test", "--max_steps", "3", "--logging_steps", "1", "--save_steps", "3",
             "--learning_rate", "1e-3", "--dataloader_drop_last", "--use_cpu", "--seed", "3"]
    _finetune(tmp_path / "single", *flags, "--per_device_train_batch_size", "16", "--per_device_eval_batch_size", "16")
    _launch(tmp_path / "double", *flags, "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "8",
            launcher=_torchrun("hf_clip_train.finetune_trainer"))

    def history(run):
        return json.loads((tmp_path / run / "checkpoint-3" / "trainer_state.json").read_text())["log_history"]

    single, double = history("single"), history("double")
    train_logs = [entry for entry in single if "loss" in entry]
    assert len(train_logs) == 3
    for one, two in zip(single, double, strict=True):
        for key in ("loss", "grad_norm", "eval_loss"):
            if key in one:
                assert two[key] == pytest.approx(one[key], abs=1e-5, rel=1e-5), (key, one["step"])
    single_weights, double_weights = load_file(tmp_path / "single" / "model.safetensors"), load_file(
        tmp_path / "double" / "model.safetensors")
    # A key bias adds q·b to every logit of a query's softmax row, which cancels: its true gradient is 0, its computed
    # one float rounding (~1e-8 against ~1e-1 for the other biases), and Adam scales that noise up to ±lr steps whose
    # signs differ between one process and two (seen on AVX2 CPUs). `test_key_bias_gradient_is_rounding_noise` pins it.
    compared = [name for name in single_weights if not name.endswith("self_attn.k_proj.bias")]
    assert len(compared) == len(single_weights) - 4  # 2 text + 2 vision layers in the start model
    for name in compared:
        torch.testing.assert_close(double_weights[name], single_weights[name], atol=1e-4, rtol=1e-4, msg=name)


def test_key_bias_gradient_is_rounding_noise(tokenizer):
    """Softmax is shift-invariant per row and a key bias shifts a query's whole row by q·b, so the gradient of every
    `k_proj.bias` is zero up to rounding, far below every other bias's gradient."""
    from conftest import make_config, text_batch

    layer = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2}
    config = make_config(tokenizer, projection_dim=32, text=layer, vision={**layer, "image_size": 32, "patch_size": 8})
    torch.manual_seed(0)
    model = HFClipModel(config).train()
    input_ids, attention_mask = text_batch(config, 16, 12)
    model(input_ids=input_ids, attention_mask=attention_mask, pixel_values=torch.randn(16, 3, 32, 32),
          return_loss=True).loss.backward()
    for tower in ("text_model", "vision_model"):
        for layer_index in range(2):
            attention = model.get_submodule(f"{tower}.encoder.layers.{layer_index}.self_attn")
            key_bias = attention.k_proj.bias.grad.abs().max().item()
            others = min(getattr(attention, name).bias.grad.abs().max().item() for name in ("q_proj", "v_proj"))
            assert key_bias < 1e-6 and key_bias < 1e-4 * others, (tower, layer_index, key_bias, others)


def _legacy_clip_model():
    """A model whose text config carries Transformers-CLIP's legacy ids (eos 2: pool at the highest token id)."""
    model, processor = _tiny_model_and_processor()
    text_config = model.config.text_config
    text_config.eos_token_id, text_config.bos_token_id, text_config.pad_token_id = 2, 0, 1
    return model, processor


def test_trainer_special_token_alignment_keeps_the_pooled_token(tmp_path):
    from hf_clip_train.synthetic import build_shapes_dataset

    model, processor = _legacy_clip_model()
    text = processor(text=["a big red circle on the left", "a cross", "at the top, a small blue square"],
                     padding=True, return_tensors="pt")
    with torch.no_grad():
        positions_before = model.text_model.pooling_positions(text["input_ids"])
    match_special_tokens(model, processor.tokenizer)
    tokenizer = processor.tokenizer
    names = ("eos_token_id", "bos_token_id", "pad_token_id")
    matched = {name: getattr(model.config.text_config, name) for name in names}
    assert matched == {"eos_token_id": tokenizer.eos_token_id, "bos_token_id": tokenizer.bos_token_id,
                       "pad_token_id": tokenizer.pad_token_id}
    assert torch.equal(model.text_model.pooling_positions(text["input_ids"]), positions_before)

    args = TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=2, per_device_train_batch_size=8,
                             remove_unused_columns=False, save_strategy="no", report_to="none", use_cpu=True)
    trainer = Trainer(model=model, args=args, train_dataset=build_shapes_dataset(16, 8, 8)["train"],
                      data_collator=ContrastiveDataCollator(processor, seed=0), processing_class=processor)
    trainer.train()
    trainer.save_model(tmp_path / "saved")
    model.eval()
    with torch.no_grad():
        expected = model.get_text_features(**text).pooler_output
    reloaded = AutoModel.from_pretrained(tmp_path / "saved").eval()
    assert {name: getattr(reloaded.config.text_config, name) for name in matched} == matched
    with torch.no_grad():
        assert torch.equal(reloaded.text_model.pooling_positions(text["input_ids"]), positions_before)
        torch.testing.assert_close(reloaded.get_text_features(**text).pooler_output, expected, atol=0, rtol=0)


def test_special_tokens_that_would_move_the_pooled_token_are_refused():
    model, processor = _legacy_clip_model()
    processor.tokenizer.add_tokens(["<extra>"])  # end-of-text is no longer the highest id
    with pytest.raises(ValueError, match="eos_token_id 2"):
        match_special_tokens(model, processor.tokenizer)


def test_collators_read_every_image_form_and_name_missing_columns(tmp_path):
    _, processor = _tiny_model_and_processor()
    image = Image.new("RGB", (40, 30), (200, 30, 30))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    image.save(tmp_path / "red.png")
    rows = [{"image": image, "caption": "a red square", "label": 1},
            {"image": buffer.getvalue(), "caption": ["a red square", "a square"], "label": 0},
            {"image": "red.png", "caption": "a red square", "label": 1},
            {"image": {"bytes": None, "path": str(tmp_path / "red.png")}, "caption": ["a red square"], "label": 2}]
    batch = ContrastiveDataCollator(processor, seed=0, base_dir=tmp_path)(rows)
    assert batch["return_loss"] is True
    assert batch["pixel_values"].shape == (4, 3, 32, 32) and batch["input_ids"].shape[0] == 4
    for row in range(1, 4):
        assert torch.equal(batch["pixel_values"][row], batch["pixel_values"][0])
    labelled = ImageClassificationDataCollator(processor, base_dir=tmp_path)(rows)
    assert labelled["labels"].tolist() == [1, 0, 1, 2]

    with pytest.raises(KeyError, match="remove_unused_columns=False"):
        ContrastiveDataCollator(processor)([{"label": 0}])
    with pytest.raises(ValueError, match="non-empty list of captions"):
        ContrastiveDataCollator(processor)([{"image": image, "caption": []}])
    with pytest.raises(ValueError, match="integer class ids"):
        ImageClassificationDataCollator(processor)([{"image": image, "label": "red"}])


@pytest.mark.slow
def test_locked_towers_bf16_and_activation_checkpointing(start_checkpoint, tmp_path):
    out = tmp_path / "locked"
    _finetune(out, "--model_name_or_path", str(start_checkpoint), *SMALL, "--embedded_num_train", "64",
              "--max_eval_samples", "16", "--max_steps", "2", "--learning_rate", "1e-3", "--save_strategy", "no",
              "--lock_image", "--lock_text", "--lock_text_unlocked_layers", "1", "--bf16", "--activation_checkpointing",
              "--use_cpu")
    before, after = load_file(start_checkpoint / "model.safetensors"), load_file(out / "model.safetensors")
    for name in ("vision_model.encoder.layers.1.mlp.fc1.weight", "visual_projection.weight",
                 "text_model.encoder.layers.0.mlp.fc1.weight"):
        assert torch.equal(before[name], after[name]), name
    for name in ("text_model.encoder.layers.1.mlp.fc1.weight", "text_projection.weight", "logit_scale"):
        assert not torch.equal(before[name], after[name]), name
