"""Evaluation of a model on dataset splits, for `hf_clip_train.evaluate` and the evaluations during training:
loading the `--eval_splits`, embedding a split (`embed_split`), zero-shot classification, where each class
embedding is the mean of the L2-normalised embeddings of its prompts (`hf_clip.zero_shot_classifier`) and an image's
prediction is its most similar class, and image-text retrieval, which pairs each image with its first caption
(`evaluate_split`); the results table and the pipeline demo."""

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from tqdm.auto import tqdm
from transformers import pipeline

from hf_clip import PHOTO_TEMPLATES, ContrastiveDataCollator, retrieval_recall, top_k_accuracy, zero_shot_classifier

from .data.batches import ImageTextDataset, worker_count
from .data.sources import (
    ImageTextColumns,
    dataset_label,
    first_decodable_image,
    load_checked_split,
    missing_split_error,
)
from .data.transforms import image_transform_for
from .synthetic import TEMPLATES as SHAPES_TEMPLATES

if TYPE_CHECKING:
    from .args import DatasetArguments, EvalArguments, LoaderArguments

logger = logging.getLogger(__name__)

MODEL_INPUTS = ("pixel_values", "input_ids", "attention_mask")


def load_eval_splits(data_args: "DatasetArguments", eval_args: "EvalArguments", columns: dict[str, str] | None = None,
                     *, missing: str = "skip") -> dict:
    """The `--eval_splits`, checked for `columns` (flag -> column; default: the image and caption columns) and cut
    to `--max_eval_samples`. A split the dataset lacks is skipped with a warning (`missing="skip"`) or refused
    (`missing="raise"`)."""
    columns = columns or {"image_column": data_args.image_column, "caption_column": data_args.caption_column}
    splits = {}
    for name in eval_args.eval_splits:
        dataset = load_checked_split(data_args, name, columns, max_rows=eval_args.max_eval_samples)
        if dataset is None:
            if missing == "raise":
                raise missing_split_error(data_args.dataset_name, name)
            logger.warning("Dataset %r has no split %r; not evaluating on it.", dataset_label(data_args.dataset_name),
                           name)
            continue
        splits[name] = dataset
    return splits


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



def zero_shot_templates(data_args: "DatasetArguments", eval_args: "EvalArguments") -> list[str]:
    """`--templates`, else the embedded dataset's own templates for it and `hf_clip.PHOTO_TEMPLATES` otherwise."""
    if eval_args.templates:
        return list(eval_args.templates)
    return list(SHAPES_TEMPLATES if data_args.dataset_name is None else PHOTO_TEMPLATES)


def evaluate_splits(model, processor, splits: dict, columns: ImageTextColumns, templates: Sequence[str],
                    loader_args: "LoaderArguments", *, split_across_processes: bool) -> dict[str, dict[str, float]]:
    """`evaluate_split` on every split: {split: metrics}. With `split_across_processes`, every process embeds a
    share of the rows, so every process must call it."""
    return {
        name: evaluate_split(
            model, processor, dataset, columns=columns, templates=templates,
            batch_size=loader_args.per_device_eval_batch_size,
            num_workers=worker_count(loader_args.dataloader_num_workers),
            split_across_processes=split_across_processes, description=f"eval {name}")
        for name, dataset in splits.items()
    }


def format_results_table(results: dict[str, dict[str, float]]) -> str:
    """Splits as rows; zero-shot accuracy and retrieval recall in percent, or the error of a split whose evaluation
    failed ({"error": message}). No splits: a line saying so."""
    if not results:
        return "Nothing to evaluate: none of the evaluation splits exists in the dataset."
    columns = [("zero_shot_top1", "ZS top1"), ("zero_shot_top5", "ZS top5"), ("image_to_text_R@1", "I→T R@1"),
               ("image_to_text_R@5", "I→T R@5"), ("text_to_image_R@1", "T→I R@1"), ("text_to_image_R@5", "T→I R@5"),
               ("num_samples", "images")]
    header = f"{'split':<14}" + "".join(f"{title:>10}" for _, title in columns)
    lines = [header, "-" * len(header)]
    for split, metrics in results.items():
        if "error" in metrics:
            lines.append(f"{split:<14}evaluation failed: {metrics['error']}")
            continue
        cells = []
        for key, _ in columns:
            value = metrics.get(key)
            cells.append(f"{'-':>10}" if value is None else f"{value:>10d}" if key == "num_samples"
                         else f"{100 * value:>9.1f}%")
        lines.append(f"{split:<14}" + "".join(cells))
    return "\n".join(lines)


def pipeline_demo(model_dir: str | Path, splits: dict, columns: ImageTextColumns) -> str | None:
    """Load the saved model with `pipeline("zero-shot-image-classification")` and classify the first decodable image
    of the first eval split over its label column's classes; None when there is no labelled eval split."""
    dataset = next(iter(splits.values()), None)
    if dataset is None or columns.label not in dataset.column_names:
        return None
    names = dataset.features[columns.label].names
    found = first_decodable_image(dataset, columns)
    if found is None:
        return "pipeline: no decodable image among the first evaluation rows"
    row, image = found
    classifier = pipeline("zero-shot-image-classification", model=str(model_dir))
    predictions = classifier(image, candidate_labels=names, hypothesis_template="a photo of a {}.")
    top = ", ".join(f"{p['label']} {100 * p['score']:.1f}%" for p in predictions[:3])
    return f"pipeline on one image of a {names[row[columns.label]]!r}: {top}"
