import pytest
import torch
from conftest import run_two_ranks, text_batch

from hf_clip import HFClipConfig, HFClipModel, grad_cache_backward
from hf_clip.grad_cache import split_micro_batches

MICRO_BATCHES, MICRO_BATCH_SIZE = 3, 4


def _model(tiny_config, attention_dropout=0.0, patch_dropout=0.0):
    config = HFClipConfig.from_dict(tiny_config.to_dict())
    config.label_smoothing = 0.1
    config.text_config.attention_dropout = config.vision_config.attention_dropout = attention_dropout
    config.vision_config.patch_dropout = patch_dropout
    torch.manual_seed(0)
    model = HFClipModel(config).train()
    with torch.no_grad():
        model.logit_scale.fill_(2.9)  # not the init value, so its gradient is not a special case
    return model


def _batch(config, batch_size, seed=0):
    generator = torch.Generator().manual_seed(seed)
    ids, mask = text_batch(config, batch_size, config.text_config.max_position_embeddings, generator)
    size = config.vision_config.image_size
    return {"input_ids": ids, "attention_mask": mask,
            "pixel_values": torch.randn(batch_size, 3, size, size, generator=generator)}


def _grads(model):
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return grads


def _assert_grads_close(got, expected):
    for name, grad in expected.items():
        torch.testing.assert_close(got[name], grad, atol=1e-5, rtol=1e-4, msg=name)


def _reference_with_same_masks(model, batch, seed):
    """The N-pair loss built from the same micro-batch forwards (so dropout draws the same masks), all activations
    kept alive and one backward through everything."""
    torch.manual_seed(seed)
    outputs = [model(**micro) for micro in split_micro_batches(batch, MICRO_BATCHES)]
    loss = model.loss_from_embeddings(torch.cat([o.image_embeds for o in outputs]),
                                      torch.cat([o.text_embeds for o in outputs]))
    loss.backward()
    return loss.detach()


def test_equals_one_full_batch_without_dropout(tiny_config):
    model = _model(tiny_config)
    batch = _batch(model.config, MICRO_BATCHES * MICRO_BATCH_SIZE)
    full_loss = model(**batch, return_loss=True).loss
    full_loss.backward()
    expected = _grads(model)

    loss = grad_cache_backward(model, batch, MICRO_BATCHES)
    torch.testing.assert_close(loss, full_loss.detach(), atol=1e-6, rtol=1e-6)
    got = _grads(model)
    assert got["logit_scale"].abs() > 0
    _assert_grads_close(got, expected)


def test_equals_one_full_batch_with_dropout_and_patch_dropout(tiny_config):
    """With attention dropout and patch dropout on, the re-forward restores each micro-batch's RNG state, so the
    gradients equal those of one backward through the N-pair loss with the same random masks."""
    model = _model(tiny_config, attention_dropout=0.2, patch_dropout=0.5)
    batch = _batch(model.config, MICRO_BATCHES * MICRO_BATCH_SIZE)
    reference_loss = _reference_with_same_masks(model, batch, seed=11)
    expected = _grads(model)

    torch.manual_seed(11)
    loss = grad_cache_backward(model, batch, MICRO_BATCHES)
    after_grad_cache = torch.rand(1)
    torch.testing.assert_close(loss, reference_loss, atol=1e-6, rtol=1e-6)
    _assert_grads_close(_grads(model), expected)

    # The generator ends where the plain forwards leave it, and other masks give other gradients (so the equality
    # above rests on the restored RNG state).
    _reference_with_same_masks(model, batch, seed=11)
    assert torch.equal(torch.rand(1), after_grad_cache)
    model.zero_grad(set_to_none=True)
    _reference_with_same_masks(model, batch, seed=12)
    other = _grads(model)
    assert not torch.allclose(other["vision_model.encoder.layers.0.mlp.fc1.weight"],
                              expected["vision_model.encoder.layers.0.mlp.fc1.weight"], atol=1e-5)


def test_accumulates_and_uses_the_given_backward(tiny_config):
    model = _model(tiny_config)
    batch = _batch(model.config, 8)
    model(**batch, return_loss=True).loss.backward()
    expected = {name: 3 * grad for name, grad in _grads(model).items()}
    grad_cache_backward(model, batch, 2)
    grad_cache_backward(model, batch, 4, backward=lambda surrogate: (2 * surrogate).backward())
    _assert_grads_close(_grads(model), expected)


@pytest.mark.parametrize("locked", ["image", "both"])
def test_locked_towers(tiny_config, locked):
    model = _model(tiny_config)
    model.lock_image_tower()
    if locked == "both":
        model.lock_text_tower()
    batch = _batch(model.config, 6)
    model(**batch, return_loss=True).loss.backward()
    expected = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    grad_cache_backward(model, batch, 3)
    got = {name: p.grad for name, p in model.named_parameters() if p.requires_grad}
    assert set(got) == set(expected) and ("logit_scale" in got)
    _assert_grads_close(got, expected)


def test_uneven_and_bad_micro_batch_counts(tiny_config):
    model = _model(tiny_config)
    batch = _batch(model.config, 7)
    model(**batch, return_loss=True).loss.backward()
    expected = _grads(model)
    grad_cache_backward(model, batch, 3)  # 3 + 2 + 2
    _assert_grads_close(_grads(model), expected)
    for bad in (0, 8):
        with pytest.raises(ValueError, match="num_micro_batches"):
            grad_cache_backward(model, batch, bad)
    with pytest.raises(TypeError, match="needs an HFClipModel"):
        grad_cache_backward(model.vision_model, batch, 2)


@pytest.mark.slow
def test_two_process_ddp_grad_cache_matches_single_process(tmp_path, tiny_config):
    """2 gloo ranks under real DDP, each splitting its half of the global batch into 2 micro-batches: the loss
    gathers embeddings across ranks, and the gradients equal one process's on the concatenated batch."""
    model = _model(tiny_config)
    global_batch = 16
    batch = _batch(model.config, global_batch)
    result = run_two_ranks("ddp_grad_cache_step", tmp_path, model, batch, 2)

    loss = model(**batch, return_loss=True).loss
    loss.backward()
    torch.testing.assert_close(result["loss"], loss.detach(), atol=1e-5, rtol=0)
    assert model.logit_scale.grad.abs() > 0
    for name, parameter in model.named_parameters():
        torch.testing.assert_close(result[f"grad.{name}"], parameter.grad, atol=1e-5, rtol=1e-4, msg=name)
