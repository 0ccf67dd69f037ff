import pytest
import torch
from conftest import text_batch
from huggingface_hub.errors import StrictDataclassError

from hf_clip import HFClipConfig, HFClipModel, HFClipVisionConfig


def _inputs(config, batch_size=5, seed=0):
    generator = torch.Generator().manual_seed(seed)
    ids, mask = text_batch(config, batch_size, config.text_config.max_position_embeddings, generator)
    size = config.vision_config.image_size
    return {"input_ids": ids, "attention_mask": mask,
            "pixel_values": torch.randn(batch_size, 3, size, size, generator=generator)}


def _pair(tiny_config, patch_dropout):
    """Two models with identical weights, without and with patch dropout."""
    torch.manual_seed(0)
    plain = HFClipModel(tiny_config)
    dropping_config = HFClipConfig.from_dict(tiny_config.to_dict())
    dropping_config.vision_config.patch_dropout = patch_dropout
    dropping = HFClipModel(dropping_config)
    dropping.load_state_dict(plain.state_dict())
    return plain, dropping


def test_eval_outputs_equal_those_without_patch_dropout(tiny_config):
    plain, dropping = _pair(tiny_config, 0.5)
    inputs = _inputs(tiny_config)
    with torch.no_grad():
        expected = plain.eval()(**inputs, return_loss=True, output_hidden_states=True)
        got = dropping.eval()(**inputs, return_loss=True, output_hidden_states=True)
    assert torch.equal(got.logits_per_image, expected.logits_per_image)
    assert torch.equal(got.image_embeds, expected.image_embeds)
    assert torch.equal(got.loss, expected.loss)
    for got_state, expected_state in zip(got.vision_model_output.hidden_states,
                                         expected.vision_model_output.hidden_states, strict=True):
        assert torch.equal(got_state, expected_state)


@pytest.mark.parametrize("patch_dropout", [0.3, 0.5, 0.9])
def test_training_keeps_the_class_token_and_a_random_subset_of_patches(tiny_config, patch_dropout):
    """Tokens entering the encoder in training are the class token, then distinct rows of the full (position-embedded,
    pre-LN) sequence; each image keeps its own random subset, of open_clip's size max(1, int((1-p)·patches))."""
    plain, dropping = _pair(tiny_config, patch_dropout)
    inputs = _inputs(tiny_config, batch_size=8)
    num_patches = (tiny_config.vision_config.image_size // tiny_config.vision_config.patch_size) ** 2
    with torch.no_grad():
        full = plain.eval().vision_model(inputs["pixel_values"], output_hidden_states=True).hidden_states[0]
        torch.manual_seed(3)
        dropped = dropping.train().vision_model(inputs["pixel_values"], output_hidden_states=True).hidden_states[0]
    num_kept = max(1, int(num_patches * (1 - patch_dropout)))
    assert dropped.shape == (8, 1 + num_kept, tiny_config.vision_config.hidden_size)
    subsets = set()
    for row in range(8):
        assert torch.equal(dropped[row, 0], full[row, 0])
        # pre-LN normalises each token on its own, so a kept token equals its row in the full sequence
        distances = torch.cdist(dropped[row, 1:], full[row, 1:])
        matches = distances.argmin(dim=1)
        assert distances.min(dim=1).values.max() < 1e-5
        assert len(set(matches.tolist())) == num_kept
        subsets.add(tuple(sorted(matches.tolist())))
    assert len(subsets) > 1


def test_training_with_patch_dropout_zero_equals_eval_tokens(tiny_config):
    plain, _ = _pair(tiny_config, 0.0)
    pixels = _inputs(tiny_config)["pixel_values"]
    with torch.no_grad():
        train_out = plain.train().vision_model(pixels).pooler_output
        eval_out = plain.eval().vision_model(pixels).pooler_output
    assert torch.equal(train_out, eval_out)


def test_patch_dropout_trains_and_round_trips(tmp_path, tiny_config):
    _, dropping = _pair(tiny_config, 0.5)
    dropping.train()(**_inputs(tiny_config), return_loss=True).loss.backward()
    assert dropping.vision_model.embeddings.position_embedding.weight.grad.abs().sum() > 0
    dropping.save_pretrained(tmp_path)
    assert HFClipModel.from_pretrained(tmp_path).config.vision_config.patch_dropout == 0.5


@pytest.mark.parametrize("value", [-0.1, 1.0])
def test_invalid_patch_dropout_names_the_field(value):
    with pytest.raises(StrictDataclassError, match="patch_dropout"):
        HFClipVisionConfig(patch_dropout=value)
