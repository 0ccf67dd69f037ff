"""Configuration of hf_clip models.

Field names follow Transformers' `CLIPTextConfig`, `CLIPVisionConfig` and `CLIPConfig`, so a CLIP
`config.json` maps onto these classes field for field (see `HFClipConfig.get_config_dict`).
"""

import copy
import math
from typing import Any

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig
from transformers.activations import ACT2FN
from transformers.configuration_utils import PreTrainedConfig, SubConfigSpec

from .loss import check_loss_settings
from .towers import check_tower, default_pooling, is_builtin


def _check_width_and_heads(config: PreTrainedConfig) -> None:
    if config.hidden_size % config.num_attention_heads != 0:
        raise ValueError(
            f"{type(config).__name__}: `hidden_size` ({config.hidden_size}) must be divisible by "
            f"`num_attention_heads` ({config.num_attention_heads})."
        )


def _check_activation(config: PreTrainedConfig) -> None:
    if config.hidden_act not in ACT2FN:
        raise ValueError(
            f"{type(config).__name__}: unknown `hidden_act` {config.hidden_act!r}; "
            f"use one of {sorted(ACT2FN)} (CLIP uses 'quick_gelu', open_clip's non-OpenAI models 'gelu')."
        )


def _check_positive(config: PreTrainedConfig, *names: str) -> None:
    """Fields a model cannot be built without: each must be a positive number (an int where it counts something)."""
    for name in names:
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise ValueError(f"{type(config).__name__}: `{name}` must be positive, got {value!r}.")


def _check_optional_positive(config: PreTrainedConfig, *names: str) -> None:
    """Like `_check_positive`, but None is allowed (a tower's `projection_dim` is set by its dual config)."""
    _check_positive(config, *(name for name in names if getattr(config, name) is not None))


def _check_dropout(config: PreTrainedConfig) -> None:
    if config.attention_dropout is None or not 0 <= config.attention_dropout < 1:
        raise ValueError(
            f"{type(config).__name__}: `attention_dropout` must be in [0, 1), got {config.attention_dropout!r}."
        )


@strict
class HFClipTextConfig(PreTrainedConfig):
    """Causal text Transformer. Pools the final hidden state at the first `eos_token_id` of each row.

    Field types equal `CLIPTextConfig`'s, so every CLIP text config loads. Special ids outside the vocabulary only
    warn (as in Transformers): a row without an `eos_token_id` pools at its first real token.
    """

    model_type = "hf_clip_text_model"
    base_config_key = "text_config"

    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    projection_dim: int | None = 512
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float | None = 1e-5
    attention_dropout: int | float | None = 0.0
    initializer_range: float = 0.02
    initializer_factor: float | None = 1.0
    pad_token_id: int | None = 1
    bos_token_id: int | None = 49406
    eos_token_id: int | list[int] | None = 49407

    def validate_architecture(self) -> None:
        _check_positive(self, "vocab_size", "hidden_size", "intermediate_size", "num_attention_heads",
                        "max_position_embeddings", "layer_norm_eps", "initializer_factor")
        _check_optional_positive(self, "projection_dim")
        _check_width_and_heads(self)
        _check_dropout(self)
        if self.num_hidden_layers < 0:
            raise ValueError(f"HFClipTextConfig: `num_hidden_layers` must be 0 or more, got {self.num_hidden_layers}.")
        if self.eos_token_id is None or self.eos_token_id == []:
            raise ValueError("HFClipTextConfig: `eos_token_id` is required; the text tower pools at that token.")

    def validate_activation(self) -> None:
        _check_activation(self)

    @classmethod
    def get_config_dict(cls, pretrained_model_name_or_path, **kwargs) -> tuple[dict[str, Any], dict[str, Any]]:
        """Reads `config.json`; a Transformers CLIP config is mapped onto hf_clip's."""
        config_dict, kwargs = super().get_config_dict(pretrained_model_name_or_path, **kwargs)
        return clip_config_dict_to_hf_clip(config_dict), kwargs


@strict
class HFClipVisionConfig(PreTrainedConfig):
    """ViT image encoder: patch conv, class token, position embeddings, pre-LN blocks, post-LN on the class token.

    `patch_dropout` is the fraction of patch tokens each image drops at random in training (FLIP, Li et al., 2023;
    open_clip's `PatchDropout`), after the position embeddings; the class token is always kept. Eval is unaffected.
    """

    model_type = "hf_clip_vision_model"
    base_config_key = "vision_config"

    hidden_size: int = 768
    intermediate_size: int = 3072
    projection_dim: int | None = 512
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int | list[int] | tuple[int, int] | None = 224
    patch_size: int | list[int] | tuple[int, int] | None = 32
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float | None = 1e-5
    attention_dropout: int | float | None = 0.0
    initializer_range: float = 0.02
    initializer_factor: float | None = 1.0
    patch_dropout: int | float = 0.0

    def validate_architecture(self) -> None:
        for name in ("image_size", "patch_size"):
            value = getattr(self, name)
            if not isinstance(value, int):
                raise ValueError(f"HFClipVisionConfig: `{name}` must be an int (square images), got {value!r}.")
        _check_positive(self, "hidden_size", "intermediate_size", "num_attention_heads", "num_channels",
                        "image_size", "patch_size", "layer_norm_eps", "initializer_factor")
        _check_optional_positive(self, "projection_dim")
        _check_width_and_heads(self)
        _check_dropout(self)
        if self.num_hidden_layers < 1:
            raise ValueError(
                f"HFClipVisionConfig: `num_hidden_layers` must be at least 1, got {self.num_hidden_layers}: without "
                "a block the class token never attends to the patches, so every image maps to the same embedding."
            )
        if self.image_size % self.patch_size != 0:
            raise ValueError(
                f"HFClipVisionConfig: `image_size` ({self.image_size}) must be divisible by "
                f"`patch_size` ({self.patch_size})."
            )

    def validate_activation(self) -> None:
        _check_activation(self)

    @classmethod
    def get_config_dict(cls, pretrained_model_name_or_path, **kwargs) -> tuple[dict[str, Any], dict[str, Any]]:
        """Reads `config.json`; a Transformers CLIP config is mapped onto hf_clip's."""
        config_dict, kwargs = super().get_config_dict(pretrained_model_name_or_path, **kwargs)
        return clip_config_dict_to_hf_clip(config_dict), kwargs

    def validate_patch_dropout(self) -> None:
        if not 0.0 <= self.patch_dropout < 1.0:
            raise ValueError(f"HFClipVisionConfig: `patch_dropout` must be in [0, 1), got {self.patch_dropout}.")


_PRESETS: dict[str, dict[str, Any]] = {
    # Small enough to train in minutes on a laptop CPU; used by the tests and the embedded demo.
    "tiny": {
        "projection_dim": 256,
        "text_config": {"hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 4,
                        "num_attention_heads": 4, "max_position_embeddings": 32},
        "vision_config": {"hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 4,
                          "num_attention_heads": 4, "image_size": 64, "patch_size": 8},
    },
    # The published OpenAI CLIP dimensions (Radford et al., 2021, Table 20).
    "ViT-B-32": {
        "projection_dim": 512,
        "text_config": {"hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 12,
                        "num_attention_heads": 8, "max_position_embeddings": 77},
        "vision_config": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                          "num_attention_heads": 12, "image_size": 224, "patch_size": 32},
    },
    "ViT-B-16": {
        "projection_dim": 512,
        "text_config": {"hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 12,
                        "num_attention_heads": 8, "max_position_embeddings": 77},
        "vision_config": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                          "num_attention_heads": 12, "image_size": 224, "patch_size": 16},
    },
    "ViT-L-14": {
        "projection_dim": 768,
        "text_config": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                        "num_attention_heads": 12, "max_position_embeddings": 77},
        "vision_config": {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
                          "num_attention_heads": 16, "image_size": 224, "patch_size": 14},
    },
}

# What `import hf_clip` registers for an `HFClipConfig`, as module.class names for a checkpoint's `auto_map`, so that
# remote code (`trust_remote_code=True`) resolves every Auto class as the installed package does.
REMOTE_CODE_AUTO_MAP = {
    "AutoConfig": "configuration_hf_clip.HFClipConfig",
    "AutoModel": "modeling_hf_clip.HFClipModel",
    "AutoModelForZeroShotImageClassification": "modeling_hf_clip.HFClipModel",
    "AutoModelForImageClassification": "modeling_hf_clip.HFClipForImageClassification",
    "AutoProcessor": "processing_hf_clip.HFClipProcessor",
}

class _TowerConfigSpec(SubConfigSpec):
    """A tower config: hf_clip's built-in one, or any Transformers backbone config (a dict naming its `model_type`,
    rebuilt with `AutoConfig.for_model`, as `VisionTextDualEncoderConfig` does)."""

    def create_subconfig(self, key, subconfig=None, **kwargs):
        if isinstance(subconfig, dict) and subconfig.get("model_type", self.model_type) != self.model_type:
            subconfig = dict(subconfig)
            try:
                return AutoConfig.for_model(subconfig.pop("model_type"), **subconfig), kwargs
            except ValueError as error:
                raise ValueError(
                    f"HFClipConfig: `{key}` names a backbone Transformers does not know ({error})."
                ) from None
        return super().create_subconfig(key, subconfig, **kwargs)


_CLIP_MODEL_TYPES = {
    "clip": "hf_clip", "clip_text_model": "hf_clip_text_model", "clip_vision_model": "hf_clip_vision_model"
}


@strict
class HFClipConfig(PreTrainedConfig):
    """Both towers plus the shared embedding size, the temperature and the loss settings.

    `loss_type` is "clip" (softmax InfoNCE) or "siglip" (pairwise sigmoid, with a learned `logit_bias` added to the
    logits). Init values follow the paper of the loss: `logit_scale_init_value` ln(1/0.07) for CLIP, ln(10) for
    SigLIP (a SigLIP config given CLIP's default takes SigLIP's), and `logit_bias_init_value` −10 (SigLIP only).
    The model clamps exp(logit_scale) to at most `logit_scale_max`. `label_smoothing` (CLIP only) is applied to both
    cross-entropies. `loss_chunk_size` is the loss's `chunk_size`: None picks dense or chunked from the batch size,
    0 is dense, k > 0 is k rows per panel.

    A tower config is hf_clip's built-in one (`HFClipTextConfig`, `HFClipVisionConfig`) or, in a composed model, the
    config of any Transformers backbone (`BertConfig`, `ViTConfig`, ... saved with its `model_type` and rebuilt with
    `AutoConfig.for_model`). A composed tower pools with `text_pooling` / `vision_pooling` (`towers.POOLINGS`; None
    takes the family's own, `towers.default_pooling`) and projects with `text_projection_type` /
    `vision_projection_type` ("linear", "mlp" or "none"); built-in towers leave these unset and "linear".
    `tower_sources` records where `HFClipModel.from_vision_text_pretrained` took each tower from:
    {"vision"/"text": {"name_or_path", "revision"}} (revision: the Hub commit, None for a local folder).

    The config carries the `auto_map` of every Auto class hf_clip registers (`REMOTE_CODE_AUTO_MAP`; entries it was
    loaded with are kept), so a saved checkpoint loads with `trust_remote_code=True` where hf_clip is not installed.
    """

    model_type = "hf_clip"
    sub_configs_defaults = {"text_config": _TowerConfigSpec(HFClipTextConfig),
                            "vision_config": _TowerConfigSpec(HFClipVisionConfig)}

    text_config: dict | PreTrainedConfig | None = None
    vision_config: dict | PreTrainedConfig | None = None
    projection_dim: int | None = 512
    logit_scale_init_value: float | int | None = math.log(1 / 0.07)
    logit_scale_max: float | int = 100.0
    label_smoothing: float = 0.0
    initializer_factor: float | None = 1.0
    loss_type: str = "clip"
    logit_bias_init_value: float | int | None = None
    loss_chunk_size: int | None = None
    text_pooling: str | None = None
    vision_pooling: str | None = None
    text_projection_type: str = "linear"
    vision_projection_type: str = "linear"
    tower_sources: dict | None = None

    def __post_init__(self, **kwargs):
        if self.loss_type == "siglip":
            if self.logit_scale_init_value == math.log(1 / 0.07):  # CLIP's default: take SigLIP's
                self.logit_scale_init_value = math.log(10.0)
            if self.logit_bias_init_value is None:
                self.logit_bias_init_value = -10.0
        super().__post_init__(**kwargs)
        for modality in ("text", "vision"):
            tower_config = getattr(self, f"{modality}_config")
            if not is_builtin(tower_config) and getattr(self, f"{modality}_pooling") is None:
                setattr(self, f"{modality}_pooling", default_pooling(tower_config))
        self.auto_map = {**REMOTE_CODE_AUTO_MAP, **(getattr(self, "auto_map", None) or {})}

    def validate_architecture(self) -> None:
        _check_positive(self, "projection_dim", "initializer_factor")

    def validate_towers(self) -> None:
        for modality in ("text", "vision"):
            check_tower(getattr(self, f"{modality}_config"), modality, getattr(self, f"{modality}_pooling"),
                        getattr(self, f"{modality}_projection_type"), self.projection_dim)

    @property
    def is_composed(self) -> bool:
        """Whether a tower is a Transformers backbone rather than hf_clip's built-in one."""
        return not (is_builtin(self.text_config) and is_builtin(self.vision_config))

    def validate_loss(self) -> None:
        try:
            check_loss_settings(self.loss_type, self.label_smoothing, self.loss_chunk_size)
        except ValueError as error:
            raise ValueError(f"HFClipConfig: {error}") from None
        if self.logit_bias_init_value is not None and self.loss_type != "siglip":
            raise ValueError("HFClipConfig: `logit_bias_init_value` is for loss_type 'siglip' (a softmax ignores a "
                             f"bias), got {self.logit_bias_init_value} with loss_type {self.loss_type!r}.")
        if self.logit_bias_init_value is not None and not math.isfinite(self.logit_bias_init_value):
            raise ValueError("HFClipConfig: `logit_bias_init_value` must be finite (SigLIP starts at -10), got "
                             f"{self.logit_bias_init_value}.")

    def validate_logit_scale(self) -> None:
        if self.logit_scale_init_value is None:
            raise ValueError("HFClipConfig: `logit_scale_init_value` must be a number, got None.")
        if not math.isfinite(self.logit_scale_init_value):
            raise ValueError("HFClipConfig: `logit_scale_init_value` must be finite (the log of the initial "
                             f"temperature scale, ln(1/0.07) = 2.659 in CLIP), got {self.logit_scale_init_value}.")
        if not 0 < self.logit_scale_max < math.inf:
            raise ValueError(
                f"HFClipConfig: `logit_scale_max` must be positive and finite, got {self.logit_scale_max}.")
        if not self.logit_scale_init_value <= math.log(self.logit_scale_max):
            raise ValueError(
                f"HFClipConfig: `logit_scale_init_value` ({self.logit_scale_init_value}) exceeds ln(`logit_scale_max`) "
                f"= {math.log(self.logit_scale_max):.4g}; it is the log of the initial temperature scale, "
                "ln(1/0.07) = 2.659 in CLIP."
            )

    @classmethod
    def presets(cls) -> list[str]:
        return list(_PRESETS)

    @classmethod
    def from_preset(cls, name: str, *, tokenizer=None, **overrides) -> "HFClipConfig":
        """Build a config from a named preset (`tiny`, `ViT-B-32`, `ViT-B-16`, `ViT-L-14`).

        With `tokenizer`, the text tower's `vocab_size`, `max_position_embeddings` and bos/eos/pad ids are taken
        from it, so the pooling token can never disagree with what the tokenizer emits. `overrides` may set
        top-level fields or partial `text_config` / `vision_config` dicts.
        """
        if name not in _PRESETS:
            raise ValueError(f"Unknown preset {name!r}; available presets: {', '.join(_PRESETS)}.")
        preset = copy.deepcopy(_PRESETS[name])
        text_config = {**preset.pop("text_config"), **overrides.pop("text_config", {})}
        vision_config = {**preset.pop("vision_config"), **overrides.pop("vision_config", {})}
        if tokenizer is not None:
            text_config.update(text_config_kwargs_from_tokenizer(tokenizer))
        top_level = {**preset, **overrides}
        text_config["projection_dim"] = vision_config["projection_dim"] = top_level["projection_dim"]
        return cls(text_config=text_config, vision_config=vision_config, **top_level)

    @classmethod
    def get_config_dict(cls, pretrained_model_name_or_path, **kwargs) -> tuple[dict[str, Any], dict[str, Any]]:
        """Reads `config.json`; a Transformers CLIP config (`model_type: "clip"`) is mapped onto hf_clip's."""
        config_dict, kwargs = super().get_config_dict(pretrained_model_name_or_path, **kwargs)
        return dual_encoder_config_dict_to_hf_clip(clip_config_dict_to_hf_clip(config_dict)), kwargs


# Transformers' SiglipModel does not clamp its temperature; trained SigLIPs go past CLIP's bound of 100.
SIGLIP_LOGIT_SCALE_MAX = 1000.0


def dual_encoder_config_dict_to_hf_clip(config_dict: dict[str, Any]) -> dict[str, Any]:
    """Map a Transformers `VisionTextDualEncoderConfig` or `SiglipConfig` dict onto a composed hf_clip config with
    the same towers, pooling and projections (other dicts are returned as they are).

    A dual encoder pools with each backbone's `pooler_output` and projects linearly. SigLIP pools with its own
    heads (the vision attention-pooling head, the text head over the last position), has no projection, and
    trains with the sigmoid loss and its bias; its temperature is clamped at `SIGLIP_LOGIT_SCALE_MAX`.
    """
    model_type = config_dict.get("model_type")
    if model_type not in ("vision-text-dual-encoder", "siglip"):
        return config_dict
    config_dict = copy.deepcopy(config_dict)
    for key in ("architectures", "auto_map", "text_config_dict", "vision_config_dict"):
        config_dict.pop(key, None)
    config_dict.update(model_type="hf_clip", text_pooling="pooler", vision_pooling="pooler")
    if model_type == "siglip":
        text_config = config_dict.setdefault("text_config", {})
        text_config.setdefault("model_type", "siglip_text_model")
        config_dict.setdefault("vision_config", {}).setdefault("model_type", "siglip_vision_model")
        config_dict.update(
            loss_type="siglip", text_projection_type="none", vision_projection_type="none",
            projection_dim=text_config.get("projection_size") or text_config.get("hidden_size", 768),
            logit_scale_init_value=math.log(10.0), logit_bias_init_value=-10.0,
            logit_scale_max=SIGLIP_LOGIT_SCALE_MAX,
        )
    return config_dict


def clip_config_dict_to_hf_clip(config_dict: dict[str, Any]) -> dict[str, Any]:
    """Map a Transformers CLIP config dict onto hf_clip's. Every field keeps its name; only model types change."""
    if config_dict.get("model_type") not in _CLIP_MODEL_TYPES:
        return config_dict
    config_dict = copy.deepcopy(config_dict)
    config_dict["model_type"] = _CLIP_MODEL_TYPES[config_dict["model_type"]]
    for key in ("text_config", "vision_config"):
        sub_config = config_dict.get(key)
        if isinstance(sub_config, dict) and sub_config.get("model_type") in _CLIP_MODEL_TYPES:
            sub_config["model_type"] = _CLIP_MODEL_TYPES[sub_config["model_type"]]
    for key in ("architectures", "text_config_dict", "vision_config_dict", "auto_map"):
        config_dict.pop(key, None)
    return config_dict


def text_config_kwargs_from_tokenizer(tokenizer) -> dict[str, int]:
    """Text-config fields that must agree with `tokenizer`: vocab size, context length, bos/eos/pad ids."""
    if tokenizer.eos_token_id is None:
        raise ValueError("The tokenizer has no eos token; the text tower pools at the end-of-text token.")
    return {
        "vocab_size": len(tokenizer),
        "max_position_embeddings": int(tokenizer.model_max_length),
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }


__all__ = ["HFClipConfig", "HFClipTextConfig", "HFClipVisionConfig"]
