"""Contrastive image-text training of hf_clip with Accelerate on HF datasets.

    python -m hf_clip_train.train                                  # embedded dataset, tiny model from scratch
    python -m hf_clip_train.train recipe.yaml --max_steps 2000     # arguments from a file, overridden by flags
    accelerate launch -m hf_clip_train.train --dataset_name DATA   # any number of processes / GPUs / nodes
    torchrun --nproc_per_node 2 -m hf_clip_train.train ...

Run with `--help` for every argument.
"""

import glob
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import datasets
import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, ProjectConfiguration, broadcast_object_list, gather_object, set_seed
from tqdm.auto import tqdm
from transformers import AutoTokenizer, get_cosine_schedule_with_warmup

from hf_clip import (
    PHOTO_TEMPLATES,
    PUBLISHED_HYPERPARAMETERS,
    ContrastiveDataCollator,
    HFClipConfig,
    HFClipModel,
    HFClipProcessor,
    ModelCardInfo,
    grad_cache_backward,
    push_to_hub,
    render_model_card,
    train_clip_tokenizer,
)
from hf_clip.grad_cache import check_micro_batches
from hf_clip.hub import check_push_access, public_name
from hf_clip.integrity import write_manifest
from hf_clip.zero_shot import check_templates

from .args import (
    DatasetArguments,
    EvalArguments,
    FromScratchArguments,
    LoaderArguments,
    LossArguments,
    ModelArguments,
    PatchDropoutArguments,
    RunArguments,
    TowerLockArguments,
    check_at_least_one,
    check_model_name_or_path,
    check_run_arguments,
    default_batch_size,
    parse_with_config_file,
    warmup_step_count,
)
from .checkpointing import (
    complete_checkpoints,
    read_state,
    resolve_checkpoint,
    save_checkpoint,
    truncate_step_log,
)
from .common import (
    check_config_overrides,
    config_overrides,
    evaluate_splits,
    format_results_table,
    load_pretrained,
    lock_towers,
    pipeline_demo,
)
from .data import (
    ImageTransform,
    ProcessShare,
    TrainBatches,
    build_train_dataset,
    caption_samples,
    check_label_columns,
    check_usable_rows,
    image_transform_for,
    load_eval_splits,
    load_train_split,
    normalize_pixels,
    typical_image_size,
    worker_count,
)
from .fsdp import (
    enable_fsdp_on_cpu,
    full_value,
    local_pieces,
    register_feature_methods,
    scalar_logit_scale,
    shardable_logit_scale_,
    unsharded_model,
)
from .synthetic import DATASET_ID, caption_corpus, describe

logger = logging.getLogger("hf_clip_train")

HUB_CHECKPOINT_BRANCH = "checkpoints"
RENAMED_FLAGS = {
    "checkpointing_steps": "save_steps",
    "checkpoints_total_limit": "save_total_limit",
    "gradient_checkpointing": "activation_checkpointing",
    "num_workers": "dataloader_num_workers",
}
# This script's own recipe keys, published beside `hf_clip.PUBLISHED_HYPERPARAMETERS` (as `extra_hyperparameters`).
SCRIPT_CARD_KEYS = ("preset", "tokenizer_vocab_size", "context_length", "image_size", "patch_size", "resume_changes",
                    "nonfinite_steps_skipped")
CARD_KEYS = (*PUBLISHED_HYPERPARAMETERS, *SCRIPT_CARD_KEYS)


@dataclass
class TrainScriptArguments:
    model: ModelArguments
    locks: TowerLockArguments
    loss: LossArguments
    patch_dropout: PatchDropoutArguments
    scratch: FromScratchArguments
    data: DatasetArguments
    eval: EvalArguments
    loader: LoaderArguments
    run: RunArguments

    def flat(self) -> dict:
        return {key: value for part in (self.model, self.locks, self.loss, self.patch_dropout, self.scratch, self.data,
                                        self.eval, self.loader, self.run) for key, value in asdict(part).items()}


ARGUMENT_CLASSES = (ModelArguments, TowerLockArguments, LossArguments, PatchDropoutArguments, FromScratchArguments,
                    DatasetArguments,
                    EvalArguments, LoaderArguments, RunArguments)


def parse_args(argv: list[str] | None = None) -> TrainScriptArguments:
    """Flags, optionally on top of a YAML/JSON config file given as the first argument."""
    args = TrainScriptArguments(*parse_with_config_file(ARGUMENT_CLASSES, argv, RENAMED_FLAGS))
    check_run_arguments(args.run)
    check_at_least_one(args.loader, "per_device_eval_batch_size")
    check_model_name_or_path(args.model.model_name_or_path)
    check_config_overrides(args.patch_dropout.patch_dropout, args.loss)
    if args.eval.templates is not None:
        check_templates(args.eval.templates)
    run = args.run
    warmup_step_count(run.warmup_steps, run.max_steps)
    if args.model.model_name_or_path is None and args.scratch.image_size is not None:
        image_geometry(args.scratch, None)
    if run.per_device_train_batch_size is not None:
        check_grad_cache(run)
    return args


def check_grad_cache(run: RunArguments) -> None:
    try:
        check_micro_batches(run.grad_cache_micro_batches, run.per_device_train_batch_size)
    except ValueError as error:
        raise ValueError(f"--grad_cache_micro_batches (with --per_device_train_batch_size "
                         f"{run.per_device_train_batch_size}): {error}") from None


def set_default_batch_size(run: RunArguments, train_split, data: DatasetArguments, num_processes: int) -> None:
    """Fill the unset `--per_device_train_batch_size` from the rows the run reads (`default_batch_size`)."""
    num_rows = None if isinstance(train_split, datasets.IterableDataset) else len(train_split)
    if num_rows is not None and data.max_train_samples is not None:
        num_rows = min(num_rows, data.max_train_samples)
    run.per_device_train_batch_size = default_batch_size(num_rows, num_processes)
    logger.info("Batch size %d per process (%s training rows)", run.per_device_train_batch_size, num_rows or "?")
    check_grad_cache(run)


def check_cpu_launch(num_processes: int) -> None:
    """Refuse a run that `accelerate launch --cpu` meant to spread over several processes or machines (it set
    MASTER_ADDR) but started as one process: without `--mpirun_hostfile`, its CPU launcher starts one process per
    machine that knows nothing of the others, so each would train alone into the same output folder."""
    launched_on_cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("true", "1")
    if launched_on_cpu and "MASTER_ADDR" in os.environ and num_processes == 1:
        raise RuntimeError(
            "accelerate launch --cpu asked for several processes or machines, but this process is alone: Accelerate's "
            "CPU launcher starts them only through MPI (--mpirun_hostfile). Use `accelerate launch --multi_gpu "
            "--num_machines N --machine_rank R ...` or `torchrun`, which start one gloo process per slot on CPUs "
            "too (hf_clip_train.train trains on the CPU when no accelerator is present); or unset MASTER_ADDR for a "
            "single-process run."
        )


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX: CPUs whose matrix units run bf16 natively (read from /proc/cpuinfo on Linux)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_mixed_precision(requested: str) -> str:
    """'auto' -> bf16 where the hardware runs it natively (CUDA with bf16, AVX512-BF16/AMX CPUs), else 'no'."""
    if requested not in ("auto", "no", "bf16", "fp16"):
        raise ValueError(f"--mixed_precision must be auto, no, bf16 or fp16, got {requested!r}.")
    if requested != "auto":
        return requested
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "no"
    return "bf16" if cpu_has_native_bf16() else "no"


def build_model_and_processor(args: TrainScriptArguments, train_split, accelerator: Accelerator, resuming: bool
                              ) -> tuple[HFClipModel, HFClipProcessor]:
    """Load `--model_name_or_path`, or build `--preset` from scratch with a tokenizer trained on the captions."""
    if args.model.model_name_or_path:
        return load_pretrained(args.model.model_name_or_path, args.patch_dropout.patch_dropout, args.loss)

    tokenizer_dir = Path(args.run.output_dir) / ".tokenizer"
    if accelerator.is_main_process and not (resuming and tokenizer_dir.is_dir()):
        if args.data.dataset_name is None:
            corpus = caption_corpus()
        else:
            corpus = [*caption_samples(train_split, args.data.caption_column),
                      *(template.format("") for template in PHOTO_TEMPLATES)]
        tokenizer = train_clip_tokenizer(corpus, vocab_size=args.scratch.tokenizer_vocab_size,
                                         model_max_length=args.scratch.context_length)
        tokenizer.save_pretrained(tokenizer_dir)
    accelerator.wait_for_everyone()
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    geometry = image_geometry(args.scratch, typical_image_size(train_split, args.data))
    args.scratch.image_size, args.scratch.patch_size = geometry["image_size"], geometry["patch_size"]
    logger.info("Image size %d, patch size %d", geometry["image_size"], geometry["patch_size"])
    overrides = config_overrides(args.patch_dropout.patch_dropout, args.loss)
    overrides["vision_config"] = {**overrides.get("vision_config", {}), **geometry}
    config = HFClipConfig.from_preset(args.scratch.preset, tokenizer=tokenizer, **overrides)
    model = HFClipModel(config)
    return model, HFClipProcessor.from_tokenizer(tokenizer, image_size=config.vision_config.image_size)


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
        raise ValueError(f"--image_size ({image_size}) must be a multiple of --patch_size ({patch_size}).")
    return {"image_size": image_size, "patch_size": patch_size}


def build_optimizer(model: HFClipModel, run: RunArguments) -> torch.optim.Optimizer:
    """AdamW without weight decay on biases, norms, embeddings and the logit scale; fused where torch has it."""
    no_decay = model.no_weight_decay_parameter_names()
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    groups = [
        {"params": [p for name, p in trainable if name not in no_decay], "weight_decay": run.weight_decay},
        {"params": [p for name, p in trainable if name in no_decay], "weight_decay": 0.0},
    ]
    kwargs = {"lr": run.learning_rate, "betas": (run.adam_beta1, run.adam_beta2), "eps": run.adam_epsilon}
    try:
        return torch.optim.AdamW(groups, fused=True, **kwargs)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(groups, foreach=True, **kwargs)


# Flags a checkpoint fixes (its optimizer, scheduler and data position were made with them); a resume compares them
# with the checkpoint's (`check_resume`).
RESUME_FIXED_FLAGS = (
    "learning_rate", "warmup_steps", "max_steps", "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon",
    "per_device_train_batch_size", "gradient_accumulation_steps", "num_processes", "seed", "dataset_name",
    "dataset_config_name", "train_split", "image_column", "caption_column", "max_train_samples", "streaming",
    "shuffle_buffer_size", "embedded_num_train", "loss_type",
)
# Refused even with --allow_resume_changes: the checkpoint's weights and optimizer state belong to its loss.
NEVER_CHANGED_ON_RESUME = ("loss_type",)
CHECKPOINT_PUSH_RETRIES = 2


def dataset_identity(dataset_name: str | None) -> str | None:
    """`--dataset_name` as a resume compares it: a local path or glob made absolute, anything else as given."""
    if dataset_name is None:
        return None
    expanded = os.path.expanduser(dataset_name)
    return os.path.abspath(expanded) if Path(expanded).exists() or glob.glob(expanded) else dataset_name


def resume_recipe(args: TrainScriptArguments, num_processes: int, loss_type: str) -> dict:
    """The values of `RESUME_FIXED_FLAGS` in this run; `loss_type` is the model's."""
    run, data = args.run, args.data
    values = {**args.flat(), "warmup_steps": warmup_step_count(run.warmup_steps, run.max_steps),
              "num_processes": num_processes, "dataset_name": dataset_identity(data.dataset_name),
              "loss_type": loss_type, "shuffle_buffer_size": data.shuffle_buffer_size if data.streaming else None,
              "embedded_num_train": data.embedded_num_train if data.dataset_name is None else None}
    return {key: values[key] for key in RESUME_FIXED_FLAGS}


def _flag(key: str) -> str:
    return "the process count" if key == "num_processes" else f"--{key}"


def take_unset_flags_from_checkpoint(args: TrainScriptArguments, saved: dict) -> None:
    """On resume, an unset --per_device_train_batch_size or --loss_type takes the checkpoint's value."""
    recipe = saved.get("recipe") or {}
    if args.run.per_device_train_batch_size is None and recipe.get("per_device_train_batch_size") is not None:
        args.run.per_device_train_batch_size = recipe["per_device_train_batch_size"]
        check_grad_cache(args.run)
    if args.loss.loss_type is None and recipe.get("loss_type") is not None:
        args.loss.loss_type = recipe["loss_type"]


def check_resume(checkpoint: Path, saved: dict, recipe: dict, allow_changes: bool) -> list[str]:
    """Compare this run's `recipe` with the one `checkpoint` was saved with (its state `saved`).

    Differences are refused with one error naming each flag with its value in the checkpoint and now, unless
    `allow_changes`; then each is logged, and returned as a line for the model card. A loss-type change is always
    refused. A checkpoint of an older release, without a recipe, is resumed unchecked (with a warning).
    """
    saved_recipe = saved.get("recipe")
    if saved_recipe is None:
        logger.warning("%s records no recipe (an older release saved it): the flags are not compared with its own.",
                       checkpoint)
        return []
    changed = {key: (saved_recipe[key], value) for key, value in recipe.items()
               if key in saved_recipe and saved_recipe[key] != value}
    described = "; ".join(f"{_flag(key)} {old!r} in the checkpoint, {new!r} now" for key, (old, new) in changed.items())
    if any(key in NEVER_CHANGED_ON_RESUME for key in changed):
        raise ValueError(
            f"Cannot resume from {checkpoint}: {described}. The loss type cannot change in a resume, even with "
            "--allow_resume_changes: the checkpoint's weights and optimizer state belong to its loss (a SigLIP model "
            "has a logit_bias, a CLIP model none). To switch, start a new run from a saved model with "
            "--model_name_or_path and --loss_type.")
    if changed and not allow_changes:
        raise ValueError(
            f"Cannot resume from {checkpoint} with flags that differ from those it was saved with: {described}. "
            f"Resume with the checkpoint's values, or pass --allow_resume_changes to apply the new ones from step "
            f"{saved['step']} on (each is logged and recorded in the model card).")
    for key, (old, new) in changed.items():
        logger.warning("Resuming at step %d with %s %r instead of the checkpoint's %r (--allow_resume_changes).",
                       saved["step"], _flag(key), new, old)
    return [f"step {saved['step']}: {_flag(key)} {old!r} -> {new!r}" for key, (old, new) in changed.items()]


def apply_recipe(optimizer, scheduler, run: RunArguments) -> None:
    """After restoring a checkpoint, make the current learning rate, schedule and AdamW settings take effect from
    the resumed step (the restored optimizer and scheduler keep the checkpoint's); used with --allow_resume_changes."""
    schedule = scheduler.scheduler  # Accelerate's wrapper around the LambdaLR
    schedule.base_lrs = [run.learning_rate] * len(schedule.base_lrs)
    for index, (group, factor) in enumerate(zip(optimizer.param_groups, schedule.lr_lambdas)):
        group.update(initial_lr=run.learning_rate, lr=run.learning_rate * factor(schedule.last_epoch),
                     betas=(run.adam_beta1, run.adam_beta2), eps=run.adam_epsilon)
        if index == 0:  # build_optimizer's group with weight decay
            group["weight_decay"] = run.weight_decay
    schedule._last_lr = [group["lr"] for group in optimizer.param_groups]


def micro_step_seed(seed: int, process_index: int, micro_step: int) -> int:
    """The seed of the global torch generator for one micro-batch, so patch dropout (and any dropout) draws the same
    masks in a resumed run as in an uninterrupted one, whatever else consumed random numbers before."""
    return int(np.random.SeedSequence([seed, process_index, micro_step]).generate_state(1, np.uint64)[0])


class NonFiniteTrainingError(RuntimeError):
    """A non-finite loss or gradient norm under `--nonfinite_loss stop`, or non-finite weights about to be saved."""


def skip_nonfinite_update(optimizer, grad_norm: torch.Tensor) -> None:
    """--nonfinite_loss skip: the coming fused AdamW step leaves parameters, moments and its step count unchanged when
    `grad_norm` is not finite, decided on the device (the `found_inf` tensor mixed-precision scalers give fused
    optimizers; under fp16, Accelerate's scaler sets it itself)."""
    getattr(optimizer, "optimizer", optimizer).found_inf = (~torch.isfinite(grad_norm)).float()


def nonfinite_weights(model) -> torch.Tensor:
    """1.0 when a parameter holds a NaN or an infinity (under FSDP, in this process's shards), else 0.0: a device
    scalar, from the largest absolute weight."""
    weights = local_pieces(model.parameters())
    if not weights:
        return torch.zeros((), device=next(model.parameters()).device)
    return (~torch.isfinite(torch.nn.utils.get_total_norm(weights, norm_type=math.inf))).float()


def nonfinite_error(first_step: int, last_step: int, output_dir: Path) -> NonFiniteTrainingError:
    checkpoints = complete_checkpoints(output_dir)
    kept = f"The last finite checkpoint is {checkpoints[-1]}" if checkpoints else "No checkpoint was saved before"
    return NonFiniteTrainingError(
        f"Non-finite loss or gradient norm in steps {first_step}-{last_step} (--nonfinite_loss stop): training stopped "
        f"at step {last_step}, and these weights are neither saved nor pushed. {kept}. Lower --learning_rate (a "
        "resume with another one needs --allow_resume_changes), or pass --nonfinite_loss skip to skip such updates.")


def check_finite_before_saving(accelerator: Accelerator, model, nonfinite_steps: torch.Tensor, run: RunArguments,
                               checked_step: int, step: int, output_dir: Path) -> int:
    """Before a checkpoint, the final save or a push (one host read): raise `NonFiniteTrainingError`, so nothing is
    saved, when a weight is not finite, or under --nonfinite_loss stop when a step since `checked_step` had a
    non-finite loss or gradient norm. Returns the number of such steps so far (skipped ones under 'skip')."""
    totals = accelerator.reduce(torch.stack([nonfinite_steps, nonfinite_weights(model)]), reduction="sum")
    steps, weights = totals.tolist()
    if run.nonfinite_loss == "stop" and steps > 0:
        raise nonfinite_error(checked_step + 1, step, output_dir)
    if weights > 0:
        raise NonFiniteTrainingError(f"The weights hold NaN or infinite values at step {step}; they are neither saved "
                                     "nor pushed.")
    return round(steps / accelerator.num_processes)


def check_bad_fraction(run: RunArguments, skipped: int, rows_read: int) -> None:
    """Stop, naming --max_bad_fraction, when more than that fraction of the rows read were unusable."""
    if run.max_bad_fraction is not None and rows_read and skipped > run.max_bad_fraction * rows_read:
        raise RuntimeError(
            f"{skipped} of the {rows_read} training rows read so far ({skipped / rows_read:.1%}) were unusable, more "
            f"than --max_bad_fraction {run.max_bad_fraction}. Check the data (undecodable images, empty captions), or "
            "raise --max_bad_fraction.")


def check_hub_access(accelerator: Accelerator, repo_id: str, private: bool) -> None:
    """With --push_to_hub, at start-up: the token is valid and may write `repo_id` (`hf_clip.hub.check_push_access`,
    on the main process). A refusal stops every process now; a Hub that cannot be reached only warns."""
    refusal = None
    if accelerator.is_main_process:
        try:
            logger.info("Pushing to %s at the end", check_push_access(repo_id, private=private))
        except (PermissionError, FileNotFoundError) as error:
            refusal = f"--push_to_hub: {error}"
        except Exception as error:
            logger.warning("Could not check the Hub token and repo %r now (%s: %s); the pushes will try again.",
                           repo_id, type(error).__name__, str(error).splitlines()[0] if str(error) else "")
    refusal = broadcast_object_list([refusal])[0]
    if refusal is not None:
        raise PermissionError(refusal)


def model_inputs(batch: dict, device: torch.device, transform: ImageTransform) -> dict:
    """The collated batch's model inputs on `device`: the tensors copied without blocking the host, the uint8 pixels
    normalised there with `transform`'s mean and std, and the collator's `padding_side`, which spares the text tower
    a read of the mask."""
    inputs = {k: batch[k].to(device, non_blocking=True) for k in ("pixel_values", "input_ids", "attention_mask")}
    inputs["pixel_values"] = normalize_pixels(inputs["pixel_values"], transform.mean, transform.std)
    return {**inputs, "padding_side": batch["padding_side"]}


def train_step(accelerator: Accelerator, model, optimizer, scheduler, inputs: dict, run: RunArguments
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One micro-batch: forward, loss and backward (through GradCache with `--grad_cache_micro_batches`); on the
    micro-batches that synchronise gradients, the gradient norm (clipped to `--max_grad_norm` when it is positive),
    under `--nonfinite_loss skip` the skip decision, the optimiser and the schedule. Reads nothing back from the
    device (tests/test_host_sync.py): returns the detached loss and the gradient norm (None on micro-batches that
    do not synchronise) as device tensors."""
    with accelerator.accumulate(model):
        if run.grad_cache_micro_batches > 1:
            loss = grad_cache_backward(model, inputs, run.grad_cache_micro_batches, backward=accelerator.backward)
        else:
            loss = model(**inputs, return_loss=True, gather_distributed=True).loss
            accelerator.backward(loss)
        grad_norm = None
        if accelerator.sync_gradients:
            max_grad_norm = run.max_grad_norm if run.max_grad_norm > 0 else math.inf  # inf: measured, not clipped
            grad_norm = full_value(accelerator.clip_grad_norm_(model.parameters(), max_grad_norm))
            if run.nonfinite_loss == "skip":
                skip_nonfinite_update(optimizer, grad_norm)
        optimizer.step()
        if accelerator.sync_gradients:
            scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    return loss.detach(), grad_norm


class MetricsLog:
    """Appends one JSON object per line to `metrics.jsonl` (NaN and infinities as null) and forwards scalars to
    Accelerate's trackers."""

    def __init__(self, accelerator: Accelerator, path: Path):
        self.accelerator, self.path = accelerator, path

    def write(self, step: int, metrics: dict) -> None:
        self.accelerator.log({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step=step)
        if self.accelerator.is_main_process:
            values = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in metrics.items()}
            with open(self.path, "a") as handle:
                handle.write(json.dumps({"step": step, **values}) + "\n")


class SampleIdLog:
    """With `--log_sample_ids`, the dataset rows of every step, buffered and appended to
    `sample_ids_rank{R}.jsonl` once per logging step."""

    def __init__(self, path: Path | None):
        self.path, self.lines = path, []

    def add(self, step: int, row_ids: torch.Tensor) -> None:
        if self.path is not None:
            self.lines.append(json.dumps({"step": step, "row_ids": row_ids.tolist()}) + "\n")

    def flush(self) -> None:
        if self.path is not None and self.lines:
            with open(self.path, "a") as handle:
                handle.writelines(self.lines)
            self.lines = []


def stream_states(accelerator: Accelerator, batches: TrainBatches) -> dict:
    """{"stream_states": every process's `TrainBatches.state_dict()`} for a streamed run's checkpoint; {} otherwise.
    Every process must call it."""
    if not batches.streaming:
        return {}
    return {"stream_states": gather_object([batches.state_dict()])}


def own_stream_state(states: list | None, process: ProcessShare) -> dict | None:
    """This process's place in a streamed checkpoint's `stream_states`; None (the stream is then read and discarded up
    to the checkpoint's micro-batch) for checkpoints without it or written by another number of processes."""
    if states is None:
        return None
    if len(states) != process.count:
        logger.warning("The checkpoint was written by %d processes, this run has %d: the stream is read again from "
                       "its start up to the checkpoint's micro-batch.", len(states), process.count)
        return None
    return states[process.index]


def card_hyperparameters(args: TrainScriptArguments, accelerator: Accelerator, resume_changes: list[str] = (),
                         nonfinite_steps: int = 0) -> dict:
    """The recipe for the model card: `CARD_KEYS` that are set, plus the process count and global batch size; the
    dataset and the starting model by Hub id, or as "local dataset NAME" / "local model NAME"; the flags changed on
    resume and the updates skipped as non-finite, if any."""
    run, data, model = args.run, args.data, args.model
    values = {**args.flat(), "num_processes": accelerator.num_processes, "mixed_precision": accelerator.mixed_precision,
              "warmup_steps": warmup_step_count(run.warmup_steps, run.max_steps),
              "global_batch_size": run.per_device_train_batch_size * accelerator.num_processes
              * run.gradient_accumulation_steps,
              "dataset_name": data.dataset_name and public_name(data.dataset_name, "dataset"),
              "model_name_or_path": model.model_name_or_path and public_name(model.model_name_or_path, "model"),
              "resume_changes": "; ".join(resume_changes) or None, "nonfinite_steps_skipped": nonfinite_steps or None}
    return {key: values[key] for key in CARD_KEYS if values.get(key) not in (None, False)
            and not (key.endswith("_unlocked_layers") and not values.get(key.removesuffix("_unlocked_layers")))}


def model_card(args: TrainScriptArguments, results: dict, hyperparameters: dict) -> ModelCardInfo:
    """What the run's model card states: its results (a split whose evaluation failed is named as such), its recipe
    and its training data."""
    failed = {split: metrics["error"] for split, metrics in results.items() if "error" in metrics}
    embedded = args.data.dataset_name is None
    return ModelCardInfo(
        metrics={split: metrics for split, metrics in results.items() if split not in failed},
        hyperparameters=hyperparameters, extra_hyperparameters=SCRIPT_CARD_KEYS,
        dataset=DATASET_ID if embedded else args.data.dataset_name, dataset_split=args.data.train_split,
        dataset_description=describe(args.data.embedded_num_train) if embedded else None,
        base_model=args.model.model_name_or_path,
        limitations=" ".join(f"The evaluation on split {split!r} failed ({error}), so it has no results here."
                             for split, error in failed.items()) or None)


def evaluate(accelerator: Accelerator, model, processor, eval_splits: dict, args: TrainScriptArguments,
             metrics_log: MetricsLog, step: int) -> dict[str, dict[str, float]]:
    """Evaluate every split (each process embeds a share of the rows) and log the results at `step`. Under FSDP
    every forward is a collective, so every process embeds every row (unequal shares would call it unequally often).
    A split whose evaluation raises is logged and recorded as {"error": message}: a failure of that split, not of
    the run."""
    shares = accelerator.distributed_type != DistributedType.FSDP
    was_training, results = model.training, {}
    for name, split in eval_splits.items():
        try:
            with accelerator.autocast():
                results.update(evaluate_splits(accelerator.unwrap_model(model), processor, {name: split}, args.data,
                                               args.eval, args.loader, split_across_processes=shares))
        except Exception as error:
            results[name] = {"error": f"{type(error).__name__}: {error}"}
            logger.error("Evaluation on split %r failed at step %d: %s", name, step, results[name]["error"])
    model.train(was_training)
    for name, metrics in results.items():
        metrics_log.write(step, {f"eval/{name}/{key}": value for key, value in metrics.items()})
    return results


def push_checkpoint(accelerator: Accelerator, model, processor: HFClipProcessor, repo_id: str, step: int,
                    card: ModelCardInfo, args: TrainScriptArguments) -> None:
    """Push the model at `step` to the `checkpoints` branch of `repo_id`; every process must call it. A failed push
    is logged and training goes on: the next checkpoint push, or the final push, sends the newer state."""
    state_dict = scalar_logit_scale(accelerator.get_state_dict(model))
    if accelerator.is_main_process:
        try:
            commit = push_to_hub(unsharded_model(accelerator, model, state_dict), processor, repo_id, card,
                                 state_dict=state_dict, private=args.run.hub_private_repo,
                                 revision=HUB_CHECKPOINT_BRANCH, commit_message=f"Checkpoint at step {step}",
                                 max_retries=CHECKPOINT_PUSH_RETRIES)
            logger.info("Pushed the step-%d checkpoint: %s", step, commit.commit_url)
        except Exception as error:
            logger.warning("Pushing the step-%d checkpoint to %s failed (%s: %s); training goes on, and the next "
                           "checkpoint push or the final push sends a newer state.", step, repo_id,
                           type(error).__name__, str(error).splitlines()[0] if str(error) else "")
    accelerator.wait_for_everyone()


def save(accelerator: Accelerator, model, processor: HFClipProcessor, output_dir: Path
         ) -> tuple[dict, HFClipModel | None]:
    """Save the model (gathered from every process) and processor to `output_dir`, with a manifest of the weights and
    config (`hf_clip.integrity`) that `from_pretrained` checks; returns the state dict that was saved and the model as
    one plain `HFClipModel` (both on the main process)."""
    state_dict = scalar_logit_scale(accelerator.get_state_dict(model))
    if not accelerator.is_main_process:
        return state_dict, None
    unsharded = unsharded_model(accelerator, model, state_dict)
    unsharded.save_pretrained(output_dir, state_dict=dict(state_dict))  # it empties its copy
    processor.save_pretrained(output_dir)
    weights = [path.name for path in output_dir.glob("*.safetensors")]
    weights += [path.name for path in output_dir.glob("*.safetensors.index.json")]
    write_manifest(output_dir, [*weights, "config.json"])
    return state_dict, unsharded


def push(model: HFClipModel, state_dict: dict, processor: HFClipProcessor, repo_id: str, card: ModelCardInfo,
         args: TrainScriptArguments) -> str:
    """Push the final model, processor, card and results in one commit; returns the commit URL."""
    commit = push_to_hub(model, processor, repo_id, card, state_dict=state_dict, private=args.run.hub_private_repo)
    return commit.commit_url


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    # 1. Arguments, Accelerator, logging, seed, the checkpoint to resume from (verified before any work), Hub access.
    args = parse_args(argv)
    run = args.run
    output_dir = Path(run.output_dir)
    accelerator = Accelerator(
        cpu=not torch.accelerator.is_available(),  # Accelerate only picks multi-process gloo on CPUs when told
        mixed_precision=resolve_mixed_precision(run.mixed_precision),
        gradient_accumulation_steps=run.gradient_accumulation_steps,
        log_with=None if run.report_to == "none" else run.report_to,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "runs")),
        step_scheduler_with_optimizer=False,
    )
    check_cpu_launch(accelerator.num_processes)
    enable_fsdp_on_cpu(accelerator)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        level=logging.INFO if accelerator.is_main_process else logging.WARNING)
    logger.info("%d process(es) on %s, mixed precision: %s", accelerator.num_processes, accelerator.device,
                accelerator.mixed_precision)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
    set_seed(run.seed)
    process = ProcessShare(index=accelerator.process_index, count=accelerator.num_processes)
    checkpoint = resolve_checkpoint(output_dir, run.resume_from_checkpoint) if run.resume_from_checkpoint else None
    saved = read_state(checkpoint) if checkpoint is not None else {}
    take_unset_flags_from_checkpoint(args, saved)
    repo_id = run.hub_model_id or output_dir.resolve().name
    if run.push_to_hub:
        check_hub_access(accelerator, repo_id, run.hub_private_repo)

    # 2. Data: the training split, checked for usable rows, and the evaluation splits, checked for class labels.
    data = args.data
    train_split = load_train_split(data, {"image_column": data.image_column, "caption_column": data.caption_column})
    check_usable_rows(train_split, data, data.train_split)
    if run.per_device_train_batch_size is None:
        set_default_batch_size(run, train_split, data, accelerator.num_processes)
    eval_splits = load_eval_splits(data, args.eval)
    check_label_columns(eval_splits, data)

    # 3. Model, processor, optimizer and schedule, restored from the checkpoint (after comparing recipes) when resuming.
    model, processor = build_model_and_processor(args, train_split, accelerator, resuming=checkpoint is not None)
    recipe = resume_recipe(args, accelerator.num_processes, model.config.loss_type)
    resume_changes = list(saved.get("resume_changes", []))
    if checkpoint is not None:
        resume_changes += check_resume(checkpoint, saved, recipe, run.allow_resume_changes)
    lock_towers(model, args.locks)
    if run.activation_checkpointing:
        model.activation_checkpointing_enable()
    if accelerator.distributed_type == DistributedType.FSDP:
        shardable_logit_scale_(model)
    if run.torch_compile:
        model.compile_towers(backend=run.torch_compile_backend, mode=run.torch_compile_mode)
    optimizer = build_optimizer(model, run)
    if run.nonfinite_loss == "skip" and not optimizer.defaults.get("fused"):
        raise ValueError("--nonfinite_loss skip needs torch's fused AdamW, which this device lacks; use "
                         "--nonfinite_loss stop.")
    scheduler = get_cosine_schedule_with_warmup(optimizer, warmup_step_count(run.warmup_steps, run.max_steps),
                                                run.max_steps)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    if accelerator.distributed_type == DistributedType.FSDP:
        register_feature_methods(model)
    step, micro_step, skipped_total, nonfinite_total, stream_state = 0, 0, 0, 0, None
    if checkpoint is not None:
        accelerator.load_state(str(checkpoint))
        if run.allow_resume_changes:
            apply_recipe(optimizer, scheduler, run)
        step, micro_step, skipped_total = saved["step"], saved["micro_step"], saved["skipped_samples"]
        nonfinite_total = saved.get("nonfinite_steps", 0)
        stream_state = own_stream_state(saved.get("stream_states"), process)
        logger.info("Resumed from %s at step %d", checkpoint, step)

    # 4. Training batches from where the run stands, logs and trackers.
    transform = image_transform_for(processor, train=True)
    train_dataset = build_train_dataset(train_split, data, transform, run.seed, process)
    collator = ContrastiveDataCollator(processor, data.image_column, data.caption_column)
    train_batches = TrainBatches(train_dataset, collator, run.per_device_train_batch_size, seed=run.seed,
                                 num_workers=worker_count(args.loader.dataloader_num_workers), process=process)
    batches = train_batches.iterate(micro_step, stream_state)
    accelerator.init_trackers("hf_clip", config={k: v for k, v in args.flat().items()
                                                  if isinstance(v, (int, float, str, bool))})
    metrics_log = MetricsLog(accelerator, output_dir / "metrics.jsonl")
    sample_ids = SampleIdLog(output_dir / f"sample_ids_rank{process.index}.jsonl" if run.log_sample_ids else None)
    if checkpoint is not None and accelerator.is_main_process:
        truncate_step_log(metrics_log.path, step)
    if checkpoint is not None and sample_ids.path is not None:
        truncate_step_log(sample_ids.path, step)
    global_batch = run.per_device_train_batch_size * accelerator.num_processes * run.gradient_accumulation_steps
    micro_batch_rows = run.per_device_train_batch_size * accelerator.num_processes

    def card(results: dict, **hyperparameters) -> ModelCardInfo:
        return model_card(args, results, {**card_hyperparameters(args, accelerator, resume_changes, nonfinite_total),
                                          **hyperparameters})

    # 5. Train: the loss, its finiteness and the non-finite-step count stay on the device until a logging or saving
    #    step reads them.
    progress = tqdm(total=run.max_steps, initial=step, desc="training", disable=not accelerator.is_local_main_process)
    window_loss, window_finite = torch.zeros((), device=accelerator.device), torch.zeros((), device=accelerator.device)
    nonfinite_steps = torch.tensor(float(nonfinite_total), device=accelerator.device)
    window_steps, window_start, checked_step = 0, time.perf_counter(), step
    model.train()
    while step < run.max_steps:
        step_loss = torch.zeros((), device=accelerator.device)
        for _ in range(run.gradient_accumulation_steps):
            epoch, batch = next(batches)
            micro_step += 1
            torch.manual_seed(micro_step_seed(run.seed, process.index, micro_step))
            skipped_total += int(batch["skipped"])
            loss, grad_norm = train_step(accelerator, model, optimizer, scheduler,
                                         model_inputs(batch, accelerator.device, transform), run)
            step_loss += loss.float() / run.gradient_accumulation_steps
            sample_ids.add(step + 1, batch["row_ids"])
        finite_loss = torch.isfinite(step_loss)
        nonfinite = ~torch.isfinite(grad_norm) if run.nonfinite_loss == "skip" else ~finite_loss | ~torch.isfinite(
            grad_norm)
        nonfinite_steps += nonfinite.float()
        window_loss += torch.where(finite_loss, step_loss, 0.0)
        window_finite += finite_loss.float()
        accelerator.unwrap_model(model).clamp_logit_scale_()
        step += 1
        window_steps += 1
        progress.update(1)

        if step % run.logging_steps == 0 or step == run.max_steps:
            skipped = torch.tensor(float(skipped_total), device=accelerator.device)
            totals = accelerator.reduce(torch.stack([window_loss, window_finite, skipped, nonfinite_steps]),
                                        reduction="sum").tolist()
            if run.nonfinite_loss == "stop" and totals[3] > 0:
                raise nonfinite_error(checked_step + 1, step, output_dir)
            checked_step, nonfinite_total = step, round(totals[3] / accelerator.num_processes)
            elapsed = time.perf_counter() - window_start
            metrics = {
                "loss": totals[0] / totals[1] if totals[1] else None,
                "learning_rate": scheduler.get_last_lr()[0],
                "logit_scale": accelerator.unwrap_model(model).clamped_logit_scale().item(),
                "grad_norm": float(grad_norm),
                "samples_per_second": window_steps * global_batch / elapsed,
                "skipped_samples": int(totals[2]),
                "epoch": epoch,
                **({"nonfinite_steps": nonfinite_total} if run.nonfinite_loss == "skip" else {}),
            }
            metrics_log.write(step, metrics)
            sample_ids.flush()
            progress.set_postfix(loss=f"{metrics['loss']:.4f}" if metrics["loss"] is not None else "-",
                                 skipped=metrics["skipped_samples"])
            check_bad_fraction(run, int(totals[2]), micro_step * micro_batch_rows
                               + (int(totals[2]) if data.streaming else 0))
            window_loss, window_finite = torch.zeros_like(window_loss), torch.zeros_like(window_finite)
            window_steps, window_start = 0, time.perf_counter()
        if run.eval_steps and step % run.eval_steps == 0 and step < run.max_steps:
            evaluate(accelerator, model, processor, eval_splits, args, metrics_log, step)
        if run.save_steps and step % run.save_steps == 0:
            nonfinite_total = check_finite_before_saving(accelerator, model, nonfinite_steps, run, checked_step, step,
                                                         output_dir)
            checked_step = step
            save_checkpoint(accelerator, output_dir, step, {
                "step": step, "micro_step": micro_step, "skipped_samples": skipped_total, "epoch": epoch,
                "nonfinite_steps": nonfinite_total, "recipe": recipe, "resume_changes": resume_changes,
                **stream_states(accelerator, train_batches),
            }, keep=run.save_total_limit)
            if run.push_to_hub and run.hub_push_checkpoints:
                push_checkpoint(accelerator, model, processor, repo_id, step, card({}, max_steps=step), args)
    progress.close()

    # 6. Save the model and processor first, so that no evaluation error can lose them (never non-finite weights).
    nonfinite_total = check_finite_before_saving(accelerator, model, nonfinite_steps, run, checked_step, step,
                                                 output_dir)
    state_dict, unwrapped = save(accelerator, model, processor, output_dir)
    # 7. Evaluate; a split that fails is recorded as failed.
    results = evaluate(accelerator, model, processor, eval_splits, args, metrics_log, step)
    skipped = int(accelerator.reduce(torch.tensor(float(skipped_total), device=accelerator.device), "sum").item())
    push_error = None
    if accelerator.is_main_process:
        # 8. The results and the model card.
        (output_dir / "eval_results.json").write_text(json.dumps(results, indent=2))
        final_card = card(results)
        render_model_card(unwrapped, repo_id, final_card).save(output_dir / "README.md")
        print(f"\nResults after {step} steps ({global_batch} images per step, {skipped} unusable rows skipped):")
        print(format_results_table(results))
        # 9. The zero-shot pipeline, loaded from the saved folder, on one image.
        try:
            demo = pipeline_demo(output_dir, eval_splits, data)
        except Exception as error:
            demo = f"pipeline demo failed: {type(error).__name__}: {error}"
        if demo is not None:
            print(demo)
        print(f"Saved model, processor and model card to {output_dir}")
        # 10. Push to the Hub: the one push whose failure fails the run (the saved folder stays).
        if run.push_to_hub:
            try:
                print(f"Pushed to the Hub: {push(unwrapped, state_dict, processor, repo_id, final_card, args)}")
            except Exception as error:
                push_error = error
                logger.error("The push to %s failed (%s: %s). The model, processor and card are saved in %s; push "
                             "them later with hf_clip.push_to_hub or `hf upload`.", repo_id, type(error).__name__,
                             str(error).splitlines()[0] if str(error) else "", output_dir)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    if push_error is not None:
        raise push_error
    return results


if __name__ == "__main__":
    main()
