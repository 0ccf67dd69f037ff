"""A small pretrained image backbone for LiT, made offline: a Transformers `ViTForImageClassification` trained with
`transformers.Trainer` to name the colour and the shape of the embedded dataset's scenes (multi-label, 10 outputs).

    python examples/pretrain_vision.py outputs/vit-shapes                  # about 4 minutes on 2 idle CPU cores
    python -m hf_clip_train.train --vision_model_name_or_path outputs/vit-shapes --vision_pooling cls --lock_image # LiT

The folder holds `config.json`, `model.safetensors` and `preprocessor_config.json` (a `ViTImageProcessor`), as a
pretrained ViT on the Hub does. The backbone never sees a caption, and never sees the `test_unseen` compositions
(a red triangle ...): it learns colours and shapes from the training split's `color` and `shape` labels.
"""

import argparse

import numpy as np
import torch
from transformers import Trainer, TrainingArguments, ViTConfig, ViTForImageClassification, ViTImageProcessor

from hf_clip_train.synthetic import COLORS, IMAGE_SIZE, SHAPES, build_shapes_dataset

ATTRIBUTES = (*COLORS, *SHAPES)


def attribute_targets(colors: list[int], shapes: list[int]) -> torch.Tensor:
    """(batch, len(ATTRIBUTES)) multi-hot targets: one colour and one shape per scene."""
    targets = torch.zeros(len(colors), len(ATTRIBUTES))
    targets[torch.arange(len(colors)), torch.tensor(colors)] = 1.0
    targets[torch.arange(len(colors)), len(COLORS) + torch.tensor(shapes)] = 1.0
    return targets


def build_backbone(patch_size: int = 16) -> ViTForImageClassification:
    """The `tiny` preset's image tower (width 256, 4 layers, 4 heads) as a Transformers ViT with a 10-way head."""
    config = ViTConfig(image_size=IMAGE_SIZE, patch_size=patch_size, hidden_size=256, num_hidden_layers=4,
                       num_attention_heads=4, intermediate_size=1024, num_labels=len(ATTRIBUTES),
                       problem_type="multi_label_classification",
                       id2label=dict(enumerate(ATTRIBUTES)), label2id={name: i for i, name in enumerate(ATTRIBUTES)})
    return ViTForImageClassification(config)


def attribute_accuracy(model: ViTForImageClassification, processor: ViTImageProcessor, split) -> dict[str, float]:
    """Share of scenes whose top colour output and top shape output are both right."""
    model.eval()
    right = []
    with torch.no_grad():
        for start in range(0, len(split), 256):
            rows = split[start:start + 256]
            logits = model(**processor(rows["image"], return_tensors="pt")).logits
            color = logits[:, :len(COLORS)].argmax(-1).numpy() == np.array(rows["color"])
            shape = logits[:, len(COLORS):].argmax(-1).numpy() == np.array(rows["shape"])
            right.append(color & shape)
    return float(np.concatenate(right).mean())


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output_dir", help="Where to save the backbone and its image processor.")
    parser.add_argument("--max_steps", type=int, default=600)
    parser.add_argument("--num_train", type=int, default=24_000, help="Training scenes of the embedded dataset.")
    parser.add_argument("--patch_size", type=int, default=16)
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    dataset = build_shapes_dataset(num_train=args.num_train)
    processor = ViTImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    model = build_backbone(args.patch_size)

    def to_inputs(rows: dict) -> dict:
        return {"pixel_values": processor(rows["image"], return_tensors="pt")["pixel_values"],
                "labels": attribute_targets(rows["color"], rows["shape"])}

    training_args = TrainingArguments(output_dir=args.output_dir, max_steps=args.max_steps, learning_rate=1e-3,
                                      warmup_steps=args.max_steps // 10, per_device_train_batch_size=128,
                                      weight_decay=0.05, logging_steps=50, save_strategy="no", report_to="none",
                                      remove_unused_columns=False, seed=0, disable_tqdm=True)
    Trainer(model=model, args=training_args, train_dataset=dataset["train"].with_transform(to_inputs)).train()

    results = {split: attribute_accuracy(model, processor, dataset[split]) for split in ("test", "test_unseen")}
    print("colour and shape both right: " + ", ".join(f"{split} {acc:.1%}" for split, acc in results.items()))
    model.save_pretrained(args.output_dir)
    processor.save_pretrained(args.output_dir)
    return results


if __name__ == "__main__":
    main()
