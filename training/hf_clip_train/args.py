"""The argument vocabulary of `hf_clip_train.train`, `hf_clip_train.evaluate`, `hf_clip_train.finetune_trainer` and
`hf-clip-index`.

Each script parses the dataclasses below for what it shares with the others (model, dataset and columns, eval
splits, tower locks), with `HfArgumentParser`. Each class checks its own values when it is made (`__post_init__`,
as the argument classes of Transformers' `run_clip.py` do), naming the flag; the scripts trust them afterwards.
Names follow `transformers.TrainingArguments` where it has one (`save_steps`, `save_total_limit`,
`activation_checkpointing`, `per_device_eval_batch_size`, `dataloader_num_workers`); `finetune_trainer` parses
`transformers.TrainingArguments` itself for those.

Arguments may also come from a YAML or JSON file given as the first argument; flags after it override it:
`python -m hf_clip_train.train recipe.yaml --learning_rate 5e-4`. Old flag spellings keep working for one release,
with a deprecation warning.
"""

import json
import logging
import math
import sys
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import yaml
from huggingface_hub.errors import StrictDataclassError
from transformers import HfArgumentParser

from hf_clip import HFClipConfig
from hf_clip.cli import UsageError
from hf_clip.grad_cache import check_micro_batches
from hf_clip.hub import is_hub_repo_id
from hf_clip.towers import POOLINGS, PROJECTION_TYPES
from hf_clip.zero_shot import check_templates


class InputError(UsageError, ValueError):
    """Input the scripts refuse, with a message for the user: a flag's value or combination, a config file, a dataset,
    split or column that the flags name, data without a usable row, a resume with another recipe. A `ValueError`,
    and a `hf_clip.cli.UsageError`, which the console scripts report as one line and exit status 2."""


class MissingInputError(UsageError, FileNotFoundError):
    """A file, folder or checkpoint that a flag names and that does not exist (a `FileNotFoundError`, and a
    `UsageError`)."""


logger = logging.getLogger(__name__)


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "hf_clip or Transformers CLIP checkpoint (directory or Hub id). Without it, training "
                          "starts from scratch from --preset, with a tokenizer trained on the captions."},
    )

    def __post_init__(self):
        check_model_name_or_path(self.model_name_or_path)


@dataclass
class PretrainedTowerArguments:
    """A model composed from a pretrained Transformers vision backbone and, optionally, a pretrained text encoder
    (`HFClipModel.from_vision_text_pretrained`); without a text model, the text tower is `--preset`'s built-in one with
    a tokenizer trained on the captions, as in a from-scratch run (LiT needs no pretrained text model)."""

    vision_model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Pretrained Transformers vision backbone (folder or Hub id: ViT, DINOv2, ConvNeXt, Swin, the "
                          "vision tower of a CLIP or SigLIP, ...) to compose the model from; its own image processor "
                          "prepares the images. With --lock_image: LiT."},
    )
    text_model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Pretrained Transformers text encoder (BERT, RoBERTa, XLM-R, ModernBERT, ...) for the text "
                          "tower, used with its own tokenizer and context length. Unset: --preset's built-in text "
                          "tower with a tokenizer trained on the captions. Needs --vision_model_name_or_path."},
    )
    vision_model_revision: str | None = field(
        default=None, metadata={"help": "Hub revision (branch, tag or commit) of --vision_model_name_or_path."}
    )
    text_model_revision: str | None = field(
        default=None, metadata={"help": "Hub revision (branch, tag or commit) of --text_model_name_or_path."}
    )
    projection_dim: int | None = field(
        default=None,
        metadata={"help": "Width of the shared embedding space of a composed or from-scratch model. Unset: 512 with "
                          "two pretrained towers, else --preset's."},
    )
    vision_pooling: str | None = field(
        default=None,
        metadata={"help": f"Pooling of the pretrained vision tower: {', '.join(POOLINGS)}. Unset: its family's own "
                          "(docs/towers.md)."},
    )
    text_pooling: str | None = field(
        default=None,
        metadata={"help": f"Pooling of the pretrained text tower: {', '.join(POOLINGS)}. Unset: its family's own."},
    )
    vision_projection_type: str = field(
        default="linear",
        metadata={"help": f"Projection of the pretrained vision tower: {', '.join(PROJECTION_TYPES)}."},
    )
    text_projection_type: str = field(
        default="linear", metadata={"help": f"Projection of the pretrained text tower: {', '.join(PROJECTION_TYPES)}."}
    )

    def __post_init__(self):
        check_at_least_one(self, "projection_dim")
        for modality in ("vision", "text"):
            name_or_path = getattr(self, f"{modality}_model_name_or_path")
            check_model_name_or_path(name_or_path, f"--{modality}_model_name_or_path")
            check_choice(f"--{modality}_pooling", getattr(self, f"{modality}_pooling"), POOLINGS)
            check_choice(f"--{modality}_projection_type", getattr(self, f"{modality}_projection_type"),
                         PROJECTION_TYPES)
            if name_or_path is None:
                given = [f"--{modality}_{name}" for name in ("model_revision", "pooling")
                         if getattr(self, f"{modality}_{name}") is not None]
                if getattr(self, f"{modality}_projection_type") != "linear":
                    given.append(f"--{modality}_projection_type")
                if given:
                    raise InputError(f"{', '.join(given)} set(s) the pretrained {modality} tower, but "
                                     f"--{modality}_model_name_or_path is not given.")
        if self.text_model_name_or_path is not None and self.vision_model_name_or_path is None:
            raise InputError("--text_model_name_or_path needs --vision_model_name_or_path: a composed model starts "
                             "from a pretrained vision backbone (pass --model_name_or_path to start from a whole "
                             "hf_clip or CLIP checkpoint).")

    @property
    def composed(self) -> bool:
        return self.vision_model_name_or_path is not None


@dataclass
class TowerLockArguments:
    lock_image: bool = field(default=False, metadata={"help": "Freeze the image tower (and its projection)."})
    lock_image_unlocked_layers: int = field(
        default=0, metadata={"help": "With --lock_image, keep the last N image blocks (and post-LN) trainable."}
    )
    lock_text: bool = field(default=False, metadata={"help": "Freeze the text tower (and its projection)."})
    lock_text_unlocked_layers: int = field(
        default=0, metadata={"help": "With --lock_text, keep the last N text blocks (and final LN) trainable."}
    )


@dataclass
class LossArguments:
    loss_type: str | None = field(
        default=None,
        metadata={"help": "clip (softmax InfoNCE) or siglip (pairwise sigmoid with a learned logit bias). Unset: "
                          "the checkpoint's, or clip from scratch."},
    )
    loss_chunk_size: int | None = field(
        default=None,
        metadata={"help": "Rows per panel of the memory-bounded exact loss (0: dense). Unset: the checkpoint's, or "
                          "chosen from the batch size."},
    )

    def __post_init__(self):
        check_config_value("loss_type", self.loss_type, {"loss_type": self.loss_type})
        check_config_value("loss_chunk_size", self.loss_chunk_size, {"loss_chunk_size": self.loss_chunk_size})


@dataclass
class FromScratchArguments:
    preset: str = field(
        default="tiny",
        metadata={"help": "Config preset for training from scratch: tiny, ViT-B-32, ViT-B-16, ViT-L-14."},
    )
    tokenizer_vocab_size: int = field(
        default=2048, metadata={"help": "Vocabulary size of the BPE tokenizer trained when starting from scratch."}
    )
    context_length: int = field(default=32, metadata={"help": "Text context (tokens) of a model trained from scratch."})
    image_size: int | None = field(
        default=None,
        metadata={"help": "Input resolution of a model trained from scratch. Unset: the training images' own size "
                          "(median longer side of the first rows), rounded up to whole patches and at most the "
                          "preset's."},
    )
    patch_size: int | None = field(
        default=None,
        metadata={"help": "Patch size of a model trained from scratch. Unset: the preset's, halved until the image "
                          "is at least 4 patches across."},
    )


@dataclass
class PatchDropoutArguments:
    patch_dropout: float | None = field(
        default=None,
        metadata={"help": "Fraction of image patch tokens dropped at random in training (FLIP); evaluation sees every "
                          "patch. Unset: the checkpoint's value (0 from scratch)."},
    )

    def __post_init__(self):
        check_config_value("patch_dropout", self.patch_dropout,
                           {"vision_config": {"patch_dropout": self.patch_dropout}})


@dataclass
class DatasetArguments:
    dataset_name: str | None = field(
        default=None,
        metadata={"help": "Any datasets.load_dataset target (Hub id, imagefolder directory, parquet/csv/jsonl "
                          "file or glob) or a save_to_disk directory. Unset: the embedded shapes dataset."},
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "Dataset configuration name, if any."})
    train_split: str = field(default="train", metadata={"help": "Split to train on."})
    image_column: str = field(default="image", metadata={"help": "Column with images (decoded, paths or bytes)."})
    caption_column: str = field(
        default="caption", metadata={"help": "Column with a caption or a list of captions (one is sampled per step)."}
    )
    label_column: str = field(
        default="label",
        metadata={"help": "ClassLabel column whose class names drive zero-shot evaluation (skipped if absent)."},
    )
    streaming: bool = field(default=False, metadata={"help": "Stream the training split (IterableDataset)."})
    shuffle_buffer_size: int = field(default=10_000, metadata={"help": "Shuffle buffer of a streamed split."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Use at most this many training rows."})
    embedded_num_train: int = field(
        default=24_000, metadata={"help": "Training scenes generated for the embedded dataset."}
    )

    def __post_init__(self):
        check_at_least_one(self, "max_train_samples")


@dataclass
class EvalArguments:
    eval_splits: list[str] = field(
        default_factory=lambda: ["test", "test_unseen"],
        metadata={"help": "Splits to evaluate on; missing ones are skipped with a warning."},
    )
    max_eval_samples: int | None = field(default=None, metadata={"help": "Evaluate on at most this many rows."})
    templates: list[str] | None = field(
        default=None,
        metadata={"help": "Zero-shot prompt templates (one {} each); default: the embedded dataset's own templates "
                          "for it, hf_clip.PHOTO_TEMPLATES otherwise."},
    )

    def __post_init__(self):
        if self.templates is not None:
            check_templates(self.templates)


@dataclass
class LoaderArguments:
    """Named and meant as in `transformers.TrainingArguments` (which `finetune_trainer` parses instead)."""

    per_device_eval_batch_size: int = field(default=256, metadata={"help": "Evaluation batch per process."})
    dataloader_num_workers: int = field(
        default=2, metadata={"help": "DataLoader worker processes for decoding and augmentation."}
    )

    def __post_init__(self):
        check_at_least_one(self, "per_device_eval_batch_size")


@dataclass
class RunArguments:
    """The Accelerate training loop of `hf_clip_train.train`."""

    output_dir: str = field(default="outputs/hf-clip", metadata={"help": "Where checkpoints, logs and the model go."})
    seed: int = field(default=42, metadata={"help": "Seed for initialisation, data order and augmentation."})
    per_device_train_batch_size: int | None = field(
        default=None,
        metadata={"help": "Training batch per process. Unset: 128, halved (down to 8) while one pass over a map-style "
                          "training split would be under 16 global batches, so small datasets still get many steps."},
    )
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Micro-batches per optimiser step."})
    grad_cache_micro_batches: int = field(
        default=1,
        metadata={"help": "GradCache: embed each per-device batch in K micro-batches while the contrastive loss still "
                          "spans the whole batch (exact gradients, one micro-batch's activations in memory)."},
    )
    max_steps: int = field(default=600, metadata={"help": "Number of optimiser steps."})
    learning_rate: float = field(default=1e-3, metadata={"help": "Peak learning rate."})
    weight_decay: float = field(
        default=0.1, metadata={"help": "AdamW weight decay (not applied to biases, norms, embeddings, logit scale)."}
    )
    adam_beta1: float = field(default=0.9, metadata={"help": "AdamW beta1."})
    adam_beta2: float = field(default=0.98, metadata={"help": "AdamW beta2."})
    adam_epsilon: float = field(default=1e-6, metadata={"help": "AdamW epsilon."})
    warmup_steps: float = field(
        default=0.1,
        metadata={"help": "Linear warm-up before the cosine decay: a whole number of steps, or a fraction in [0, 1) of "
                          "--max_steps (as in transformers.TrainingArguments)."},
    )
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm (0 disables)."})
    torch_compile: bool = field(
        default=False, metadata={"help": "torch.compile both towers for training and evaluation."}
    )
    torch_compile_backend: str = field(default="inductor", metadata={"help": "torch.compile backend."})
    torch_compile_mode: str | None = field(
        default=None, metadata={"help": "torch.compile mode (default, reduce-overhead, max-autotune)."}
    )
    mixed_precision: str = field(
        default="auto",
        metadata={"help": "auto (bf16 where the hardware runs it natively, else fp32), no, bf16 or fp16."},
    )
    activation_checkpointing: bool = field(
        default=False, metadata={"help": "Recompute activations in the backward pass to save memory."}
    )
    logging_steps: int = field(
        default=10,
        metadata={"help": "Log training metrics every N steps; the --max_bad_fraction bound and --nonfinite_loss are "
                          "checked then too."},
    )
    eval_steps: int = field(default=0, metadata={"help": "Evaluate every N steps (0: only at the end)."})
    save_steps: int = field(default=0, metadata={"help": "Save the full training state every N steps (0: never)."})
    save_total_limit: int = field(default=2, metadata={"help": "Keep only the last K checkpoints."})
    resume_from_checkpoint: str | None = field(
        default=None,
        metadata={"help": "'latest' or a checkpoint directory to resume from. Flags the checkpoint fixes (the learning "
                          "rate and schedule, batch sizes and process count, seed, AdamW settings, training data, "
                          "loss type, pretrained towers and --lock_image) must equal its values unless "
                          "--allow_resume_changes; unset --per_device_train_batch_size and --loss_type take its "
                          "values."},
    )
    allow_resume_changes: bool = field(
        default=False,
        metadata={"help": "Resume even though flags the checkpoint fixes differ from its values (except --loss_type): "
                          "each change is logged, takes effect from the resumed step and is recorded in the model "
                          "card. A changed batch size, seed or dataset re-reads the data from the step count."},
    )
    max_bad_fraction: float | None = field(
        default=None,
        metadata={"help": "Stop when more than this fraction (0 to 1) of the training rows read so far were unusable "
                          "(checked at logging steps). Unset: unusable rows are skipped and counted, and a run stops "
                          "only when a whole pass over the split finds no usable row."},
    )
    nonfinite_loss: str = field(
        default="stop",
        metadata={"help": "A non-finite loss or gradient norm: 'stop' (an error at the next logging or saving step; "
                          "the weights are never saved or pushed, the last finite checkpoint stays) or 'skip' (that "
                          "optimiser update is skipped on the device, as mixed-precision loss scalers do, and counted "
                          "in the logs as nonfinite_steps)."},
    )
    report_to: str = field(default="tensorboard", metadata={"help": "Accelerate tracker: tensorboard or none."})
    push_to_hub: bool = field(
        default=False,
        metadata={"help": "At the end, push the model, processor, model card and eval results to the Hub in one "
                          "commit (token from HF_TOKEN or `hf auth login`; HF_ENDPOINT picks the Hub)."},
    )
    hub_model_id: str | None = field(
        default=None, metadata={"help": "Repo to push to, 'name' or 'namespace/name' (default: output_dir's name)."}
    )
    hub_private_repo: bool = field(
        default=False, metadata={"help": "Create the Hub repo as private (has no effect on an existing repo)."}
    )
    hub_push_checkpoints: bool = field(
        default=False,
        metadata={"help": "With --push_to_hub, also push the model at every --save_steps to the repo's "
                          "'checkpoints' branch (one commit each; training waits for the upload)."},
    )
    log_sample_ids: bool = field(
        default=False, metadata={"help": "Write the dataset row ids of every step to sample_ids_rank{R}.jsonl."}
    )

    def __post_init__(self):
        """Refuse, naming the flag, values that would crash or act every step."""
        check_at_least_one(self, "max_steps", "per_device_train_batch_size", "gradient_accumulation_steps",
                           "logging_steps")
        for name in ("save_steps", "eval_steps"):
            if getattr(self, name) < 0:
                raise InputError(f"--{name} must be 0 (never) or a positive number of steps, got "
                                 f"{getattr(self, name)}.")
        if self.max_bad_fraction is not None and not 0 <= self.max_bad_fraction < 1:
            raise InputError(f"--max_bad_fraction must be in [0, 1) (a fraction of the rows read), got "
                             f"{self.max_bad_fraction}.")
        if self.nonfinite_loss not in NONFINITE_LOSS_ACTIONS:
            raise InputError(f"--nonfinite_loss must be one of {NONFINITE_LOSS_ACTIONS}, got {self.nonfinite_loss!r}.")
        warmup_step_count(self.warmup_steps, self.max_steps)
        if self.per_device_train_batch_size is not None:
            self.check_grad_cache()

    def check_grad_cache(self) -> None:
        """`--grad_cache_micro_batches` must divide the per-device batch (checked again when that is filled in)."""
        try:
            check_micro_batches(self.grad_cache_micro_batches, self.per_device_train_batch_size)
        except ValueError as error:
            raise InputError(f"--grad_cache_micro_batches (with --per_device_train_batch_size "
                             f"{self.per_device_train_batch_size}): {error}") from None


@dataclass
class IndexArguments:
    """The index folder `hf-clip-index` writes."""

    output_dir: str = field(default="outputs/index", metadata={"help": "The index folder to write."})
    keep_columns: list[str] = field(
        default_factory=list,
        metadata={"help": "Dataset columns copied beside the embeddings and returned with each hit (a path, a URL, "
                          "the caption; an image column gives the HTML page its thumbnails)."},
    )
    shard_size: int = field(
        default=10_000,
        metadata={"help": "Rows per shard. Each finished shard is written at once, so a killed run redoes at most "
                          "one shard per process."},
    )
    index_type: str = field(
        default="flat",
        metadata={"help": "flat: exact inner-product search (FAISS if installed, else a torch matrix product). "
                          "ivf_pq: approximate FAISS index for large collections (needs faiss); its recall@10 against "
                          "exact search is measured and written to index_info.json."},
    )
    target_recall: float = field(
        default=0.95,
        metadata={"help": "With --index_type ivf_pq: probe twice the fewest inverted lists at which the recall@10 "
                          "against exact search of the collection's image and caption queries reaches this on "
                          "average, with their worst 5%% no more than 0.15 below it (all lists if none does)."},
    )
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Replace a finished or half-built index in --output_dir."}
    )
    hub_dataset_id: str | None = field(
        default=None, metadata={"help": "Push the finished index folder to this Hub dataset repo ('name' or "
                                        "'namespace/name'; token from HF_TOKEN or `hf auth login`)."},
    )

    def __post_init__(self):
        from .search.ann import check_index_type, import_faiss

        check_at_least_one(self, "shard_size")
        check_index_type(self.index_type)
        if self.index_type != "flat":
            import_faiss(f"--index_type {self.index_type}")


@dataclass
class TrainScriptArguments:
    """Every argument of `hf_clip_train.train`, by group; checks the values that depend on several groups."""

    model: ModelArguments
    towers: PretrainedTowerArguments
    locks: TowerLockArguments
    loss: LossArguments
    patch_dropout: PatchDropoutArguments
    scratch: FromScratchArguments
    data: DatasetArguments
    eval: EvalArguments
    loader: LoaderArguments
    run: RunArguments

    def __post_init__(self):
        if self.towers.composed:
            self.check_composed()
        elif self.model.model_name_or_path is None:
            if self.scratch.image_size is not None:
                image_geometry(self.scratch, None)
            if self.locks.lock_image:
                raise InputError("--lock_image freezes a pretrained image tower, and a run from scratch (--preset) "
                                 "has none: pass --vision_model_name_or_path (LiT: a pretrained vision backbone, "
                                 "locked) or --model_name_or_path.")
        elif self.towers.projection_dim is not None:
            raise InputError("--projection_dim sets the width of a new model's embeddings; --model_name_or_path keeps "
                             "its checkpoint's.")

    def check_composed(self) -> None:
        """Refuse the flags that cannot apply to a model composed from pretrained towers, naming them."""
        if self.model.model_name_or_path is not None:
            raise InputError("--model_name_or_path and --vision_model_name_or_path both say where the model starts; "
                             "pass one (a whole checkpoint, or pretrained towers to compose).")
        scratch_vision = [f"--{name}" for name in ("image_size", "patch_size") if getattr(self.scratch, name)]
        if scratch_vision:
            raise InputError(f"{' and '.join(scratch_vision)} shape a vision tower trained from scratch; the "
                             f"pretrained vision tower {self.towers.vision_model_name_or_path!r} keeps its own (its "
                             "image processor gives the input size).")
        if self.patch_dropout.patch_dropout:
            raise InputError(f"--patch_dropout {self.patch_dropout.patch_dropout}: patch dropout is a step of "
                             "hf_clip's built-in ViT, and the vision tower "
                             f"{self.towers.vision_model_name_or_path!r} is a Transformers backbone; leave it unset.")

    def flat(self) -> dict:
        parts = (self.model, self.towers, self.locks, self.loss, self.patch_dropout, self.scratch, self.data, self.eval,
                 self.loader, self.run)
        return {key: value for part in parts for key, value in asdict(part).items()}


TRAIN_ARGUMENT_CLASSES = (ModelArguments, PretrainedTowerArguments, TowerLockArguments, LossArguments,
                          PatchDropoutArguments, FromScratchArguments, DatasetArguments, EvalArguments,
                          LoaderArguments, RunArguments)


NONFINITE_LOSS_ACTIONS = ("stop", "skip")


def config_error(error: Exception) -> Exception:
    """The config validator's own error inside huggingface_hub's strict-dataclass wrapper."""
    return error.__cause__ if isinstance(error, StrictDataclassError) and error.__cause__ is not None else error


def check_config_value(flag: str, value, overrides: dict) -> None:
    """Refuse, naming the flag, a value (unset: None passes) that `HFClipConfig`'s own validation refuses in a
    default config (`common.load_pretrained` applies it to the checkpoint's config)."""
    if value is None:
        return
    try:
        HFClipConfig(**overrides)
    except (StrictDataclassError, ValueError, TypeError) as error:
        raise InputError(f"--{flag} {value!r}: {config_error(error)}") from None


def image_geometry(scratch: FromScratchArguments, data_image_size: int | None) -> dict[str, int]:
    """`image_size` and `patch_size` of a model trained from scratch: the flags where given; else the preset's patch
    size, halved until the image is at least 4 patches across, and the data's image size rounded up to whole
    patches and capped at the preset's."""
    preset = HFClipConfig.from_preset(scratch.preset).vision_config
    image_size = scratch.image_size or data_image_size or preset.image_size
    patch_size = scratch.patch_size
    if patch_size is None:
        patch_size = preset.patch_size
        while patch_size > 1 and image_size < 4 * patch_size:
            patch_size //= 2
    if scratch.image_size is None:
        image_size = min(preset.image_size, math.ceil(image_size / patch_size) * patch_size)
    if image_size % patch_size:
        raise InputError(f"--image_size ({image_size}) must be a multiple of --patch_size ({patch_size}).")
    return {"image_size": image_size, "patch_size": patch_size}


def check_model_name_or_path(model_name_or_path: str | None, flag: str = "--model_name_or_path") -> None:
    """Refuse a `flag` value that is neither an existing directory nor shaped like a Hub repo id."""
    if model_name_or_path is None or Path(model_name_or_path).expanduser().exists():
        return
    if not is_hub_repo_id(model_name_or_path):
        raise MissingInputError(f"{flag} {model_name_or_path!r}: no such directory, and not a Hub repo id ('name' "
                                "or 'namespace/name').")


def check_choice(flag: str, value: str | None, choices: Iterable[str]) -> None:
    """Refuse, naming the flag and the choices, a value (unset: None passes) that is not one of `choices`."""
    if value is not None and value not in choices:
        raise InputError(f"{flag} must be one of {', '.join(choices)}; got {value!r}.")


def warmup_step_count(warmup_steps: float, max_steps: int) -> int:
    """`--warmup_steps` as a number of steps: whole numbers as they are, fractions in [0, 1) of `max_steps`
    (rounded up, as `transformers.TrainingArguments.get_warmup_steps` does)."""
    if warmup_steps < 0 or (warmup_steps >= 1 and warmup_steps != int(warmup_steps)):
        raise InputError(f"--warmup_steps must be a whole number of steps or a fraction in [0, 1), got {warmup_steps}.")
    return int(warmup_steps) if warmup_steps >= 1 else math.ceil(warmup_steps * max_steps)


def default_batch_size(num_rows: int | None, num_processes: int) -> int:
    """The per-process batch when `--per_device_train_batch_size` is unset: 128, halved (down to 8) while `num_rows`
    (None for a stream) would fill fewer than 16 global batches."""
    batch_size = 128
    while num_rows is not None and batch_size > 8 and num_rows < 16 * batch_size * num_processes:
        batch_size //= 2
    return batch_size


def check_at_least_one(arguments, *names: str) -> None:
    """Refuse, naming the flag, any of the `names` fields of `arguments` below 1 (they would crash or train nothing);
    unset (None) fields pass."""
    for name in names:
        value = getattr(arguments, name)
        if value is not None and value < 1:
            raise InputError(f"--{name} must be at least 1, got {value}.")


def rename_deprecated(argv: list[str], renamed: Mapping[str, str]) -> list[str]:
    """`argv` with the old flag spellings in `renamed` (old name -> new name) replaced, warning once for each."""
    result = []
    for arg in argv:
        name, equals, value = arg.partition("=")
        old = name.removeprefix("--") if name.startswith("--") else None
        if old in renamed:
            logger.warning("--%s is deprecated and will be removed in the next release; use --%s.", old, renamed[old])
            arg = f"--{renamed[old]}{equals}{value}"
        result.append(arg)
    return result


def parse_with_config_file(classes: Iterable[type], argv: list[str] | None, renamed: Mapping[str, str] = {},
                           defaults: Mapping[str, object] = {}) -> tuple:
    """Parse `argv` (default: sys.argv[1:]) into `classes`, on top of a YAML/JSON file given as its first argument."""
    classes = tuple(classes)
    argv = rename_deprecated(list(sys.argv[1:] if argv is None else argv), renamed)
    parser = HfArgumentParser(classes)
    parser.set_defaults(**defaults)
    if argv and Path(argv[0]).suffix in (".yaml", ".yml", ".json"):
        path = Path(argv.pop(0))
        if not path.is_file():
            raise MissingInputError(f"Config file {str(path)!r} does not exist (a first argument ending in "
                                    f"{path.suffix} is read as a file of arguments).")
        text = path.read_text()
        try:
            values = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
        except (json.JSONDecodeError, yaml.YAMLError) as error:
            raise InputError(f"Config file {str(path)!r} is not valid {path.suffix[1:].upper()}: "
                             f"{' '.join(str(error).split())}") from None
        if not isinstance(values, dict):
            raise InputError(f"{path} must hold a mapping of argument names to values.")
        for old in set(values) & set(renamed):
            logger.warning("%s: %r is deprecated and will be removed in the next release; use %r.", path, old,
                           renamed[old])
            values[renamed[old]] = values.pop(old)
        known = {f.name for cls in classes for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise InputError(f"{path}: unknown argument(s) {unknown}.")
        parser.set_defaults(**values)
    return parser.parse_args_into_dataclasses(args=argv, look_for_args_file=False)
