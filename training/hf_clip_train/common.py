"""What the scripts share: loading a checkpoint with config overrides, and tower locks."""

from huggingface_hub.errors import StrictDataclassError
from transformers import AutoProcessor

from hf_clip import HFClipConfig, HFClipModel, HFClipProcessor, match_special_tokens

from .args import InputError, LossArguments, TowerLockArguments, config_error


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
        raise InputError(f"The config of {model_name_or_path!r} with {overrides}: {config_error(error)}") from None
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
