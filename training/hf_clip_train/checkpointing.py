"""Atomic, rotating, verifiable training checkpoints on top of `Accelerator.save_state`.

A checkpoint is written to `.tmp-checkpoint-N`, completed with `run_state.json` (the loop's step, data position and
counters), then renamed to `checkpoint-N`. A run killed mid-save leaves only a temporary folder, which is never resumed
from, so the previous checkpoint stays usable. `run_state.json` (the completion marker) records the size and SHA-256
of every other file of the checkpoint (the manifest format of `hf_clip.integrity`, which `from_pretrained` checks too),
so a file truncated or altered later (a full disk, a bad copy) is found before Accelerate reads it:
`--resume_from_checkpoint latest` then falls back to the newest checkpoint that verifies.

A resume compares the flags the checkpoint fixes with this run's (`check_resume`), takes unset ones from it, and
puts each process back at its place in a streamed split (`own_stream_state`).
"""

import glob
import json
import logging
import os
import re
import shutil
from pathlib import Path

from accelerate import Accelerator
from accelerate.utils import gather_object

from hf_clip.integrity import CHECKPOINT_MARKER, FILES_KEY, CorruptFileError, file_manifest, verify_files

from .args import InputError, MissingInputError, RunArguments, TrainScriptArguments, warmup_step_count
from .data import ProcessShare, TrainBatches

logger = logging.getLogger(__name__)

STATE_FILE = CHECKPOINT_MARKER
LEGACY_STATE_FILE = "trainer_state.json"  # the marker's name in checkpoints of the previous release: read, not written
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


class DamagedCheckpointError(CorruptFileError):
    """A checkpoint whose files do not match its completion marker. The message names the checkpoint and the file."""


def _marker(checkpoint: Path) -> Path:
    """The completion marker of `checkpoint`: `run_state.json`, or the previous release's name when only it exists."""
    legacy = checkpoint / LEGACY_STATE_FILE
    return legacy if legacy.is_file() and not (checkpoint / STATE_FILE).is_file() else checkpoint / STATE_FILE


def complete_checkpoints(output_dir: str | Path) -> list[Path]:
    """Finished checkpoints in `output_dir`, oldest first."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = [(int(m.group(1)), path) for path in output_dir.iterdir()
             if (m := _CHECKPOINT.match(path.name)) and _marker(path).is_file()]
    return [path for _, path in sorted(found)]


def verify_checkpoint(checkpoint: str | Path) -> dict:
    """The training state of `checkpoint` after checking each file against the completion marker's sizes and hashes.

    Raises `DamagedCheckpointError` naming the first file that is missing, truncated or altered (or the marker itself
    when it is not valid JSON). A checkpoint written before manifests existed is only checked for a readable marker.
    """
    checkpoint = Path(checkpoint)
    marker = _marker(checkpoint)
    if not marker.is_file():
        raise MissingInputError(f"{checkpoint} is not a complete checkpoint (no {STATE_FILE}).")
    try:
        state = json.loads(marker.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DamagedCheckpointError(f"Checkpoint {checkpoint}: {marker.name} is damaged ({error}).") from None
    if not isinstance(state, dict) or not {"step", "micro_step"} <= set(state):
        raise DamagedCheckpointError(f"Checkpoint {checkpoint}: {marker.name} holds no training state.")
    try:
        verify_files(checkpoint, state.get(FILES_KEY, {}), label=f"Checkpoint {checkpoint}")
    except CorruptFileError as error:
        raise DamagedCheckpointError(str(error)) from None
    return state


def resolve_checkpoint(output_dir: str | Path, requested: str) -> Path:
    """`requested` is "latest" (the newest checkpoint in `output_dir` that verifies; damaged newer ones are logged
    and skipped) or a checkpoint directory, which must verify (see `verify_checkpoint`)."""
    if requested != "latest":
        verify_checkpoint(requested)
        return Path(requested)
    checkpoints = complete_checkpoints(output_dir)
    if not checkpoints:
        raise MissingInputError(f"--resume_from_checkpoint latest: no complete checkpoint in {output_dir}.")
    damaged = []
    for checkpoint in reversed(checkpoints):
        try:
            verify_checkpoint(checkpoint)
        except DamagedCheckpointError as error:
            logger.warning("%s Falling back to an older checkpoint.", error)
            damaged.append(str(error))
            continue
        return checkpoint
    raise DamagedCheckpointError(
        f"--resume_from_checkpoint latest: every checkpoint in {output_dir} is damaged: " + " ".join(damaged))


def read_state(checkpoint: Path) -> dict:
    """The training state saved with `checkpoint` (without the file manifest)."""
    state = json.loads(_marker(checkpoint).read_text())
    state.pop(FILES_KEY, None)
    return state


def truncate_step_log(path: Path, step: int) -> None:
    """Keep only the lines of a JSON-lines log (`{"step": ...}` per line) up to `step`, dropping lines that a killed
    run left past it (and a half-written last line), so a resumed run logs each step exactly once."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line + "\n")
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text("".join(kept))
    os.replace(temporary, path)


def save_checkpoint(accelerator: Accelerator, output_dir: str | Path, step: int, state: dict, keep: int) -> Path:
    """Save model, optimizer, scheduler and RNG states plus `state` atomically; keep the last `keep` checkpoints.
    All processes must call this."""
    output_dir = Path(output_dir)
    final, temporary = output_dir / f"checkpoint-{step}", output_dir / f".tmp-checkpoint-{step}"
    if accelerator.is_main_process and temporary.exists():
        shutil.rmtree(temporary)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(temporary))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        state_path = temporary / STATE_FILE
        with open(state_path, "w") as handle:
            json.dump({**state, FILES_KEY: file_manifest(temporary, exclude=[STATE_FILE])}, handle, indent=2)
            handle.flush()
            os.fsync(handle.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.replace(temporary, final)
        for old in complete_checkpoints(output_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


# Flags a checkpoint fixes (its optimizer, scheduler and data position were made with them); a resume compares them
# with the checkpoint's (`check_resume`).
RESUME_FIXED_FLAGS = (
    "learning_rate", "warmup_steps", "max_steps", "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon",
    "per_device_train_batch_size", "gradient_accumulation_steps", "num_processes", "seed", "dataset_name",
    "dataset_config_name", "train_split", "image_column", "caption_column", "max_train_samples", "streaming",
    "shuffle_buffer_size", "embedded_num_train", "loss_type", "stream_workers", "vision_model_name_or_path",
    "vision_model_revision", "text_model_name_or_path", "text_model_revision", "lock_image",
)
# How a resume names the recipe keys that are not flags of their own.
_RECIPE_KEY_NAMES = {
    "num_processes": "the process count (accelerate launch --num_processes)",
    "stream_workers": "the DataLoader workers reading the streamed split (--dataloader_num_workers, 0 counted as 1 "
                      "and capped at the CPU count)",
}
# Refused even with --allow_resume_changes: the checkpoint's weights and optimizer state belong to its loss.
NEVER_CHANGED_ON_RESUME = ("loss_type",)


def dataset_identity(dataset_name: str | None) -> str | None:
    """`--dataset_name` as a resume compares it: a local path or glob made absolute, anything else as given."""
    if dataset_name is None:
        return None
    expanded = os.path.expanduser(dataset_name)
    return os.path.abspath(expanded) if Path(expanded).exists() or glob.glob(expanded) else dataset_name


def resume_recipe(args: TrainScriptArguments, num_processes: int, loss_type: str, stream_workers: int) -> dict:
    """The values of `RESUME_FIXED_FLAGS` in this run; `loss_type` is the model's, `stream_workers` the number of
    DataLoader workers that read a streamed split (`TrainBatches.streams`; recorded for streamed data only: each
    worker's position in its own shards is what a streamed resume restores, so another count cannot continue it)."""
    run, data = args.run, args.data
    values = {**args.flat(), "warmup_steps": warmup_step_count(run.warmup_steps, run.max_steps),
              "num_processes": num_processes, "dataset_name": dataset_identity(data.dataset_name),
              "loss_type": loss_type, "shuffle_buffer_size": data.shuffle_buffer_size if data.streaming else None,
              "embedded_num_train": data.embedded_num_train if data.dataset_name is None else None,
              "stream_workers": stream_workers if data.streaming else None}
    return {key: values[key] for key in RESUME_FIXED_FLAGS}


def _flag(key: str) -> str:
    return _RECIPE_KEY_NAMES.get(key, f"--{key}")


def take_unset_flags_from_checkpoint(args: TrainScriptArguments, saved: dict) -> None:
    """On resume, an unset --per_device_train_batch_size or --loss_type takes the checkpoint's value."""
    recipe = saved.get("recipe") or {}
    if args.run.per_device_train_batch_size is None and recipe.get("per_device_train_batch_size") is not None:
        args.run.per_device_train_batch_size = recipe["per_device_train_batch_size"]
        args.run.check_grad_cache()
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
        raise InputError(
            f"Cannot resume from {checkpoint}: {described}. The loss type cannot change in a resume, even with "
            "--allow_resume_changes: the checkpoint's weights and optimizer state belong to its loss (a SigLIP model "
            "has a logit_bias, a CLIP model none). To switch, start a new run from a saved model with "
            "--model_name_or_path and --loss_type.")
    if changed and not allow_changes:
        raise InputError(
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
