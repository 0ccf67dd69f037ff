"""Symmetric contrastive (InfoNCE) loss of CLIP, correct under data parallelism.

Single process: logits = scale · image_embeds · text_embedsᵀ (N×N), row i's positive is column i, and the loss is
the mean of the image→text and text→image cross-entropies.

Data parallel (`torch.distributed` initialised, world size W > 1): every rank all-gathers both modalities *with*
gradients and scores its n local rows against the N = W·n global columns, with labels offset by rank·n (open_clip's
"local loss"). The gather's backward sums the gradients that every rank's loss sends to a rank's features, so after
DDP's gradient all-reduce (a mean over W) the parameter gradients equal those of the single-process loss on the
concatenated global batch, and the mean of the per-rank losses equals that loss.
"""

import torch
import torch.distributed as dist
import torch.nn.functional as F


def _distributed_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _AllGatherWithGradient(torch.autograd.Function):
    """(n, d) per rank -> (W·n, d) on every rank. Backward sums, over ranks, the gradient each rank's loss sends to
    a slice and returns this rank's slice. (torch.distributed.nn.functional.all_gather does the same but is
    deprecated in torch 2.14 in favour of a private module.)"""

    @staticmethod
    def forward(ctx, features: torch.Tensor) -> torch.Tensor:
        ctx.rank, ctx.batch_size = dist.get_rank(), features.shape[0]
        gathered = [torch.empty_like(features) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, features.contiguous())
        return torch.cat(gathered, dim=0)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> torch.Tensor:
        grad_output = grad_output.contiguous()
        dist.all_reduce(grad_output, op=dist.ReduceOp.SUM)
        return grad_output[ctx.rank * ctx.batch_size : (ctx.rank + 1) * ctx.batch_size]


def gather_features(features: torch.Tensor) -> torch.Tensor:
    """All-gather `features` (n, d) from every rank into (W·n, d), keeping gradients to each rank's slice.

    All ranks must call this with the same n (training keeps batches full).
    """
    _, world_size = _distributed_world()
    if world_size == 1:
        return features
    return _AllGatherWithGradient.apply(features)


def contrastive_loss(
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    logit_scale: torch.Tensor,
    *,
    label_smoothing: float = 0.0,
    gather_distributed: bool = True,
) -> torch.Tensor:
    """CLIP's symmetric cross-entropy over the image-text similarity matrix.

    Args:
        image_embeds: (n, d) L2-normalised image embeddings of this rank's batch.
        text_embeds: (n, d) L2-normalised text embeddings; row i is the caption of image i.
        logit_scale: scalar temperature multiplier, already exponentiated (and clamped) by the caller.
        label_smoothing: passed to `F.cross_entropy`.
        gather_distributed: score against the global batch when `torch.distributed` is initialised.
    Returns:
        Scalar loss: the mean over this rank's rows of (CE(image→text) + CE(text→image)) / 2.
    """
    if image_embeds.shape != text_embeds.shape:
        raise ValueError(
            "contrastive_loss needs one caption per image: got image embeddings of shape "
            f"{tuple(image_embeds.shape)} and text embeddings of shape {tuple(text_embeds.shape)}."
        )
    rank, world_size = _distributed_world() if gather_distributed else (0, 1)
    local_batch_size = image_embeds.shape[0]
    if world_size > 1:
        all_image_embeds = gather_features(image_embeds)
        all_text_embeds = gather_features(text_embeds)
    else:
        all_image_embeds, all_text_embeds = image_embeds, text_embeds

    # Logits up to 100 need fp32: in bf16 a logit near 100 is only resolved to ±0.25.
    with torch.autocast(device_type=image_embeds.device.type, enabled=False):
        scale = logit_scale.float()
        logits_per_image = scale * image_embeds.float() @ all_text_embeds.float().T  # (n, N)
        logits_per_text = scale * text_embeds.float() @ all_image_embeds.float().T  # (n, N)
        labels = torch.arange(local_batch_size, device=image_embeds.device) + rank * local_batch_size
        image_loss = F.cross_entropy(logits_per_image, labels, label_smoothing=label_smoothing)
        text_loss = F.cross_entropy(logits_per_text, labels, label_smoothing=label_smoothing)
    return (image_loss + text_loss) / 2


__all__ = ["contrastive_loss", "gather_features"]
