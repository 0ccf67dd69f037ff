import importlib.util
import math
import os

import pytest
import torch
from conftest import text_batch, write_pickle_bomb
from safetensors.torch import load_file, save_file
from transformers import (
    AutoModel,
    CLIPModel,
    CLIPTextModelWithProjection,
    CLIPVisionModelWithProjection,
)
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface
from transformers.utils import logging as transformers_logging

from hf_clip import (
    HFClipConfig,
    HFClipModel,
    HFClipTextModelWithProjection,
    HFClipVisionModelWithProjection,
)
from hf_clip.convert import clip_config_from_hf_clip_config, hf_clip_from_transformers, transformers_from_hf_clip

ATOL = 1e-5


@pytest.fixture
def clip_reference(tmp_path, tiny_config):
    """A random-weight Transformers `CLIPModel` with odd sizes, saved to disk as a CLIP checkpoint."""
    torch.manual_seed(1)
    reference = CLIPModel(clip_config_from_hf_clip_config(tiny_config)).eval()
    with torch.no_grad():
        reference.logit_scale.fill_(3.3)  # not the init value, so a wrong copy would show
    reference.save_pretrained(tmp_path / "clip")
    return reference, tmp_path / "clip"


def _inputs(config, batch_size=6, image_size=None, seed=0):
    generator = torch.Generator().manual_seed(seed)
    ids, mask = text_batch(config, batch_size, config.text_config.max_position_embeddings, generator)
    size = image_size or config.vision_config.image_size
    pixels = torch.randn(batch_size, 3, size, size, generator=generator)
    return ids, mask, pixels


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_loads_transformers_clip_checkpoint_and_matches_outputs(clip_reference, tiny_config, attn_implementation):
    reference, path = clip_reference
    assert '"model_type": "clip"' in (path / "config.json").read_text()
    model = HFClipModel.from_pretrained(path, attn_implementation=attn_implementation).eval()
    reference.set_attn_implementation(attn_implementation)
    ids, mask, pixels = _inputs(tiny_config)
    with torch.no_grad():
        expected = reference(input_ids=ids, attention_mask=mask, pixel_values=pixels, return_loss=True)
        got = model(input_ids=ids, attention_mask=mask, pixel_values=pixels, return_loss=True)
    torch.testing.assert_close(got.logits_per_image, expected.logits_per_image, atol=ATOL, rtol=0)
    torch.testing.assert_close(got.logits_per_text, expected.logits_per_text, atol=ATOL, rtol=0)
    torch.testing.assert_close(got.image_embeds, expected.image_embeds, atol=ATOL, rtol=0)
    torch.testing.assert_close(got.text_embeds, expected.text_embeds, atol=ATOL, rtol=0)
    torch.testing.assert_close(got.loss, expected.loss, atol=ATOL, rtol=0)
    torch.testing.assert_close(
        got.vision_model_output.last_hidden_state, expected.vision_model_output.last_hidden_state, atol=ATOL, rtol=0
    )


def test_gradients_match_transformers_clip(clip_reference, tiny_config):
    reference, _ = clip_reference
    model = hf_clip_from_transformers(reference)
    ids, mask, pixels = _inputs(tiny_config)
    reference(input_ids=ids, attention_mask=mask, pixel_values=pixels, return_loss=True).loss.backward()
    model(input_ids=ids, attention_mask=mask, pixel_values=pixels, return_loss=True).loss.backward()
    expected = dict(reference.named_parameters())
    for name, parameter in model.named_parameters():
        torch.testing.assert_close(parameter.grad, expected[name].grad, atol=ATOL, rtol=1e-4, msg=name)


def test_feature_methods_follow_transformers_5_contract(clip_reference, tiny_config):
    reference, _ = clip_reference
    model = hf_clip_from_transformers(reference).eval()
    ids, mask, pixels = _inputs(tiny_config)
    with torch.no_grad():
        text = model.get_text_features(input_ids=ids, attention_mask=mask)
        image = model.get_image_features(pixel_values=pixels)
        ref_text = reference.get_text_features(input_ids=ids, attention_mask=mask)
        ref_image = reference.get_image_features(pixel_values=pixels)
    assert isinstance(text, BaseModelOutputWithPooling) and isinstance(image, BaseModelOutputWithPooling)
    assert text.pooler_output.shape == (6, tiny_config.projection_dim)
    torch.testing.assert_close(text.pooler_output, ref_text.pooler_output, atol=ATOL, rtol=0)
    torch.testing.assert_close(image.pooler_output, ref_image.pooler_output, atol=ATOL, rtol=0)


def test_interpolate_pos_encoding_matches_transformers(clip_reference, tiny_config):
    reference, _ = clip_reference
    model = hf_clip_from_transformers(reference).eval()
    ids, mask, pixels = _inputs(tiny_config, image_size=60)
    with torch.no_grad():
        expected = reference(input_ids=ids, attention_mask=mask, pixel_values=pixels, interpolate_pos_encoding=True)
        got = model(input_ids=ids, attention_mask=mask, pixel_values=pixels, interpolate_pos_encoding=True)
    torch.testing.assert_close(got.logits_per_image, expected.logits_per_image, atol=ATOL, rtol=0)
    with pytest.raises(ValueError, match="interpolate_pos_encoding"):
        model(input_ids=ids, pixel_values=pixels)


def test_with_projection_models_match_transformers(clip_reference, tiny_config):
    reference, _ = clip_reference
    ids, mask, pixels = _inputs(tiny_config)
    ref_text = CLIPTextModelWithProjection(reference.config.text_config).eval()
    ref_vision = CLIPVisionModelWithProjection(reference.config.vision_config).eval()
    text = HFClipTextModelWithProjection(tiny_config.text_config).eval()
    vision = HFClipVisionModelWithProjection(tiny_config.vision_config).eval()
    text.load_state_dict(ref_text.state_dict(), strict=True)
    vision.load_state_dict(ref_vision.state_dict(), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(text(ids, mask).text_embeds, ref_text(ids, mask).text_embeds, atol=ATOL, rtol=0)
        torch.testing.assert_close(vision(pixels).image_embeds, ref_vision(pixels).image_embeds, atol=ATOL, rtol=0)


def test_conversion_round_trip_is_exact(clip_reference):
    reference, _ = clip_reference
    back = transformers_from_hf_clip(hf_clip_from_transformers(reference))
    for name, tensor in reference.state_dict().items():
        assert torch.equal(back.state_dict()[name], tensor), name
    assert back.config.to_dict()["text_config"]["eos_token_id"] == reference.config.text_config.eos_token_id


def test_pooling_at_first_eos_without_host_sync(tiny_config):
    """`fullgraph=True` fails on any graph break, and `.item()` or a data-dependent branch is one."""
    model = HFClipModel(tiny_config).eval()
    ids, mask, _ = _inputs(tiny_config)
    compiled = torch.compile(model.text_model, backend="eager", fullgraph=True)
    with torch.no_grad():
        out = compiled(ids, mask)
        positions = (ids == tiny_config.text_config.eos_token_id).int().argmax(-1)
        expected = out.last_hidden_state[torch.arange(len(ids)), positions]
    torch.testing.assert_close(out.pooler_output, expected)


def test_right_padding_never_changes_the_pooled_output(tiny_config):
    model = HFClipModel(tiny_config).eval()
    ids, mask, _ = _inputs(tiny_config)
    with torch.no_grad():
        short = model.get_text_features(ids[:2, :12], mask[:2, :12]).pooler_output
        long = model.get_text_features(ids, mask).pooler_output[:2]
    assert mask[:2, 12:].sum() == 0
    torch.testing.assert_close(short, long, atol=ATOL, rtol=0)


def _left_padded(ids: torch.Tensor, mask: torch.Tensor, pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The same right-padded rows with their padding moved to the front."""
    shifts = (mask == 0).sum(-1)
    left_ids = torch.stack([row.roll(int(shift)) for row, shift in zip(ids, shifts)])
    left_mask = torch.stack([row.roll(int(shift)) for row, shift in zip(mask, shifts)])
    left_ids[left_mask == 0] = pad_token_id
    return left_ids, left_mask


@pytest.mark.parametrize("attn_implementation", [
    "eager", "sdpa", pytest.param("flex_attention", marks=pytest.mark.slow)])  # flex: an inductor compile, 20 s here
def test_left_padding_embeds_as_right_padding(tiny_config, attn_implementation):
    model = HFClipModel(tiny_config).eval()
    model.set_attn_implementation(attn_implementation)
    ids, mask, pixels = _inputs(tiny_config)
    left_ids, left_mask = _left_padded(ids, mask, tiny_config.text_config.pad_token_id)
    assert (left_mask[:, 0] == 0).any() and not torch.equal(left_ids, ids)
    with torch.no_grad():
        right = model(input_ids=ids, attention_mask=mask, pixel_values=pixels)
        left = model(input_ids=left_ids, attention_mask=left_mask, pixel_values=pixels)
    torch.testing.assert_close(left.text_embeds, right.text_embeds, atol=ATOL, rtol=0)
    torch.testing.assert_close(left.logits_per_image, right.logits_per_image, atol=1e-4, rtol=0)


def test_left_padding_with_pad_equal_to_eos_pools_at_the_real_eos(tiny_config):
    """CLIP's OpenAI tokenizer pads with its end-of-text token; left pads must not be taken for it."""
    model = HFClipModel(tiny_config).eval()
    eos = tiny_config.text_config.eos_token_id
    ids, mask, _ = _inputs(tiny_config)
    left_ids, left_mask = _left_padded(ids, mask, eos)
    with torch.no_grad():
        right = model.get_text_features(ids, mask).pooler_output
        left = model.get_text_features(left_ids, left_mask).pooler_output
    torch.testing.assert_close(left, right, atol=ATOL, rtol=0)


def test_sdpa_runs_unmasked_for_right_padding_and_masked_for_left_padding(tiny_config):
    """Right-padded and unmasked text keeps SDPA's `is_causal` path: no mask reaches the attention layers."""
    model = HFClipModel(tiny_config).eval()
    model.set_attn_implementation("sdpa")
    masks_seen = []
    model.text_model.encoder.layers[0].self_attn.register_forward_pre_hook(lambda m, args: masks_seen.append(args[1]))
    ids, mask, _ = _inputs(tiny_config)
    left_ids, left_mask = _left_padded(ids, mask, tiny_config.text_config.pad_token_id)
    with torch.no_grad():
        model.get_text_features(ids)
        model.get_text_features(ids, mask)
        model.get_text_features(left_ids, left_mask)
    assert masks_seen[0] is None and masks_seen[1] is None
    assert isinstance(masks_seen[2], torch.Tensor)


def test_too_long_text_is_rejected(tiny_config):
    model = HFClipModel(tiny_config).eval()
    ids = torch.full((1, tiny_config.text_config.max_position_embeddings + 1), 5)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model.get_text_features(ids)


@pytest.mark.parametrize("bad_id", ["vocab_size", -1])
def test_token_ids_outside_the_vocabulary_name_the_vocab_size(tiny_config, bad_id):
    model = HFClipModel(tiny_config).eval()
    ids, mask, pixels = _inputs(tiny_config)
    vocab_size = tiny_config.text_config.vocab_size
    ids[2, 3] = vocab_size if bad_id == "vocab_size" else bad_id
    expected = f"outside the vocabulary \\(0..{vocab_size - 1}, `vocab_size` = {vocab_size}"
    with pytest.raises(RuntimeError, match=expected):
        model(input_ids=ids, attention_mask=mask, pixel_values=pixels)


def test_rows_without_an_end_of_text_token_are_rejected(tiny_config):
    """Checked on device, so `fullgraph=True` compiles it (a host sync would be a graph break)."""
    model = HFClipModel(tiny_config).eval()
    ids, mask, _ = _inputs(tiny_config)
    eos = tiny_config.text_config.eos_token_id
    ids[4] = torch.where(ids[4] == eos, ids[4, 1], ids[4])  # pad may be eos too, so an ordinary token
    compiled = torch.compile(model.text_model, backend="eager", fullgraph=True)
    for text_model in (model.text_model, compiled):
        with torch.no_grad(), pytest.raises(RuntimeError, match=f"no end-of-text token \\(`eos_token_id` = {eos}\\)"):
            text_model(ids, mask)


def test_logit_scale_init_and_clamp(tiny_config):
    model = HFClipModel(tiny_config).eval()
    assert math.isclose(model.logit_scale.item(), math.log(1 / 0.07), rel_tol=1e-6)
    ids, mask, pixels = _inputs(tiny_config, batch_size=2)
    with torch.no_grad():
        model.logit_scale.fill_(10.0)  # exp(10) ~ 22026
        out = model(input_ids=ids, attention_mask=mask, pixel_values=pixels)
    assert model.clamped_logit_scale().item() == pytest.approx(100.0)
    assert out.logits_per_image.abs().max() <= 100.0 + 1e-4
    model.clamp_logit_scale_()
    assert model.logit_scale.item() == pytest.approx(math.log(100.0))


def test_non_square_batch_scores_but_never_reaches_the_loss(tiny_config):
    model = HFClipModel(tiny_config).eval()
    ids, mask, pixels = _inputs(tiny_config, batch_size=4)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, pixel_values=pixels[:1])
    assert out.loss is None and out.logits_per_image.shape == (1, 4) and out.logits_per_text.shape == (4, 1)
    with pytest.raises(ValueError, match="one caption per image"):
        model(input_ids=ids, attention_mask=mask, pixel_values=pixels[:1], return_loss=True)


def test_outputs_tuple_hidden_states_and_attentions(tiny_config):
    model = HFClipModel(tiny_config).eval()
    model.set_attn_implementation("eager")
    ids, mask, pixels = _inputs(tiny_config, batch_size=2)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, pixel_values=pixels, output_hidden_states=True,
                    output_attentions=True)
        as_tuple = model(input_ids=ids, attention_mask=mask, pixel_values=pixels, return_dict=False)
    layers = tiny_config.text_config.num_hidden_layers
    assert len(out.text_model_output.hidden_states) == layers + 1
    assert out.vision_model_output.attentions[0].shape == (2, 5, 10, 10)  # 5 heads, 1 + 3x3 patches
    torch.testing.assert_close(as_tuple[0], out.logits_per_image)


def test_output_flags_follow_the_config_and_explicit_arguments_win(tiny_config):
    tiny_config.text_config.output_hidden_states = True
    tiny_config.text_config.output_attentions = True
    model = HFClipModel(tiny_config).eval()
    model.set_attn_implementation("eager")
    ids, mask, pixels = _inputs(tiny_config, batch_size=2)
    layers = tiny_config.text_config.num_hidden_layers
    with torch.no_grad():
        text = model.text_model(ids, mask)
        assert len(text.hidden_states) == layers + 1 and len(text.attentions) == layers
        text = model.text_model(ids, mask, output_hidden_states=False, output_attentions=False)
        assert text.hidden_states is None and text.attentions is None
        features = model.get_text_features(ids, mask, output_hidden_states=True)
        assert len(features.hidden_states) == layers + 1


def test_return_dict_false_gives_tuples_everywhere(tiny_config, tokenizer):
    tiny_config.return_dict = False
    tiny_config.text_config.return_dict = tiny_config.vision_config.return_dict = False
    model = HFClipModel(tiny_config).eval()
    text_model = HFClipTextModelWithProjection(tiny_config.text_config).eval()
    vision_model = HFClipVisionModelWithProjection(tiny_config.vision_config).eval()
    ids, mask, pixels = _inputs(tiny_config, batch_size=2)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, pixel_values=pixels)
        text_features = model.get_text_features(ids, mask)
        image_features = model.get_image_features(pixels)
        assert isinstance(out, tuple) and isinstance(text_features, tuple) and isinstance(image_features, tuple)
        assert isinstance(text_model(ids, mask), tuple) and isinstance(vision_model(pixels), tuple)
        as_dict = model(input_ids=ids, attention_mask=mask, pixel_values=pixels, return_dict=True)
    torch.testing.assert_close(out[0], as_dict.logits_per_image)
    torch.testing.assert_close(text_features[1], as_dict.text_model_output.pooler_output)


def test_constructors_leave_the_config_alone(tiny_config):
    tiny_config.auto_map = None
    HFClipModel(tiny_config)
    assert tiny_config.auto_map is None


def test_gradient_checkpointing_gives_the_same_gradients(tiny_config):
    torch.manual_seed(0)
    model = HFClipModel(tiny_config).train()
    checkpointed = HFClipModel(tiny_config).train()
    checkpointed.load_state_dict(model.state_dict())
    checkpointed.activation_checkpointing_enable()
    assert all(layer.gradient_checkpointing for layer in checkpointed.text_model.encoder.layers)
    ids, mask, pixels = _inputs(tiny_config)
    model(input_ids=ids, attention_mask=mask, pixel_values=pixels, return_loss=True).loss.backward()
    checkpointed(input_ids=ids, attention_mask=mask, pixel_values=pixels, return_loss=True).loss.backward()
    reference = dict(model.named_parameters())
    for name, parameter in checkpointed.named_parameters():
        torch.testing.assert_close(parameter.grad, reference[name].grad, atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("activation", ["quick_gelu", "gelu"])
def test_activations(tiny_config, activation):
    tiny_config.text_config.hidden_act = tiny_config.vision_config.hidden_act = activation
    model = HFClipModel(tiny_config).eval()
    ids, mask, pixels = _inputs(tiny_config, batch_size=2)
    reference = CLIPModel(clip_config_from_hf_clip_config(tiny_config)).eval()
    reference.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(
            model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits_per_image,
            reference(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits_per_image,
            atol=ATOL, rtol=0,
        )


def test_weight_init_follows_openai_clip_scheme():
    config = HFClipConfig.from_preset(
        "tiny", text_config={"hidden_size": 512, "num_hidden_layers": 6, "num_attention_heads": 8,
                             "intermediate_size": 2048, "vocab_size": 4096, "eos_token_id": 4095,
                             "bos_token_id": 4094, "pad_token_id": 4095},
    )
    torch.manual_seed(0)
    model = HFClipModel(config)
    text = model.text_model
    width, layers = 512, 6
    attn_std, proj_std, fc_std = width**-0.5, width**-0.5 * (2 * layers) ** -0.5, (2 * width) ** -0.5
    layer = text.encoder.layers[0]
    expected = {
        "token_embedding": (text.embeddings.token_embedding.weight, 0.02),
        "text position": (text.embeddings.position_embedding.weight, 0.01),
        "q_proj": (layer.self_attn.q_proj.weight, attn_std),
        "out_proj": (layer.self_attn.out_proj.weight, proj_std),
        "fc1": (layer.mlp.fc1.weight, fc_std),
        "fc2": (layer.mlp.fc2.weight, proj_std),
        "text_projection": (model.text_projection.weight, width**-0.5),
        "class_embedding": (model.vision_model.embeddings.class_embedding, 256**-0.5),
    }
    for name, (tensor, std) in expected.items():
        assert tensor.float().std().item() == pytest.approx(std, rel=0.15), name
    assert torch.all(layer.self_attn.q_proj.bias == 0) and torch.all(layer.layer_norm1.weight == 1)
    assert model.logit_scale.item() == pytest.approx(math.log(1 / 0.07))


def test_save_writes_safetensors_only_and_auto_model_loads(tmp_path, tiny_config):
    model = HFClipModel(tiny_config).eval()
    model.save_pretrained(tmp_path)
    files = set(os.listdir(tmp_path))
    assert "model.safetensors" in files and not any(f.endswith((".bin", ".pt", ".pth")) for f in files)
    loaded = AutoModel.from_pretrained(tmp_path).eval()
    assert type(loaded) is HFClipModel
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name


def test_loading_never_unpickles(tmp_path, tiny_config):
    HFClipModel(tiny_config).config.save_pretrained(tmp_path)
    marker = tmp_path / "UNPICKLED"
    write_pickle_bomb(tmp_path / "pytorch_model.bin", marker)
    with pytest.raises(OSError, match="model.safetensors"):
        HFClipModel.from_pretrained(tmp_path)
    with pytest.raises(OSError):
        AutoModel.from_pretrained(tmp_path)
    assert not marker.exists()


def test_folder_with_only_pytorch_model_bin_names_the_file_and_the_opt_in(tmp_path, tiny_config):
    model = HFClipModel(tiny_config)
    model.config.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(OSError, match=r"only pytorch_model.bin .*arbitrary code.*use_safetensors=False"):
        HFClipModel.from_pretrained(tmp_path)
    loaded = HFClipModel.from_pretrained(tmp_path, use_safetensors=False)
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name


def test_truncated_checkpoint_names_the_problem(tmp_path, tiny_config):
    HFClipModel(tiny_config).save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    with open(weights, "r+b") as handle:
        handle.truncate(weights.stat().st_size // 2)
    with pytest.raises(OSError, match=r"model.safetensors has \d+ bytes, \d+ were saved \(truncated\?\)"):
        HFClipModel.from_pretrained(tmp_path)  # the manifest every save writes
    (tmp_path / "hf_clip_manifest.json").unlink()  # as a folder saved by another tool
    with pytest.raises(OSError, match="truncated or corrupt"):
        HFClipModel.from_pretrained(tmp_path)


def test_mismatched_config_names_the_tensor(tmp_path, tiny_config, caplog):
    HFClipModel(tiny_config).save_pretrained(tmp_path)
    other = HFClipConfig.from_dict(tiny_config.to_dict())
    other.vision_config.intermediate_size = 64
    transformers_logging.enable_propagation()
    try:
        with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
            HFClipModel.from_pretrained(tmp_path, config=other)
    finally:
        transformers_logging.disable_propagation()
    report = caplog.text  # Transformers' load report, logged just before it raises
    assert "mlp.fc1.weight" in report and "MISMATCH" in report and "torch.Size([176, 80])" in report


def test_legacy_checkpoint_with_position_ids_loads_silently(clip_reference, caplog):
    _, path = clip_reference
    weights = load_file(path / "model.safetensors")
    weights["text_model.embeddings.position_ids"] = torch.arange(19)[None]
    weights["vision_model.embeddings.position_ids"] = torch.arange(10)[None]
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    transformers_logging.enable_propagation()
    try:
        model = HFClipModel.from_pretrained(path)
    finally:
        transformers_logging.disable_propagation()
    assert "UNEXPECTED" not in caplog.text and "MISSING" not in caplog.text
    assert torch.equal(model.logit_scale, torch.tensor(3.3))


def _logits_by_implementation(path, config, implementations) -> dict[str, torch.Tensor]:
    """{attention implementation: logits_per_image} of the checkpoint at `path` on the same eval inputs."""
    ids, mask, pixels = _inputs(config)
    outputs = {}
    for implementation in implementations:
        model = HFClipModel.from_pretrained(path, attn_implementation=implementation).eval()
        with torch.no_grad():
            outputs[implementation] = model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits_per_image
    return outputs


@pytest.mark.slow  # an inductor compile of flex attention
def test_flex_attention_matches_sdpa(clip_reference, tiny_config):
    _, path = clip_reference
    outputs = _logits_by_implementation(path, tiny_config, ("sdpa", "flex_attention"))
    torch.testing.assert_close(outputs["flex_attention"], outputs["sdpa"], atol=ATOL, rtol=0)


def test_attention_backend_registry_dispatches_to_a_registered_function(clip_reference, tiny_config):
    """`_supports_attention_backend`: an implementation registered with `AttentionInterface` is what runs."""
    _, path = clip_reference
    calls = []

    def recording_sdpa(module, query, key, value, attention_mask, **kwargs):
        calls.append(type(module).__name__)
        return ALL_ATTENTION_FUNCTIONS["sdpa"](module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("hf_clip_recording_sdpa", recording_sdpa)
    AttentionMaskInterface.register("hf_clip_recording_sdpa", ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    outputs = _logits_by_implementation(path, tiny_config, ("sdpa", "hf_clip_recording_sdpa"))
    layers = tiny_config.text_config.num_hidden_layers + tiny_config.vision_config.num_hidden_layers
    assert calls == ["HFClipAttention"] * layers
    torch.testing.assert_close(outputs["hf_clip_recording_sdpa"], outputs["sdpa"], atol=0, rtol=0)


@pytest.mark.skipif(
    not torch.cuda.is_available() or importlib.util.find_spec("flash_attn") is None,
    reason="`_supports_flash_attn` needs a CUDA GPU and the flash-attn package; unverified on CPU-only machines.",
)
def test_flash_attention_matches_sdpa_on_gpu(clip_reference, tiny_config):
    _, path = clip_reference
    ids, mask, pixels = (tensor.cuda() for tensor in _inputs(tiny_config))
    outputs = {}
    for implementation in ("sdpa", "flash_attention_2"):
        model = HFClipModel.from_pretrained(path, attn_implementation=implementation, dtype=torch.bfloat16)
        with torch.no_grad():
            outputs[implementation] = model.cuda().eval()(
                input_ids=ids, attention_mask=mask, pixel_values=pixels.bfloat16()
            ).logits_per_image.float()
    torch.testing.assert_close(outputs["flash_attention_2"], outputs["sdpa"], atol=3e-2, rtol=3e-2)


def test_text_padded_past_the_context_names_max_length_not_truncation(tokenizer, tiny_config):
    """Transformers' run_clip.py pads every caption to --max_seq_length 128 with truncation=True: the texts fit, the
    padding does not, so the fix is a smaller max_length, not truncation."""
    model = HFClipModel(tiny_config).eval()
    context = tiny_config.text_config.max_position_embeddings
    inputs = tokenizer(["a red circle", "a big blue square on the left"], padding="max_length", max_length=128,
                       truncation=True, return_tensors="pt")
    with pytest.raises(ValueError) as raised:
        model.get_text_features(**inputs)
    message = str(raised.value)
    assert f"input_ids have 128 positions, more than the model's context of {context} tokens" in message
    assert "The longest text holds only 9 tokens" in message
    assert f"max_length={context}" in message and f"--max_seq_length {context}" in message
    assert "truncation=True" in message  # part of the processor call it shows, with max_length


def test_text_longer_than_the_context_names_truncation(tokenizer, tiny_config):
    model = HFClipModel(tiny_config).eval()
    context = tiny_config.text_config.max_position_embeddings
    inputs = tokenizer(["red " * 40], return_tensors="pt")
    for call in (lambda: model.get_text_features(**inputs), lambda: model.get_text_features(inputs["input_ids"])):
        with pytest.raises(ValueError) as raised:
            call()
        assert str(raised.value).startswith(
            f"input_ids have 42 positions, more than the model's context of {context} tokens "
            f"(`max_position_embeddings`). Tokenize with truncation=True and max_length={context}")
