"""Image-text losses of CLIP (softmax InfoNCE) and SigLIP (pairwise sigmoid), exact at any batch size.

Both score n image rows against N text columns, logits = scale · image_embeds · text_embedsᵀ (+ bias for SigLIP),
with the positive of row i at column offset + i.

- InfoNCE (`contrastive_loss`): the mean over rows of (CE(image→text) + CE(text→image)) / 2. With label smoothing
  ε, a row's cross-entropy is logsumexp(z) − (1 − ε)·z_pos − ε·mean(z), so only the log-sum-exps need the matrix.
- Sigmoid (`sigmoid_loss`, Zhai et al. 2023): Σ_ij −log σ(y_ij · logits_ij) / n, y_ij = 1 for a positive pair and
  −1 otherwise.

Dense or chunked (`chunk_size`): the dense path builds the logit matrix once (InfoNCE reads its transpose for the
text direction). The chunked path computes it in panels of `chunk_size` rows × N columns inside a custom
`autograd.Function`, with an online log-sum-exp over the columns, and recomputes the panels in backward, so the
extra memory is O(N · chunk_size) instead of O(N²). Values and gradients equal the dense ones up to float rounding.
Embeddings of any float dtype are upcast: logits and sums are always fp32 (a bf16 logit near 100 is only resolved
to ±0.25). The embeddings must be L2-normalised, as `HFClipModel` returns them; their norm is not checked (that would
read a value back from the device in every step), and embeddings of norm r act as a temperature r² times larger. A
negative `logit_scale` fails on the device (`torch._assert_async`); the loss settings are checked once, by
`check_loss_settings`, which `HFClipConfig` calls too. `chunk_size=None` picks dense up to `DENSE_MAX_LOGITS`
logits, else panels of about `PANEL_LOGITS`.

Data parallel, opt-in (`gather_distributed=True` and `torch.distributed` initialised with W > 1 ranks): every rank
scores its n local rows against the N = W·n gathered columns (open_clip's "local loss"); InfoNCE gathers both
modalities, the sigmoid loss only the texts, since each image meets every text once. The gather's backward sums the
gradients every rank's loss sends to a rank's features, so after DDP's gradient mean the parameter gradients equal
those of the single-process loss on the concatenated batch, and so does the mean of the per-rank losses. All ranks
must then call the loss with the same n. Without the opt-in no collective ever runs, so one rank may call it alone.
"""

import math
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

LOSS_TYPES = ("clip", "siglip")
DENSE_MAX_LOGITS = 4096 * 4096
PANEL_LOGITS = 2**23
MIN_PANEL_ROWS = 32


def _distributed_world(gather_distributed: bool) -> tuple[int, int]:
    if gather_distributed and dist.is_available() and dist.is_initialized():
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

    A collective: every rank must call it, with the same n. Without an initialised process group it returns
    `features` unchanged.
    """
    _, world_size = _distributed_world(True)
    if world_size == 1:
        return features
    return _AllGatherWithGradient.apply(features)


def check_loss_settings(loss_type: str = "clip", label_smoothing: float = 0.0, chunk_size: int | None = None) -> None:
    """Raise `ValueError` naming the first invalid loss setting: `loss_type` one of `LOSS_TYPES`; `label_smoothing`
    in [0, 1), and 0 unless `loss_type` is "clip"; `chunk_size` None (automatic), 0 (dense) or a positive int.
    The losses check their arguments with this, and `HFClipConfig` its loss fields."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}.")
    if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, (int, float)) \
            or not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be a number in [0, 1), got {label_smoothing!r}.")
    if label_smoothing and loss_type != "clip":
        raise ValueError(f"label_smoothing applies to loss_type='clip' only (the sigmoid loss has no softmax), got "
                         f"{label_smoothing} with loss_type={loss_type!r}.")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 0):
        raise ValueError("chunk_size must be None (automatic), 0 (dense) or a positive number of rows "
                         f"(HFClipConfig.loss_chunk_size), got {chunk_size!r}.")


def resolve_chunk_size(chunk_size: int | None, rows: int, columns: int) -> int | None:
    """Rows per panel for a `rows` × `columns` logit matrix, or None for the dense path.

    `chunk_size`: None picks dense up to `DENSE_MAX_LOGITS` logits, else panels of
    about `PANEL_LOGITS` logits (at least `MIN_PANEL_ROWS` rows); 0 forces dense; k > 0 forces panels of k rows.
    """
    check_loss_settings(chunk_size=chunk_size)
    if chunk_size is None:
        if rows * columns <= DENSE_MAX_LOGITS:
            return None
        return max(MIN_PANEL_ROWS, PANEL_LOGITS // columns)
    return chunk_size or None


class _DenseLogSumExp(torch.autograd.Function):
    """Row and column log-sum-exps of one logit matrix (n, N) -> (n,), (N,). Keeps only the matrix for backward,
    which builds the gradient of both directions in one n×N buffer."""

    @staticmethod
    def forward(ctx, logits):
        row_max, col_max = logits.amax(dim=1, keepdim=True), logits.amax(dim=0, keepdim=True)
        buffer = torch.sub(logits, row_max).exp_()
        row_lse = buffer.sum(dim=1).log_().add_(row_max[:, 0])
        col_lse = torch.sub(logits, col_max, out=buffer).exp_().sum(dim=0).log_().add_(col_max[0])
        ctx.save_for_backward(logits, row_lse, col_lse)
        return row_lse, col_lse

    @staticmethod
    def backward(ctx, grad_row_lse, grad_col_lse):
        logits, row_lse, col_lse = ctx.saved_tensors
        grad = torch.zeros_like(logits)
        if grad_row_lse is not None:
            grad.add_(torch.sub(logits, row_lse[:, None]).exp_().mul_(grad_row_lse[:, None]))
        if grad_col_lse is not None:
            grad.add_(torch.sub(logits, col_lse[None, :]).exp_().mul_(grad_col_lse[None, :]))
        return grad


class _ChunkedLogSumExp(torch.autograd.Function):
    """Row (and optionally column) log-sum-exps of logits = scale · rows @ colsᵀ in (chunk, N) panels, recomputed in
    backward: O(chunk · N) extra memory. rows (n, d), cols (N, d) and scale () in fp32 -> row_lse (n,), col_lse (N,)
    (empty when `with_columns` is False). Column lses are accumulated online: a running max and a rescaled sum."""

    @staticmethod
    def forward(ctx, rows, cols, scale, chunk_size: int, with_columns: bool):
        scaled_rows = rows * scale
        row_lse = rows.new_empty(rows.shape[0])
        col_max = cols.new_full((cols.shape[0] if with_columns else 0,), -math.inf)
        col_sum = torch.zeros_like(col_max)
        for start in range(0, rows.shape[0], chunk_size):
            logits = torch.mm(scaled_rows[start : start + chunk_size], cols.T)
            row_max = logits.amax(dim=1, keepdim=True)
            row_lse[start : start + chunk_size] = (logits - row_max).exp_().sum(dim=1).log_().add_(row_max[:, 0])
            if with_columns:
                new_max = torch.maximum(col_max, logits.amax(dim=0))
                col_sum.mul_((col_max - new_max).exp_()).add_(logits.sub_(new_max).exp_().sum(dim=0))
                col_max = new_max
        col_lse = col_max + col_sum.log()
        ctx.chunk_size, ctx.with_columns = chunk_size, with_columns
        ctx.save_for_backward(rows, cols, scale, row_lse, col_lse)
        return row_lse, col_lse

    @staticmethod
    def backward(ctx, grad_row_lse, grad_col_lse):
        rows, cols, scale, row_lse, col_lse = ctx.saved_tensors
        chunk_size = ctx.chunk_size
        use_columns = ctx.with_columns and grad_col_lse is not None
        grad_rows = torch.zeros_like(rows)
        grad_cols = torch.zeros_like(cols)
        with torch.autocast(device_type=rows.device.type, enabled=False):
            scaled_rows = rows * scale
            for start in range(0, rows.shape[0], chunk_size):
                end = start + chunk_size
                logits = torch.mm(scaled_rows[start:end], cols.T)
                grad_logits = None
                if grad_row_lse is not None:
                    grad_logits = (logits - row_lse[start:end, None]).exp_().mul_(grad_row_lse[start:end, None])
                if use_columns:
                    column_part = logits.sub_(col_lse).exp_().mul_(grad_col_lse)
                    grad_logits = column_part if grad_logits is None else grad_logits.add_(column_part)
                if grad_logits is None:
                    break
                torch.mm(grad_logits, cols, out=grad_rows[start:end])
                grad_cols.addmm_(grad_logits.T, rows[start:end])
            grad_scale = (grad_rows * rows).sum()  # Σ_ij dL/dlogits_ij · (rows_i · cols_j)
        return grad_rows.mul_(scale), grad_cols.mul_(scale), grad_scale, None, None


class _ChunkedSigmoidLoss(torch.autograd.Function):
    """Σ_ij −log σ(y_ij · (scale · rows_i · cols_j + bias)), y = 1 at (i, offset + i) and −1 elsewhere, in (chunk, N)
    panels. rows (n, d), cols (N, d), scale () and bias () in fp32 -> scalar. Written as Σ softplus(−y · logits)."""

    @staticmethod
    def _signed_logits(rows, cols, scale, bias, start: int, end: int, offset: int) -> torch.Tensor:
        """−y · logits for rows [start, end): (end − start, N)."""
        logits = torch.mm(rows[start:end], cols.T).mul_(scale).add_(bias)
        logits[:, offset + start : offset + end].diagonal().neg_()
        return logits

    @staticmethod
    def forward(ctx, rows, cols, scale, bias, chunk_size: int, offset: int):
        total = torch.zeros((), dtype=torch.float64, device=rows.device)
        for start in range(0, rows.shape[0], chunk_size):
            signed = _ChunkedSigmoidLoss._signed_logits(rows, cols, scale, bias, start, start + chunk_size, offset)
            total += F.softplus(signed).sum()
        ctx.chunk_size, ctx.offset = chunk_size, offset
        ctx.save_for_backward(rows, cols, scale, bias)
        return total.to(rows.dtype)

    @staticmethod
    def backward(ctx, grad_total):
        rows, cols, scale, bias = ctx.saved_tensors
        chunk_size, offset = ctx.chunk_size, ctx.offset
        grad_rows = torch.empty_like(rows)
        grad_cols = torch.zeros_like(cols)
        grad_bias = torch.zeros((), dtype=torch.float64, device=rows.device)
        with torch.autocast(device_type=rows.device.type, enabled=False):
            for start in range(0, rows.shape[0], chunk_size):
                end = start + chunk_size
                signed = _ChunkedSigmoidLoss._signed_logits(rows, cols, scale, bias, start, end, offset)
                grad_logits = signed.sigmoid_().mul_(grad_total)
                grad_logits[:, offset + start : offset + end].diagonal().neg_()
                grad_bias += grad_logits.sum()
                torch.mm(grad_logits, cols, out=grad_rows[start:end])
                grad_cols.addmm_(grad_logits.T, rows[start:end])
            grad_scale = (grad_rows * rows).sum()
        return grad_rows.mul_(scale), grad_cols.mul_(scale), grad_scale, grad_bias.to(bias.dtype), None, None


# What to pass for each scalar argument of the losses, as their type errors suggest it.
_SCALAR_EXAMPLES = {
    "logit_scale": "`model.clamped_logit_scale()` or `torch.tensor(100.0)`",
    "logit_bias": "`model.logit_bias` or `torch.tensor(-10.0)`",
}


def _check_inputs(loss_name: str, image_embeds: Any, text_embeds: Any, **scalars: Any) -> None:
    for name, value in (("image_embeds", image_embeds), ("text_embeds", text_embeds)):
        if not isinstance(value, torch.Tensor) or value.ndim != 2 or not value.is_floating_point():
            described = f"a {value.dtype} tensor of shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) \
                else type(value).__name__
            raise ValueError(f"{loss_name}: `{name}` must be a 2-d float tensor (batch, dim), got {described}.")
    if image_embeds.shape != text_embeds.shape:
        raise ValueError(
            f"{loss_name} needs one caption per image: got image embeddings of shape "
            f"{tuple(image_embeds.shape)} and text embeddings of shape {tuple(text_embeds.shape)}."
        )
    if image_embeds.shape[0] == 0:
        raise ValueError(f"{loss_name}: the batch is empty (0 image-text pairs); the loss needs at least one pair.")
    for name, value in scalars.items():
        if not isinstance(value, torch.Tensor) or value.numel() != 1:
            described = f"a tensor of shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else repr(value)
            raise TypeError(f"{loss_name}: `{name}` must be a one-element tensor (e.g. {_SCALAR_EXAMPLES[name]}), got "
                            f"{described}.")
    # On the device, so the training step reads nothing back: a CPU tensor fails here, a CUDA one at its next sync.
    # NaN passes, for the training loop's non-finite check to report with the step it happened at.
    torch._assert_async(~(scalars["logit_scale"].detach() < 0).reshape(()),
                        f"{loss_name}: `logit_scale` is negative; it is the temperature multiplier exp(log scale) "
                        "(e.g. `model.clamped_logit_scale()`), which is never below 0.")


def contrastive_loss(
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    logit_scale: torch.Tensor,
    *,
    label_smoothing: float = 0.0,
    chunk_size: int | None = None,
    gather_distributed: bool = False,
) -> torch.Tensor:
    """CLIP's symmetric cross-entropy over the image-text similarity matrix.

    Args:
        image_embeds: (n, d) L2-normalised image embeddings of this rank's batch.
        text_embeds: (n, d) L2-normalised text embeddings; row i is the caption of image i.
        logit_scale: one-element tensor, the temperature multiplier, already exponentiated (and clamped).
        label_smoothing: ε of `F.cross_entropy`, applied in both directions.
        chunk_size: None (dense or chunked by size), 0 (dense) or rows per panel (see `resolve_chunk_size`).
        gather_distributed: score against the global batch when `torch.distributed` is initialised (a collective
            that every rank must join); False never communicates.
    Returns:
        Scalar fp32 loss: the mean over this rank's rows of (CE(image→text) + CE(text→image)) / 2.
    """
    _check_inputs("contrastive_loss", image_embeds, text_embeds, logit_scale=logit_scale)
    check_loss_settings("clip", label_smoothing, chunk_size)
    rank, world_size = _distributed_world(gather_distributed)
    with torch.autocast(device_type=image_embeds.device.type, enabled=False):
        image, text, scale = image_embeds.float(), text_embeds.float(), logit_scale.float().reshape(())
        if world_size > 1:
            all_image, all_text = gather_features(image), gather_features(text)
        else:
            all_image, all_text = image, text
        chunk = resolve_chunk_size(chunk_size, image.shape[0], all_text.shape[0])
        if chunk is None:
            scaled_image = scale * image
            logits_per_image = scaled_image @ all_text.T  # (n, N); the only n×N tensor autograd keeps
            if world_size == 1:
                image_lse, text_lse = _DenseLogSumExp.apply(logits_per_image)
            else:  # the global matrix's row strip and column strip, rounded as one process rounds them
                image_lse = _DenseLogSumExp.apply(logits_per_image)[0]
                text_lse = _DenseLogSumExp.apply((scale * all_image) @ text.T)[1]
        elif world_size == 1:
            image_lse, text_lse = _ChunkedLogSumExp.apply(image, text, scale, chunk, True)
        else:
            image_lse = _ChunkedLogSumExp.apply(image, all_text, scale, chunk, False)[0]
            text_lse = _ChunkedLogSumExp.apply(text, all_image, scale, chunk, False)[0]
        positive = scale * (image * text).sum(dim=-1)
        image_loss = image_lse - (1 - label_smoothing) * positive
        text_loss = text_lse - (1 - label_smoothing) * positive
        if label_smoothing:
            image_loss = image_loss - label_smoothing * scale * (image @ all_text.mean(dim=0))
            text_loss = text_loss - label_smoothing * scale * (text @ all_image.mean(dim=0))
        return (image_loss.mean() + text_loss.mean()) / 2


def sigmoid_loss(
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor,
    *,
    chunk_size: int | None = None,
    gather_distributed: bool = False,
) -> torch.Tensor:
    """SigLIP's pairwise sigmoid loss: Σ_ij −log σ(y_ij · (scale · image_i · text_j + bias)) / n_images.

    Args:
        image_embeds: (n, d) L2-normalised image embeddings of this rank's batch.
        text_embeds: (n, d) L2-normalised text embeddings; row i is the caption of image i (y_ii = 1, else −1).
        logit_scale: one-element tensor, the temperature multiplier, already exponentiated (and clamped).
        logit_bias: one-element tensor added to every logit.
        chunk_size: None (dense or chunked by size), 0 (dense) or rows per panel (see `resolve_chunk_size`).
        gather_distributed: score this rank's images against every rank's texts when `torch.distributed` is
            initialised (a collective that every rank must join); False never communicates.
    Returns:
        Scalar fp32 loss, summed over this rank's rows against all columns and divided by this rank's n.
    """
    _check_inputs("sigmoid_loss", image_embeds, text_embeds, logit_scale=logit_scale, logit_bias=logit_bias)
    check_loss_settings("siglip", 0.0, chunk_size)
    rank, world_size = _distributed_world(gather_distributed)
    with torch.autocast(device_type=image_embeds.device.type, enabled=False):
        image, text = image_embeds.float(), text_embeds.float()
        scale, bias = logit_scale.float().reshape(()), logit_bias.float().reshape(())
        all_text = gather_features(text) if world_size > 1 else text
        batch_size, offset = image.shape[0], rank * image.shape[0]
        chunk = resolve_chunk_size(chunk_size, batch_size, all_text.shape[0])
        if chunk is None:
            logits = (scale * image) @ all_text.T + bias  # (n, N)
            signs = torch.full_like(logits, -1.0)
            signs[:, offset : offset + batch_size].diagonal().fill_(1.0)
            total = -F.logsigmoid(signs * logits).sum()
        else:
            total = _ChunkedSigmoidLoss.apply(image, all_text, scale, bias, chunk, offset)
        return total / batch_size


def image_text_loss(
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor | None = None,
    *,
    loss_type: str = "clip",
    label_smoothing: float = 0.0,
    chunk_size: int | None = None,
    gather_distributed: bool = False,
) -> torch.Tensor:
    """The loss `loss_type` names, from embeddings: `contrastive_loss` ("clip"; a bias would cancel in the softmax
    and is ignored) or `sigmoid_loss` ("siglip"; needs `logit_bias`). `HFClipModel.forward` calls this with
    `loss_settings(model.config)`; other training code (e.g. gradient caching) can do the same."""
    check_loss_settings(loss_type, label_smoothing, chunk_size)
    if loss_type == "clip":
        return contrastive_loss(image_embeds, text_embeds, logit_scale, label_smoothing=label_smoothing,
                                chunk_size=chunk_size, gather_distributed=gather_distributed)
    if logit_bias is None:
        raise ValueError("loss_type='siglip' needs `logit_bias` (HFClipModel has one when its config says so).")
    return sigmoid_loss(image_embeds, text_embeds, logit_scale, logit_bias, chunk_size=chunk_size,
                        gather_distributed=gather_distributed)


def loss_settings(config) -> dict[str, Any]:
    """`image_text_loss` keyword arguments read from an `HFClipConfig`: loss_type, label_smoothing, chunk_size."""
    return {"loss_type": config.loss_type, "label_smoothing": config.label_smoothing,
            "chunk_size": config.loss_chunk_size}


__all__ = [
    "LOSS_TYPES",
    "check_loss_settings",
    "contrastive_loss",
    "gather_features",
    "image_text_loss",
    "loss_settings",
    "resolve_chunk_size",
    "sigmoid_loss",
]
