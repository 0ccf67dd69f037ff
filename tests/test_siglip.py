"""A SigLIP-type hf_clip model (`loss_type="siglip"`): initialisation, forward and loss, the zero-shot pipeline,
the Hub round trip with and without hf_clip installed, and training through both CLIs."""

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import FAST_TRAINING_ARGS, finetune_in_process, hub_env, make_config, text_batch, train_in_process
from hub_workers import LABELS, probe_image, probe_inputs
from safetensors.torch import load_file
from test_hub import assert_bit_identical, local_outputs, pull, run_worker
from test_loss import assert_relative, naive_sigmoid_loss
from transformers import pipeline

from hf_clip import HFClipConfig, HFClipModel, HFClipProcessor, from_zero_shot, sigmoid_loss

REPO = Path(__file__).resolve().parents[1]
LAYER = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1, "num_attention_heads": 2}


def _siglip_config(tokenizer, **overrides) -> HFClipConfig:
    config = make_config(tokenizer, projection_dim=32, text=LAYER, vision={**LAYER, "image_size": 32, "patch_size": 8})
    return HFClipConfig.from_dict({**config.to_dict(), "loss_type": "siglip",
                                   **overrides})


@pytest.fixture(scope="module")
def siglip_checkpoint(tmp_path_factory, tokenizer):
    torch.manual_seed(0)
    model = HFClipModel(_siglip_config(tokenizer)).eval()
    with torch.no_grad():
        model.logit_bias.fill_(-1.5)  # a trained-looking bias, so the round trips check that it travels
    path = tmp_path_factory.mktemp("siglip")
    model.save_pretrained(path)
    HFClipProcessor.from_tokenizer(tokenizer, image_size=32).save_pretrained(path)
    return path


def test_initialisation_follows_the_siglip_paper(tokenizer):
    model = HFClipModel(_siglip_config(tokenizer))
    assert model.config.loss_type == "siglip"
    assert model.logit_scale.item() == pytest.approx(math.log(10))
    assert model.logit_bias.item() == -10.0
    assert "logit_bias" in model.state_dict() and "logit_bias" in model.no_weight_decay_parameter_names()
    clip = HFClipModel(make_config(tokenizer, 32, LAYER, {**LAYER, "image_size": 32, "patch_size": 8}))
    assert clip.logit_bias is None and "logit_bias" not in clip.state_dict()
    assert clip.logit_scale.item() == pytest.approx(math.log(1 / 0.07))


def test_conversion_to_transformers_clip_refuses_a_siglip_model(tokenizer):
    from hf_clip.convert import transformers_from_hf_clip

    with pytest.raises(ValueError, match="loss_type 'siglip'.*logit_bias"):
        transformers_from_hf_clip(HFClipModel(_siglip_config(tokenizer)))


def test_forward_adds_the_bias_and_returns_the_paper_loss(tokenizer):
    torch.manual_seed(0)
    model = HFClipModel(_siglip_config(tokenizer, loss_chunk_size=0)).train()
    chunked = HFClipModel(_siglip_config(tokenizer, loss_chunk_size=2)).train()
    with torch.no_grad():
        model.logit_bias.fill_(-2.0)
    chunked.load_state_dict(model.state_dict())
    ids, mask = text_batch(model.config, 5, 24)
    batch = {"input_ids": ids, "attention_mask": mask, "pixel_values": torch.randn(5, 3, 32, 32)}

    out = model(**batch, return_loss=True)
    scale = model.logit_scale.exp()
    expected_logits = scale * out.image_embeds @ out.text_embeds.T - 2.0
    torch.testing.assert_close(out.logits_per_image, expected_logits)
    naive = naive_sigmoid_loss(out.image_embeds.double(), out.text_embeds.double(), scale.double(),
                               torch.tensor(-2.0, dtype=torch.float64))
    assert_relative(out.loss, naive, 1e-5, "loss vs the paper's formula")
    torch.testing.assert_close(out.loss, sigmoid_loss(out.image_embeds, out.text_embeds, scale, model.logit_bias))

    out.loss.backward()
    chunked(**batch, return_loss=True).loss.backward()
    largest = max(parameter.grad.abs().max().item() for parameter in model.parameters())
    for (name, parameter), other in zip(model.named_parameters(), chunked.parameters(), strict=True):
        error = (other.grad - parameter.grad).abs().max().item()
        assert error <= 1e-5 * largest, f"{name}: {error:.3g} > 1e-5 x the largest gradient entry {largest:.3g}"


def test_pipeline_on_a_siglip_model_ranks_as_the_sigmoid_does(siglip_checkpoint):
    """The zero-shot pipeline applies a sigmoid only when model_type contains "siglip"; ours is "hf_clip", so it
    returns the softmax over the candidate labels. The bias cancels in it, and its ranking is the sigmoid's."""
    model = HFClipModel.from_pretrained(siglip_checkpoint).eval()
    processor = HFClipProcessor.from_pretrained(siglip_checkpoint)
    prompts = [f"This is a photo of {label}." for label in LABELS]
    with torch.no_grad():
        inputs = processor(text=prompts, images=probe_image(), padding=True, return_tensors="pt")
        logits = model(**inputs).logits_per_image[0]
    result = pipeline("zero-shot-image-classification", model=str(siglip_checkpoint))(
        probe_image(), candidate_labels=LABELS)
    got = {r["label"]: r["score"] for r in result}
    for label, probability in zip(LABELS, logits.softmax(-1).tolist(), strict=True):
        assert got[label] == pytest.approx(probability, abs=1e-6)
    by_sigmoid = [LABELS[i] for i in logits.sigmoid().argsort(descending=True).tolist()]
    assert [r["label"] for r in result] == by_sigmoid


def test_zero_shot_classifier_of_a_siglip_model_keeps_the_bias(siglip_checkpoint):
    model = HFClipModel.from_pretrained(siglip_checkpoint).eval()
    processor = HFClipProcessor.from_pretrained(siglip_checkpoint)
    classifier = from_zero_shot(model, processor, LABELS, ["a photo of a {}."]).eval()
    inputs = processor(text=[f"a photo of a {label}." for label in LABELS], images=[probe_image()] * 2, padding=True,
                       return_tensors="pt")
    with torch.no_grad():
        expected = model(**inputs).logits_per_image
        logits = classifier(pixel_values=inputs["pixel_values"]).logits
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)
    assert classifier.classifier.bias.tolist() == [-1.5] * len(LABELS)


@pytest.mark.slow
def test_push_and_pull_a_siglip_model_with_and_without_hf_clip(hub_server, siglip_checkpoint, tmp_path):
    report = run_worker("push", {"checkpoint": str(siglip_checkpoint), "repo_id": "siglip-round-trip"},
                        hub_env(hub_server, tmp_path / "hf_home_push"))
    files = hub_server.hub.repos["alice/siglip-round-trip"].history("main")[0].files
    assert json.loads(files["config.json"])["loss_type"] == "siglip"
    assert report["oid"]
    expected = local_outputs(siglip_checkpoint)
    assert expected["state.logit_bias"].item() == -1.5
    pull(hub_server, tmp_path, "installed", {"repo_id": "alice/siglip-round-trip"})
    assert_bit_identical(expected, tmp_path / "installed.safetensors")
    remote = pull(hub_server, tmp_path, "remote", {"repo_id": "alice/siglip-round-trip", "trust_remote_code": True},
                  "--without-hf-clip")
    assert remote["model_class"].startswith("transformers_modules.")
    assert_bit_identical(expected, tmp_path / "remote.safetensors")
    model = HFClipModel.from_pretrained(siglip_checkpoint).eval()
    with torch.no_grad():
        outputs = model(**probe_inputs(HFClipProcessor.from_pretrained(siglip_checkpoint)))
    torch.testing.assert_close(load_file(tmp_path / "remote.safetensors")["logits_per_image"], outputs.logits_per_image,
                               atol=0, rtol=0)


@pytest.mark.slow
def test_train_cli_with_loss_type_siglip(tmp_path):
    out = tmp_path / "run"
    train_in_process([*FAST_TRAINING_ARGS, "--max_steps", "3", "--loss_type", "siglip", "--loss_chunk_size", "5",
                      "--eval_splits", "test", "--output_dir", out])
    config = json.loads((out / "config.json").read_text())
    assert config["loss_type"] == "siglip" and config["loss_chunk_size"] == 5
    assert config["logit_scale_init_value"] == pytest.approx(math.log(10))
    weights = load_file(out / "model.safetensors")
    assert weights["logit_bias"].item() != -10.0  # it trained
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()
              if '"loss"' in line]
    assert len(losses) == 3 and all(math.isfinite(loss) for loss in losses)


@pytest.mark.slow
def test_finetune_trainer_switches_a_clip_checkpoint_to_siglip(saved_checkpoint, tmp_path):
    """Trainer fine-tunes a CLIP checkpoint with the sigmoid loss: the model gains a logit_bias at −10 that trains,
    keeps its towers' weights as the start, and the saved model reloads as a SigLIP-type model."""
    out = tmp_path / "ft"
    finetune_in_process(["--model_name_or_path", saved_checkpoint, "--loss_type", "siglip", "--output_dir", out,
                         "--embedded_num_train", "64", "--eval_splits", "test", "--max_eval_samples", "16",
                         "--per_device_train_batch_size", "16", "--per_device_eval_batch_size", "16", "--max_steps",
                         "3", "--logging_steps", "1", "--learning_rate", "1e-3", "--use_cpu",
                         "--dataloader_num_workers", "0", "--save_strategy", "no", "--report_to", "none"])
    model = HFClipModel.from_pretrained(out)
    assert model.config.loss_type == "siglip"
    assert model.logit_bias is not None and -10.5 < model.logit_bias.item() < -9.5 and model.logit_bias.item() != -10
    start = HFClipModel.from_pretrained(saved_checkpoint)
    assert model.logit_scale.item() == pytest.approx(start.logit_scale.item(), abs=0.05)
    with torch.no_grad():
        image = torch.randn(2, 3, 32, 32)
        ids, mask = text_batch(model.config, 2, 24)
        logits = model(input_ids=ids, attention_mask=mask, pixel_values=image).logits_per_image
        embeds = model(input_ids=ids, attention_mask=mask, pixel_values=image)
    expected = model.logit_scale.exp() * F.normalize(embeds.image_embeds) @ F.normalize(embeds.text_embeds).T
    torch.testing.assert_close(logits, expected + model.logit_bias)
