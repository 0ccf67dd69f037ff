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
import tempfile
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, set_seed
from tqdm.auto import tqdm
from transformers import AutoProcessor, AutoTokenizer, get_cosine_schedule_with_warmup, pipeline

from hf_clip import (
    PHOTO_TEMPLATES,
    SHAPES_TEMPLATES,
    HFClipConfig,
    HFClipModel,
    HFClipProcessor,
    match_special_tokens,
    push_to_hub,
    render_model_card,
    train_clip_tokenizer,
)

from .args import DataArguments, DatasetArguments, ModelArguments, TowerLockArguments, TrainingArguments, parse_args
from .checkpointing import read_state, resolve_checkpoint, save_checkpoint, truncate_step_log
from .data import (
    ImageTextCollator,
    TrainBatches,
    base_directory,
    build_train_dataset,
    caption_samples,
    check_columns,
    check_usable_rows,
    dataset_label,
    decode_image,
    first_rows,
    image_transform_for,
    load_split,
    load_train_split,
    worker_count,
)
from .evaluate import evaluate_split, format_results_table
from .synthetic import CLASS_NAMES
from .synthetic import caption_corpus, describe

logger = logging.getLogger("training")


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


def load_pretrained(model_name_or_path: str) -> tuple[HFClipModel, HFClipProcessor]:
    """An hf_clip or Transformers CLIP checkpoint and its processor, with the text config's special token ids
    matched to the tokenizer's (see `hf_clip.match_special_tokens`)."""
    model = HFClipModel.from_pretrained(model_name_or_path)
    loaded = AutoProcessor.from_pretrained(model_name_or_path)
    match_special_tokens(model, loaded.tokenizer)
    return model, HFClipProcessor(image_processor=loaded.image_processor, tokenizer=loaded.tokenizer)


def build_model_and_processor(model_args: ModelArguments, data_args: DataArguments, train_split,
                              accelerator: Accelerator, output_dir: Path, resuming: bool
                              ) -> tuple[HFClipModel, HFClipProcessor]:
    """Load `--model_name_or_path`, or build `--preset` from scratch with a tokenizer trained on the captions."""
    if model_args.model_name_or_path:
        return load_pretrained(model_args.model_name_or_path)

    tokenizer_dir = output_dir / ".tokenizer"
    if accelerator.is_main_process and not (resuming and tokenizer_dir.is_dir()):
        if data_args.dataset_name is None:
            corpus = caption_corpus()
        else:
            corpus = [*caption_samples(train_split, data_args.caption_column),
                      *(template.format("") for template in PHOTO_TEMPLATES)]
        tokenizer = train_clip_tokenizer(corpus, vocab_size=model_args.tokenizer_vocab_size,
                                         model_max_length=model_args.context_length)
        tokenizer.save_pretrained(tokenizer_dir)
    accelerator.wait_for_everyone()
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = HFClipConfig.from_preset(model_args.preset, tokenizer=tokenizer)
    model = HFClipModel(config)
    return model, HFClipProcessor.from_tokenizer(tokenizer, image_size=config.vision_config.image_size)


def lock_towers(model, lock_args: TowerLockArguments) -> None:
    """Freeze the towers that `--lock_image` / `--lock_text` name, but their last `--lock_*_unlocked_layers`."""
    if lock_args.lock_image:
        model.lock_image_tower(lock_args.lock_image_unlocked_layers)
    if lock_args.lock_text:
        model.lock_text_tower(lock_args.lock_text_unlocked_layers)


def build_optimizer(model: HFClipModel, args: TrainingArguments) -> torch.optim.Optimizer:
    """AdamW without weight decay on biases, norms, embeddings and the logit scale; fused where torch has it."""
    no_decay = model.no_weight_decay_parameter_names()
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    groups = [
        {"params": [p for name, p in trainable if name not in no_decay], "weight_decay": args.weight_decay},
        {"params": [p for name, p in trainable if name in no_decay], "weight_decay": 0.0},
    ]
    kwargs = {"lr": args.learning_rate, "betas": (args.adam_beta1, args.adam_beta2), "eps": args.adam_epsilon}
    try:
        return torch.optim.AdamW(groups, fused=True, **kwargs)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(groups, foreach=True, **kwargs)


def load_eval_splits(data_args: DatasetArguments, columns: dict[str, str] | None = None) -> dict:
    """The `--eval_splits` that exist, checked for `columns` (flag -> column; default: the image and caption columns)
    and cut to `--max_eval_samples`."""
    columns = columns or {"image_column": data_args.image_column, "caption_column": data_args.caption_column}
    splits = {}
    for name in data_args.eval_splits:
        dataset = load_split(data_args, name)
        if dataset is None:
            logger.warning("Dataset %r has no split %r; not evaluating on it.", dataset_label(data_args.dataset_name),
                           name)
            continue
        check_columns(dataset, data_args.dataset_name, name, columns)
        if data_args.max_eval_samples is not None:
            dataset = first_rows(dataset, data_args.max_eval_samples)
        splits[name] = dataset
    return splits


def run_evaluation(model, processor, eval_splits: dict, data_args: DataArguments, args: TrainingArguments,
                   accelerator: Accelerator, metrics_log: "MetricsLog", step: int) -> dict[str, dict[str, float]]:
    """Evaluate every split (each process embeds a share of the rows) and log the results at `step`."""
    embedded = data_args.dataset_name is None
    results = {}
    with accelerator.autocast():
        for name, dataset in eval_splits.items():
            results[name] = evaluate_split(
                accelerator.unwrap_model(model), processor, dataset, image_column=data_args.image_column,
                caption_column=data_args.caption_column, label_column=data_args.label_column,
                class_names=list(CLASS_NAMES) if embedded else None,
                templates=list(SHAPES_TEMPLATES if embedded else PHOTO_TEMPLATES),
                base_dir=base_directory(data_args.dataset_name), batch_size=args.per_device_eval_batch_size,
                num_workers=worker_count(data_args.num_workers), state=accelerator.state, description=f"eval {name}")
            metrics_log.write(step, {f"eval/{name}/{key}": value for key, value in results[name].items()})
    return results


class MetricsLog:
    """Appends one JSON object per line to `metrics.jsonl` and forwards scalars to Accelerate's trackers."""

    def __init__(self, accelerator: Accelerator, path: Path):
        self.accelerator, self.path = accelerator, path

    def write(self, step: int, metrics: dict) -> None:
        self.accelerator.log({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step=step)
        if self.accelerator.is_main_process:
            with open(self.path, "a") as handle:
                handle.write(json.dumps({"step": step, **metrics}) + "\n")


def classify_one_image(output_dir: Path, dataset, data_args: DataArguments) -> str:
    """Load the saved model with `pipeline("zero-shot-image-classification")` and classify one eval image."""
    names = list(CLASS_NAMES) if data_args.dataset_name is None else dataset.features[data_args.label_column].names
    row = dataset[0]
    image = decode_image(row[data_args.image_column], base_directory(data_args.dataset_name))
    classifier = pipeline("zero-shot-image-classification", model=str(output_dir))
    predictions = classifier(image, candidate_labels=names, hypothesis_template="a photo of a {}.")
    truth = names[row[data_args.label_column]] if data_args.label_column in row else "?"
    top = ", ".join(f"{p['label']} {100 * p['score']:.1f}%" for p in predictions[:3])
    return f"pipeline on one image of a {truth!r}: {top}"


HUB_CHECKPOINT_BRANCH = "checkpoints"


def push_checkpoint(accelerator: Accelerator, model, processor: HFClipProcessor, repo_id: str, step: int,
                    args: TrainingArguments, card_args: dict) -> None:
    """Push the model at `step` to the `checkpoints` branch of `repo_id`; every process must call it."""
    state_dict = accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        with tempfile.TemporaryDirectory(prefix="hf_clip_checkpoint_") as folder:
            accelerator.unwrap_model(model).save_pretrained(folder, state_dict=state_dict)
            commit = push_to_hub(HFClipModel.from_pretrained(folder), processor, repo_id,
                                 training_args={**card_args, "max_steps": step}, private=args.hub_private_repo,
                                 revision=HUB_CHECKPOINT_BRANCH, commit_message=f"Checkpoint at step {step}")
        logger.info("Pushed the step-%d checkpoint: %s", step, commit.commit_url)
    accelerator.wait_for_everyone()


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    model_args, data_args, args = parse_args(argv)
    output_dir = Path(args.output_dir)
    accelerator = Accelerator(
        cpu=not torch.accelerator.is_available(),  # Accelerate only picks multi-process gloo on CPUs when told
        mixed_precision=resolve_mixed_precision(args.mixed_precision),
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "runs")),
        step_scheduler_with_optimizer=False,
    )
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        level=logging.INFO if accelerator.is_main_process else logging.WARNING)
    logger.info("%d process(es) on %s, mixed precision: %s", accelerator.num_processes, accelerator.device,
                accelerator.mixed_precision)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
    set_seed(args.seed)
    checkpoint = resolve_checkpoint(output_dir, args.resume_from_checkpoint) if args.resume_from_checkpoint else None

    train_split = load_train_split(data_args, {"image_column": data_args.image_column,
                                               "caption_column": data_args.caption_column})
    check_usable_rows(train_split, data_args, data_args.train_split)
    eval_splits = load_eval_splits(data_args)

    model, processor = build_model_and_processor(model_args, data_args, train_split, accelerator, output_dir,
                                                 resuming=checkpoint is not None)
    lock_towers(model, model_args)
    if model_args.gradient_checkpointing:
        model.activation_checkpointing_enable()
    optimizer = build_optimizer(model, args)
    scheduler = get_cosine_schedule_with_warmup(optimizer, args.warmup_steps, args.max_steps)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)

    step, micro_step, skipped_total = 0, 0, 0
    if checkpoint is not None:
        accelerator.load_state(str(checkpoint))
        state = read_state(checkpoint)
        step, micro_step, skipped_total = state["step"], state["micro_step"], state["skipped_samples"]
        logger.info("Resumed from %s at step %d", checkpoint, step)

    train_dataset = build_train_dataset(train_split, data_args, image_transform_for(processor, train=True),
                                        args.seed, accelerator.num_processes, accelerator.process_index)
    batches = TrainBatches(
        train_dataset, ImageTextCollator(processor.tokenizer), args.per_device_train_batch_size,
        worker_count(data_args.num_workers), accelerator.num_processes, accelerator.process_index, args.seed,
        data_args.streaming,
    ).iterate(micro_step)

    run_config = {**vars(model_args), **vars(data_args), **vars(args)}
    repo_id = args.hub_model_id or output_dir.resolve().name
    accelerator.init_trackers("hf_clip", config={k: v for k, v in run_config.items()
                                                  if isinstance(v, (int, float, str, bool))})
    metrics_log = MetricsLog(accelerator, output_dir / "metrics.jsonl")
    ids_log = output_dir / f"sample_ids_rank{accelerator.process_index}.jsonl" if args.log_sample_ids else None
    if checkpoint is not None and accelerator.is_main_process:
        truncate_step_log(metrics_log.path, step)
    if checkpoint is not None and ids_log is not None:
        truncate_step_log(ids_log, step)
    global_batch = args.per_device_train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    card_args = {**run_config, "num_processes": accelerator.num_processes, "global_batch_size": global_batch,
                 "mixed_precision": accelerator.mixed_precision}
    progress = tqdm(total=args.max_steps, initial=step, desc="training", disable=not accelerator.is_local_main_process)
    window_loss, window_steps, window_start = 0.0, 0, time.perf_counter()
    model.train()
    while step < args.max_steps:
        for _ in range(args.gradient_accumulation_steps):
            epoch, batch = next(batches)
            micro_step += 1
            skipped_total += int(batch["skipped"])
            inputs = {k: batch[k].to(accelerator.device) for k in ("pixel_values", "input_ids", "attention_mask")}
            with accelerator.accumulate(model):
                loss = model(**inputs, return_loss=True).loss
                accelerator.backward(loss)
                grad_norm = None
                if accelerator.sync_gradients and args.max_grad_norm > 0:
                    grad_norm = accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                optimizer.step()
                if accelerator.sync_gradients:
                    scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            window_loss += loss.detach().float().item() / args.gradient_accumulation_steps
            if ids_log is not None:
                with open(ids_log, "a") as handle:
                    handle.write(json.dumps({"step": step + 1, "row_ids": batch["row_ids"].tolist()}) + "\n")
        accelerator.unwrap_model(model).clamp_logit_scale_()
        step += 1
        window_steps += 1
        progress.update(1)

        if step % args.logging_steps == 0 or step == args.max_steps:
            totals = accelerator.reduce(torch.tensor([window_loss, float(skipped_total)], device=accelerator.device),
                                        reduction="sum")
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
            progress.set_postfix(loss=f"{metrics['loss']:.4f}", skipped=metrics["skipped_samples"])
            window_loss, window_steps, window_start = 0.0, 0, time.perf_counter()
        if args.eval_steps and step % args.eval_steps == 0 and step < args.max_steps:
            run_evaluation(model, processor, eval_splits, data_args, args, accelerator, metrics_log, step)
        if args.checkpointing_steps and step % args.checkpointing_steps == 0:
            save_checkpoint(accelerator, output_dir, step, {"step": step, "micro_step": micro_step,
                                                           "skipped_samples": skipped_total, "epoch": epoch},
                            keep=args.checkpoints_total_limit)
            if args.push_to_hub and args.hub_push_checkpoints:
                push_checkpoint(accelerator, model, processor, repo_id, step, args, card_args)
    progress.close()

    results = run_evaluation(model, processor, eval_splits, data_args, args, accelerator, metrics_log, step)
    state_dict = accelerator.get_state_dict(model)
    skipped = int(accelerator.reduce(torch.tensor(float(skipped_total), device=accelerator.device), "sum").item())
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)
        unwrapped.save_pretrained(output_dir, state_dict=state_dict)
        processor.save_pretrained(output_dir)
        (output_dir / "eval_results.json").write_text(json.dumps(results, indent=2))
        description = describe(data_args.embedded_num_train) if data_args.dataset_name is None else None
        render_model_card(unwrapped, repo_id, metrics=results, training_args=card_args,
                          dataset_description=description).save(output_dir / "README.md")
        print(f"\nResults after {step} steps ({global_batch} images per step, {skipped} unusable rows skipped):")
        print(format_results_table(results))
        first_split = next(iter(eval_splits.values()), None)
        if first_split is not None and (data_args.dataset_name is None or data_args.label_column in
                                        first_split.column_names):
            print(classify_one_image(output_dir, first_split, data_args))
        print(f"Saved model, processor and model card to {output_dir}")
        if args.push_to_hub:
            commit = push_to_hub(HFClipModel.from_pretrained(output_dir), processor, repo_id, metrics=results,
                                 training_args=card_args, private=args.hub_private_repo,
                                 dataset_description=description)
            print(f"Pushed to the Hub: {commit.commit_url}")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return results


if __name__ == "__main__":
    main()
