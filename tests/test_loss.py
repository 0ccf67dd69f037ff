import socket

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from conftest import text_batch
from safetensors.torch import load_file, save_file

from hf_clip import HFClipModel, contrastive_loss


def naive_clip_loss(image: torch.Tensor, text: torch.Tensor, scale: float) -> torch.Tensor:
    """Textbook InfoNCE in float64: softmax probabilities, then -log of the diagonal."""
    image = image.double() / image.double().norm(dim=-1, keepdim=True)
    text = text.double() / text.double().norm(dim=-1, keepdim=True)
    logits = scale * image @ text.T
    p_image_to_text = logits.exp() / logits.exp().sum(dim=1, keepdim=True)
    p_text_to_image = logits.T.exp() / logits.T.exp().sum(dim=1, keepdim=True)
    return -(p_image_to_text.diagonal().log().mean() + p_text_to_image.diagonal().log().mean()) / 2


@pytest.mark.parametrize("batch_size, scale", [(1, 14.3), (7, 14.3), (33, 1.0), (16, 50.0)])
def test_matches_naive_implementation(batch_size, scale):
    torch.manual_seed(batch_size)
    image, text = torch.randn(batch_size, 24), torch.randn(batch_size, 24)
    loss = contrastive_loss(F.normalize(image, dim=-1), F.normalize(text, dim=-1), torch.tensor(scale))
    torch.testing.assert_close(loss.double(), naive_clip_loss(image, text, scale), atol=1e-5, rtol=1e-5)


def test_label_smoothing_matches_formula():
    torch.manual_seed(0)
    image, text = F.normalize(torch.randn(9, 16), dim=-1), F.normalize(torch.randn(9, 16), dim=-1)
    smoothing, scale = 0.1, 20.0
    logits = scale * image.double() @ text.double().T
    def smoothed(log_probs):
        return (-(1 - smoothing) * log_probs.diagonal() - smoothing * log_probs.mean(dim=1)).mean()
    expected = (smoothed(logits.log_softmax(1)) + smoothed(logits.T.log_softmax(1))) / 2
    got = contrastive_loss(image, text, torch.tensor(scale), label_smoothing=smoothing)
    torch.testing.assert_close(got.double(), expected, atol=1e-6, rtol=1e-6)


def test_exact_and_finite_at_logit_scale_100():
    batch_size, scale = 16, torch.tensor(100.0, requires_grad=True)
    identical = torch.ones(batch_size, 32) / 32**0.5
    loss = contrastive_loss(identical.clone().requires_grad_(), identical.clone(), scale)
    assert loss.item() == pytest.approx(torch.log(torch.tensor(batch_size * 1.0)).item(), abs=1e-5)
    orthogonal = torch.eye(batch_size, 32).requires_grad_()
    loss = contrastive_loss(orthogonal, torch.eye(batch_size, 32), scale)
    assert loss.item() == pytest.approx(0.0, abs=1e-6)  # log(1 + 15 e^-100), no eps floor
    loss.backward()
    assert torch.isfinite(orthogonal.grad).all() and torch.isfinite(scale.grad)
    swapped = contrastive_loss(torch.eye(batch_size, 32), torch.eye(batch_size, 32).roll(1, dims=0), scale)
    assert swapped.item() == pytest.approx(100.0, abs=1e-3)  # a confident mistake costs exactly its margin


def test_rejects_mismatched_batches():
    with pytest.raises(ValueError, match="one caption per image"):
        contrastive_loss(torch.randn(1, 8), torch.randn(3, 8), torch.tensor(1.0))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_two_process_ddp_matches_single_process(tmp_path, tiny_config):
    """2 gloo ranks, each with half the global batch, under real DDP: loss and every parameter gradient equal the
    single-process loss and gradients on the concatenated batch."""
    tiny_config.label_smoothing = 0.1
    torch.manual_seed(0)
    model = HFClipModel(tiny_config).train()
    global_batch = 8
    ids, mask = text_batch(tiny_config, global_batch, tiny_config.text_config.max_position_embeddings)
    batch = {"input_ids": ids, "attention_mask": mask,
             "pixel_values": torch.randn(global_batch, 3, 36, 36)}
    features = {"image": F.normalize(torch.randn(global_batch, 16), dim=-1),
                "text": F.normalize(torch.randn(global_batch, 16), dim=-1), "scale": torch.tensor(30.0)}
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "weights.safetensors")
    save_file(batch, tmp_path / "batch.safetensors")
    save_file(features, tmp_path / "features.safetensors")
    tiny_config.to_json_file(tmp_path / "config.json")

    mp.spawn(
        __import__("distributed_workers").ddp_contrastive_step,
        args=(2, _free_port(), str(tmp_path), str(tmp_path / "config.json")),
        nprocs=2,
        join=True,
    )
    result = load_file(tmp_path / "ddp_result.safetensors")

    loss = model(**batch, return_loss=True).loss
    loss.backward()
    torch.testing.assert_close(result["loss"], loss.detach(), atol=1e-5, rtol=0)
    for name, parameter in model.named_parameters():
        torch.testing.assert_close(result[f"grad.{name}"], parameter.grad, atol=1e-5, rtol=1e-4, msg=name)

    image = features["image"].clone().requires_grad_()
    single = contrastive_loss(image, features["text"], features["scale"], label_smoothing=0.1)
    single.backward()
    torch.testing.assert_close(result["feature_loss"], single.detach(), atol=1e-5, rtol=0)
    torch.testing.assert_close(result["image_grad"], image.grad, atol=1e-6, rtol=1e-5)
