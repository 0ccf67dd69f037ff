"""Contrastive image-text training of hf_clip with Accelerate on HF datasets.

    python -m hf_clip_train.train                                  # embedded dataset, tiny model from scratch
    python -m hf_clip_train.train recipe.yaml --max_steps 2000     # arguments from a file, overridden by flags
    accelerate launch -m hf_clip_train.train --dataset_name DATA   # any number of processes / GPUs / nodes
    torchrun --nproc_per_node 2 -m hf_clip_train.train ...

Run with `--help` for every argument.
"""

import json
import logging
import math
import os
import time
from pathlib import Path

import datasets
import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, ProjectConfiguration, set_seed
from tqdm.auto import tqdm
from transformers import AutoTokenizer, get_cosine_schedule_with_warmup

from hf_clip import (
    PHOTO_TEMPLATES,
    ContrastiveDataCollator,
    HFClipConfig,
    HFClipModel,
    HFClipProcessor,
    ModelCardInfo,
    grad_cache_backward,
    render_model_card,
    train_clip_tokenizer,
)
from hf_clip.hub import error_summary

from .args import TRAIN_ARGUMENT_CLASSES as ARGUMENT_CLASSES
from .args import (
    DatasetArguments,
    InputError,
    RunArguments,
    TrainScriptArguments,
    default_batch_size,
    image_geometry,
    parse_with_config_file,
    warmup_step_count,
)
from .checkpointing import (
    apply_recipe,
    check_resume,
    complete_checkpoints,
    own_stream_state,
    read_state,
    resolve_checkpoint,
    resume_recipe,
    save_checkpoint,
    stream_states,
    take_unset_flags_from_checkpoint,
    truncate_step_log,
)
from .common import compose_pretrained, compose_vision_pretrained, config_overrides, load_pretrained, lock_towers
from .data import (
    ImageTextColumns,
    ImageTransform,
    ProcessShare,
    TrainBatches,
    build_train_dataset,
    caption_samples,
    check_label_columns,
    check_usable_rows,
    columns_of,
    image_transform_for,
    load_train_split,
    normalize_pixels,
    typical_image_size,
    worker_count,
)
from .evaluation import evaluate_splits, format_results_table, load_eval_splits, pipeline_demo, zero_shot_templates
from .fsdp import enable_fsdp_on_cpu, full_value, local_pieces, register_feature_methods, shardable_logit_scale_
from .publish import card_hyperparameters, check_hub_access, model_card, push, push_checkpoint, save
from .runtime import setup_logging
from .synthetic import caption_corpus

logger = logging.getLogger("hf_clip_train")

RENAMED_FLAGS = {
    "checkpointing_steps": "save_steps",
    "checkpoints_total_limit": "save_total_limit",
    "gradient_checkpointing": "activation_checkpointing",
    "num_workers": "dataloader_num_workers",
}


def parse_args(argv: list[str] | None = None) -> TrainScriptArguments:
    """Flags, optionally on top of a YAML/JSON config file given as the first argument, each checked by its
    argument class (`hf_clip_train.args`)."""
    return TrainScriptArguments(*parse_with_config_file(ARGUMENT_CLASSES, argv, RENAMED_FLAGS))


def set_default_batch_size(run: RunArguments, train_split, data: DatasetArguments, num_processes: int) -> None:
    """Fill the unset `--per_device_train_batch_size` from the rows the run reads (`default_batch_size`)."""
    num_rows = None if isinstance(train_split, datasets.IterableDataset) else len(train_split)
    if num_rows is not None and data.max_train_samples is not None:
        num_rows = min(num_rows, data.max_train_samples)
    run.per_device_train_batch_size = default_batch_size(num_rows, num_processes)
    logger.info("Batch size %d per process (%s training rows)", run.per_device_train_batch_size, num_rows or "?")
    run.check_grad_cache()


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
        raise InputError(f"--mixed_precision must be auto, no, bf16 or fp16, got {requested!r}.")
    if requested != "auto":
        return requested
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "no"
    return "bf16" if cpu_has_native_bf16() else "no"


def build_model_and_processor(args: TrainScriptArguments, train_split, columns: ImageTextColumns,
                              accelerator: Accelerator, resuming: bool) -> tuple[HFClipModel, HFClipProcessor]:
    """Load `--model_name_or_path`; or compose the model from `--vision_model_name_or_path` and
    `--text_model_name_or_path`; or build `--preset` from scratch. A text tower that is not pretrained is `--preset`'s
    built-in one, with a tokenizer trained on the captions."""
    if args.model.model_name_or_path:
        return load_pretrained(args.model.model_name_or_path, args.patch_dropout.patch_dropout, args.loss)
    towers = args.towers
    if towers.text_model_name_or_path is not None:
        return compose_pretrained(towers, args.loss)

    tokenizer = caption_tokenizer(args, train_split, columns, accelerator, resuming)
    overrides = config_overrides(args.patch_dropout.patch_dropout, args.loss)
    if towers.projection_dim is not None:
        overrides["projection_dim"] = towers.projection_dim
    if towers.composed:
        return compose_vision_pretrained(towers, HFClipConfig.from_preset(args.scratch.preset, tokenizer=tokenizer,
                                                                          **overrides), tokenizer)
    geometry = image_geometry(args.scratch, typical_image_size(train_split, columns))
    args.scratch.image_size, args.scratch.patch_size = geometry["image_size"], geometry["patch_size"]
    logger.info("Image size %d, patch size %d", geometry["image_size"], geometry["patch_size"])
    overrides["vision_config"] = {**overrides.get("vision_config", {}), **geometry}
    config = HFClipConfig.from_preset(args.scratch.preset, tokenizer=tokenizer, **overrides)
    model = HFClipModel(config)
    return model, HFClipProcessor.from_tokenizer(tokenizer, image_size=config.vision_config.image_size)


def caption_tokenizer(args: TrainScriptArguments, train_split, columns: ImageTextColumns, accelerator: Accelerator,
                      resuming: bool):
    """A BPE tokenizer trained on the training captions (the embedded dataset's caption corpus) and the photo
    templates, by the main process into `output_dir/.tokenizer` (kept there for a resumed run)."""
    tokenizer_dir = Path(args.run.output_dir) / ".tokenizer"
    if accelerator.is_main_process and not (resuming and tokenizer_dir.is_dir()):
        if args.data.dataset_name is None:
            corpus = caption_corpus()
        else:
            corpus = [*caption_samples(train_split, columns.caption),
                      *(template.format("") for template in PHOTO_TEMPLATES)]
        tokenizer = train_clip_tokenizer(corpus, vocab_size=args.scratch.tokenizer_vocab_size,
                                         model_max_length=args.scratch.context_length)
        tokenizer.save_pretrained(tokenizer_dir)
    accelerator.wait_for_everyone()
    return AutoTokenizer.from_pretrained(tokenizer_dir)


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


def evaluate(accelerator: Accelerator, model, processor, eval_splits: dict, columns: ImageTextColumns,
             args: TrainScriptArguments, metrics_log: MetricsLog, step: int) -> dict[str, dict[str, float]]:
    """Evaluate every split (each process embeds a share of the rows) and log the results at `step`. Under FSDP
    every forward is a collective, so every process embeds every row (unequal shares would call it unequally often).
    A split whose evaluation raises is logged and recorded as {"error": message}: a failure of that split, not of
    the run."""
    shares = accelerator.distributed_type != DistributedType.FSDP
    was_training, results = model.training, {}
    for name, split in eval_splits.items():
        try:
            with accelerator.autocast():
                results.update(evaluate_splits(accelerator.unwrap_model(model), processor, {name: split}, columns,
                                               zero_shot_templates(args.data, args.eval), args.loader,
                                               split_across_processes=shares))
        except Exception as error:
            results[name] = {"error": f"{type(error).__name__}: {error}"}
            logger.error("Evaluation on split %r failed at step %d: %s", name, step, results[name]["error"])
    model.train(was_training)
    for name, metrics in results.items():
        metrics_log.write(step, {f"eval/{name}/{key}": value for key, value in metrics.items()})
    return results


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
    setup_logging(accelerator.is_main_process)
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
    columns = columns_of(data)
    train_split = load_train_split(data, {"image_column": columns.image, "caption_column": columns.caption})
    check_usable_rows(train_split, data.dataset_name, data.train_split, columns)
    if run.per_device_train_batch_size is None:
        set_default_batch_size(run, train_split, data, accelerator.num_processes)
    eval_splits = load_eval_splits(data, args.eval)
    check_label_columns(eval_splits, data.dataset_name, columns.label)

    # 3. Model, processor, optimizer and schedule, restored from the checkpoint (after comparing recipes) when resuming.
    model, processor = build_model_and_processor(args, train_split, columns, accelerator,
                                                 resuming=checkpoint is not None)
    num_workers = worker_count(args.loader.dataloader_num_workers)
    recipe = resume_recipe(args, accelerator.num_processes, model.config.loss_type, stream_workers=max(1, num_workers))
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
        raise InputError("--nonfinite_loss skip needs torch's fused AdamW, which this device lacks; use "
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
    train_dataset = build_train_dataset(train_split, columns, transform, run.seed, process,
                                        max_rows=data.max_train_samples, shuffle_buffer_size=data.shuffle_buffer_size)
    collator = ContrastiveDataCollator(processor, columns.image, columns.caption)
    train_batches = TrainBatches(train_dataset, collator, run.per_device_train_batch_size, seed=run.seed,
                                 num_workers=num_workers, process=process)
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
            evaluate(accelerator, model, processor, eval_splits, columns, args, metrics_log, step)
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
    results = evaluate(accelerator, model, processor, eval_splits, columns, args, metrics_log, step)
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
            demo = pipeline_demo(output_dir, eval_splits, columns)
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
                logger.error("The push to %s failed (%s). The model, processor and card are saved in %s; push "
                             "them later with hf_clip.push_to_hub or `hf upload`.", repo_id, error_summary(error),
                             output_dir)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    if push_error is not None:
        raise push_error
    return results


if __name__ == "__main__":
    from .cli import run_script

    run_script(main, "train")
