import math

import pytest
import torch
from huggingface_hub.errors import StrictDataclassError
from transformers import CLIPConfig, CLIPTextConfig, CLIPVisionConfig
from transformers.utils import logging as transformers_logging

from hf_clip import HFClipConfig, HFClipModel, HFClipTextConfig, HFClipVisionConfig
from hf_clip.configuration_hf_clip import clip_config_dict_to_hf_clip

PUBLISHED = {
    # preset: (embed, vision width, layers, heads, patch, image, text width, layers, heads, context)
    "ViT-B-32": (512, 768, 12, 12, 32, 224, 512, 12, 8, 77),
    "ViT-B-16": (512, 768, 12, 12, 16, 224, 512, 12, 8, 77),
    "ViT-L-14": (768, 1024, 24, 16, 14, 224, 768, 12, 12, 77),
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_presets_have_published_dimensions(name):
    config = HFClipConfig.from_preset(name)
    vision, text = config.vision_config, config.text_config
    got = (config.projection_dim, vision.hidden_size, vision.num_hidden_layers, vision.num_attention_heads,
           vision.patch_size, vision.image_size, text.hidden_size, text.num_hidden_layers,
           text.num_attention_heads, text.max_position_embeddings)
    assert got == PUBLISHED[name]
    assert vision.intermediate_size == 4 * vision.hidden_size and text.intermediate_size == 4 * text.hidden_size
    assert text.vocab_size == 49408 and text.eos_token_id == 49407
    assert text.projection_dim == vision.projection_dim == config.projection_dim


def test_tiny_preset_and_unknown_preset():
    assert "tiny" in HFClipConfig.presets()
    with pytest.raises(ValueError, match="Unknown preset 'ViT-Z'.*tiny"):
        HFClipConfig.from_preset("ViT-Z")


def test_defaults_match_clip():
    config = HFClipConfig()
    assert math.isclose(config.logit_scale_init_value, math.log(1 / 0.07))
    assert config.text_config.hidden_act == config.vision_config.hidden_act == "quick_gelu"


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"text_config": {"hidden_size": 100, "num_attention_heads": 3}}, "num_attention_heads"),
        ({"vision_config": {"hidden_size": 100, "num_attention_heads": 3}}, "num_attention_heads"),
        ({"vision_config": {"image_size": 225, "patch_size": 32}}, "patch_size"),
        ({"text_config": {"eos_token_id": None}}, "eos_token_id"),
        ({"text_config": {"layer_norm_eps": None}}, "layer_norm_eps"),
        ({"text_config": {"vocab_size": 0}}, "vocab_size"),
        ({"text_config": {"attention_dropout": 1.0}}, "attention_dropout"),
        ({"vision_config": {"image_size": [224, 224]}}, "image_size"),
        ({"vision_config": {"num_channels": 0}}, "num_channels"),
        ({"projection_dim": None}, "projection_dim"),
        ({"logit_scale_init_value": None}, "logit_scale_init_value"),
        ({"text_config": {"hidden_act": "swishy"}}, "hidden_act"),
        ({"vision_config": {"hidden_act": "swishy"}}, "hidden_act"),
        ({"logit_scale_init_value": 5.0}, "logit_scale_max"),
        ({"label_smoothing": 1.5}, "label_smoothing"),
        ({"loss_type": "softmax"}, "loss_type"),
        ({"loss_type": "siglip", "label_smoothing": 0.1}, "label_smoothing"),
        ({"loss_chunk_size": -1}, "loss_chunk_size"),
        ({"logit_bias_init_value": -10.0}, "logit_bias_init_value"),
        ({"loss_type": "siglip", "logit_bias_init_value": float("nan")}, "`logit_bias_init_value` must be finite"),
        ({"loss_type": "siglip", "logit_bias_init_value": float("inf")}, "`logit_bias_init_value` must be finite"),
        ({"loss_type": "siglip", "logit_bias_init_value": -float("inf")}, "`logit_bias_init_value` must be finite"),
        ({"logit_scale_init_value": -float("inf")}, "`logit_scale_init_value` must be finite"),
        ({"text_config": {"hidden_size": -64}}, "`hidden_size` must be positive"),
        ({"vision_config": {"intermediate_size": -1}}, "`intermediate_size` must be positive"),
        ({"projection_dim": -8}, "`projection_dim` must be positive"),
        ({"projection_dim": 0}, "`projection_dim` must be positive"),
        ({"text_config": {"projection_dim": 0}}, "`projection_dim` must be positive"),
        ({"vision_config": {"patch_size": 0}}, "`patch_size` must be positive"),
        ({"text_config": {"num_attention_heads": 0}}, "`num_attention_heads` must be positive"),
        ({"vision_config": {"num_attention_heads": 0}}, "`num_attention_heads` must be positive"),
        ({"logit_scale_init_value": 1e6}, "`logit_scale_init_value`"),
        ({"logit_scale_init_value": float("nan")}, "`logit_scale_init_value`"),
        ({"text_config": {"num_hidden_layers": -1}}, "`num_hidden_layers` must be 0 or more"),
        ({"vision_config": {"num_hidden_layers": -2}}, "`num_hidden_layers` must be at least 1"),
        ({"vision_config": {"num_hidden_layers": 0}}, "every image maps to the same embedding"),
        ({"text_config": {"layer_norm_eps": 0.0}}, "`layer_norm_eps` must be positive"),
        ({"vision_config": {"layer_norm_eps": -1e-5}}, "`layer_norm_eps` must be positive"),
    ],
)
def test_invalid_config_names_the_field(kwargs, field):
    # huggingface_hub's @strict wraps validator errors (as for Transformers' own configs); the message keeps ours.
    with pytest.raises(StrictDataclassError, match=field):
        HFClipConfig(**kwargs)


def test_wrong_type_is_rejected():
    with pytest.raises(StrictDataclassError, match="hidden_size"):
        HFClipTextConfig(hidden_size="512")


def test_ids_derived_from_tokenizer(tokenizer):
    config = HFClipConfig.from_preset("tiny", tokenizer=tokenizer)
    text = config.text_config
    assert text.vocab_size == len(tokenizer)
    assert text.max_position_embeddings == tokenizer.model_max_length
    assert (text.bos_token_id, text.eos_token_id, text.pad_token_id) == (
        tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)


def test_clip_config_maps_field_for_field():
    clip = CLIPConfig(
        text_config={"vocab_size": 301, "hidden_size": 96, "num_attention_heads": 3, "eos_token_id": 300,
                     "bos_token_id": 299, "max_position_embeddings": 19},
        vision_config={"hidden_size": 80, "num_attention_heads": 5, "image_size": 45, "patch_size": 9,
                       "hidden_act": "gelu"},
        projection_dim=40,
        logit_scale_init_value=2.0,
    )
    ours = HFClipConfig.from_dict(clip_config_dict_to_hf_clip(clip.to_dict()))
    assert ours.projection_dim == 40 and ours.logit_scale_init_value == 2.0
    for name, ref_sub, our_sub in (("text", clip.text_config, ours.text_config),
                                   ("vision", clip.vision_config, ours.vision_config)):
        for field, value in ref_sub.to_dict().items():
            if field in ("model_type", "transformers_version", "architectures"):
                continue
            if hasattr(our_sub, field):
                assert getattr(our_sub, field) == value, (name, field)
    shared = {"hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "hidden_act",
              "layer_norm_eps", "projection_dim", "initializer_range", "initializer_factor", "attention_dropout"}
    assert shared <= set(HFClipTextConfig().to_dict()) and shared <= set(HFClipVisionConfig().to_dict())


def test_config_round_trip(tmp_path, tiny_config):
    tiny_config.save_pretrained(tmp_path)
    loaded = HFClipConfig.from_pretrained(tmp_path)
    assert loaded.to_dict() == tiny_config.to_dict()


def test_special_ids_outside_the_vocabulary_warn_and_the_model_runs(caplog):
    """As `CLIPTextConfig` (and Transformers' CLIP tester: vocab 99 with bos/eos 49406/49407)."""
    transformers_logging.warning_once.cache_clear()
    transformers_logging.enable_propagation()
    try:
        text = HFClipTextConfig(vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                                num_attention_heads=4, max_position_embeddings=16)
    finally:
        transformers_logging.disable_propagation()
    assert "eos_token_id" in caplog.text
    config = HFClipConfig(text_config=text.to_dict(), vision_config={
        "hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 1, "num_attention_heads": 4,
        "image_size": 16, "patch_size": 8}, projection_dim=8)
    with torch.no_grad():
        out = HFClipModel(config).eval()(input_ids=torch.randint(99, (2, 7)), pixel_values=torch.randn(2, 3, 16, 16))
    assert torch.isfinite(out.logits_per_image).all()


CLIP_CONFIGS = {
    "defaults": {},
    "transformers_tester": {
        "text_config": {"vocab_size": 99, "hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2,
                        "num_attention_heads": 4, "max_position_embeddings": 512, "attention_dropout": 0.1},
        "vision_config": {"image_size": 30, "patch_size": 2, "hidden_size": 32, "intermediate_size": 37,
                          "num_hidden_layers": 2, "num_attention_heads": 4, "attention_dropout": 0.1},
        "projection_dim": 64,
    },
    "legacy_eos_2_and_list_eos": {"text_config": {"eos_token_id": [2, 49407], "bos_token_id": 0, "pad_token_id": None},
                                  "logit_scale_init_value": 2.6592},
    "extra_keys": {"text_config": {"dropout": 0.0, "layer_norm_eps": 1e-6}, "vision_config": {"dropout": 0.0},
                   "torch_dtype": "float32"},
}


@pytest.mark.parametrize("name", sorted(CLIP_CONFIGS))
def test_every_transformers_clip_config_loads_as_the_matching_hf_clip_config(tmp_path, name):
    clip = CLIPConfig(**CLIP_CONFIGS[name])
    clip.save_pretrained(tmp_path)
    ours = HFClipConfig.from_pretrained(tmp_path)
    text = HFClipTextConfig.from_pretrained(tmp_path)
    vision = HFClipVisionConfig.from_pretrained(tmp_path)
    assert ours.model_type == "hf_clip" and text.model_type == "hf_clip_text_model"
    for ref, sub_configs in ((clip.text_config, (ours.text_config, text)),
                             (clip.vision_config, (ours.vision_config, vision))):
        for field, value in ref.to_dict().items():
            if field in ("model_type", "transformers_version", "architectures", "dtype"):
                continue
            for sub_config in sub_configs:
                assert getattr(sub_config, field) == value, (name, field)
    assert ours.projection_dim == clip.projection_dim
    assert ours.logit_scale_init_value == clip.logit_scale_init_value


def test_tower_configs_load_from_transformers_clip_tower_configs(tmp_path):
    CLIPTextConfig(vocab_size=99, hidden_size=36, num_attention_heads=6).save_pretrained(tmp_path / "text")
    CLIPVisionConfig(hidden_size=36, num_attention_heads=6, image_size=30, patch_size=3).save_pretrained(
        tmp_path / "vision"
    )
    assert HFClipTextConfig.from_pretrained(tmp_path / "text").hidden_size == 36
    assert HFClipVisionConfig.from_pretrained(tmp_path / "vision").patch_size == 3
