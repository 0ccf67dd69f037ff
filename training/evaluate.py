"""Zero-shot classification and image-text retrieval evaluation of an hf_clip model.

    python -m training.evaluate --model outputs/hf-clip                      # the embedded dataset's test splits
    python -m training.evaluate --model DIR --dataset DATASET --splits test --templates "a photo of a {}."

Zero-shot: each class embedding is the mean of the L2-normalised embeddings of its prompts (one per template),
normalised again; an image's prediction is its most similar class. Retrieval uses each image's first caption.
Under `accelerate launch` / `torchrun`, every process embeds its share of the rows.
"""

import argparse
import json
import logging
from pathlib import Path

import torch
from accelerate import PartialState
from accelerate.utils import gather_object
from tqdm.auto import tqdm

from hf_clip import PHOTO_TEMPLATES, SHAPES_TEMPLATES, zero_shot_classifier

from .data import (
    ImageTextCollator,
    ImageTextDataset,
    base_directory,
    first_rows,
    image_transform_for,
    load_split,
    worker_count,
)

logger = logging.getLogger(__name__)

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


@torch.no_grad()
def embed_split(model, processor, dataset, image_column: str, caption_column: str, base_dir: Path,
                batch_size: int, num_workers: int, state: PartialState, description: str
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Normalised image and first-caption embeddings (n, dim), row ids (n,) and the count of unusable rows,
    with each process embedding a contiguous share of the rows and all of them gathered everywhere."""
    rows = list(range(len(dataset)))
    with state.split_between_processes(rows) as local_rows:
        local = ImageTextDataset(dataset.select(local_rows), image_column, caption_column,
                                 image_transform_for(processor, train=False), base_dir, seed=0,
                                 replace_bad_rows=False)
        loader = torch.utils.data.DataLoader(local, batch_size=batch_size, num_workers=num_workers,
                                             collate_fn=ImageTextCollator(processor.tokenizer))
        image_embeds, text_embeds, row_ids, skipped = [], [], [], 0
        for batch in tqdm(loader, desc=description, disable=not state.is_main_process, leave=False):
            skipped += int(batch["skipped"])
            if batch["row_ids"].numel() == 0:
                continue
            inputs = {k: batch[k].to(model.device) for k in ("pixel_values", "input_ids", "attention_mask")}
            outputs = model(**inputs)
            image_embeds.append(outputs.image_embeds.float().cpu())
            text_embeds.append(outputs.text_embeds.float().cpu())
            row_ids.append(torch.tensor(local_rows)[batch["row_ids"]])
    gathered = gather_object([(torch.cat(image_embeds) if image_embeds else None,
                               torch.cat(text_embeds) if text_embeds else None,
                               torch.cat(row_ids) if row_ids else None, skipped)])
    parts = [part for part in gathered if part[0] is not None]
    return (torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]), torch.cat([p[2] for p in parts]),
            sum(p[3] for p in gathered))


def evaluate_split(model, processor, dataset, *, image_column: str = "image", caption_column: str = "caption",
                   label_column: str | None = "label", class_names: list[str] | None = None,
                   templates: list[str] | None = None, base_dir: Path = Path.cwd(), batch_size: int = 256,
                   num_workers: int = 0, state: PartialState | None = None, description: str = "eval"
                   ) -> dict[str, float]:
    """Zero-shot top-1/top-5 (when the split has labels) and retrieval recall@1/5/10 on one split."""
    state = state or PartialState()
    was_training = model.training
    model.eval()
    image_embeds, text_embeds, row_ids, skipped = embed_split(
        model, processor, dataset, image_column, caption_column, base_dir, batch_size, num_workers, state,
        description)
    results = {"num_samples": len(row_ids), "skipped_samples": skipped}
    results.update(retrieval_recall(image_embeds, text_embeds))
    if label_column and label_column in dataset.column_names:
        names = class_names or dataset.features[label_column].names
        classifier = zero_shot_classifier(model, processor.tokenizer, list(names), list(templates or PHOTO_TEMPLATES))
        labels = torch.tensor(dataset[label_column])[row_ids]
        results.update({f"zero_shot_{k}": v for k, v in top_k_accuracy(image_embeds @ classifier.cpu().T, labels).items()})
    model.train(was_training)
    return results


def format_results_table(results: dict[str, dict[str, float]]) -> str:
    """Splits as rows; zero-shot accuracy and retrieval recall in percent. No splits: a line saying so."""
    if not results:
        return "Nothing to evaluate: none of the evaluation splits exists in the dataset."
    columns = [("zero_shot_top1", "ZS top1"), ("zero_shot_top5", "ZS top5"), ("image_to_text_R@1", "I→T R@1"),
               ("image_to_text_R@5", "I→T R@5"), ("text_to_image_R@1", "T→I R@1"), ("text_to_image_R@5", "T→I R@5"),
               ("num_samples", "images")]
    header = f"{'split':<14}" + "".join(f"{title:>10}" for _, title in columns)
    lines = [header, "-" * len(header)]
    for split, metrics in results.items():
        cells = []
        for key, _ in columns:
            value = metrics.get(key)
            cells.append(f"{'-':>10}" if value is None else f"{value:>10d}" if key == "num_samples"
                         else f"{100 * value:>9.1f}%")
        lines.append(f"{split:<14}" + "".join(cells))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    import hf_clip  # noqa: F401  (registers the Auto classes)
    from transformers import AutoModel, AutoProcessor

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="Saved hf_clip (or Transformers CLIP) model directory.")
    parser.add_argument("--dataset", default=None, help="datasets target as in training; unset: embedded dataset.")
    parser.add_argument("--dataset_config_name", default=None, help="Dataset configuration name, if any.")
    parser.add_argument("--splits", nargs="+", default=["test", "test_unseen"], help="Splits to evaluate.")
    parser.add_argument("--image_column", default="image", help="Image column.")
    parser.add_argument("--caption_column", default="caption", help="Caption column (str or list of str).")
    parser.add_argument("--label_column", default="label", help="ClassLabel column for zero-shot accuracy.")
    parser.add_argument("--templates", nargs="+", default=None, help="Prompt templates with one {} each.")
    parser.add_argument("--batch_size", type=int, default=256, help="Batch size per process.")
    parser.add_argument("--num_workers", type=int, default=2, help="DataLoader workers.")
    parser.add_argument("--max_eval_samples", type=int, default=None, help="Evaluate at most this many rows.")
    parser.add_argument("--output_file", default=None, help="Write the results as JSON here.")
    args = parser.parse_args(argv)

    state = PartialState()
    model = AutoModel.from_pretrained(args.model).to(state.device)
    processor = AutoProcessor.from_pretrained(args.model)
    templates = args.templates or (list(SHAPES_TEMPLATES) if args.dataset is None else list(PHOTO_TEMPLATES))
    data_args = argparse.Namespace(dataset_name=args.dataset, dataset_config_name=args.dataset_config_name,
                                   embedded_num_train=0)
    results = {}
    for split in args.splits:
        dataset = load_split(data_args, split)
        if dataset is None:
            raise ValueError(f"Dataset {args.dataset or 'embedded'!r} has no split {split!r}.")
        if args.max_eval_samples is not None:
            dataset = first_rows(dataset, args.max_eval_samples)
        results[split] = evaluate_split(
            model, processor, dataset, image_column=args.image_column, caption_column=args.caption_column,
            label_column=args.label_column, templates=templates, base_dir=base_directory(args.dataset),
            batch_size=args.batch_size, num_workers=worker_count(args.num_workers), state=state, description=split)
    if state.is_main_process:
        print(format_results_table(results))
        if args.output_file:
            Path(args.output_file).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
