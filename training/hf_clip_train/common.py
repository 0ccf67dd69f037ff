"""What the scripts share: loading a checkpoint with config overrides, composing a model from pretrained towers, and
tower locks."""

import logging
from pathlib import Path

from huggingface_hub.errors import StrictDataclassError
from transformers import AutoImageProcessor, AutoProcessor

from hf_clip import HFClipConfig, HFClipModel, HFClipProcessor, match_special_tokens
from hf_clip.towers import load_pretrained_tower

from .args import InputError, LossArguments, PretrainedTowerArguments, TowerLockArguments, config_error

logger = logging.getLogger(__name__)

# The projection width of a model composed from two pretrained towers when --projection_dim is unset (that of
# `HFClipModel.from_vision_text_pretrained`).
COMPOSED_PROJECTION_DIM = 512
# The `HFClipConfig` fields of a preset that a model with a pretrained vision tower keeps.
SHARED_CONFIG_FIELDS = ("projection_dim", "logit_scale_init_value", "logit_scale_max", "label_smoothing",
                        "initializer_factor", "loss_type", "logit_bias_init_value", "loss_chunk_size")


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


def compose_pretrained(towers: PretrainedTowerArguments, loss_args: LossArguments | None = None
                       ) -> tuple[HFClipModel, HFClipProcessor]:
    """`--vision_model_name_or_path` and `--text_model_name_or_path` composed (`HFClipModel.
    from_vision_text_pretrained`) with the poolings, projections and revisions the flags give, and their processor:
    the text model's tokenizer and the vision model's image processor."""
    model = HFClipModel.from_vision_text_pretrained(
        towers.vision_model_name_or_path, towers.text_model_name_or_path,
        projection_dim=towers.projection_dim or COMPOSED_PROJECTION_DIM, vision_pooling=towers.vision_pooling,
        text_pooling=towers.text_pooling, vision_projection_type=towers.vision_projection_type,
        text_projection_type=towers.text_projection_type, vision_revision=towers.vision_model_revision,
        text_revision=towers.text_model_revision, **config_overrides(None, loss_args))
    check_pooler_weights(model, towers.vision_model_name_or_path)
    processor = HFClipProcessor.from_vision_text_pretrained(
        towers.vision_model_name_or_path, towers.text_model_name_or_path, vision_revision=towers.vision_model_revision,
        text_revision=towers.text_model_revision)
    return model, processor


def compose_vision_pretrained(towers: PretrainedTowerArguments, preset_config: HFClipConfig, tokenizer
                              ) -> tuple[HFClipModel, HFClipProcessor]:
    """The pretrained `--vision_model_name_or_path` beside the built-in text tower of `preset_config` (a preset's
    config fitted to `tokenizer`, the one trained on the captions), and their processor: `tokenizer` and the vision
    model's own image processor. The projections and temperature are new."""
    name_or_path, revision = towers.vision_model_name_or_path, towers.vision_model_revision
    hub_kwargs = {"revision": revision} if revision is not None else {}
    image_processor = vision_image_processor(name_or_path, hub_kwargs)
    vision_model, missing = load_pretrained_tower(name_or_path, "vision", towers.vision_pooling, **hub_kwargs)
    values = {key: getattr(preset_config, key) for key in SHARED_CONFIG_FIELDS}
    try:
        config = HFClipConfig(
            text_config=preset_config.text_config, vision_config=vision_model.config,
            vision_pooling=towers.vision_pooling, vision_projection_type=towers.vision_projection_type,
            tower_sources={"vision": {"name_or_path": str(name_or_path),
                                      "revision": getattr(vision_model.config, "_commit_hash", None)}},
            **values)
    except (StrictDataclassError, ValueError, TypeError) as error:
        raise InputError(f"The vision model {name_or_path!r} as a tower: {config_error(error)}") from None
    model = HFClipModel(config)
    model.vision_model = vision_model
    if config.vision_pooling == "pooler" and any(key.startswith("pooler.") for key in missing):
        raise_missing_pooler(name_or_path)
    return model, HFClipProcessor(image_processor=image_processor, tokenizer=tokenizer)


def vision_image_processor(name_or_path: str, hub_kwargs: dict):
    """The image processor saved with the vision model at `name_or_path`, or an error saying what to add."""
    try:
        return AutoImageProcessor.from_pretrained(name_or_path, **hub_kwargs)
    except (OSError, ValueError) as error:
        raise InputError(
            f"--vision_model_name_or_path {name_or_path!r} has no image processor AutoImageProcessor can load "
            f"({str(error).splitlines()[0][:200]}): save the backbone's image processor beside it "
            "(AutoImageProcessor.from_pretrained(...).save_pretrained(FOLDER) writes preprocessor_config.json)."
        ) from None


def check_pooler_weights(model: HFClipModel, name_or_path: str) -> None:
    """Refuse a vision tower pooled with its backbone's pooler when a local checkpoint holds no pooler weights (a
    `ViTForImageClassification` has none): that pooler would start random, and stay so under --lock_image."""
    if model.config.vision_pooling != "pooler" or not Path(name_or_path).is_dir():
        return
    from safetensors import safe_open

    names = set()
    for path in Path(name_or_path).glob("*.safetensors"):
        with safe_open(str(path), framework="pt") as weights:
            names.update(weights.keys())
    if names and not any(".pooler." in f".{name}" for name in names):
        raise_missing_pooler(name_or_path)


def raise_missing_pooler(name_or_path: str) -> None:
    raise InputError(
        f"--vision_model_name_or_path {name_or_path!r} holds no pooler weights, so the default --vision_pooling "
        "'pooler' would pool through a random layer (frozen so under --lock_image); pass --vision_pooling cls (the "
        "class token an image classifier reads) or mean."
    )


def lock_towers(model, locks: TowerLockArguments) -> None:
    """Freeze the towers that `--lock_image` / `--lock_text` name, but their last `--lock_*_unlocked_layers`."""
    if locks.lock_image:
        model.lock_image_tower(locks.lock_image_unlocked_layers)
    if locks.lock_text:
        model.lock_text_tower(locks.lock_text_unlocked_layers)
