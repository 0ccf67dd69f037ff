"""What the scripts share: loading a checkpoint, tower locks, zero-shot prompts, evaluating the eval splits, the
results table and the pipeline demo."""

from pathlib import Path

from huggingface_hub.errors import StrictDataclassError
from transformers import AutoProcessor, pipeline

from hf_clip import PHOTO_TEMPLATES, HFClipConfig, HFClipModel, HFClipProcessor, match_special_tokens

from .args import DatasetArguments, EvalArguments, LoaderArguments, LossArguments, TowerLockArguments
from .data import columns_of, evaluate_split, first_decodable_image, worker_count
from .synthetic import TEMPLATES as SHAPES_TEMPLATES


def config_overrides(patch_dropout: float | None = None, loss_args: LossArguments | None = None) -> dict:
    """`HFClipConfig` fields set by `--patch_dropout`, `--loss_type` and `--loss_chunk_size` (only those given)."""
    overrides = {}
    if patch_dropout is not None:
        overrides["vision_config"] = {"patch_dropout": patch_dropout}
    if loss_args is not None and loss_args.loss_chunk_size is not None:
        overrides["loss_chunk_size"] = loss_args.loss_chunk_size
    if loss_args is not None and loss_args.loss_type is not None:
        overrides["loss_type"] = loss_args.loss_type
    return overrides


def override_config(config: HFClipConfig, overrides: dict) -> HFClipConfig:
    """A new config with `overrides` (top-level fields, partial `text_config` / `vision_config` dicts) applied, built
    through the config's own validation, so a bad value fails here, naming the field. A switch of `loss_type` also
    takes that loss's initial `logit_bias`."""
    if not overrides:
        return config
    values = config.to_dict()
    for key, value in overrides.items():
        values[key] = {**values[key], **value} if key in ("text_config", "vision_config") else value
    if values["loss_type"] != config.loss_type:
        values["logit_bias_init_value"] = None
    return HFClipConfig.from_dict(values)


def _config_error(error: Exception) -> Exception:
    """The config validator's own error inside huggingface_hub's strict-dataclass wrapper."""
    return error.__cause__ if isinstance(error, StrictDataclassError) and error.__cause__ is not None else error


def check_config_overrides(patch_dropout: float | None, loss_args: LossArguments) -> None:
    """Refuse at start-up, naming the flag, a `--patch_dropout`, `--loss_type` or `--loss_chunk_size` that the
    config's own validation refuses (on a default `HFClipConfig`; `load_pretrained` applies them to the
    checkpoint's config)."""
    flags = {"patch_dropout": (patch_dropout, config_overrides(patch_dropout)),
             "loss_type": (loss_args.loss_type, config_overrides(loss_args=LossArguments(loss_args.loss_type))),
             "loss_chunk_size": (loss_args.loss_chunk_size,
                                 config_overrides(loss_args=LossArguments(loss_chunk_size=loss_args.loss_chunk_size)))}
    for flag, (value, overrides) in flags.items():
        try:
            override_config(HFClipConfig(), overrides)
        except (StrictDataclassError, ValueError, TypeError) as error:
            raise ValueError(f"--{flag} {value!r}: {_config_error(error)}") from None


def load_pretrained(model_name_or_path: str, patch_dropout: float | None = None,
                    loss_args: LossArguments | None = None) -> tuple[HFClipModel, HFClipProcessor]:
    """An hf_clip or Transformers CLIP checkpoint and its processor, with the text config's special token ids
    matched to the tokenizer's (see `hf_clip.match_special_tokens`); `patch_dropout` and `loss_args` override the
    checkpoint's config (see `override_config`): a CLIP checkpoint switched to SigLIP gets a new `logit_bias` at the
    SigLIP initialisation."""
    config = HFClipConfig.from_pretrained(model_name_or_path)
    overrides = config_overrides(patch_dropout, loss_args)
    try:
        config = override_config(config, overrides)
    except (StrictDataclassError, ValueError, TypeError) as error:
        raise ValueError(f"The config of {model_name_or_path!r} with {overrides}: {_config_error(error)}") from None
    model = HFClipModel.from_pretrained(model_name_or_path, config=config)
    loaded = AutoProcessor.from_pretrained(model_name_or_path)
    match_special_tokens(model, loaded.tokenizer)
    return model, HFClipProcessor(image_processor=loaded.image_processor, tokenizer=loaded.tokenizer)


def lock_towers(model, locks: TowerLockArguments) -> None:
    """Freeze the towers that `--lock_image` / `--lock_text` name, but their last `--lock_*_unlocked_layers`."""
    if locks.lock_image:
        model.lock_image_tower(locks.lock_image_unlocked_layers)
    if locks.lock_text:
        model.lock_text_tower(locks.lock_text_unlocked_layers)


def zero_shot_templates(data_args: DatasetArguments, eval_args: EvalArguments) -> list[str]:
    """`--templates`, else the embedded dataset's own templates for it and `hf_clip.PHOTO_TEMPLATES` otherwise."""
    if eval_args.templates:
        return list(eval_args.templates)
    return list(SHAPES_TEMPLATES if data_args.dataset_name is None else PHOTO_TEMPLATES)


def evaluate_splits(model, processor, splits: dict, data_args: DatasetArguments, eval_args: EvalArguments,
                    loader_args: LoaderArguments, *, split_across_processes: bool) -> dict[str, dict[str, float]]:
    """`hf_clip.evaluate_split` on every split: {split: metrics}. With `split_across_processes`, every process
    embeds a share of the rows, so every process must call it."""
    return {
        name: evaluate_split(
            model, processor, dataset, columns=columns_of(data_args),
            templates=zero_shot_templates(data_args, eval_args), batch_size=loader_args.per_device_eval_batch_size,
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


def pipeline_demo(model_dir: str | Path, splits: dict, data_args: DatasetArguments) -> str | None:
    """Load the saved model with `pipeline("zero-shot-image-classification")` and classify the first decodable image
    of the first eval split over its label column's classes; None when there is no labelled eval split."""
    dataset = next(iter(splits.values()), None)
    if dataset is None or data_args.label_column not in dataset.column_names:
        return None
    names = dataset.features[data_args.label_column].names
    found = first_decodable_image(dataset, data_args)
    if found is None:
        return "pipeline: no decodable image among the first evaluation rows"
    row, image = found
    classifier = pipeline("zero-shot-image-classification", model=str(model_dir))
    predictions = classifier(image, candidate_labels=names, hypothesis_template="a photo of a {}.")
    top = ", ".join(f"{p['label']} {100 * p['score']:.1f}%" for p in predictions[:3])
    return f"pipeline on one image of a {names[row[data_args.label_column]]!r}: {top}"
