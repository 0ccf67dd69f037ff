"""Zero-shot classification and image-text retrieval evaluation of an `HFClipModel` on a datasets split.

Zero-shot: each class embedding is the mean of the L2-normalised embeddings of its prompts (one per template),
normalised again (`zero_shot_classifier`); an image's prediction is its most similar class. Retrieval pairs each
image with its first caption.

    metrics = evaluate_split(model, processor, dataset)  # {"zero_shot_top1": ..., "image_to_text_R@1": ..., ...}

With `split_across_processes=True` under `torch.distributed`, every process embeds a contiguous share of the rows
and the shares are gathered on all of them: then every process must make the call. Without it, the call embeds
every row itself and runs no collective, so one rank alone may call it.
"""

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from .data import ContrastiveDataCollator, ImageTextColumns, ImageTextDataset, image_transform_for
from .templates import PHOTO_TEMPLATES
from .zero_shot import zero_shot_classifier

MODEL_INPUTS = ("pixel_values", "input_ids", "attention_mask")


def top_k_accuracy(logits: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> dict[str, float]:
    """logits (n, classes), labels (n,) -> {"top1": ..., "top5": ...} in [0, 1]."""
    ranked = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices
    hits = ranked == labels[:, None]
    return {f"top{k}": hits[:, :k].any(dim=1).float().mean().item() for k in ks}


def retrieval_recall(image_embeds: torch.Tensor, text_embeds: torch.Tensor, ks: tuple[int, ...] = (1, 5, 10)
                     ) -> dict[str, float]:
    """Paired, normalised (n, dim) embeddings -> image→text and text→image recall@k (the pair is the target)."""
    similarity = image_embeds @ text_embeds.T
    targets = torch.arange(len(similarity))
    results = {}
    for direction, scores in (("image_to_text", similarity), ("text_to_image", similarity.T)):
        ranked = scores.topk(min(max(ks), scores.shape[1]), dim=1).indices
        hits = ranked == targets[:, None]
        results.update({f"{direction}_R@{k}": hits[:, :k].any(dim=1).float().mean().item() for k in ks})
    return results


@dataclass
class SplitEmbeddings:
    """A split's normalised image and first-caption embeddings (n, dim), the dataset row of each (n,), and the
    number of rows left out as unusable."""

    image_embeds: torch.Tensor
    text_embeds: torch.Tensor
    row_ids: torch.Tensor
    skipped: int


def _shared(split_across_processes: bool) -> bool:
    return split_across_processes and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _process_share(num_rows: int) -> range:
    """This process's contiguous share of `num_rows` rows; the first `num_rows % world_size` get one more."""
    rank, world_size = dist.get_rank(), dist.get_world_size()
    per_process, extra = divmod(num_rows, world_size)
    start = rank * per_process + min(rank, extra)
    return range(start, start + per_process + (1 if rank < extra else 0))


@torch.no_grad()
def embed_split(model, processor, dataset, *, columns: ImageTextColumns = ImageTextColumns(), batch_size: int = 256,
                num_workers: int = 0, split_across_processes: bool = False, description: str | None = None
                ) -> SplitEmbeddings:
    """Embed every usable row of a map-style `dataset` (images with the evaluation transform, first captions)."""
    shared = _shared(split_across_processes)
    rows = _process_share(len(dataset)) if shared else range(len(dataset))
    local = ImageTextDataset(dataset.select(rows), image_transform_for(processor, train=False), columns,
                             replace_bad_rows=False)
    loader = torch.utils.data.DataLoader(
        local, batch_size=batch_size, num_workers=num_workers,
        collate_fn=ContrastiveDataCollator(processor, columns.image, columns.caption, sample_captions=False))
    image_embeds, text_embeds, row_ids, skipped = [], [], [], 0
    show = description is not None and (not shared or dist.get_rank() == 0)
    for batch in tqdm(loader, desc=description, disable=not show, leave=False):
        skipped += int(batch["skipped"])
        if batch["row_ids"].numel() == 0:
            continue
        outputs = model(**{key: batch[key].to(model.device) for key in MODEL_INPUTS})
        image_embeds.append(outputs.image_embeds.float().cpu())
        text_embeds.append(outputs.text_embeds.float().cpu())
        row_ids.append(torch.tensor(rows)[batch["row_ids"]])
    parts = [(torch.cat(image_embeds) if image_embeds else None, torch.cat(text_embeds) if text_embeds else None,
              torch.cat(row_ids) if row_ids else None, skipped)]
    if shared:
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, parts[0])
        parts = gathered
    usable = [part for part in parts if part[0] is not None]
    if not usable:
        raise ValueError(f"No usable row among the {len(dataset)} rows of the split (image column "
                         f"{columns.image!r}, caption column {columns.caption!r}).")
    return SplitEmbeddings(torch.cat([p[0] for p in usable]), torch.cat([p[1] for p in usable]),
                           torch.cat([p[2] for p in usable]), sum(p[3] for p in parts))


def evaluate_split(model, processor, dataset, *, columns: ImageTextColumns = ImageTextColumns(),
                   class_names: Sequence[str] | None = None, templates: Sequence[str] = PHOTO_TEMPLATES,
                   batch_size: int = 256, num_workers: int = 0, split_across_processes: bool = False,
                   description: str | None = None) -> dict[str, float]:
    """Retrieval recall@1/5/10 on one split and, when it has the `columns.label` column, zero-shot top-1/top-5 over
    `class_names` (default: the column's `ClassLabel` names) with prompt ensembling over `templates`.

    Returns {"num_samples", "skipped_samples", "image_to_text_R@k", "text_to_image_R@k", "zero_shot_top1",
    "zero_shot_top5"}, accuracies in [0, 1].
    """
    was_training = model.training
    model.eval()
    embedded = embed_split(model, processor, dataset, columns=columns, batch_size=batch_size,
                           num_workers=num_workers, split_across_processes=split_across_processes,
                           description=description)
    results = {"num_samples": len(embedded.row_ids), "skipped_samples": embedded.skipped}
    results.update(retrieval_recall(embedded.image_embeds, embedded.text_embeds))
    if columns.label and columns.label in dataset.column_names:
        names = list(class_names or dataset.features[columns.label].names)
        classifier = zero_shot_classifier(model, processor.tokenizer, names, list(templates))
        labels = torch.tensor(dataset[columns.label])[embedded.row_ids]
        accuracy = top_k_accuracy(embedded.image_embeds @ classifier.cpu().T, labels)
        results.update({f"zero_shot_{key}": value for key, value in accuracy.items()})
    model.train(was_training)
    return results


__all__ = ["SplitEmbeddings", "embed_split", "evaluate_split", "retrieval_recall", "top_k_accuracy"]
