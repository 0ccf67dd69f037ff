"""Composed towers: any Transformers vision or text backbone as an hf_clip tower.

A composed tower is the backbone `AutoModel.from_config(config)` builds, a pooling that turns its output into one
vector per input, and a projection into the shared embedding space. The backbone is stored under the tower's own
name (`vision_model`, `text_model`), as in Transformers' `VisionTextDualEncoderModel`, so such folders load directly.

Poolings (`POOLINGS`):
- "cls": the first token of `last_hidden_state`;
- "mean": the mean over the attended tokens (text) or over every token or spatial position (vision);
- "eos": the first end-of-text token (`eos_token_id`, else `sep_token_id`) among the attended tokens;
- "last": the last attended token (the last position when there is no mask, as SigLIP's text tower);
- "attention": a learned query attending over the tokens (`HFClipAttentionPooling`);
- "pooler": the backbone's own `pooler_output` (BERT's dense+tanh over [CLS], CLIP's end-of-text token, SigLIP's
  attention head, ConvNeXt's normalised mean, ...).

SigLIP's text head reads the last of `max_position_embeddings` positions: SigLIP was trained on text padded to that
length with no mask (`padding="max_length"`). With that pooling the tower puts every batch in that layout itself
(`HFClipTowerPooling.fixed_length_ids`), so text padded to the longest, masked or not, embeds as SigLIP embeds it.
"""

import inspect

import torch
import transformers
from torch import nn
from transformers import AutoConfig, AutoModel, PreTrainedConfig
from transformers.models.auto.auto_factory import _get_model_class

BUILTIN_MODEL_TYPES = {"text": "hf_clip_text_model", "vision": "hf_clip_vision_model"}
POOLINGS = ("cls", "mean", "eos", "last", "attention", "pooler")
PROJECTION_TYPES = ("linear", "mlp", "none")

# Backbone families whose `AutoModel` returns a `pooler_output`, and what it is.
_POOLER_FAMILIES = {
    "vit": "dense + tanh over the class token",
    "dinov2": "the normalised class token",
    "convnext": "the normalised mean of the last feature map",
    "swin": "the mean of the normalised last tokens",
    "clip_vision_model": "the normalised class token",
    "siglip_vision_model": "the attention-pooling head",
    "bert": "dense + tanh over [CLS]",
    "roberta": "dense + tanh over <s>",
    "xlm-roberta": "dense + tanh over <s>",
    "clip_text_model": "the end-of-text token",
    "siglip_text_model": "the head over the last position",
}
# Families without a class token at position 0 of `last_hidden_state`.
_NO_CLASS_TOKEN = {"convnext", "swin", "siglip_vision_model", "resnet", "regnet", "efficientnet", "mobilenet_v2"}
_TEXT_ONLY_POOLINGS = ("eos", "last")


def is_builtin(config: PreTrainedConfig) -> bool:
    return config.model_type in BUILTIN_MODEL_TYPES.values()


def default_pooling(config: PreTrainedConfig) -> str:
    """What the backbone's own family pools with: its `pooler_output` where it has one, DeBERTa's first token,
    ModernBERT's `classifier_pooling`, else the mean."""
    if config.model_type in _POOLER_FAMILIES:
        return "pooler"
    if config.model_type == "deberta-v2":
        return "cls"
    if config.model_type == "modernbert":
        return "mean" if getattr(config, "classifier_pooling", "cls") == "mean" else "cls"
    return "mean"


def end_of_text_ids(config: PreTrainedConfig) -> list[int]:
    token_id = getattr(config, "eos_token_id", None)
    if token_id is None:
        token_id = getattr(config, "sep_token_id", None)
    if token_id is None:
        return []
    return list(token_id) if isinstance(token_id, (list, tuple)) else [token_id]


def fixed_text_length(config: PreTrainedConfig, pooling: str) -> int | None:
    """The length every text row is padded to before a backbone of `config` pooling with `pooling` reads it:
    `max_position_embeddings` for SigLIP's head over the last position, None for every other tower."""
    if config.model_type == "siglip_text_model" and pooling == "pooler" and config.pad_token_id is not None:
        return config.max_position_embeddings
    return None


def output_width(config: PreTrainedConfig, pooling: str) -> int:
    """Width of the pooled vector a backbone of `config` gives with `pooling`."""
    if config.model_type == "convnext":
        return config.hidden_sizes[-1]
    if config.model_type == "swin":
        return int(config.embed_dim * 2 ** (len(config.depths) - 1))
    if config.model_type == "siglip_text_model" and pooling == "pooler":
        return config.projection_size if config.projection_size is not None else config.hidden_size
    return config.hidden_size


def check_tower(config: PreTrainedConfig, modality: str, pooling: str | None, projection_type: str,
                projection_dim: int) -> None:
    """Raise `ValueError` naming the problem when a `modality` ("text"/"vision") tower of `config` cannot pool with
    `pooling` or reach `projection_dim` with `projection_type`."""
    family = config.model_type
    if is_builtin(config):
        if family != BUILTIN_MODEL_TYPES[modality]:
            raise ValueError(f"HFClipConfig: {family!r} is hf_clip's built-in "
                             f"{'vision' if modality == 'text' else 'text'} tower, not a {modality} tower.")
        if pooling is not None or projection_type != "linear":
            raise ValueError(
                f"HFClipConfig: the built-in {modality} tower pools at its "
                f"{'end-of-text token' if modality == 'text' else 'class token'} and projects linearly; "
                f"`{modality}_pooling` and `{modality}_projection_type` are for composed backbones, got "
                f"{pooling!r} and {projection_type!r}."
            )
        return
    check_tower_inputs(config, modality)
    if modality == "vision" and getattr(config, "patch_dropout", 0):
        raise ValueError(
            f"HFClipConfig: patch dropout ({config.patch_dropout}) drops the patch tokens of hf_clip's built-in ViT; "
            f"a composed {family!r} vision tower has no such step. Train without it."
        )
    if pooling not in POOLINGS:
        raise ValueError(f"HFClipConfig: unknown `{modality}_pooling` {pooling!r}; use one of {POOLINGS}.")
    if projection_type not in PROJECTION_TYPES:
        raise ValueError(f"HFClipConfig: unknown `{modality}_projection_type` {projection_type!r}; use one of "
                         f"{PROJECTION_TYPES}.")
    if pooling == "pooler" and family not in _POOLER_FAMILIES:
        raise ValueError(
            f"HFClipConfig: `{modality}_pooling`='pooler', but a {family!r} backbone returns no pooler_output; "
            f"use one of {[name for name in POOLINGS if name != 'pooler']} (its family's default is "
            f"{default_pooling(config)!r})."
        )
    if pooling == "cls" and family in _NO_CLASS_TOKEN:
        raise ValueError(
            f"HFClipConfig: `{modality}_pooling`='cls', but a {family!r} backbone has no class token; use 'mean', "
            f"'attention' or 'pooler' (its default, {default_pooling(config)!r})."
        )
    if modality == "vision" and pooling in _TEXT_ONLY_POOLINGS:
        raise ValueError(f"HFClipConfig: `vision_pooling`={pooling!r} pools text; use 'cls', 'mean', 'attention' "
                         "or 'pooler'.")
    if pooling == "eos" and not end_of_text_ids(config):
        raise ValueError(f"HFClipConfig: `text_pooling`='eos', but the {family!r} config has neither an "
                         "`eos_token_id` nor a `sep_token_id`; use 'last', 'cls' or 'mean'.")
    width = output_width(config, pooling)
    if projection_type == "none" and width != projection_dim:
        raise ValueError(
            f"HFClipConfig: the {modality} tower ({family}) gives {width}-wide vectors but `projection_dim` is "
            f"{projection_dim}, and `{modality}_projection_type` is 'none'; use 'linear' or 'mlp', or "
            f"projection_dim={width}."
        )


# Families whose pooler is optional (`add_pooling_layer`): built without it unless the tower pools with it, so that
# no parameter goes unused (which data-parallel training refuses) and checkpoints saved without one load exactly.
_OPTIONAL_POOLER = {"vit", "bert", "roberta", "xlm-roberta"}


def _backbone_kwargs(config: PreTrainedConfig, pooling: str) -> dict:
    return {"add_pooling_layer": False} if config.model_type in _OPTIONAL_POOLER and pooling != "pooler" else {}


def backbone_class(config: PreTrainedConfig) -> type[nn.Module]:
    """The model class `AutoModel` builds for `config`; for a tower config AutoModel does not map
    (`SiglipTextConfig`), the model class named after it (`SiglipTextModel`). An error names the family when neither
    exists."""
    if type(config) in AutoModel._model_mapping:  # the class, or the one of several its `architectures` names
        return _get_model_class(config, AutoModel._model_mapping)
    model_class_name = type(config).__name__.removesuffix("Config") + "Model"
    model_class = getattr(transformers, model_class_name, None)
    if model_class is None:
        raise ValueError(
            f"hf_clip: Transformers' AutoModel cannot build a {config.model_type!r} backbone "
            f"({type(config).__name__}), and Transformers has no {model_class_name}; pass a config of a vision or "
            "text model AutoModel knows (e.g. ViTConfig, BertConfig)."
        )
    return model_class


_TOWER_INPUT = {"vision": "pixel_values", "text": "input_ids"}


def check_tower_inputs(config: PreTrainedConfig, modality: str) -> None:
    """Raise `ValueError` unless the backbone of `config` reads a `modality` tower's input (`pixel_values` or
    `input_ids`) and needs no other: a text model given as the vision tower, or SigLIP 2's vision tower (which
    takes patches with their mask and spatial shapes), is refused before anything is built."""
    model_class = backbone_class(config)
    parameters = inspect.signature(model_class.forward).parameters
    given = _TOWER_INPUT[modality]
    if given not in parameters:
        other = "text" if modality == "vision" else "vision"
        raise ValueError(
            f"HFClipConfig: the {modality} tower's backbone, {model_class.__name__} ({config.model_type!r}), takes "
            f"no `{given}`: it is not a {modality} model"
            f"{f' but a {other} model' if _TOWER_INPUT[other] in parameters else ''}."
        )
    required = [name for name, parameter in list(parameters.items())[1:] if name != given
                and parameter.default is inspect.Parameter.empty
                and parameter.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)]
    if required:
        siglip2 = " (SigLIP 2 takes variable-resolution patches; a SigLIP vision tower works)"
        raise ValueError(
            f"HFClipConfig: the {modality} tower's backbone, {model_class.__name__} ({config.model_type!r}), needs "
            f"{', '.join(f'`{name}`' for name in required)} beside `{given}`, which hf_clip's {modality} inputs do "
            f"not carry; use a {modality} model that reads `{given}` alone"
            f"{siglip2 if 'siglip2' in config.model_type else ''}."
        )


def build_backbone(config: PreTrainedConfig, pooling: str) -> nn.Module:
    """The backbone `AutoModel.from_config(config)` builds (`backbone_class`), without its optional pooler when
    `pooling` is not "pooler"."""
    if type(config) in AutoModel._model_mapping:
        return AutoModel.from_config(config, **_backbone_kwargs(config, pooling))
    return backbone_class(config)._from_config(config)


_BLOCK_LIST_NAMES = ("layer", "layers", "stages", "blocks", "block")


def block_list(backbone: nn.Module) -> tuple[str, nn.ModuleList]:
    """The outermost `nn.ModuleList` of a backbone's blocks (`encoder.layer`, `encoder.layers`, `layers`,
    `encoder.stages`, ...) and its name; `ValueError` when there is none."""
    candidates = [(name, module) for name, module in backbone.named_modules()
                  if isinstance(module, nn.ModuleList) and name.rsplit(".", 1)[-1] in _BLOCK_LIST_NAMES]
    if not candidates:
        raise ValueError(f"{type(backbone).__name__} has no list of blocks ({_BLOCK_LIST_NAMES}) to unlock the last "
                         "of; lock it whole (unlocked_layers=0) or set requires_grad on its modules yourself.")
    return min(candidates, key=lambda candidate: candidate[0].count("."))


# Dual encoders whose folders hold both towers: the tower class to take out of them for each modality.
_TOWER_OF_DUAL_ENCODER = {
    "clip": {"vision": "CLIPVisionModel", "text": "CLIPTextModel"},
    "siglip": {"vision": "SiglipVisionModel", "text": "SiglipTextModel"},
}


def load_pretrained_tower(name_or_path: str, modality: str, pooling: str | None = None,
                          **hub_kwargs) -> tuple[nn.Module, list[str]]:
    """The `modality` ("vision"/"text") backbone saved at `name_or_path` (a local folder or a Hub id), loaded with
    `AutoModel.from_pretrained` (the vision or text tower class for a CLIP or SigLIP folder; without its optional
    pooler unless it pools with `pooling`, default the family's), and the names of the weights its checkpoint did
    not hold."""
    try:
        config = AutoConfig.from_pretrained(name_or_path, **hub_kwargs)
    except (OSError, ValueError) as error:
        raise ValueError(f"hf_clip: cannot read the {modality} model's config at {name_or_path!r}: {error}") from error
    tower_class_name = _TOWER_OF_DUAL_ENCODER.get(config.model_type, {}).get(modality)
    if tower_class_name is None and type(config) not in AutoModel._model_mapping:
        tower_class_name = type(config).__name__.removesuffix("Config") + "Model"
    tower_class = AutoModel if tower_class_name is None else getattr(transformers, tower_class_name, None)
    if tower_class is None:
        raise ValueError(
            f"hf_clip: Transformers' AutoModel cannot build the {modality} backbone at {name_or_path!r} "
            f"(model_type {config.model_type!r}, and Transformers has no {tower_class_name}); pass a folder of a "
            f"{modality} model AutoModel knows."
        )
    pooling = pooling or default_pooling(config)
    tower, info = tower_class.from_pretrained(name_or_path, output_loading_info=True, **hub_kwargs,
                                              **_backbone_kwargs(config, pooling))
    return tower, list(info.get("missing_keys", []))


def text_context_length(config: PreTrainedConfig) -> int | None:
    """How many tokens a text backbone of `config` takes: its learned positions (RoBERTa-likes keep
    `pad_token_id + 1` of them for the padding offset), or None when it has no such limit."""
    positions = getattr(config, "max_position_embeddings", None)
    if not isinstance(positions, int):
        return None
    if config.model_type in ("roberta", "xlm-roberta", "camembert") and config.pad_token_id is not None:
        return positions - config.pad_token_id - 1
    return positions


class HFClipProjectionMLP(nn.Module):
    """open_clip's `proj_type="mlp"`: Linear -> GELU -> Linear, no biases, hidden width (in + out) // 2."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        hidden = (in_features + out_features) // 2
        self.fc1 = nn.Linear(in_features, hidden, bias=False)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, out_features, bias=False)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        """(batch, in_features) -> (batch, out_features)."""
        return self.fc2(self.act(self.fc1(pooled)))


def build_projection(projection_type: str, in_features: int, out_features: int) -> nn.Module:
    if projection_type == "linear":
        return nn.Linear(in_features, out_features, bias=False)
    if projection_type == "mlp":
        return HFClipProjectionMLP(in_features, out_features)
    return nn.Identity()


class HFClipAttentionPooling(nn.Module):
    """A learned query attends over the tokens (CoCa / open_clip's attentional pooler, one query):
    (batch, seq, width) -> (batch, width)."""

    def __init__(self, width: int, num_heads: int):
        super().__init__()
        self.probe = nn.Parameter(torch.randn(1, 1, width) * width**-0.5)
        self.layernorm = nn.LayerNorm(width)
        self.attention = nn.MultiheadAttention(width, num_heads, batch_first=True)

    def forward(self, hidden_states: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        keys = self.layernorm(hidden_states)
        key_padding_mask = None if padding_mask is None else ~padding_mask.bool()
        query = self.probe.expand(hidden_states.shape[0], -1, -1)
        pooled, _ = self.attention(query, keys, keys, key_padding_mask=key_padding_mask, need_weights=False)
        return pooled[:, 0]


class HFClipTowerPooling(nn.Module):
    """The pooling of a composed tower (module docstring): backbone output -> (batch, width)."""

    def __init__(self, config: PreTrainedConfig, pooling: str):
        super().__init__()
        self.pooling = pooling
        self.end_of_text_ids = end_of_text_ids(config)
        self.fixed_length = fixed_text_length(config, pooling)
        self.pad_token_id = getattr(config, "pad_token_id", None)
        self.attention = None
        if pooling == "attention":
            width = output_width(config, pooling)
            heads = getattr(config, "num_attention_heads", None)
            heads = heads if isinstance(heads, int) and heads > 0 and width % heads == 0 else 1
            self.attention = HFClipAttentionPooling(width, heads)

    def fixed_length_ids(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """(batch, seq) ids, `seq` <= `fixed_length`, padded on either side (per `attention_mask`) or not at all ->
        (batch, fixed_length): each row's attended tokens first, in order, then the pad id, as
        `tokenizer(..., padding="max_length")` lays it out; read with no mask."""
        if attention_mask is not None:
            attended = attention_mask.bool()
            positions = torch.arange(input_ids.shape[1], device=input_ids.device)
            order = ((~attended).long() * input_ids.shape[1] + positions).argsort(dim=1)  # distinct keys: stable
            input_ids = torch.where(attended.gather(1, order), input_ids.gather(1, order), self.pad_token_id)
        return nn.functional.pad(input_ids, (0, self.fixed_length - input_ids.shape[1]), value=self.pad_token_id)

    def forward(self, outputs, attention_mask: torch.Tensor | None = None,
                input_ids: torch.Tensor | None = None) -> torch.Tensor:
        """outputs: the backbone's output; attention_mask, input_ids: (batch, seq) for text. Returns (batch, width)."""
        if self.pooling == "pooler":
            return outputs.pooler_output
        hidden_states = outputs.last_hidden_state
        if hidden_states.dim() == 4:  # (batch, channels, height, width) feature maps
            hidden_states = hidden_states.flatten(2).transpose(1, 2)
        if self.pooling == "cls":
            return hidden_states[:, 0]
        if self.pooling == "attention":
            return self.attention(hidden_states, attention_mask)
        if self.pooling == "mean":
            if attention_mask is None:
                return hidden_states.mean(dim=1)
            weights = attention_mask.to(hidden_states.dtype).unsqueeze(-1)
            return (hidden_states * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)
        batch_index = torch.arange(hidden_states.shape[0], device=hidden_states.device)
        if self.pooling == "last":
            if attention_mask is None:
                return hidden_states[:, -1]
            positions = torch.arange(attention_mask.shape[-1], device=attention_mask.device)
            return hidden_states[batch_index, (attention_mask.bool() * positions).argmax(dim=-1)]
        is_eos = input_ids == self.end_of_text_ids[0]
        for token_id in self.end_of_text_ids[1:]:
            is_eos = is_eos | (input_ids == token_id)
        if attention_mask is not None:
            is_eos = is_eos & attention_mask.bool()
        torch._assert_async(is_eos.any(dim=-1).all(), "hf_clip: an input_ids row has no end-of-text token "
                            f"({self.end_of_text_ids}), where text_pooling='eos' pools.")
        return hidden_states[batch_index, is_eos.int().argmax(dim=-1)]


__all__ = ["POOLINGS", "PROJECTION_TYPES", "HFClipAttentionPooling", "HFClipProjectionMLP", "HFClipTowerPooling",
           "default_pooling"]
