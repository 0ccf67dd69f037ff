"""Fine-tune an hf_clip or Transformers CLIP checkpoint with `transformers.Trainer`.

    # contrastive fine-tuning on image-caption pairs (the embedded shapes dataset unless --dataset_name is given)
    python -m hf_clip_train.finetune_trainer --model_name_or_path DIR --output_dir OUT
    python -m hf_clip_train.finetune_trainer --model_name_or_path DIR --dataset_name DATA --caption_column text \
        --lock_image --bf16 --activation_checkpointing --eval_strategy steps --eval_steps 500 --save_steps 500
    torchrun --nproc_per_node 8 -m hf_clip_train.finetune_trainer --model_name_or_path DIR --dataset_name DATA

    # zero-shot head -> image classifier, fine-tuned with cross-entropy on a ClassLabel column
    python -m hf_clip_train.finetune_trainer --task image-classification --model_name_or_path DIR --label_column shape \
        --wise_ft_alpha 0.5 --output_dir OUT

Every `transformers.TrainingArguments` flag applies (`--help` lists them). `--remove_unused_columns` defaults to
False here: the collators read the raw image and caption (or label) columns, which Trainer would otherwise drop.
The output directory loads with `AutoModel` and the zero-shot pipeline (contrastive), or with
`AutoModelForImageClassification` and the image-classification pipeline (classifier).
"""

import copy
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from transformers import Trainer, TrainerCallback, TrainingArguments, pipeline

from hf_clip import (
    ContrastiveDataCollator,
    ImageClassificationDataCollator,
    compute_classification_metrics,
    compute_contrastive_metrics,
    contrastive_accuracy_flags,
    from_zero_shot,
    weight_space_ensemble,
)

from .args import (
    DatasetArguments,
    EvalArguments,
    InputError,
    LossArguments,
    ModelArguments,
    PatchDropoutArguments,
    TowerLockArguments,
    parse_with_config_file,
)
from .common import load_pretrained, lock_towers
from .data import ImageTextColumns, columns_of, dataset_label, first_decodable_image, load_train_split
from .evaluation import load_eval_splits, pipeline_demo, zero_shot_templates
from .runtime import setup_logging

logger = logging.getLogger("hf_clip_train")

TASKS = ("contrastive", "image-classification")


@dataclass
class FinetuneArguments:
    task: str = field(
        default="contrastive",
        metadata={"help": "contrastive: image-caption fine-tuning of the CLIP model. image-classification: "
                          "initialise a classifier from the zero-shot head over --label_column and fine-tune it."},
    )
    wise_ft_alpha: float | None = field(
        default=None,
        metadata={"help": "image-classification: save (1-alpha)·zero-shot + alpha·fine-tuned weights (WiSE-FT)."},
    )

    def __post_init__(self):
        if self.task not in TASKS:
            raise InputError(f"--task must be one of {TASKS}, got {self.task!r}.")
        if self.wise_ft_alpha is not None and self.task != "image-classification":
            raise InputError("--wise_ft_alpha applies to --task image-classification only.")


@dataclass
class FinetuneScriptArguments:
    model: ModelArguments
    locks: TowerLockArguments
    loss: LossArguments
    patch_dropout: PatchDropoutArguments
    data: DatasetArguments
    eval: EvalArguments
    finetune: FinetuneArguments
    training: TrainingArguments

    def __post_init__(self):
        if self.training.remove_unused_columns:
            raise InputError("--remove_unused_columns must stay False: the collators read the raw dataset columns.")
        if self.finetune.task == "image-classification" and self.locks.lock_text:
            raise InputError("--lock_text: the image classifier has no text tower.")


def parse_args(argv: list[str] | None = None) -> FinetuneScriptArguments:
    args = FinetuneScriptArguments(*parse_with_config_file(
        (ModelArguments, TowerLockArguments, LossArguments, PatchDropoutArguments, DatasetArguments, EvalArguments,
         FinetuneArguments,
         TrainingArguments),
        argv, defaults={"remove_unused_columns": False, "embedded_num_train": 4_000}))
    if args.model.model_name_or_path is None:
        raise InputError("--model_name_or_path is required: the hf_clip or Transformers CLIP checkpoint to fine-tune.")
    return args


def first_caption(column: str):
    """A dataset transform that keeps only the first caption of each row of `column`, so evaluation is
    deterministic."""

    def transform(batch: dict) -> dict:
        return {**batch, column: [value[0] if isinstance(value, list) else value for value in batch[column]]}

    return transform


def single_or_dict(splits: dict):
    """Trainer reports `eval_loss` for one dataset and `eval_{name}_loss` for each of several."""
    if not splits:
        return None
    return next(iter(splits.values())) if len(splits) == 1 else splits


class EvaluationRecorder(TrainerCallback):
    """Keeps the metrics of every evaluation, in order."""

    def __init__(self):
        self.results: list[dict[str, float]] = []

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        self.results.append(dict(metrics or {}))


def train_and_evaluate(trainer: Trainer, has_eval_splits: bool) -> tuple[dict[str, float], dict[str, float]]:
    """Train, then return the eval metrics before and after training ({} without eval splits).

    The "before" evaluation runs inside `train()` (`eval_on_start`): a `trainer.evaluate()` call before `train()`
    registers the model with Accelerate unwrapped, and training would then run without DDP's gradient averaging.
    """
    recorder = EvaluationRecorder()
    trainer.add_callback(recorder)
    trainer.args.eval_on_start = has_eval_splits
    trainer.train(resume_from_checkpoint=trainer.args.resume_from_checkpoint)
    if not has_eval_splits:
        return {}, {}
    return recorder.results[0], trainer.evaluate()


def finetune_contrastive(model, processor, args: FinetuneScriptArguments) -> dict[str, dict[str, float]]:
    """Contrastive fine-tuning; the eval loss and in-batch accuracies on every eval split before and after."""
    data, training_args = args.data, args.training
    columns = columns_of(data)
    needed = {"image_column": columns.image, "caption_column": columns.caption}
    train_split = load_train_split(data, needed, max_rows=data.max_train_samples)
    eval_splits = {name: split.with_transform(first_caption(columns.caption))
                   for name, split in load_eval_splits(data, args.eval, needed).items()}
    lock_towers(model, args.locks)
    trainer = Trainer(
        model=model,
        args=training_args,
        data_collator=ContrastiveDataCollator(processor, columns.image, columns.caption, seed=training_args.seed,
                                              base_dir=columns.base_dir),
        train_dataset=train_split,
        eval_dataset=single_or_dict(eval_splits),
        processing_class=processor,
        preprocess_logits_for_metrics=contrastive_accuracy_flags,
        compute_metrics=compute_contrastive_metrics,
    )
    before, after = train_and_evaluate(trainer, bool(eval_splits))
    results = {"before": before, "after": after}
    trainer.save_model()
    if trainer.is_world_process_zero():
        report(results, training_args)
        demo = pipeline_demo(training_args.output_dir, eval_splits, columns)
        if demo is not None:
            print(demo)
    return results


def class_names_of(dataset, dataset_name: str | None, columns: ImageTextColumns) -> list[str]:
    feature = dataset.features[columns.label] if dataset.features is not None else None
    if not hasattr(feature, "names"):
        raise InputError(
            f"Column {columns.label!r} of {dataset_label(dataset_name)!r} is not a ClassLabel, "
            "so it names no classes; cast it with dataset.cast_column(column, ClassLabel(names=[...]))."
        )
    return list(feature.names)


def finetune_classifier(model, processor, args: FinetuneScriptArguments) -> dict[str, dict[str, float]]:
    """Zero-shot head -> classifier fine-tuned with cross-entropy; accuracy on every eval split of the zero-shot,
    fine-tuned and (with --wise_ft_alpha) weight-space-ensembled classifiers."""
    data, training_args, alpha = args.data, args.training, args.finetune.wise_ft_alpha
    columns = columns_of(data)
    needed = {"image_column": columns.image, "label_column": columns.label}
    train_split = load_train_split(data, needed, max_rows=data.max_train_samples)
    eval_splits = load_eval_splits(data, args.eval, needed)
    zero_shot = from_zero_shot(model, processor, class_names_of(train_split, data.dataset_name, columns),
                               zero_shot_templates(data, args.eval))
    classifier = copy.deepcopy(zero_shot)
    lock_towers(classifier, args.locks)  # parse_args refuses --lock_text for the classifier
    collator = ImageClassificationDataCollator(processor, columns.image, columns.label, base_dir=columns.base_dir)

    def make_trainer(model_to_run) -> Trainer:
        return Trainer(model=model_to_run, args=training_args, data_collator=collator, train_dataset=train_split,
                       eval_dataset=single_or_dict(eval_splits), processing_class=processor,
                       compute_metrics=compute_classification_metrics)

    trainer = make_trainer(classifier)
    zero_shot_metrics, fine_tuned_metrics = train_and_evaluate(trainer, bool(eval_splits))
    results = {"zero_shot": zero_shot_metrics, "fine_tuned": fine_tuned_metrics}
    if alpha is not None:
        trainer = make_trainer(weight_space_ensemble(zero_shot, trainer.model, alpha))
        results[f"wise_ft_{alpha:g}"] = trainer.evaluate() if eval_splits else {}
    trainer.save_model()
    if trainer.is_world_process_zero():
        report(results, training_args)
        found = first_decodable_image(next(iter(eval_splits.values())), columns) if eval_splits else None
        if found is not None:
            row, image = found
            top = pipeline("image-classification", model=training_args.output_dir)(image)[0]
            truth = classifier.config.id2label[row[columns.label]]
            print(f"pipeline on one image of a {truth!r}: {top['label']} {100 * top['score']:.1f}%")
    return results


def report(results: dict[str, dict[str, float]], training_args: TrainingArguments) -> None:
    """Print the loss and accuracies of each evaluated model, and write them to `eval_results.json`."""
    for name, metrics in results.items():
        cells = [f"{key.removeprefix('eval_')} {value:.4f}" for key, value in metrics.items()
                 if key.endswith(("accuracy", "loss"))]
        print(f"{name:<12} " + ", ".join(cells))
    (Path(training_args.output_dir) / "eval_results.json").write_text(json.dumps(results, indent=2))


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    setup_logging()
    model, processor = load_pretrained(args.model.model_name_or_path, args.patch_dropout.patch_dropout, args.loss)
    if args.finetune.task == "contrastive":
        return finetune_contrastive(model, processor, args)
    return finetune_classifier(model, processor, args)


if __name__ == "__main__":
    from .cli import run_script

    run_script(main, "finetune")
