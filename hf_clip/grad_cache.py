"""GradCache (Gao et al., 2021): the exact gradient of a contrastive loss over a batch whose activations do not fit.

The loss of a batch of N pairs couples every image with every caption, so plain gradient accumulation over
micro-batches changes the loss: each micro-batch sees only its own negatives. GradCache keeps the loss over all N
pairs while only one micro-batch's activations are alive:

1. embed each micro-batch without autograd, recording the RNG state (CPU and accelerator) before it;
2. compute the loss over all N embedding pairs, and its gradients with respect to the embeddings and to the loss's
   own parameters (the temperature, and any bias);
3. re-embed each micro-batch with autograd under its recorded RNG state, so dropout and patch dropout draw the same
   masks, and backpropagate the cached embedding gradients through it.

The parameter gradients equal those of one backward through the N-pair loss with the same random masks. Under DDP
(the model wrapped in `DistributedDataParallel`, directly or through Accelerate) the loss gathers embeddings across
ranks as `forward(return_loss=True)` does, only the last micro-batch's backward all-reduces, and the gradients
equal those of one process on the concatenated global batch.

With `transformers.Trainer`, override `training_step` to return
`grad_cache_backward(model, inputs, num_micro_batches, backward=self.accelerator.backward)`.
"""

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .modeling_hf_clip import HFClipModel

EMBEDDING_INPUTS = ("pixel_values", "input_ids", "attention_mask", "position_ids")
EMBEDDING_OPTIONS = ("padding_side",)  # passed to every micro-batch's forward as they are


@dataclass
class RandomState:
    """The CPU generator's state and, for an accelerator device, that device's generator state."""

    cpu: torch.Tensor
    device: torch.device
    accelerator: torch.Tensor | None

    @classmethod
    def capture(cls, device: torch.device) -> "RandomState":
        accelerator = None
        if device.type != "cpu":
            accelerator = torch.get_device_module(device.type).get_rng_state(device)
        return cls(torch.get_rng_state(), device, accelerator)

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.accelerator is not None:
            torch.get_device_module(self.device.type).set_rng_state(self.accelerator, self.device)


def unwrap_clip_model(model: nn.Module) -> HFClipModel:
    """The `HFClipModel` inside DDP (`.module`) or `torch.compile` (`._orig_mod`) wrappers."""
    inner = model
    while not isinstance(inner, HFClipModel):
        wrapped = next((inner._modules[name] for name in ("module", "_orig_mod") if name in inner._modules), None)
        if wrapped is None:
            raise TypeError(
                f"grad_cache_backward needs an HFClipModel (optionally wrapped), got {type(model).__name__}."
            )
        inner = wrapped
    return inner


def check_micro_batches(num_micro_batches: int, batch_size: int) -> None:
    """Raise `ValueError` unless 1 <= `num_micro_batches` <= `batch_size` (each micro-batch holds at least one pair)."""
    if isinstance(num_micro_batches, bool) or not isinstance(num_micro_batches, int) \
            or not 1 <= num_micro_batches <= batch_size:
        raise ValueError(f"num_micro_batches must be in [1, {batch_size}] (the batch size), got {num_micro_batches!r}.")


def split_micro_batches(inputs: dict[str, torch.Tensor], num_micro_batches: int) -> list[dict[str, torch.Tensor]]:
    """Split every (N, ...) tensor of `inputs` into `num_micro_batches` consecutive chunks along the batch."""
    sizes = {name: value.shape[0] for name, value in inputs.items()}
    batch_size = sizes["pixel_values"]
    if any(size != batch_size for size in sizes.values()):
        raise ValueError(f"grad_cache_backward: every input needs the same batch size, got {sizes}.")
    try:
        check_micro_batches(num_micro_batches, batch_size)
    except ValueError as error:
        raise ValueError(f"grad_cache_backward: {error}") from None
    chunks = {name: value.tensor_split(num_micro_batches) for name, value in inputs.items()}
    return [{name: chunks[name][index] for name in inputs} for index in range(num_micro_batches)]


def _no_sync_unless(last: bool, model: nn.Module) -> contextlib.AbstractContextManager:
    no_sync = getattr(model, "no_sync", None)
    return contextlib.nullcontext() if last or no_sync is None else no_sync()


def _embed(model: nn.Module, micro_batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    outputs = model(**micro_batch)
    return outputs.image_embeds, outputs.text_embeds


def grad_cache_backward(
    model: nn.Module,
    inputs: dict[str, torch.Tensor],
    num_micro_batches: int,
    *,
    backward: Callable[[torch.Tensor], None] | None = None,
    gather_distributed: bool = True,
) -> torch.Tensor:
    """Accumulate into `.grad` the gradients of the model's contrastive loss over all N pairs of `inputs`, holding
    the activations of one micro-batch of about N / `num_micro_batches` pairs at a time.

    Args:
        model: an `HFClipModel` in the mode to train in, optionally wrapped by DDP / Accelerate / `torch.compile`;
            it is called as `model(**micro_batch)` and must return `image_embeds` and `text_embeds`.
        inputs: `pixel_values` (N, C, H, W), `input_ids` (N, L) and optionally `attention_mask` / `position_ids`
            (N, L) and `padding_side`; caption i belongs to image i. Other keys (labels, `return_loss`) are ignored.
        num_micro_batches: K, the number of forward/backward passes the batch is split into.
        backward: called on each surrogate scalar instead of `Tensor.backward` (e.g. `accelerator.backward`, which
            applies loss scaling and the division by gradient accumulation steps).
        gather_distributed: under an initialised `torch.distributed` group, score against every rank's embeddings
            (a collective: all ranks call this in step, as training does). False keeps the loss to this process.
    Returns:
        The detached loss over the N pairs, as `model(**inputs, return_loss=True).loss` would give.
    """
    backward = backward or torch.Tensor.backward
    loss_model = unwrap_clip_model(model)
    micro_batches = split_micro_batches({k: v for k, v in inputs.items() if k in EMBEDDING_INPUTS and v is not None},
                                        num_micro_batches)
    options = {k: v for k, v in inputs.items() if k in EMBEDDING_OPTIONS}
    micro_batches = [{**micro_batch, **options} for micro_batch in micro_batches]
    device = inputs["pixel_values"].device
    states, image_chunks, text_chunks = [], [], []
    with torch.no_grad():
        for micro_batch in micro_batches:
            states.append(RandomState.capture(device))
            image_embeds, text_embeds = _embed(model, micro_batch)
            image_chunks.append(image_embeds)
            text_chunks.append(text_embeds)
    final_state = RandomState.capture(device)

    loss_parameters = [parameter for parameter in loss_model.parameters() if parameter.requires_grad]
    image_embeds = torch.cat(image_chunks).requires_grad_()
    text_embeds = torch.cat(text_chunks).requires_grad_()
    with torch.enable_grad():
        loss = loss_model.loss_from_embeddings(image_embeds, text_embeds, gather_distributed=gather_distributed)
    image_grad, text_grad, *parameter_grads = torch.autograd.grad(
        loss, [image_embeds, text_embeds, *loss_parameters], allow_unused=True
    )
    sizes = [chunk.shape[0] for chunk in image_chunks]
    image_grads, text_grads = image_grad.split(sizes), text_grad.split(sizes)
    loss_parameter_grads = [(p, g) for p, g in zip(loss_parameters, parameter_grads) if g is not None]

    for index, (micro_batch, state) in enumerate(zip(micro_batches, states)):
        last = index == len(micro_batches) - 1
        state.restore()
        with _no_sync_unless(last, model):
            image_embeds, text_embeds = _embed(model, micro_batch)
            surrogate = (image_embeds * image_grads[index]).sum() + (text_embeds * text_grads[index]).sum()
            if last:  # the loss's own parameters (temperature, bias) join the one backward that synchronises
                surrogate = surrogate + sum((p * g).sum() for p, g in loss_parameter_grads)
            if surrogate.requires_grad:  # False for a micro-batch of fully locked towers
                backward(surrogate)
    final_state.restore()
    return loss.detach()


__all__ = ["RandomState", "check_micro_batches", "grad_cache_backward", "split_micro_batches", "unwrap_clip_model"]
