"""Weight conversion between hf_clip, Transformers' CLIP and OpenAI / open_clip state dicts.

hf_clip shares `CLIPModel`'s state-dict layout, so Transformers conversions only translate the config. OpenAI's
layout (also used by open_clip's `CLIP` class) fuses q/k/v into `in_proj_weight` and stores the projections as
(width, embed_dim) matrices used as `x @ proj`, which are transposed into `nn.Linear` weights here.
"""

import copy
import math
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import (
    CLIPConfig,
    CLIPModel,
    PreTrainedConfig,
    SiglipConfig,
    SiglipModel,
    VisionTextDualEncoderConfig,
    VisionTextDualEncoderModel,
    VisionTextDualEncoderProcessor,
)

from .configuration_hf_clip import HFClipConfig, clip_config_dict_to_hf_clip
from .modeling_hf_clip import HFClipModel
from .towers import default_pooling

_HF_CLIP_ONLY_FIELDS = (
    "logit_scale_max", "label_smoothing", "loss_type", "logit_bias_init_value", "loss_chunk_size", "text_pooling",
    "vision_pooling", "text_projection_type", "vision_projection_type", "tower_sources",
)


def hf_clip_config_from_clip_config(clip_config: CLIPConfig) -> HFClipConfig:
    """Field-for-field copy of a Transformers `CLIPConfig` as an `HFClipConfig`."""
    return HFClipConfig.from_dict(clip_config_dict_to_hf_clip(clip_config.to_dict()))


def clip_config_from_hf_clip_config(config: HFClipConfig) -> CLIPConfig:
    """Field-for-field copy of an `HFClipConfig` as a Transformers `CLIPConfig`."""
    if config.is_composed:
        raise ValueError(
            f"A composed model ({config.vision_config.model_type} + {config.text_config.model_type} towers) has no "
            "CLIPConfig; write it as a VisionTextDualEncoderModel or SiglipModel folder with "
            "hf_clip.convert.export_dual_encoder."
        )
    config_dict = config.to_dict()
    for key in ("model_type", "auto_map", "architectures", *_HF_CLIP_ONLY_FIELDS):
        config_dict.pop(key, None)
    for key in ("text_config", "vision_config"):
        config_dict[key].pop("model_type", None)
    config_dict["vision_config"].pop("patch_dropout", None)  # training only; CLIPVisionConfig has no such field
    return CLIPConfig.from_dict(config_dict)


def hf_clip_from_transformers(clip_model: CLIPModel) -> HFClipModel:
    """An `HFClipModel` with the same config and weights as `clip_model`."""
    model = HFClipModel(hf_clip_config_from_clip_config(clip_model.config))
    model.load_state_dict(clip_model.state_dict(), strict=True)
    return model


def transformers_from_hf_clip(model: HFClipModel) -> CLIPModel:
    """A Transformers `CLIPModel` with the same config and weights as `model` (a CLIP-loss model: `CLIPModel` has
    no `logit_bias`)."""
    if model.config.loss_type != "clip":
        raise ValueError(
            f"transformers_from_hf_clip: this model was built for loss_type {model.config.loss_type!r}; its "
            "`logit_bias` has no place in Transformers' CLIPModel."
        )
    clip_model = CLIPModel(clip_config_from_hf_clip_config(model.config))
    clip_model.load_state_dict(model.state_dict(), strict=True)
    return clip_model


_SIGLIP_TOWERS = ("siglip_vision_model", "siglip_text_model")


def _dual_encoder_blockers(config: HFClipConfig) -> list[str]:
    """Why `VisionTextDualEncoderModel` cannot hold a model of `config` (empty when it can)."""
    reasons = []
    for modality in ("vision", "text"):
        tower = getattr(config, f"{modality}_config")
        if getattr(config, f"{modality}_pooling") != "pooler":
            reasons.append(f"the {modality} tower ({tower.model_type}) pools with "
                           f"{getattr(config, f'{modality}_pooling')!r}, a dual encoder with its pooler_output")
        if getattr(config, f"{modality}_projection_type") != "linear":
            reasons.append(f"the {modality} projection is {getattr(config, f'{modality}_projection_type')!r}, a dual "
                           "encoder's is linear")
    if config.text_config.model_type == "siglip_text_model":
        reasons.append("AutoModel, which VisionTextDualEncoderModel builds its towers with, has no SigLIP text model")
    if config.loss_type != "clip":
        reasons.append(f"loss_type {config.loss_type!r} has a logit_bias the dual encoder cannot hold")
    return reasons


def _siglip_blockers(config: HFClipConfig) -> list[str]:
    reasons = []
    if (config.vision_config.model_type, config.text_config.model_type) != _SIGLIP_TOWERS:
        reasons.append(f"its towers are {config.vision_config.model_type} + {config.text_config.model_type}, not "
                       "SigLIP's")
    if (config.vision_pooling, config.text_pooling) != ("pooler", "pooler"):
        reasons.append("SigLIP pools with its own heads (pooling 'pooler')")
    if (config.vision_projection_type, config.text_projection_type) != ("none", "none"):
        reasons.append("SigLIP has no projections (projection type 'none')")
    if config.loss_type != "siglip":
        reasons.append("SiglipModel scores with a logit_bias, which a CLIP-loss model has not learned")
    return reasons


def transformers_from_composed(model: HFClipModel) -> VisionTextDualEncoderModel | SiglipModel:
    """The Transformers model with `model`'s weights and outputs: a `SiglipModel` for SigLIP towers with their own
    heads and the sigmoid loss, else a `VisionTextDualEncoderModel` (both towers pooled with their backbone's
    `pooler_output`, linear projections, CLIP loss). The temperature is stored clamped to `logit_scale_max`, as
    neither clamps. Raises `ValueError` listing what neither can hold."""
    config = model.config
    if not config.is_composed:
        raise ValueError("transformers_from_composed: this model has hf_clip's built-in towers; export it as a "
                         "CLIPModel with hf_clip.convert.transformers_from_hf_clip.")
    state_dict = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}
    state_dict["logit_scale"] = state_dict["logit_scale"].clamp(max=math.log(config.logit_scale_max))
    if not _siglip_blockers(config):
        siglip = SiglipModel(SiglipConfig(text_config=config.text_config.to_dict(),
                                          vision_config=config.vision_config.to_dict()))
        renamed = {}
        for name, tensor in state_dict.items():
            for tower in ("vision_model", "text_model"):
                name = name.replace(f"{tower}.{tower}.", f"{tower}.", 1) if name.startswith(f"{tower}.") else name
            renamed[name] = tensor.reshape(1) if name in ("logit_scale", "logit_bias") else tensor
        siglip.load_state_dict(renamed, strict=True)
        return siglip
    blockers = _dual_encoder_blockers(config)
    if blockers:
        raise ValueError("Neither VisionTextDualEncoderModel nor SiglipModel can hold this model: "
                         f"{'; '.join(blockers)}; and for SiglipModel: {'; '.join(_siglip_blockers(config))}.")
    dual_encoder = VisionTextDualEncoderModel(VisionTextDualEncoderConfig.from_vision_text_configs(
        config.vision_config, config.text_config, projection_dim=config.projection_dim,
        logit_scale_init_value=config.logit_scale_init_value))
    dual_encoder.load_state_dict(state_dict, strict=True)
    return dual_encoder


def export_dual_encoder(model: HFClipModel, processor, output_dir: str | os.PathLike) -> Path:
    """Write `output_dir` as a plain Transformers folder of a composed model (`transformers_from_composed`: a
    `SiglipModel`, or a `VisionTextDualEncoderModel` with its `VisionTextDualEncoderProcessor`), with no custom code
    and nothing naming hf_clip. The folder is written beside `output_dir` and moved into place whole, so a refusal
    or a failure leaves nothing half-written. Returns `output_dir`."""
    transformers_model = transformers_from_composed(model)
    output_dir = Path(output_dir)
    if output_dir.exists() and any(output_dir.iterdir()):
        raise FileExistsError(f"export_dual_encoder: {output_dir} exists and is not empty; pick a new folder.")
    tokenizer = copy.deepcopy(processor.tokenizer)
    for key in ("auto_map", "processor_class"):
        tokenizer.init_kwargs.pop(key, None)
    image_processor = copy.deepcopy(processor.image_processor)
    image_processor.__dict__.pop("auto_map", None)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.", dir=output_dir.parent))
    try:
        transformers_model.save_pretrained(staging)
        if isinstance(transformers_model, VisionTextDualEncoderModel):
            VisionTextDualEncoderProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(
                staging)
        else:
            tokenizer.save_pretrained(staging)
        image_processor.save_pretrained(staging)
        if output_dir.exists():
            output_dir.rmdir()
        os.replace(staging, output_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return output_dir


_OPENAI_IGNORED_KEYS = {"input_resolution", "context_length", "vocab_size", "attn_mask"}
_OPENAI_BLOCK_KEYS = {
    "ln_1.weight": "layer_norm1.weight",
    "ln_1.bias": "layer_norm1.bias",
    "ln_2.weight": "layer_norm2.weight",
    "ln_2.bias": "layer_norm2.bias",
    "attn.out_proj.weight": "self_attn.out_proj.weight",
    "attn.out_proj.bias": "self_attn.out_proj.bias",
    "mlp.c_fc.weight": "mlp.fc1.weight",
    "mlp.c_fc.bias": "mlp.fc1.bias",
    "mlp.c_proj.weight": "mlp.fc2.weight",
    "mlp.c_proj.bias": "mlp.fc2.bias",
}
_OPENAI_TOP_KEYS = {
    "logit_scale": "logit_scale",
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",
    "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "visual.ln_post.weight": "vision_model.post_layernorm.weight",
    "visual.ln_post.bias": "vision_model.post_layernorm.bias",
}
_OPENAI_BLOCK_PATTERN = re.compile(r"^(visual\.)?transformer\.resblocks\.(\d+)\.(.+)$")


def convert_openai_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an OpenAI / open_clip CLIP state dict (`visual.conv1.weight`, `transformer.resblocks.N.attn.
    in_proj_weight`, `positional_embedding`, `ln_final`, `text_projection`, ...) into hf_clip's layout.

    Raises `ValueError` naming every key it does not understand, e.g. open_clip variants hf_clip does not implement
    (attention pooling, SigLIP's `logit_bias`, custom text towers).
    """
    converted: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in state_dict.items():
        if key in _OPENAI_IGNORED_KEYS:
            continue
        if key in _OPENAI_TOP_KEYS:
            converted[_OPENAI_TOP_KEYS[key]] = value
        elif key == "text_projection":
            converted["text_projection.weight"] = value.T.contiguous()
        elif key == "visual.proj":
            converted["visual_projection.weight"] = value.T.contiguous()
        elif match := _OPENAI_BLOCK_PATTERN.match(key):
            tower = "vision_model" if match.group(1) else "text_model"
            prefix = f"{tower}.encoder.layers.{match.group(2)}."
            name = match.group(3)
            if name in ("attn.in_proj_weight", "attn.in_proj_bias"):
                suffix = name.rsplit("_", 1)[1]
                for proj, chunk in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0)):
                    converted[f"{prefix}self_attn.{proj}.{suffix}"] = chunk.contiguous()
            elif name in _OPENAI_BLOCK_KEYS:
                converted[prefix + _OPENAI_BLOCK_KEYS[name]] = value
            else:
                unknown.append(key)
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(
            f"Cannot convert {len(unknown)} key(s) of this OpenAI/open_clip state dict: {sorted(unknown)[:10]}. "
            "hf_clip supports the standard CLIP ViT layout (no attention pooling, no logit_bias, no custom text tower)."
        )
    return converted


def _count_blocks(state_dict: dict[str, torch.Tensor], prefix: str) -> int:
    pattern = re.compile(rf"^{re.escape(prefix)}transformer\.resblocks\.(\d+)\.")
    return len({m.group(1) for key in state_dict if (m := pattern.match(key))})


def _vision_config_from_openai_state_dict(state_dict: dict[str, torch.Tensor], head_width: int,
                                          hidden_act: str) -> dict:
    vision_width, _, patch_size, _ = state_dict["visual.conv1.weight"].shape
    grid_size = round((state_dict["visual.positional_embedding"].shape[0] - 1) ** 0.5)
    return {
        "hidden_size": vision_width,
        "intermediate_size": state_dict["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
        "num_hidden_layers": _count_blocks(state_dict, "visual."),
        "num_attention_heads": vision_width // head_width,
        "image_size": grid_size * patch_size,
        "patch_size": patch_size,
        "hidden_act": hidden_act,
    }


def config_from_openai_state_dict(
    state_dict: dict[str, torch.Tensor],
    *,
    text_head_width: int = 64,
    vision_head_width: int = 64,
    hidden_act: str = "quick_gelu",
    **overrides,
) -> HFClipConfig:
    """Infer an `HFClipConfig` from the tensor shapes of an OpenAI / open_clip state dict.

    Head counts are not stored in the weights: they are width // head_width (64 in OpenAI's and open_clip's models).
    OpenAI's BPE puts end-of-text at the last vocabulary id, which is where the text tower pools.
    Use hidden_act="gelu" for open_clip models trained without QuickGELU.
    """
    required = ("visual.conv1.weight", "visual.positional_embedding", "token_embedding.weight", "text_projection")
    missing = [key for key in required if key not in state_dict]
    if missing:
        raise ValueError(f"Not an OpenAI/open_clip CLIP state dict: missing {missing}.")
    vocab_size, text_width = state_dict["token_embedding.weight"].shape
    text_config = {
        "vocab_size": vocab_size,
        "hidden_size": text_width,
        "intermediate_size": state_dict["transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
        "num_hidden_layers": _count_blocks(state_dict, ""),
        "num_attention_heads": text_width // text_head_width,
        "max_position_embeddings": state_dict["positional_embedding"].shape[0],
        "hidden_act": hidden_act,
        "eos_token_id": vocab_size - 1,
        "bos_token_id": vocab_size - 2,
        "pad_token_id": 0,
    }
    vision_config = _vision_config_from_openai_state_dict(state_dict, vision_head_width, hidden_act)
    text_config.update(overrides.pop("text_config", {}))
    vision_config.update(overrides.pop("vision_config", {}))
    projection_dim = state_dict["text_projection"].shape[1]
    return HFClipConfig(
        text_config=text_config, vision_config=vision_config, projection_dim=projection_dim, **overrides
    )


def hf_clip_from_openai_state_dict(
    state_dict: dict[str, torch.Tensor], config: HFClipConfig | None = None, **config_kwargs
) -> HFClipModel:
    """Build an `HFClipModel` from an OpenAI / open_clip state dict; the config is inferred unless given."""
    if config is None:
        config = config_from_openai_state_dict(state_dict, **config_kwargs)
    model = HFClipModel(config)
    model.load_state_dict(convert_openai_state_dict(state_dict), strict=True)
    return model


# open_clip's `hf_pooler_type` -> hf_clip's pooling. "cls_pooler" takes the backbone's pooler_output where it has
# one (open_clip builds BERT-likes with their pooler for it) and the first token otherwise.
_OPEN_CLIP_POOLERS = {"mean_pooler": "mean", "cls_pooler": "pooler", "cls_last_hidden_state_pooler": "cls"}
_OPEN_CLIP_PROJECTIONS = {"mlp": "mlp", "linear": "linear", None: "none", "none": "none"}
_OPEN_CLIP_TEXT_KEYS = {
    "text.proj.weight": "text_projection.weight",
    "text.proj.0.weight": "text_projection.fc1.weight",
    "text.proj.2.weight": "text_projection.fc2.weight",
}


def hf_clip_from_open_clip_hf_text(
    state_dict: dict[str, torch.Tensor],
    text_config: PreTrainedConfig,
    *,
    pooler_type: str = "mean_pooler",
    proj_type: str | None = "mlp",
    vision_head_width: int = 64,
    hidden_act: str = "gelu",
    **config_kwargs,
) -> HFClipModel:
    """An `HFClipModel` from an open_clip model whose text tower is a Transformers model (`hf_model_name` in its
    `text_cfg`: the multilingual XLM-RoBERTa CLIPs, RoBERTa, PubMedBERT...) and whose image tower is open_clip's ViT.

    `state_dict` is the open_clip model's (`visual.*`, `text.transformer.*`, `text.proj*`, `logit_scale`);
    `text_config` is the text backbone's config (`AutoConfig.from_pretrained(text_cfg["hf_model_name"])`, from a
    local folder offline); `pooler_type` and `proj_type` are the text_cfg's `hf_pooler_type` and `hf_proj_type`
    (open_clip's defaults). The image tower becomes hf_clip's built-in ViT (`vision_head_width`: its head width, 64
    in open_clip's ViTs; `hidden_act` "quick_gelu" for models trained with QuickGELU). Raises `ValueError` naming an
    unsupported pooler or projection, and the keys it cannot place.
    """
    if pooler_type not in _OPEN_CLIP_POOLERS:
        raise ValueError(f"hf_clip_from_open_clip_hf_text: hf_pooler_type {pooler_type!r} has no hf_clip pooling; "
                         f"supported: {sorted(_OPEN_CLIP_POOLERS)}.")
    if proj_type not in _OPEN_CLIP_PROJECTIONS:
        raise ValueError(f"hf_clip_from_open_clip_hf_text: hf_proj_type {proj_type!r} is not one of "
                         f"{sorted(key for key in _OPEN_CLIP_PROJECTIONS if key)} or None.")
    text_pooling = _OPEN_CLIP_POOLERS[pooler_type]
    if text_pooling == "pooler" and default_pooling(text_config) != "pooler":
        text_pooling = "cls"
    converted, rest = {}, {}
    for key, value in state_dict.items():
        if key.startswith("text.transformer."):
            converted["text_model." + key.removeprefix("text.transformer.")] = value
        elif key in _OPEN_CLIP_TEXT_KEYS:
            converted[_OPEN_CLIP_TEXT_KEYS[key]] = value
        else:
            rest[key] = value
    converted.update(convert_openai_state_dict(rest))
    config = HFClipConfig(
        vision_config=_vision_config_from_openai_state_dict(state_dict, vision_head_width, hidden_act),
        text_config=text_config, projection_dim=state_dict["visual.proj"].shape[1], text_pooling=text_pooling,
        text_projection_type=_OPEN_CLIP_PROJECTIONS[proj_type], **config_kwargs,
    )
    model = HFClipModel(config)
    buffers = {name for name, _ in model.named_buffers()}
    missing, unexpected = model.load_state_dict(converted, strict=False)
    missing = [key for key in missing if key not in buffers]
    unexpected = [key for key in unexpected if not key.endswith(("position_ids", "token_type_ids"))]
    if missing or unexpected:
        raise ValueError(f"hf_clip_from_open_clip_hf_text: the state dict does not fit the composed model: missing "
                         f"{sorted(missing)[:10]}, unexpected {sorted(unexpected)[:10]}.")
    return model


__all__ = [
    "clip_config_from_hf_clip_config",
    "config_from_openai_state_dict",
    "convert_openai_state_dict",
    "export_dual_encoder",
    "hf_clip_config_from_clip_config",
    "hf_clip_from_open_clip_hf_text",
    "hf_clip_from_openai_state_dict",
    "hf_clip_from_transformers",
    "transformers_from_composed",
    "transformers_from_hf_clip",
]
