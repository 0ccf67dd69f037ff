"""What a run publishes: the model saved with its manifest, the model card, and the pushes to the Hub (the final one,
and the checkpoints to the `checkpoints` branch), with the start-up check of Hub access."""

import logging
from pathlib import Path

from accelerate import Accelerator
from accelerate.utils import broadcast_object_list

from hf_clip import PUBLISHED_HYPERPARAMETERS, HFClipModel, HFClipProcessor, ModelCardInfo, push_to_hub
from hf_clip.cli import UsageError
from hf_clip.hub import check_push_access, error_summary, public_name
from hf_clip.integrity import write_manifest

from .args import TrainScriptArguments, warmup_step_count
from .fsdp import scalar_logit_scale, unsharded_model
from .synthetic import DATASET_ID, describe

logger = logging.getLogger(__name__)

HUB_CHECKPOINT_BRANCH = "checkpoints"
CHECKPOINT_PUSH_RETRIES = 2
# This script's own recipe keys, published beside `hf_clip.PUBLISHED_HYPERPARAMETERS` (as `extra_hyperparameters`).
SCRIPT_CARD_KEYS = ("vision_model_name_or_path", "vision_model_revision", "text_model_name_or_path",
                    "text_model_revision", "projection_dim", "preset", "tokenizer_vocab_size", "context_length",
                    "image_size", "patch_size", "resume_changes", "nonfinite_steps_skipped")
CARD_KEYS = (*PUBLISHED_HYPERPARAMETERS, *SCRIPT_CARD_KEYS)


class HubAccessError(UsageError, PermissionError):
    """--push_to_hub with a token the Hub refuses, or a repo it may not write: found at start-up, before any step."""


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
            logger.warning("Could not check the Hub token and repo %r now (%s); the pushes will try again.", repo_id,
                           error_summary(error))
    refusal = broadcast_object_list([refusal])[0]
    if refusal is not None:
        raise HubAccessError(refusal)


def card_hyperparameters(args: TrainScriptArguments, accelerator: Accelerator, resume_changes: list[str] = (),
                         nonfinite_steps: int = 0) -> dict:
    """The recipe for the model card: `CARD_KEYS` that are set, plus the process count and global batch size; the
    dataset, the starting model and the pretrained towers by Hub id, or as "local dataset NAME" / "local model NAME";
    the flags changed on resume and the updates skipped as non-finite, if any. A model with a pretrained text tower
    publishes none of the caption tokenizer's flags, and one with a pretrained vision tower none of the image size's."""
    run, data, model, towers = args.run, args.data, args.model, args.towers
    tower_names = {name: value and public_name(value, "model") for name, value in (
        ("vision_model_name_or_path", towers.vision_model_name_or_path),
        ("text_model_name_or_path", towers.text_model_name_or_path))}
    unused = set()
    if towers.text_model_name_or_path is not None:
        unused |= {"preset", "tokenizer_vocab_size", "context_length"}
    values = {**args.flat(), "num_processes": accelerator.num_processes, "mixed_precision": accelerator.mixed_precision,
              "warmup_steps": warmup_step_count(run.warmup_steps, run.max_steps),
              "global_batch_size": run.per_device_train_batch_size * accelerator.num_processes
              * run.gradient_accumulation_steps,
              "dataset_name": data.dataset_name and public_name(data.dataset_name, "dataset"),
              "model_name_or_path": model.model_name_or_path and public_name(model.model_name_or_path, "model"),
              "resume_changes": "; ".join(resume_changes) or None, "nonfinite_steps_skipped": nonfinite_steps or None,
              **tower_names}
    return {key: values[key] for key in CARD_KEYS if values.get(key) not in (None, False) and key not in unused
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
            logger.warning("Pushing the step-%d checkpoint to %s failed (%s); training goes on, and the next "
                           "checkpoint push or the final push sends a newer state.", step, repo_id,
                           error_summary(error))
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
