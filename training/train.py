"""Contrastive image-text training of hf_clip with Accelerate on HF datasets.

    python -m training.train                                  # embedded dataset, tiny model from scratch
    python -m training.train recipe.yaml --max_steps 2000     # arguments from a file, overridden by flags
    accelerate launch -m training.train --dataset_name DATA   # any number of processes / GPUs / nodes
    torchrun --nproc_per_node 2 -m training.train ...

Run with `--help` for every argument.
"""

import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import datasets
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, ProjectConfiguration, set_seed
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
from hf_clip.hub import public_name

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
    default_batch_size,
    parse_with_config_file,
    warmup_step_count,
)
from .checkpointing import read_state, resolve_checkpoint, save_checkpoint, truncate_step_log
from .common import (
    config_overrides,
    evaluate_splits,
    format_results_table,
    load_pretrained,
    lock_towers,
    pipeline_demo,
)
from .data import (
    ProcessShare,
    TrainBatches,
    build_train_dataset,
    caption_samples,
    check_usable_rows,
    image_transform_for,
    load_eval_splits,
    load_train_split,
    typical_image_size,
    worker_count,
)
from .fsdp import (
    enable_fsdp_on_cpu,
    register_feature_methods,
    scalar_logit_scale,
    shardable_logit_scale_,
    unsharded_model,
)
from .synthetic import DATASET_ID, caption_corpus, describe

logger = logging.getLogger("training")

HUB_CHECKPOINT_BRANCH = "checkpoints"
RENAMED_FLAGS = {
    "checkpointing_steps": "save_steps",
    "checkpoints_total_limit": "save_total_limit",
    "gradient_checkpointing": "activation_checkpointing",
    "num_workers": "dataloader_num_workers",
}
# This script's own recipe keys, published beside `hf_clip.PUBLISHED_HYPERPARAMETERS` (as `extra_hyperparameters`).
SCRIPT_CARD_KEYS = ("preset", "tokenizer_vocab_size", "context_length", "image_size", "patch_size")
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
    check_at_least_one(args.run, "max_steps", "per_device_train_batch_size", "gradient_accumulation_steps")
    check_at_least_one(args.loader, "per_device_eval_batch_size")
    check_model_name_or_path(args.model.model_name_or_path)
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
            "too (training.train trains on the CPU when no accelerator is present); or unset MASTER_ADDR for a "
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


def model_inputs(batch: dict, device: torch.device) -> dict:
    """The collated batch's model inputs on `device`: the tensors copied without blocking the host, and the collator's
    `padding_side`, which spares the text tower a read of the mask."""
    inputs = {k: batch[k].to(device, non_blocking=True) for k in ("pixel_values", "input_ids", "attention_mask")}
    return {**inputs, "padding_side": batch["padding_side"]}


def train_step(accelerator: Accelerator, model, optimizer, scheduler, inputs: dict, run: RunArguments
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One micro-batch: forward, loss and backward (through GradCache with `--grad_cache_micro_batches`); on the
    micro-batches that synchronise gradients, clipping, the optimiser and the schedule. Reads nothing back from the
    device (tests/test_host_sync.py): returns the detached loss and the gradient norm (None unless clipped) as
    device tensors."""
    with accelerator.accumulate(model):
        if run.grad_cache_micro_batches > 1:
            loss = grad_cache_backward(model, inputs, run.grad_cache_micro_batches, backward=accelerator.backward)
        else:
            loss = model(**inputs, return_loss=True, gather_distributed=True).loss
            accelerator.backward(loss)
        grad_norm = None
        if accelerator.sync_gradients and run.max_grad_norm > 0:
            grad_norm = accelerator.clip_grad_norm_(model.parameters(), run.max_grad_norm)
        optimizer.step()
        if accelerator.sync_gradients:
            scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    return loss.detach(), grad_norm


class MetricsLog:
    """Appends one JSON object per line to `metrics.jsonl` and forwards scalars to Accelerate's trackers."""

    def __init__(self, accelerator: Accelerator, path: Path):
        self.accelerator, self.path = accelerator, path

    def write(self, step: int, metrics: dict) -> None:
        self.accelerator.log({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step=step)
        if self.accelerator.is_main_process:
            with open(self.path, "a") as handle:
                handle.write(json.dumps({"step": step, **metrics}) + "\n")


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


def card_hyperparameters(args: TrainScriptArguments, accelerator: Accelerator) -> dict:
    """The recipe for the model card: `CARD_KEYS` that are set, plus the process count and global batch size; the
    dataset and the starting model by Hub id, or as "local dataset NAME" / "local model NAME"."""
    run, data, model = args.run, args.data, args.model
    values = {**args.flat(), "num_processes": accelerator.num_processes, "mixed_precision": accelerator.mixed_precision,
              "warmup_steps": warmup_step_count(run.warmup_steps, run.max_steps),
              "global_batch_size": run.per_device_train_batch_size * accelerator.num_processes
              * run.gradient_accumulation_steps,
              "dataset_name": data.dataset_name and public_name(data.dataset_name, "dataset"),
              "model_name_or_path": model.model_name_or_path and public_name(model.model_name_or_path, "model")}
    return {key: values[key] for key in CARD_KEYS if values.get(key) not in (None, False)
            and not (key.endswith("_unlocked_layers") and not values.get(key.removesuffix("_unlocked_layers")))}


def model_card(args: TrainScriptArguments, results: dict, hyperparameters: dict) -> ModelCardInfo:
    """What the run's model card states: its results, its recipe and its training data."""
    embedded = args.data.dataset_name is None
    return ModelCardInfo(
        metrics=results, hyperparameters=hyperparameters, extra_hyperparameters=SCRIPT_CARD_KEYS,
        dataset=DATASET_ID if embedded else args.data.dataset_name, dataset_split=args.data.train_split,
        dataset_description=describe(args.data.embedded_num_train) if embedded else None,
        base_model=args.model.model_name_or_path)


def evaluate(accelerator: Accelerator, model, processor, eval_splits: dict, args: TrainScriptArguments,
             metrics_log: MetricsLog, step: int) -> dict[str, dict[str, float]]:
    """Evaluate every split (each process embeds a share of the rows) and log the results at `step`. Under FSDP
    every forward is a collective, so every process embeds every row (unequal shares would call it unequally often)."""
    shares = accelerator.distributed_type != DistributedType.FSDP
    with accelerator.autocast():
        results = evaluate_splits(accelerator.unwrap_model(model), processor, eval_splits, args.data, args.eval,
                                  args.loader, split_across_processes=shares)
    for name, metrics in results.items():
        metrics_log.write(step, {f"eval/{name}/{key}": value for key, value in metrics.items()})
    return results


def push_checkpoint(accelerator: Accelerator, model, processor: HFClipProcessor, repo_id: str, step: int,
                    args: TrainScriptArguments) -> None:
    """Push the model at `step` to the `checkpoints` branch of `repo_id`; every process must call it."""
    state_dict = scalar_logit_scale(accelerator.get_state_dict(model))
    if accelerator.is_main_process:
        card = model_card(args, {}, {**card_hyperparameters(args, accelerator), "max_steps": step})
        commit = push_to_hub(unsharded_model(accelerator, model, state_dict), processor, repo_id, card,
                             state_dict=state_dict, private=args.run.hub_private_repo, revision=HUB_CHECKPOINT_BRANCH,
                             commit_message=f"Checkpoint at step {step}")
        logger.info("Pushed the step-%d checkpoint: %s", step, commit.commit_url)
    accelerator.wait_for_everyone()


def save(accelerator: Accelerator, model, processor: HFClipProcessor, results: dict, output_dir: Path
         ) -> tuple[dict, HFClipModel | None]:
    """Save the model (gathered from every process), processor and `eval_results.json` to `output_dir`; returns
    the state dict that was saved and the model as one plain `HFClipModel` (both on the main process)."""
    state_dict = scalar_logit_scale(accelerator.get_state_dict(model))
    if not accelerator.is_main_process:
        return state_dict, None
    unsharded = unsharded_model(accelerator, model, state_dict)
    unsharded.save_pretrained(output_dir, state_dict=dict(state_dict))  # it empties its copy
    processor.save_pretrained(output_dir)
    (output_dir / "eval_results.json").write_text(json.dumps(results, indent=2))
    return state_dict, unsharded


def push(model: HFClipModel, state_dict: dict, processor: HFClipProcessor, repo_id: str, card: ModelCardInfo,
         args: TrainScriptArguments) -> str:
    """Push the final model, processor, card and results in one commit; returns the commit URL."""
    commit = push_to_hub(model, processor, repo_id, card, state_dict=state_dict, private=args.run.hub_private_repo)
    return commit.commit_url


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    # 1. Arguments, Accelerator, logging, seed, and the checkpoint to resume from (verified before any work).
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

    # 2. Data: the training split, checked for usable rows, and the evaluation splits.
    data = args.data
    train_split = load_train_split(data, {"image_column": data.image_column, "caption_column": data.caption_column})
    check_usable_rows(train_split, data, data.train_split)
    if run.per_device_train_batch_size is None:
        set_default_batch_size(run, train_split, data, accelerator.num_processes)
    eval_splits = load_eval_splits(data, args.eval)

    # 3. Model, processor, optimizer and schedule, restored from the checkpoint when resuming.
    model, processor = build_model_and_processor(args, train_split, accelerator, resuming=checkpoint is not None)
    lock_towers(model, args.locks)
    if run.activation_checkpointing:
        model.activation_checkpointing_enable()
    if accelerator.distributed_type == DistributedType.FSDP:
        shardable_logit_scale_(model)
    if run.torch_compile:
        model.compile_towers(backend=run.torch_compile_backend, mode=run.torch_compile_mode)
    optimizer = build_optimizer(model, run)
    scheduler = get_cosine_schedule_with_warmup(optimizer, warmup_step_count(run.warmup_steps, run.max_steps),
                                                run.max_steps)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    if accelerator.distributed_type == DistributedType.FSDP:
        register_feature_methods(model)
    step, micro_step, skipped_total = 0, 0, 0
    if checkpoint is not None:
        accelerator.load_state(str(checkpoint))
        state = read_state(checkpoint)
        step, micro_step, skipped_total = state["step"], state["micro_step"], state["skipped_samples"]
        logger.info("Resumed from %s at step %d", checkpoint, step)

    # 4. Training batches from where the run stands, logs and trackers.
    train_dataset = build_train_dataset(train_split, data, image_transform_for(processor, train=True), run.seed,
                                        process)
    collator = ContrastiveDataCollator(processor, data.image_column, data.caption_column)
    batches = TrainBatches(train_dataset, collator, run.per_device_train_batch_size, seed=run.seed,
                           num_workers=worker_count(args.loader.dataloader_num_workers), process=process
                           ).iterate(micro_step)
    repo_id = run.hub_model_id or output_dir.resolve().name
    accelerator.init_trackers("hf_clip", config={k: v for k, v in args.flat().items()
                                                  if isinstance(v, (int, float, str, bool))})
    metrics_log = MetricsLog(accelerator, output_dir / "metrics.jsonl")
    sample_ids = SampleIdLog(output_dir / f"sample_ids_rank{process.index}.jsonl" if run.log_sample_ids else None)
    if checkpoint is not None and accelerator.is_main_process:
        truncate_step_log(metrics_log.path, step)
    if checkpoint is not None and sample_ids.path is not None:
        truncate_step_log(sample_ids.path, step)
    global_batch = run.per_device_train_batch_size * accelerator.num_processes * run.gradient_accumulation_steps

    # 5. Train: the loss is summed on the device and read only at logging steps.
    progress = tqdm(total=run.max_steps, initial=step, desc="training", disable=not accelerator.is_local_main_process)
    window_loss = torch.zeros((), device=accelerator.device)
    window_steps, window_start = 0, time.perf_counter()
    model.train()
    while step < run.max_steps:
        for _ in range(run.gradient_accumulation_steps):
            epoch, batch = next(batches)
            micro_step += 1
            skipped_total += int(batch["skipped"])
            inputs = model_inputs(batch, accelerator.device)
            loss, grad_norm = train_step(accelerator, model, optimizer, scheduler, inputs, run)
            window_loss += loss.float() / run.gradient_accumulation_steps
            sample_ids.add(step + 1, batch["row_ids"])
        accelerator.unwrap_model(model).clamp_logit_scale_()
        step += 1
        window_steps += 1
        progress.update(1)

        if step % run.logging_steps == 0 or step == run.max_steps:
            skipped = torch.tensor(float(skipped_total), device=accelerator.device)
            totals = accelerator.reduce(torch.stack([window_loss, skipped]), reduction="sum")
            elapsed = time.perf_counter() - window_start
            metrics = {
                "loss": totals[0].item() / (window_steps * accelerator.num_processes),
                "learning_rate": scheduler.get_last_lr()[0],
                "logit_scale": accelerator.unwrap_model(model).clamped_logit_scale().item(),
                "grad_norm": None if grad_norm is None else float(grad_norm),
                "samples_per_second": window_steps * global_batch / elapsed,
                "skipped_samples": int(totals[1].item()),
                "epoch": epoch,
            }
            metrics_log.write(step, metrics)
            sample_ids.flush()
            progress.set_postfix(loss=f"{metrics['loss']:.4f}", skipped=metrics["skipped_samples"])
            window_loss = torch.zeros((), device=accelerator.device)
            window_steps, window_start = 0, time.perf_counter()
        if run.eval_steps and step % run.eval_steps == 0 and step < run.max_steps:
            evaluate(accelerator, model, processor, eval_splits, args, metrics_log, step)
        if run.save_steps and step % run.save_steps == 0:
            save_checkpoint(accelerator, output_dir, step, {"step": step, "micro_step": micro_step,
                                                           "skipped_samples": skipped_total, "epoch": epoch},
                            keep=run.save_total_limit)
            if run.push_to_hub and run.hub_push_checkpoints:
                push_checkpoint(accelerator, model, processor, repo_id, step, args)
    progress.close()

    # 6. Evaluate.
    results = evaluate(accelerator, model, processor, eval_splits, args, metrics_log, step)
    # 7. Save the model, processor and results.
    state_dict, unwrapped = save(accelerator, model, processor, results, output_dir)
    skipped = int(accelerator.reduce(torch.tensor(float(skipped_total), device=accelerator.device), "sum").item())
    if accelerator.is_main_process:
        # 8. The model card.
        card = model_card(args, results, card_hyperparameters(args, accelerator))
        render_model_card(unwrapped, repo_id, card).save(output_dir / "README.md")
        print(f"\nResults after {step} steps ({global_batch} images per step, {skipped} unusable rows skipped):")
        print(format_results_table(results))
        # 9. The zero-shot pipeline, loaded from the saved folder, on one image.
        demo = pipeline_demo(output_dir, eval_splits, data)
        if demo is not None:
            print(demo)
        print(f"Saved model, processor and model card to {output_dir}")
        # 10. Push to the Hub.
        if run.push_to_hub:
            commit_url = push(unwrapped, state_dict, processor, repo_id, card, args)
            print(f"Pushed to the Hub: {commit_url}")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return results


if __name__ == "__main__":
    main()
