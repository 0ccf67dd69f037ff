"""hf_clip against open_clip 3.x models built from configs (pretrained=None), with identical weights."""

import json

import pytest
import torch

open_clip = pytest.importorskip("open_clip")
from open_clip.loss import ClipLoss  # noqa: E402

from hf_clip.convert import (  # noqa: E402
    config_from_openai_state_dict,
    convert_openai_state_dict,
    hf_clip_from_openai_state_dict,
)

VOCAB, CONTEXT = 301, 19


@pytest.fixture(params=[True, False], ids=["quick_gelu", "gelu"])
def open_clip_model(request, tmp_path):
    quick_gelu = request.param
    name = f"hfclip-test-{'quick' if quick_gelu else 'gelu'}"
    model_config = {
        "embed_dim": 40,
        "quick_gelu": quick_gelu,
        "vision_cfg": {"image_size": 45, "patch_size": 9, "width": 80, "layers": 2, "head_width": 16,
                       "mlp_ratio": 2.0},
        "text_cfg": {"context_length": CONTEXT, "vocab_size": VOCAB, "width": 96, "heads": 3, "layers": 3,
                     "mlp_ratio": 2.0},
    }
    (tmp_path / f"{name}.json").write_text(json.dumps(model_config))
    open_clip.add_model_config(tmp_path)
    torch.manual_seed(0)
    model = open_clip.create_model(name, pretrained=None).eval()
    with torch.no_grad():
        model.logit_scale.fill_(3.0)
    return model, quick_gelu


def _batch(batch_size=5):
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(1, VOCAB - 2, (batch_size, CONTEXT), generator=generator)
    for row, length in enumerate([4, 19, 9, 12, 2][:batch_size]):
        ids[row, 0] = VOCAB - 2
        ids[row, length - 1] = VOCAB - 1  # end-of-text: the highest id, where open_clip's argmax pools
        ids[row, length:] = 0
    pixels = torch.randn(batch_size, 3, 45, 45, generator=generator)
    return ids, (ids != 0).long(), pixels


def test_matches_open_clip(open_clip_model):
    reference, quick_gelu = open_clip_model
    model = hf_clip_from_openai_state_dict(
        reference.state_dict(), text_head_width=32, vision_head_width=16,
        hidden_act="quick_gelu" if quick_gelu else "gelu", text_config={"pad_token_id": 0},
    ).eval()
    assert model.config.text_config.num_attention_heads == 3 and model.config.vision_config.image_size == 45
    ids, mask, pixels = _batch()
    with torch.no_grad():
        image_features = reference.encode_image(pixels, normalize=True)
        text_features = reference.encode_text(ids, normalize=True)
        scale = reference.logit_scale.exp()
        expected_loss = ClipLoss()(image_features, text_features, scale)
        out = model(input_ids=ids, attention_mask=mask, pixel_values=pixels, return_loss=True)
    torch.testing.assert_close(out.image_embeds, image_features, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.text_embeds, text_features, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.logits_per_image, scale * image_features @ text_features.T, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.loss, expected_loss, atol=1e-5, rtol=0)


def test_inferred_config(open_clip_model):
    reference, _ = open_clip_model
    config = config_from_openai_state_dict(reference.state_dict(), text_head_width=32, vision_head_width=16)
    text, vision = config.text_config, config.vision_config
    assert (text.vocab_size, text.hidden_size, text.num_hidden_layers, text.max_position_embeddings) == (301, 96, 3, 19)
    vision_sizes = (vision.hidden_size, vision.num_hidden_layers, vision.patch_size, vision.intermediate_size)
    assert vision_sizes == (80, 2, 9, 160)
    assert config.projection_dim == 40 and text.eos_token_id == 300


def test_unknown_keys_are_named(open_clip_model):
    reference, _ = open_clip_model
    state_dict = dict(reference.state_dict())
    state_dict["logit_bias"] = torch.zeros(1)
    state_dict["visual.attn_pool.query"] = torch.zeros(4, 80)
    with pytest.raises(ValueError, match=r"logit_bias.*visual\.attn_pool\.query|visual\.attn_pool\.query.*logit_bias"):
        convert_openai_state_dict(state_dict)
    with pytest.raises(ValueError, match="missing"):
        config_from_openai_state_dict({"foo": torch.zeros(1)})
