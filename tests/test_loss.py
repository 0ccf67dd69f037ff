import pytest
import torch
import torch.nn.functional as F
from conftest import assert_two_ranks_match_one_process, run_two_ranks, text_batch

from hf_clip import HFClipConfig, HFClipModel, contrastive_loss, image_text_loss, sigmoid_loss
from hf_clip.loss import resolve_chunk_size


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


def naive_sigmoid_loss(image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor,
                       bias: torch.Tensor) -> torch.Tensor:
    """SigLIP's loss as the paper writes it, in float64: -Σ_ij log σ(y_ij (t x_i·y_j + b)) / n, y = 2·I - 1."""
    labels = 2 * torch.eye(image.shape[0], dtype=torch.float64) - 1
    return -torch.log(torch.sigmoid(labels * (scale * image @ text.T + bias))).sum() / image.shape[0]


def assert_relative(got: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-5, what: str = "") -> None:
    """max |got - expected| <= rtol · max |expected| (the max-norm relative error)."""
    error = (got.double() - expected.double()).abs().max().item()
    bound = rtol * expected.double().abs().max().item()
    assert error <= bound, f"{what}: max error {error:.3g} > {rtol:g} x max |expected| = {bound:.3g}"


def _leaves(*tensors: torch.Tensor) -> list[torch.Tensor]:
    return [t.detach().clone().requires_grad_() for t in tensors]


def _loss_and_grads(loss_fn, *inputs: torch.Tensor) -> list[torch.Tensor]:
    leaves = _leaves(*inputs)
    loss = loss_fn(*leaves)
    loss.backward()
    return [loss.detach(), *(leaf.grad for leaf in leaves)]


def _unit_rows(n: int, dim: int, seed: int, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    image, text = torch.randn(2, n, dim, generator=generator)
    text = text + 0.3 * image  # matched pairs somewhat similar: at scale 100 the rows are confident, not saturated
    return F.normalize(image, dim=-1).to(dtype), F.normalize(text, dim=-1).to(dtype)


@pytest.mark.parametrize("n, chunk_size, smoothing", [(37, 5, 0.0), (37, 8, 0.1), (64, 64, 0.2), (3, 1, 0.1)])
def test_chunked_infonce_equals_dense_at_scale_100(n, chunk_size, smoothing):
    image, text = _unit_rows(n, 24, seed=n)
    scale = torch.tensor(100.0)
    def loss(chunk):
        return lambda i, t, s: contrastive_loss(i, t, s, label_smoothing=smoothing, chunk_size=chunk)
    dense = _loss_and_grads(loss(0), image, text, scale)
    chunked = _loss_and_grads(loss(chunk_size), image, text, scale)
    for what, got, expected in zip(("loss", "image grad", "text grad", "scale grad"), chunked, dense, strict=True):
        assert_relative(got, expected, 1e-5, what)
    image64, text64 = image.double(), text.double()
    naive = naive_clip_loss(image64, text64, 100.0) if not smoothing else None
    if naive is not None:
        assert_relative(chunked[0], naive, 1e-5, "loss vs float64 textbook loss")


def test_chunked_infonce_with_bf16_inputs_accumulates_in_fp32():
    """bf16 embeddings: chunked and dense agree in fp32, and both equal the float64 loss of the same bf16 values to
    1e-5, which a bf16 accumulation (8 mantissa bits) could not reach. Gradients come back in bf16."""
    image, text = _unit_rows(48, 32, seed=1, dtype=torch.bfloat16)
    scale = torch.tensor(100.0)
    dense = _loss_and_grads(lambda i, t, s: contrastive_loss(i, t, s, chunk_size=0), image, text, scale)
    chunked = _loss_and_grads(lambda i, t, s: contrastive_loss(i, t, s, chunk_size=7), image, text, scale)
    assert chunked[0].dtype == torch.float32 and chunked[1].dtype == torch.bfloat16
    assert_relative(chunked[0], dense[0], 1e-5, "loss")
    logits = 100.0 * image.double() @ text.double().T
    labels = torch.arange(len(logits))
    float64_loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    assert_relative(chunked[0], float64_loss, 1e-5, "loss vs float64")
    for what, got, expected in zip(("image grad", "text grad"), chunked[1:3], dense[1:3], strict=True):
        assert_relative(got, expected, 2**-8, what)  # the same fp32 gradient, rounded to bf16 (one ulp at most)
    assert_relative(chunked[3], dense[3], 1e-5, "scale grad")


@pytest.mark.parametrize("n, chunk_size, scale, bias", [(37, 5, 10.0, -10.0), (16, 16, 100.0, 3.0), (9, 4, 1.0, 0.0)])
def test_sigmoid_loss_matches_paper_formula(n, chunk_size, scale, bias):
    image, text = _unit_rows(n, 24, seed=n)
    inputs = (image.double(), text.double(), torch.tensor(scale, dtype=torch.float64),
              torch.tensor(bias, dtype=torch.float64))
    naive = _loss_and_grads(naive_sigmoid_loss, *inputs)
    for chunk in (0, chunk_size):
        got = _loss_and_grads(lambda i, t, s, b: sigmoid_loss(i, t, s, b, chunk_size=chunk),
                              image, text, torch.tensor(scale), torch.tensor(bias))
        for what, value, expected in zip(("loss", "image grad", "text grad", "scale grad", "bias grad"), got, naive,
                                         strict=True):
            assert_relative(value, expected, 1e-5, f"chunk_size={chunk}: {what}")


def test_chunk_size_choice():
    assert resolve_chunk_size(None, 4096, 4096) is None
    assert resolve_chunk_size(None, 16384, 16384) == 512
    assert resolve_chunk_size(None, 8192, 65536) == 128
    assert resolve_chunk_size(None, 2**20, 2**20) == 32
    assert resolve_chunk_size(0, 10**6, 10**6) is None
    assert resolve_chunk_size(7, 8, 8) == 7
    with pytest.raises(ValueError, match="chunk_size must be None"):
        resolve_chunk_size(-1, 8, 8)
    with pytest.raises(ValueError, match="chunk_size must be None"):
        contrastive_loss(torch.randn(4, 8), torch.randn(4, 8), torch.tensor(1.0), chunk_size=2.5)


@pytest.mark.parametrize("loss_type", ["clip", "siglip"])
def test_input_errors_name_the_problem(loss_type):
    def loss(image, text, scale=torch.tensor(10.0), bias=torch.tensor(-10.0)):
        return image_text_loss(image, text, scale, bias, loss_type=loss_type)
    with pytest.raises(ValueError, match="one caption per image.*\\(1, 8\\).*\\(3, 8\\)"):
        loss(torch.randn(1, 8), torch.randn(3, 8))
    with pytest.raises(ValueError, match="one caption per image"):
        loss(torch.randn(4, 8), torch.randn(4, 6))
    with pytest.raises(ValueError, match="the batch is empty"):
        loss(torch.randn(0, 8), torch.randn(0, 8))
    with pytest.raises(ValueError, match="`image_embeds` must be a 2-d float tensor"):
        loss(torch.randn(8), torch.randn(8))
    with pytest.raises(TypeError, match="`logit_scale` must be a one-element tensor.*got 10.0"):
        loss(torch.randn(4, 8), torch.randn(4, 8), scale=10.0)
    with pytest.raises(TypeError, match="`logit_scale` must be a one-element tensor.*shape \\(4,\\)"):
        loss(torch.randn(4, 8), torch.randn(4, 8), scale=torch.ones(4))


def test_sigmoid_loss_settings_errors():
    image, text, scale = torch.randn(4, 8), torch.randn(4, 8), torch.tensor(10.0)
    with pytest.raises(ValueError, match="needs `logit_bias`"):
        image_text_loss(image, text, scale, None, loss_type="siglip")
    with pytest.raises(ValueError, match="label_smoothing applies to loss_type='clip' only"):
        image_text_loss(image, text, scale, torch.tensor(-10.0), loss_type="siglip", label_smoothing=0.1)
    with pytest.raises(TypeError, match="`logit_bias` must be a one-element tensor.*got -10") as raised:
        sigmoid_loss(image, text, scale, -10)
    assert "logit_scale" not in str(raised.value)  # the logit scale's fix does not apply to the bias
    assert "`model.logit_bias`" in str(raised.value) and "torch.tensor(-10.0)" in str(raised.value)
    with pytest.raises(ValueError, match="loss_type must be one of \\('clip', 'siglip'\\), got 'softmax'"):
        image_text_loss(image, text, scale, loss_type="softmax")


def test_rejects_mismatched_batches():
    with pytest.raises(ValueError, match="one caption per image"):
        contrastive_loss(torch.randn(1, 8), torch.randn(3, 8), torch.tensor(1.0))


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
    result = run_two_ranks("ddp_contrastive_step", tmp_path, model, batch, extra_files={"features": features})

    assert_two_ranks_match_one_process(result, model, batch)

    image = features["image"].clone().requires_grad_()
    single = contrastive_loss(image, features["text"], features["scale"], label_smoothing=0.1)
    single.backward()
    torch.testing.assert_close(result["feature_loss"], single.detach(), atol=1e-5, rtol=0)
    torch.testing.assert_close(result["image_grad"], image.grad, atol=1e-6, rtol=1e-5)


def _siglip_config(tiny_config):
    return HFClipConfig.from_dict({**tiny_config.to_dict(), "loss_type": "siglip", "loss_chunk_size": 3,
                                   "label_smoothing": 0.0})


@pytest.mark.slow
def test_two_process_losses_match_one_process_on_the_concatenated_batch(tmp_path, tiny_config):
    """2 gloo ranks × 8 rows against 1 process × 16 rows, for the InfoNCE and sigmoid losses, dense and chunked:
    the mean of the ranks' losses and the gradients of every feature, of the scale and of the bias equal the
    single-process ones to 1e-5 relative. Then a SigLIP HFClipModel (chunked loss) under real DDP: loss and every
    parameter gradient, logit_bias included."""
    workers = __import__("distributed_workers")
    global_batch = 16
    image, text = _unit_rows(global_batch, 16, seed=5)
    features = {"image": image, "text": text, "scale": torch.tensor(100.0), "bias": torch.tensor(-4.0)}
    config = _siglip_config(tiny_config)
    torch.manual_seed(0)
    model = HFClipModel(config).train()
    ids, mask = text_batch(config, global_batch, config.text_config.max_position_embeddings)
    batch = {"input_ids": ids, "attention_mask": mask, "pixel_values": torch.randn(global_batch, 3, 36, 36)}
    result = run_two_ranks("loss_variants_step", tmp_path, model, batch, extra_files={"features": features},
                           result_file="variants_result.safetensors")

    for name, settings in workers.LOSS_VARIANTS.items():
        single = _loss_and_grads(lambda i, t, s, b: image_text_loss(i, t, s, b, **settings),
                                 features["image"], features["text"], features["scale"], features["bias"])
        if settings["loss_type"] == "clip":
            single[4] = torch.zeros(())
        for what, expected in zip(("loss", "image_grad", "text_grad", "scale_grad", "bias_grad"), single, strict=True):
            assert_relative(result[f"{name}.{what}"], expected, 1e-5, f"{name} {what}")

    loss = model(**batch, return_loss=True).loss
    loss.backward()
    assert_relative(result["model.loss"], loss.detach(), 1e-5, "model loss")
    assert model.logit_bias.grad.abs() > 0
    for name, parameter in model.named_parameters():
        torch.testing.assert_close(result[f"model.grad.{name}"], parameter.grad, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.slow
def test_a_loss_on_one_rank_alone_needs_no_other_rank(tmp_path, tiny_config):
    """Under an initialised 2-process group, only rank 0 asks the model for its loss (no opt-in to the gather):
    it finishes, and equals the loss of a process with no group on the same batch."""
    torch.manual_seed(0)
    model = HFClipModel(tiny_config).eval()
    ids, mask = text_batch(tiny_config, 6, tiny_config.text_config.max_position_embeddings)
    batch = {"input_ids": ids, "attention_mask": mask, "pixel_values": torch.randn(6, 3, 36, 36)}
    result = run_two_ranks("rank_zero_loss_alone", tmp_path, model, batch, result_file="rank0_result.safetensors")
    with torch.no_grad():
        expected = model(**batch, return_loss=True).loss
    torch.testing.assert_close(result["loss"], expected)
