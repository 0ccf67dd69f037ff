"""The training step reads nothing back from the device: the padding side is decided where the batch is built.

`hf_clip_train.train.train_step` (forward, loss, backward, clipping, optimiser, schedule) and `clamp_logit_scale_` run
under `host_reads.no_host_reads()`, which makes every host read of a tensor raise, every op with a data-dependent
output shape, and every tensor made from Python data. On a CPU it cannot see a copy of an existing host tensor to
the device (`.to("cpu")` does nothing); on CUDA the same step runs under `torch.cuda.set_sync_debug_mode("error")`,
which sees those too.
"""

import copy

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from conftest import make_config, text_batch
from host_reads import HostRead, no_host_reads
from PIL import Image
from transformers import get_cosine_schedule_with_warmup

from hf_clip import ContrastiveDataCollator, HFClipConfig, HFClipModel, HFClipProcessor
from hf_clip.collators import padding_side_of
from hf_clip_train.args import RunArguments
from hf_clip_train.data import ImageTransform, image_transform_for, normalize_pixels
from hf_clip_train.train import build_optimizer, model_inputs, train_step

COLORS = ["red", "green", "blue", "yellow", "white", "black", "purple", "orange"]
CAPTIONS = [f"a {color} circle" + " on the left" * (i % 3) for i, color in enumerate(COLORS)]


@pytest.fixture
def small_config(tokenizer) -> HFClipConfig:
    layer = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}
    return make_config(tokenizer, projection_dim=16, text=layer,
                       vision={**layer, "image_size": 32, "patch_size": 8, "patch_dropout": 0.5})


@pytest.fixture
def accelerator_factory():
    made = []

    def make(cpu: bool = True, mixed_precision: str = "no", **kwargs) -> Accelerator:
        """An Accelerator made as hf_clip_train.train makes it."""
        made.append(Accelerator(cpu=cpu, mixed_precision=mixed_precision, step_scheduler_with_optimizer=False,
                                **kwargs))
        return made[-1]
    yield make
    if made:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()


def _collated(tokenizer, padding_side: str = "right", size: int = 32) -> tuple[dict, ImageTransform]:
    """The real collator's batch of 8 pairs, as the trainer builds it (uint8 pixels from the training transform),
    with the tokenizer padding on `padding_side`; and the transform, whose mean and std normalise it on the device."""
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.padding_side = padding_side
    processor = HFClipProcessor.from_tokenizer(tokenizer, image_size=size)
    transform = image_transform_for(processor, train=True)
    rng = np.random.default_rng(0)
    rows = [{"pixel_values": transform(Image.new("RGB", (40, 40), color), rng), "caption": caption}
            for color, caption in zip(COLORS, CAPTIONS)]
    return ContrastiveDataCollator(processor)(rows), transform


STEP_CASES = {
    "plain": ({}, {}, "right"),
    "left padding": ({}, {}, "left"),
    "GradCache": ({"grad_cache_micro_batches": 2}, {}, "right"),
    "GradCache, left padding": ({"grad_cache_micro_batches": 2}, {}, "left"),
    "chunked loss": ({}, {"loss_chunk_size": 3}, "right"),
    "sigmoid loss, chunked": ({}, {"loss_type": "siglip", "loss_chunk_size": 3}, "right"),
    "accumulation": ({"gradient_accumulation_steps": 2}, {}, "right"),
    "non-finite updates skipped": ({"nonfinite_loss": "skip"}, {}, "right"),
    "no clipping": ({"max_grad_norm": 0.0}, {}, "right"),
}


@pytest.mark.parametrize("case", list(STEP_CASES))
def test_training_step_reads_nothing_back_from_the_device(case, small_config, tokenizer, accelerator_factory):
    """Two optimiser steps of the loop's own step function, from the first (optimiser state is created inside),
    each followed by the logit-scale clamp, with every host read made to raise; then the loss is read (as logging
    steps do) and the weights have moved."""
    run_overrides, config_overrides, side = STEP_CASES[case]
    run = RunArguments(max_steps=2, warmup_steps=1, **run_overrides)
    config = HFClipConfig.from_dict({**small_config.to_dict(), **config_overrides})
    torch.manual_seed(0)
    accelerator = accelerator_factory(gradient_accumulation_steps=run.gradient_accumulation_steps)
    model = HFClipModel(config)
    optimizer = build_optimizer(model, run)
    scheduler = get_cosine_schedule_with_warmup(optimizer, 1, run.max_steps)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    model.train()
    batch, transform = _collated(tokenizer, side)
    assert batch["padding_side"] == side and batch["pixel_values"].dtype == torch.uint8
    model_inputs(batch, accelerator.device, transform)  # the normalisation constants are made once, outside the step
    before = {name: p.detach().clone() for name, p in model.named_parameters()}

    losses = []
    with no_host_reads():
        for _ in range(run.max_steps):
            for _ in range(run.gradient_accumulation_steps):
                loss, grad_norm = train_step(accelerator, model, optimizer, scheduler,
                                             model_inputs(batch, accelerator.device, transform), run)
                losses.append(loss)
            accelerator.unwrap_model(model).clamp_logit_scale_()
    assert all(torch.isfinite(loss) for loss in losses) and grad_norm is not None and torch.isfinite(grad_norm)
    moved = [name for name, p in model.named_parameters() if not torch.equal(p, before[name])]
    assert "text_model.embeddings.token_embedding.weight" in moved and "visual_projection.weight" in moved


def test_the_guard_catches_host_reads(small_config, tokenizer):
    """The guard is not vacuous: the text tower's own host read (a plain call with a mask and no padding side), scalar
    and list reads, data-dependent shapes and tensors made from Python data all raise; integer indexing does not."""
    model = HFClipModel(small_config).eval()
    batch, transform = _collated(tokenizer)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    inputs["pixel_values"] = normalize_pixels(batch["pixel_values"], transform.mean, transform.std)
    x = torch.randn(5)
    reads = {
        "plain call": lambda: model(**inputs),
        "bool": lambda: bool(x.sum() > 0),
        "item": lambda: x.sum().item(),
        "tolist": lambda: x.tolist(),
        "int": lambda: int(x.argmax()),
        "float": lambda: float(x.max()),
        "numpy": lambda: x.numpy(),
        "nonzero": lambda: torch.nonzero(x > 0),
        "boolean index": lambda: x[x > 0],
        "torch.tensor": lambda: torch.tensor([1, 2]),
    }
    missed = []
    for name, read in reads.items():
        try:
            with no_host_reads():
                read()
        except HostRead:
            continue
        missed.append(name)
    assert not missed
    with no_host_reads():
        assert x[torch.arange(3)].shape == (3,)
        model(**inputs, padding_side="right")
    assert bool(x.sum() == x.sum())  # restored


def test_collator_decides_the_padding_side_on_the_host(tokenizer):
    (right, _), (left, _) = _collated(tokenizer, "right"), _collated(tokenizer, "left")
    assert right["padding_side"] == "right" and left["padding_side"] == "left"
    assert (right["attention_mask"][:, -1] == 0).any() and (left["attention_mask"][:, 0] == 0).any()
    assert padding_side_of(torch.ones(3, 5, dtype=torch.long)) == "right"  # unpadded: no mask needed either way
    assert padding_side_of(torch.tensor([[0, 1, 1], [1, 1, 1]])) == "left"


def test_padding_side_keeps_embeddings_and_a_wrong_claim_raises(small_config):
    """With the side handed in, right- and left-padded text embed as with the tower's own host-side decision, and so
    as each other; "right" for a left-padded mask is caught on device."""
    model = HFClipModel(small_config).eval()
    ids, mask = text_batch(small_config, 6, small_config.text_config.max_position_embeddings,
                           torch.Generator().manual_seed(0))
    shifts = (mask == 0).sum(-1)
    left_ids = torch.stack([row.roll(int(shift)) for row, shift in zip(ids, shifts)])
    left_mask = torch.stack([row.roll(int(shift)) for row, shift in zip(mask, shifts)])
    with torch.no_grad():
        decided = model.get_text_features(ids, mask).pooler_output
        right = model.get_text_features(ids, mask, padding_side="right").pooler_output
        masked = model.get_text_features(ids, mask, padding_side="left").pooler_output
        left = model.get_text_features(left_ids, left_mask, padding_side="left").pooler_output
        left_decided = model.get_text_features(left_ids, left_mask).pooler_output
        with pytest.raises(RuntimeError, match="padding_side='right'"):
            model.get_text_features(left_ids, left_mask, padding_side="right")
        with pytest.raises(ValueError, match="padding_side must be one of"):
            model.get_text_features(ids, mask, padding_side="top")
    torch.testing.assert_close(right, decided, atol=0, rtol=0)
    for other in (masked, left, left_decided):
        torch.testing.assert_close(other, decided, atol=1e-5, rtol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA only: torch.cuda.set_sync_debug_mode")
def test_training_step_on_cuda_under_sync_debug_mode_error(small_config, tokenizer, accelerator_factory):
    """On a GPU, PyTorch reports every synchronising CUDA call itself, including what the CPU guard cannot see
    (blocking copies to the device): for right- and left-padded text, with GradCache, the batch's copy and two steps
    after a warm-up step raise nothing."""
    run = RunArguments(max_steps=3, warmup_steps=1, grad_cache_micro_batches=2)
    accelerator = accelerator_factory(cpu=False, mixed_precision="bf16")
    model = HFClipModel(small_config)
    optimizer = build_optimizer(model, run)
    scheduler = get_cosine_schedule_with_warmup(optimizer, 1, run.max_steps)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    model.train()
    for side in ("right", "left"):
        batch, transform = _collated(tokenizer, side)
        for step in range(3):
            previous = torch.cuda.get_sync_debug_mode()
            torch.cuda.set_sync_debug_mode("error" if step else "default")
            try:
                inputs = model_inputs(batch, accelerator.device, transform)
                train_step(accelerator, model, optimizer, scheduler, inputs, run)
                accelerator.unwrap_model(model).clamp_logit_scale_()
            finally:
                torch.cuda.set_sync_debug_mode(previous)
