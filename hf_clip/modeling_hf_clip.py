"""hf_clip: CLIP as a native Transformers model.

The state-dict layout is that of Transformers' `CLIPModel` (including its `pre_layrnorm` spelling), so CLIP
checkpoints load directly and converted weights round-trip without renaming. Optional outputs (`hidden_states`,
`attentions`) and `return_dict` come from Transformers' output-capture machinery, as in `modeling_clip.py`.

Differences from Transformers' CLIP:
- the text tower pools at the first `eos_token_id` among the attended tokens, with no host sync;
- left-padded text gets positions counted from each row's first token, so it embeds as the same text right-padded;
  right-padded or unmasked text runs causal attention without a mask (SDPA's `is_causal` path); the caller can say
  which side pads (`padding_side`), so the training step reads nothing back from the device;
- `logit_scale` is clamped to `config.logit_scale_max`, the similarities are computed in fp32, and the loss is
  distributed-correct under DDP (`loss.contrastive_loss`);
- OpenAI CLIP's weight init; `HFClipForImageClassification` classifies the normalised projected class token;
- `HFClipModel.forward` given one modality returns that tower's features, as Transformers' feature-extraction
  pipelines call it.
"""

import contextlib
import contextvars
import dataclasses
import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from huggingface_hub.errors import StrictDataclassClassValidationError
from safetensors import SafetensorError
from torch import nn
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.configuration_utils import PreTrainedConfig
from transformers.core_model_loading import ConversionOps, WeightConverter, WeightRenaming, WeightTransform
from transformers.masking_utils import create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPooling, ImageClassifierOutput
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel
from transformers.processing_utils import Unpack
from transformers.utils import ModelOutput, TransformersKwargs, has_file, logging
from transformers.utils.generic import can_return_tuple
from transformers.utils.output_capturing import capture_outputs

from .configuration_hf_clip import HFClipConfig, HFClipTextConfig, HFClipVisionConfig
from .integrity import verify_loaded_files, write_model_manifest
from .loss import image_text_loss, loss_settings

# Transformers saves a model's code with the modules it imports relatively, so this import puts the processor's
# module beside every saved model, where the `AutoProcessor` entry of the config's `auto_map` points.
from .processing_hf_clip import HFClipProcessor  # noqa: F401
from .towers import (
    HFClipAttentionPooling,
    HFClipProjectionMLP,
    HFClipTowerPooling,
    block_list,
    build_backbone,
    build_projection,
    is_builtin,
    load_pretrained_tower,
    output_width,
)

logger = logging.get_logger(__name__)


@dataclass
class HFClipOutput(ModelOutput):
    """Output of `HFClipModel.forward`.

    loss: scalar loss of `config.loss_type`, only when `return_loss=True`.
    logits_per_image: (n_images, n_texts) scaled cosine similarities (plus `logit_bias` for SigLIP).
    logits_per_text: (n_texts, n_images), the transpose.
    text_embeds, image_embeds: (n, projection_dim) L2-normalised embeddings.
    text_model_output, vision_model_output: the towers' `BaseModelOutputWithPooling` (pooler_output unprojected).
    """

    loss: torch.Tensor | None = None
    logits_per_image: torch.Tensor | None = None
    logits_per_text: torch.Tensor | None = None
    text_embeds: torch.Tensor | None = None
    image_embeds: torch.Tensor | None = None
    text_model_output: BaseModelOutputWithPooling | None = None
    vision_model_output: BaseModelOutputWithPooling | None = None

    def to_tuple(self) -> tuple[Any, ...]:
        return tuple(v.to_tuple() if isinstance(v, ModelOutput) else v for v in self.values())


@dataclass
class HFClipTextModelOutput(ModelOutput):
    """text_embeds: (batch, projection_dim) projected, not normalised; last_hidden_state: (batch, seq, width)."""

    text_embeds: torch.Tensor | None = None
    last_hidden_state: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None


@dataclass
class HFClipVisionModelOutput(ModelOutput):
    """image_embeds: (batch, projection_dim) projected, not normalised; last_hidden_state: (batch, 1+patches, width)."""

    image_embeds: torch.Tensor | None = None
    last_hidden_state: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs: Unpack[TransformersKwargs],
) -> tuple[torch.Tensor, torch.Tensor]:
    """query/key/value: (batch, heads, seq, head_dim); returns (batch, seq, heads, head_dim) and the weights."""
    attn_weights = torch.matmul(query, key.transpose(-1, -2)) * scaling
    if attention_mask is not None:
        attn_weights = attn_weights + attention_mask
    attn_weights = F.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query.dtype)
    attn_weights = F.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value).transpose(1, 2).contiguous()
    return attn_output, attn_weights


class HFClipAttention(nn.Module):
    """Multi-head self-attention through Transformers' attention interface (eager, sdpa, flex, ...)."""

    def __init__(self, config: HFClipTextConfig | HFClipVisionConfig, is_causal: bool):
        super().__init__()
        self.config = config
        self.embed_dim = config.hidden_size
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.scale = self.head_dim**-0.5
        self.dropout = config.attention_dropout
        self.is_causal = is_causal
        self.q_proj = nn.Linear(self.embed_dim, self.embed_dim)
        self.k_proj = nn.Linear(self.embed_dim, self.embed_dim)
        self.v_proj = nn.Linear(self.embed_dim, self.embed_dim)
        self.out_proj = nn.Linear(self.embed_dim, self.embed_dim)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """hidden_states: (batch, seq, width) -> (batch, seq, width), attention weights (eager only)."""
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        queries = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        keys = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        values = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)

        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        # On CPUs, PyTorch's bf16 flash-attention backward is several times slower than its fp32 one, while
        # attention is a small share of the FLOPs; so under CPU bf16 autocast the attention core runs in fp32.
        upcast = queries.device.type == "cpu" and torch.is_autocast_enabled("cpu")
        if upcast:
            queries, keys, values = queries.float(), keys.float(), values.float()
        with torch.autocast("cpu", enabled=False) if upcast else contextlib.nullcontext():
            attn_output, attn_weights = attention_interface(
                self,
                queries,
                keys,
                values,
                attention_mask,
                scaling=self.scale,
                dropout=self.dropout if self.training else 0.0,
                is_causal=self.is_causal,
                **kwargs,
            )
        attn_output = self.out_proj(attn_output.reshape(*input_shape, -1))
        return attn_output, attn_weights


class HFClipMLP(nn.Module):
    def __init__(self, config: HFClipTextConfig | HFClipVisionConfig):
        super().__init__()
        self.config = config
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.activation_fn = ACT2FN[config.hidden_act]
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation_fn(self.fc1(hidden_states)))


class HFClipEncoderLayer(GradientCheckpointingLayer):
    """Pre-LN residual block: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    def __init__(self, config: HFClipTextConfig | HFClipVisionConfig, is_causal: bool):
        super().__init__()
        self.self_attn = HFClipAttention(config, is_causal=is_causal)
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = HFClipMLP(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> torch.Tensor:
        attn_output, _ = self.self_attn(self.layer_norm1(hidden_states), attention_mask, **kwargs)
        hidden_states = hidden_states + attn_output
        return hidden_states + self.mlp(self.layer_norm2(hidden_states))


class HFClipEncoder(nn.Module):
    """A stack of `HFClipEncoderLayer`s: (batch, seq, width) -> (batch, seq, width)."""

    def __init__(self, config: HFClipTextConfig | HFClipVisionConfig, is_causal: bool):
        super().__init__()
        self.layers = nn.ModuleList(
            [HFClipEncoderLayer(config, is_causal=is_causal) for _ in range(config.num_hidden_layers)]
        )

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> torch.Tensor:
        for layer in self.layers:
            hidden_states = layer(hidden_states, attention_mask, **kwargs)
        return hidden_states


def check_image_size(height: int, width: int, image_size: int) -> None:
    """Images must be `image_size` square unless the position embeddings are interpolated."""
    if height != image_size or width != image_size:
        raise ValueError(
            f"Input image size ({height}x{width}) doesn't match the model's `image_size` "
            f"({image_size}x{image_size}); pass `interpolate_pos_encoding=True` to run at another size."
        )


class HFClipVisionEmbeddings(nn.Module):
    """Patch conv + class token + learned position embeddings: (batch, C, H, W) -> (batch, 1+patches, width)."""

    def __init__(self, config: HFClipVisionConfig):
        super().__init__()
        self.config = config
        self.embed_dim = config.hidden_size
        self.image_size = config.image_size
        self.patch_size = config.patch_size
        self.num_positions = (config.image_size // config.patch_size) ** 2 + 1
        self.class_embedding = nn.Parameter(torch.zeros(self.embed_dim))
        self.patch_embedding = nn.Conv2d(
            config.num_channels, self.embed_dim, kernel_size=self.patch_size, stride=self.patch_size, bias=False
        )
        self.position_embedding = nn.Embedding(self.num_positions, self.embed_dim)

    def interpolate_pos_encoding(self, height: int, width: int) -> torch.Tensor:
        """Bicubically resize the patch position grid to (height/patch, width/patch): (1, 1+patches, width)."""
        position_embedding = self.position_embedding.weight.unsqueeze(0)
        class_pos_embed, patch_pos_embed = position_embedding[:, :1], position_embedding[:, 1:]
        grid = int(math.sqrt(self.num_positions - 1))
        patch_pos_embed = patch_pos_embed.reshape(1, grid, grid, self.embed_dim).permute(0, 3, 1, 2)
        patch_pos_embed = F.interpolate(
            patch_pos_embed,
            size=(height // self.patch_size, width // self.patch_size),
            mode="bicubic",
            align_corners=False,
        )
        patch_pos_embed = patch_pos_embed.permute(0, 2, 3, 1).reshape(1, -1, self.embed_dim)
        return torch.cat((class_pos_embed, patch_pos_embed), dim=1)

    def forward(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False) -> torch.Tensor:
        batch_size, _, height, width = pixel_values.shape
        resized = height != self.image_size or width != self.image_size
        if not interpolate_pos_encoding:
            check_image_size(height, width, self.image_size)
        patch_embeds = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))
        patch_embeds = patch_embeds.flatten(2).transpose(1, 2)  # (batch, patches, width)
        class_embeds = self.class_embedding.expand(batch_size, 1, -1)
        embeddings = torch.cat([class_embeds, patch_embeds], dim=1)
        if resized:
            return embeddings + self.interpolate_pos_encoding(height, width)
        return embeddings + self.position_embedding.weight.unsqueeze(0)


class HFClipPatchDropout(nn.Module):
    """FLIP's patch dropout (open_clip's `PatchDropout`): in training, each image keeps the class token and a random
    max(1, int((1 - p) · patches)) of its patch tokens: (batch, 1+patches, width) -> (batch, 1+kept, width).
    Identity in eval mode or at p = 0."""

    def __init__(self, config: HFClipVisionConfig):
        super().__init__()
        self.prob = config.patch_dropout

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        if not self.training or self.prob == 0.0:
            return embeddings
        class_token, patches = embeddings[:, :1], embeddings[:, 1:]
        batch_size, num_patches, width = patches.shape
        num_kept = max(1, int(num_patches * (1.0 - self.prob)))
        kept = torch.rand(batch_size, num_patches, device=patches.device).topk(num_kept, dim=-1).indices
        patches = patches.gather(1, kept.unsqueeze(-1).expand(-1, -1, width))
        return torch.cat([class_token, patches], dim=1)


class HFClipTextEmbeddings(nn.Module):
    """Token + learned position embeddings: (batch, seq) -> (batch, seq, width)."""

    def __init__(self, config: HFClipTextConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embedding = nn.Embedding(config.max_position_embeddings, config.hidden_size)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        seq_length = input_ids.shape[-1]
        if position_ids is None:
            position_embeds = self.position_embedding.weight[:seq_length].unsqueeze(0)
        else:
            position_embeds = self.position_embedding(position_ids)
        return self.token_embedding(input_ids) + position_embeds


def _check_context_length(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, context: int) -> None:
    """(batch, seq) ids must fit the `context` learned positions. The error says whether the texts are too long
    or only padded past the context (then counting the attended tokens is one host sync, on the error path only)."""
    seq_length = input_ids.shape[-1]
    if seq_length <= context:
        return
    message = (f"input_ids have {seq_length} positions, more than the model's context of {context} tokens "
               "(`max_position_embeddings`).")
    longest = None if attention_mask is None else int(attention_mask.sum(-1).max())
    if longest is not None and longest <= context:
        raise ValueError(
            f"{message} The longest text holds only {longest} tokens: the batch was padded past the context "
            f"(e.g. padding='max_length' with a larger max_length). Tokenize with max_length={context} (or less), "
            f"e.g. processor(text=..., padding='max_length', max_length={context}, truncation=True); in "
            f"Transformers' run_clip.py, pass --max_seq_length {context}."
        )
    raise ValueError(
        f"{message} Tokenize with truncation=True and max_length={context} (or less), e.g. "
        f"processor(text=..., padding=True, truncation=True, max_length={context}), which cuts longer texts and keeps "
        "their end-of-text token."
    )


PADDING_SIDES = ("left", "right")


def _padding_mask(attention_mask: torch.Tensor | None, padding_side: str | None) -> torch.Tensor | None:
    """The (batch, seq) `attention_mask` if the text tower must apply it, else None.

    Causal attention never looks ahead, so right padding needs no mask. `padding_side` is where the batch's builder
    put the padding: "right" (no row starts with padding, which is asserted on device) drops the mask, "left" (or any
    other pattern) applies it. Left unset, the first column is read on the host to decide: one device-to-host sync,
    which training avoids by passing the side (`ContrastiveDataCollator` does); under `torch.compile` an unset side
    applies the mask.
    """
    if padding_side not in (None, *PADDING_SIDES):
        raise ValueError(f"padding_side must be one of {PADDING_SIDES} or None, got {padding_side!r}.")
    if attention_mask is None:
        return None
    if padding_side == "right":
        torch._assert_async(
            attention_mask[:, 0].bool().all(),
            "hf_clip: padding_side='right', but a row of attention_mask starts with padding; pass "
            "padding_side='left' (or None) for left-padded text.",
        )
        return None
    if padding_side == "left" or torch.compiler.is_compiling():
        return attention_mask
    return None if bool(attention_mask[:, 0].all()) else attention_mask


def _check_token_ids(input_ids: torch.Tensor, vocab_size: int) -> None:
    """(batch, seq) ids must index the token embedding. Asserted on device, so it never stalls the host."""
    torch._assert_async(
        ((input_ids >= 0) & (input_ids < vocab_size)).all(),
        f"hf_clip: input_ids hold token ids outside the vocabulary (0..{vocab_size - 1}, `vocab_size` = "
        f"{vocab_size}); tokenize with this model's tokenizer.",
    )


def _check_end_of_text(is_eos: torch.Tensor, eos_token_id: int | list[int]) -> None:
    """Each row of the (batch, seq) `is_eos` flags must hold the end-of-text token the text tower pools at.
    Asserted on device."""
    torch._assert_async(
        is_eos.any(dim=-1).all(),
        f"hf_clip: an input_ids row has no end-of-text token (`eos_token_id` = {eos_token_id}), where the text "
        "tower pools; tokenize with this model's tokenizer and `truncation=True`, which keeps it.",
    )


def _check_text_shapes(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> None:
    """input_ids must be (batch, seq), and attention_mask, when given, of the same shape."""
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be (batch, sequence), got shape {tuple(input_ids.shape)}; one text is a "
                         "batch of one, e.g. input_ids[None].")
    if attention_mask is not None and attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, input_ids {tuple(input_ids.shape)}; "
                         "both must be (batch, sequence), as the processor returns them.")


def _end_of_text_flags(input_ids: torch.Tensor, padding_mask: torch.Tensor | None,
                       eos_token_id: int | list[int]) -> torch.Tensor:
    """(batch, seq) True at the end-of-text tokens among the attended ones."""
    eos_ids = eos_token_id if isinstance(eos_token_id, list) else [eos_token_id]
    is_eos = input_ids == eos_ids[0]
    for token_id in eos_ids[1:]:  # `==`, not `torch.isin`: no id tensor copied to the device, and ONNX-exportable
        is_eos = is_eos | (input_ids == token_id)
    return is_eos if padding_mask is None else is_eos & padding_mask.bool()


def _pools_at_end_of_text(config: HFClipTextConfig) -> bool:
    """Whether every row must hold an end-of-text id: false for legacy configs (`eos_token_id` 2, pooled at the
    highest id) and for ids outside the vocabulary (rows then pool at their first attended token)."""
    eos_ids = config.eos_token_id if isinstance(config.eos_token_id, list) else [config.eos_token_id]
    return config.eos_token_id != 2 and all(0 <= token_id < config.vocab_size for token_id in eos_ids)


def check_text_inputs(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, config: HFClipTextConfig,
                      padding_side: str | None = None) -> None:
    """Every check the text tower makes on its inputs, with its messages, for callers that run the tower elsewhere
    (`hf_clip.export.OnnxHFClipModel`): shapes, context length, token ids in the vocabulary, an end-of-text token in
    each row. The ids and end-of-text checks are device asserts (`RuntimeError` on CPU)."""
    _check_text_shapes(input_ids, attention_mask)
    _check_context_length(input_ids, attention_mask, config.max_position_embeddings)
    _check_token_ids(input_ids, config.vocab_size)
    if _pools_at_end_of_text(config):
        is_eos = _end_of_text_flags(input_ids, _padding_mask(attention_mask, padding_side), config.eos_token_id)
        _check_end_of_text(is_eos, config.eos_token_id)


def _check_backbone_accepts(backbone: nn.Module, argument: str) -> None:
    if argument not in inspect.signature(backbone.forward).parameters:
        raise ValueError(f"{type(backbone).__name__} does not take `{argument}`; feed it images at the size of its "
                         "image processor.")


# Transformers' SiglipModel (and CLIPModel) keep each tower's inner transformer under the tower's name, where the
# backbone `AutoModel` builds (`SiglipVisionModel`) holds it one level down.
_FLAT_TOWER_KEY_MAPPING = {r"^vision_model\.": "vision_model.vision_model.", r"^text_model\.": "text_model.text_model."}
# The weight transforms of the folder `from_pretrained` is loading, for `_load_pretrained_model`.
_SOURCE_WEIGHT_MAPPING: contextvars.ContextVar[list | None] = contextvars.ContextVar("source_weight_mapping",
                                                                                   default=None)
_DOWNLOAD_KWARGS = ("cache_dir", "force_download", "proxies", "token", "revision", "local_files_only", "subfolder")


class _ToScalar(ConversionOps):
    """SigLIP stores `logit_scale` and `logit_bias` with shape (1,); hf_clip's are scalars."""

    @torch.no_grad()
    def convert(self, input_dict: dict, source_patterns: list[str], target_patterns: list[str], **kwargs) -> dict:
        tensors = next(iter(input_dict.values()))
        tensor = tensors[0] if isinstance(tensors, list) else tensors
        return {target_patterns[0]: tensor.reshape(())}


def _source_weight_mapping(pretrained_model_name_or_path, kwargs: dict) -> list[WeightTransform] | None:
    """The weight transforms a folder of another model type needs to load into hf_clip's layout (a `SiglipModel`
    folder: the towers one level down, `_FLAT_TOWER_KEY_MAPPING`, and scalar temperature and bias), or None."""
    try:
        config_dict, _ = PreTrainedConfig.get_config_dict(
            pretrained_model_name_or_path, **{key: kwargs[key] for key in _DOWNLOAD_KWARGS if key in kwargs})
    except (OSError, ValueError):
        return None
    if config_dict.get("model_type") != "siglip":
        return None
    return [*(WeightRenaming(source, target) for source, target in _FLAT_TOWER_KEY_MAPPING.items()),
            *(WeightConverter(f"^{name}$", name, [_ToScalar()]) for name in ("logit_scale", "logit_bias"))]


def _pickled_weights_file(pretrained_model_name_or_path, kwargs: dict) -> str | None:
    """The name of the pickled weights file a local folder or Hub repo holds (`pytorch_model.bin` or its index),
    or None. A Hub repo is asked with the caller's revision and token; a failed request counts as no file."""
    subfolder = kwargs.get("subfolder") or ""
    for name in ("pytorch_model.bin", "pytorch_model.bin.index.json"):
        try:
            if has_file(pretrained_model_name_or_path, f"{subfolder}/{name}" if subfolder else name,
                        revision=kwargs.get("revision"), token=kwargs.get("token"),
                        local_files_only=bool(kwargs.get("local_files_only")), cache_dir=kwargs.get("cache_dir")):
                return name
        except (OSError, ValueError):
            return None
    return None


class HFClipPreTrainedModel(PreTrainedModel):
    """Weight init follows OpenAI CLIP: std width^-0.5 for attention inputs and projections,
    width^-0.5·(2·layers)^-0.5 for residual outputs, (2·width)^-0.5 for the MLP input, 0.02 for token
    embeddings and 0.01 for text positions; all scaled by `initializer_factor`."""

    config: HFClipConfig
    base_model_prefix = "hf_clip"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _no_split_modules = ["HFClipTextEmbeddings", "HFClipEncoderLayer", "HFClipVisionEmbeddings"]
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_flash_attn = True
    _supports_attention_backend = True
    _can_record_outputs = {"hidden_states": HFClipEncoderLayer, "attentions": HFClipAttention}
    _keys_to_ignore_on_load_unexpected = [r"position_ids"]
    # The contrastive loss is a batch mean, so the Trainer must not pass `num_items_in_batch` and skip its scaling.
    accepts_loss_kwargs = False

    def post_init(self) -> None:
        """`PreTrainedModel.post_init`, then `_no_split_modules` cut to the classes this model holds (the built-in
        ones and those a composed backbone brings: a ViT + BERT model holds no `HFClipEncoderLayer`), less the one
        that holds the token embedding, for Accelerate's FSDP2 auto-wrap: it refuses a name it cannot find, and it
        shards the token embedding as a unit of its own, which fails inside an already sharded module. A model of
        built-in towers keeps Transformers CLIP's list (`device_map` placement relies on it)."""
        super().post_init()
        if not getattr(self.config, "is_composed", False):
            return
        token_embedding = self.get_input_embeddings() if hasattr(self, "text_model") else None
        present, holding_token_embedding = set(), set()
        for module in self.modules():
            present.add(type(module).__name__)
            if token_embedding is not None and module is not token_embedding and any(
                    child is token_embedding for child in module.modules()):
                holding_token_embedding.add(type(module).__name__)
        self._no_split_modules = {name for name in self._no_split_modules
                                  if name in present and name not in holding_token_embedding}

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """`PreTrainedModel.from_pretrained`, reading safetensors only unless `use_safetensors=False` is passed, so a
        checkpoint is never unpickled by default. A truncated or corrupt weights file raises `OSError` naming it."""
        safetensors_by_default = "use_safetensors" not in kwargs
        kwargs.setdefault("use_safetensors", True)
        weight_mapping = None
        if kwargs.get("key_mapping") is None and pretrained_model_name_or_path is not None:
            weight_mapping = _source_weight_mapping(pretrained_model_name_or_path, kwargs)
        token = _SOURCE_WEIGHT_MAPPING.set(weight_mapping)
        try:
            model = super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
            if weight_mapping is not None and model.config.loss_type != "siglip":
                logger.warning(
                    f"{pretrained_model_name_or_path!r} is a SigLIP checkpoint loaded with loss_type "
                    f"{model.config.loss_type!r}: its logit_bias is dropped (a softmax loss has none), so logits and "
                    "sigmoid probabilities change; embeddings and rankings do not."
                )
                model.config.logit_bias_init_value = None
            return model
        except SafetensorError as error:
            raise OSError(
                f"The safetensors weights of {pretrained_model_name_or_path!r} are truncated or corrupt ({error}). "
                "Re-download or re-save the checkpoint."
            ) from error
        except OSError as error:
            if not safetensors_by_default or pretrained_model_name_or_path is None:
                raise
            pickled = _pickled_weights_file(pretrained_model_name_or_path, kwargs)
            if pickled is None:
                raise
            raise OSError(
                f"{pretrained_model_name_or_path!r} has no model.safetensors, only {pickled} (pickled PyTorch "
                "weights). hf_clip does not read pickles by default because unpickling a file can run arbitrary code. "
                "If you trust where it came from, convert it once with use_safetensors=False and load the converted "
                "folder from then on:\n"
                f"    {cls.__name__}.from_pretrained({str(pretrained_model_name_or_path)!r}, "
                "use_safetensors=False).save_pretrained('converted')  # writes model.safetensors"
            ) from error
        finally:
            _SOURCE_WEIGHT_MAPPING.reset(token)

    def save_pretrained(self, save_directory, is_main_process: bool = True, *args, **kwargs) -> None:
        """`PreTrainedModel.save_pretrained`, then, on the main process, the folder's integrity manifest of the weight
        files and `config.json` just written (`integrity.write_model_manifest`, replacing an earlier one), which
        `from_pretrained` checks: altered bytes in any saved folder are refused, and a re-saved folder never keeps a
        stale manifest."""
        super().save_pretrained(save_directory, is_main_process, *args, **kwargs)
        if is_main_process:
            write_model_manifest(save_directory)

    def _initialize_weights(self, module: nn.Module, is_custom_code: bool = False) -> None:
        # Transformers skips modules without direct parameters in code outside its own package, guarding remote code
        # that writes weights in place. `_init_weights` below only uses `transformers.initialization`, which already
        # leaves loaded weights alone, so the per-module scheme must run for every module.
        super()._initialize_weights(module, is_custom_code=False)

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        factor = self.config.initializer_factor
        if isinstance(module, HFClipTextEmbeddings):
            init.normal_(module.token_embedding.weight, std=0.02 * factor)
            init.normal_(module.position_embedding.weight, std=0.01 * factor)
        elif isinstance(module, HFClipVisionEmbeddings):
            scale = module.embed_dim**-0.5 * factor
            init.normal_(module.class_embedding, std=scale)
            init.normal_(module.position_embedding.weight, std=scale)
            init.normal_(module.patch_embedding.weight, std=module.config.initializer_range * factor)
        elif isinstance(module, HFClipAttention):
            attn_std = module.embed_dim**-0.5 * factor
            proj_std = attn_std * (2 * module.config.num_hidden_layers) ** -0.5
            for linear in (module.q_proj, module.k_proj, module.v_proj):
                init.normal_(linear.weight, std=attn_std)
            init.normal_(module.out_proj.weight, std=proj_std)
        elif isinstance(module, HFClipMLP):
            width = module.config.hidden_size
            init.normal_(module.fc1.weight, std=(2 * width) ** -0.5 * factor)
            init.normal_(module.fc2.weight, std=width**-0.5 * (2 * module.config.num_hidden_layers) ** -0.5 * factor)
        elif isinstance(module, HFClipAttentionPooling):
            init.normal_(module.probe, std=module.probe.shape[-1] ** -0.5 * factor)
            init.xavier_uniform_(module.attention.in_proj_weight)
            init.zeros_(module.attention.in_proj_bias)
        elif isinstance(module, HFClipModel):
            for projection, width in ((module.text_projection, module.text_embed_dim),
                                      (module.visual_projection, module.vision_embed_dim)):
                if isinstance(projection, nn.Linear):
                    init.normal_(projection.weight, std=width**-0.5 * factor)
                elif isinstance(projection, HFClipProjectionMLP):
                    init.normal_(projection.fc1.weight, std=width**-0.5 * factor)
                    init.normal_(projection.fc2.weight, std=projection.fc1.out_features**-0.5 * factor)
            init.constant_(module.logit_scale, module.config.logit_scale_init_value)
            if module.logit_bias is not None:
                init.constant_(module.logit_bias, module.config.logit_bias_init_value)
        elif isinstance(module, HFClipTextModelWithProjection):
            init.normal_(module.text_projection.weight, std=module.config.hidden_size**-0.5 * factor)
        elif isinstance(module, HFClipVisionModelWithProjection):
            init.normal_(module.visual_projection.weight, std=module.config.hidden_size**-0.5 * factor)
        elif isinstance(module, HFClipForImageClassification):
            init.normal_(module.visual_projection.weight, std=module.vision_embed_dim**-0.5 * factor)
            init.normal_(module.classifier.weight, std=module.config.projection_dim**-0.5 * factor)
            init.zeros_(module.classifier.bias)

    @staticmethod
    def _load_pretrained_model(model, state_dict, checkpoint_files, load_config, *args, **kwargs):
        """Transformers' weight loading (`PreTrainedModel._load_pretrained_model`, which `from_pretrained` calls with
        the resolved weight files), after checking those files against their folder's manifest when it has one
        (`integrity.verify_loaded_files`): flipped bytes in a saved weights file raise instead of loading."""
        verify_loaded_files(checkpoint_files)
        source_mapping = _SOURCE_WEIGHT_MAPPING.get()
        if source_mapping is not None:
            load_config = dataclasses.replace(
                load_config, weight_mapping=[*source_mapping, *(load_config.weight_mapping or [])])
        loaded = PreTrainedModel._load_pretrained_model(model, state_dict, checkpoint_files, load_config, *args,
                                                        **kwargs)
        if source_mapping is not None:  # the model saves in hf_clip's own layout, not back into the source's
            model._weight_conversions = [transform for transform in getattr(model, "_weight_conversions", None) or []
                                         if not any(transform is source for source in source_mapping)]
        return loaded


class HFClipTextModel(HFClipPreTrainedModel):
    """Causal text Transformer pooled at the first end-of-text token: (batch, seq) -> pooled (batch, width).

    Right padding cannot change the pooled output of a causal tower, so a right-padded (or absent) mask is not
    materialised and SDPA runs its `is_causal` fast path; hidden states at padded positions are then unspecified.
    A batch with left padding is masked and its positions count from each row's first token, so each row embeds as
    the same text right-padded.
    """

    config: HFClipTextConfig
    input_modalities = ("text",)
    _input_embed_layer = "token_embedding"

    def __init__(self, config: HFClipTextConfig):
        super().__init__(config)
        self.embeddings = HFClipTextEmbeddings(config)
        self.encoder = HFClipEncoder(config, is_causal=True)
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.post_init()

    def pooling_positions(self, input_ids: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(batch, seq) -> (batch,) index of the first `eos_token_id` among the attended tokens, computed on device
        with no host sync. A row without one raises on device; if the config's `eos_token_id` lies outside the
        vocabulary (it warned when built, as Transformers' CLIP configs do), rows pool at their first attended token.
        """
        eos_token_id = self.config.eos_token_id
        if eos_token_id == 2:  # legacy CLIP configs pooled at the highest token id
            return input_ids.argmax(dim=-1)
        is_eos = _end_of_text_flags(input_ids, padding_mask, eos_token_id)
        if _pools_at_end_of_text(self.config):
            _check_end_of_text(is_eos, eos_token_id)
        if padding_mask is None:
            return is_eos.int().argmax(dim=-1)
        return (2 * is_eos.int() + padding_mask.bool().int()).argmax(dim=-1)

    @capture_outputs(tie_last_hidden_states=False)
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        padding_side: str | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> BaseModelOutputWithPooling:
        """input_ids, attention_mask (1 = token, 0 = padding on either side): (batch, seq). `padding_side` ("right",
        "left" or None) says where the mask's padding is, so that the tower decides on its mask without reading it
        on the host. Returns last_hidden_state (batch, seq, width) and pooler_output (batch, width)."""
        _check_text_shapes(input_ids, attention_mask)
        _check_context_length(input_ids, attention_mask, self.config.max_position_embeddings)
        _check_token_ids(input_ids, self.config.vocab_size)
        padding_mask = _padding_mask(attention_mask, padding_side)
        if padding_mask is not None and position_ids is None:
            position_ids = (padding_mask.long().cumsum(-1) - 1).clamp(min=0)
        hidden_states = self.embeddings(input_ids, position_ids)
        causal_mask = create_causal_mask(self.config, hidden_states, attention_mask=padding_mask, cache=None,
                                         allow_is_causal_skip=padding_mask is None)
        last_hidden_state = self.final_layer_norm(self.encoder(hidden_states, causal_mask, **kwargs))
        batch_index = torch.arange(input_ids.shape[0], device=input_ids.device)
        pooled_output = last_hidden_state[batch_index, self.pooling_positions(input_ids, padding_mask)]
        return BaseModelOutputWithPooling(last_hidden_state=last_hidden_state, pooler_output=pooled_output)


class HFClipVisionModel(HFClipPreTrainedModel):
    """ViT: embeddings, pre-LN, blocks, post-LN on the class token: (batch, C, H, W) -> pooled (batch, width)."""

    config: HFClipVisionConfig
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    _input_embed_layer = "patch_embedding"

    def __init__(self, config: HFClipVisionConfig):
        super().__init__(config)
        self.embeddings = HFClipVisionEmbeddings(config)
        self.patch_dropout = HFClipPatchDropout(config)
        self.pre_layrnorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.encoder = HFClipEncoder(config, is_causal=False)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.post_init()

    @capture_outputs(tie_last_hidden_states=False)
    def forward(
        self,
        pixel_values: torch.Tensor,
        interpolate_pos_encoding: bool = False,
        **kwargs: Unpack[TransformersKwargs],
    ) -> BaseModelOutputWithPooling:
        """pixel_values: (batch, C, H, W). Returns last_hidden_state (batch, 1+patches, width), pooler_output
        (batch, width)."""
        embeddings = self.patch_dropout(self.embeddings(pixel_values, interpolate_pos_encoding))
        last_hidden_state = self.encoder(self.pre_layrnorm(embeddings), None, **kwargs)
        pooled_output = self.post_layernorm(last_hidden_state[:, 0])
        return BaseModelOutputWithPooling(last_hidden_state=last_hidden_state, pooler_output=pooled_output)


def _tower(config, pooling: str | None, builtin_class: type) -> tuple[int, nn.Module, nn.Module | None]:
    """A tower of `HFClipModel`: (output width, the model, its pooling module), the pooling None for a built-in tower
    (which pools itself), else a Transformers backbone built from `config` with `HFClipTowerPooling`."""
    if is_builtin(config):
        return config.hidden_size, builtin_class._from_config(config), None
    return output_width(config, pooling), build_backbone(config, pooling), HFClipTowerPooling(config, pooling)


class HFClipModel(HFClipPreTrainedModel):
    """Both towers, their projections, the learned temperature and the loss (`config.loss_type`: CLIP or SigLIP).

    The temperature is stored as `logit_scale` = log(scale). The forward uses min(exp(logit_scale),
    `config.logit_scale_max`) (default 100); training loops should also call `clamp_logit_scale_()` after each
    optimiser step, so the parameter itself never drifts above the bound, where the clamp zeroes its gradient.
    A SigLIP model (`loss_type="siglip"`) also learns `logit_bias`, added to every logit; CLIP models have none.
    """

    def __init__(self, config: HFClipConfig):
        super().__init__(config)
        self.locked_towers: set[str] = set()
        # Registration order (towers, then projections) fixes the state dict's order and the draws of initialisation.
        self.text_embed_dim, self.text_model, self.text_pooling = _tower(
            config.text_config, config.text_pooling, HFClipTextModel)
        self.vision_embed_dim, self.vision_model, self.vision_pooling = _tower(
            config.vision_config, config.vision_pooling, HFClipVisionModel)
        text_projection_type = "linear" if is_builtin(config.text_config) else config.text_projection_type
        vision_projection_type = "linear" if is_builtin(config.vision_config) else config.vision_projection_type
        self.text_projection = build_projection(text_projection_type, self.text_embed_dim, config.projection_dim)
        self.visual_projection = build_projection(vision_projection_type, self.vision_embed_dim, config.projection_dim)
        self.logit_scale = nn.Parameter(torch.tensor(float(config.logit_scale_init_value)))
        self.logit_bias = None
        if config.loss_type == "siglip":
            self.logit_bias = nn.Parameter(torch.tensor(float(config.logit_bias_init_value)))
        self.post_init()

    @classmethod
    def from_vision_text_pretrained(
        cls,
        vision_model_name_or_path: str,
        text_model_name_or_path: str,
        projection_dim: int = 512,
        *,
        vision_pooling: str | None = None,
        text_pooling: str | None = None,
        vision_projection_type: str = "linear",
        text_projection_type: str = "linear",
        hub_kwargs: dict[str, Any] | None = None,
        vision_revision: str | None = None,
        text_revision: str | None = None,
        **config_kwargs,
    ) -> "HFClipModel":
        """An hf_clip model whose towers are the pretrained backbones at `vision_model_name_or_path` and
        `text_model_name_or_path` (local folders or Hub ids; a CLIP or SigLIP folder gives its vision or text tower),
        with new projections into `projection_dim` and a new temperature (as `VisionTextDualEncoderModel.
        from_vision_text_pretrained`). Poolings default to each backbone family's own (`towers.default_pooling`);
        `config_kwargs` set other `HFClipConfig` fields (`loss_type`, `logit_scale_init_value`, ...); `hub_kwargs`
        (`revision`, `token`, `cache_dir`, `local_files_only`) go to every `from_pretrained` call; `vision_revision` /
        `text_revision` override its revision for one tower.

        Raises `ValueError` naming the problem: a backbone AutoModel cannot build, a pooling the backbone cannot do,
        or towers whose widths differ from `projection_dim` with a projection type of "none".
        """
        vision_hub_kwargs, text_hub_kwargs = dict(hub_kwargs or {}), dict(hub_kwargs or {})
        if vision_revision is not None:
            vision_hub_kwargs["revision"] = vision_revision
        if text_revision is not None:
            text_hub_kwargs["revision"] = text_revision
        vision_model, _ = load_pretrained_tower(vision_model_name_or_path, "vision", vision_pooling,
                                                **vision_hub_kwargs)
        text_model, text_missing = load_pretrained_tower(text_model_name_or_path, "text", text_pooling,
                                                         **text_hub_kwargs)
        try:
            config = HFClipConfig(
                vision_config=vision_model.config, text_config=text_model.config, projection_dim=projection_dim,
                vision_pooling=vision_pooling, text_pooling=text_pooling, vision_projection_type=vision_projection_type,
                text_projection_type=text_projection_type, tower_sources={
                    "vision": {"name_or_path": str(vision_model_name_or_path),
                               "revision": getattr(vision_model.config, "_commit_hash", None)},
                    "text": {"name_or_path": str(text_model_name_or_path),
                             "revision": getattr(text_model.config, "_commit_hash", None)},
                }, **config_kwargs,
            )
        except StrictDataclassClassValidationError as error:
            raise ValueError(str(error.__cause__ or error)) from None
        for modality, missing in (("text", text_missing),):
            if getattr(config, f"{modality}_pooling") == "pooler" and any(key.startswith("pooler.") for key in missing):
                logger.warning(
                    f"The {modality} checkpoint {text_model_name_or_path!r} holds no pooler weights, so its pooler "
                    f"(the default {modality}_pooling 'pooler') starts random; pass {modality}_pooling='cls' or "
                    "'mean' to pool its hidden states instead."
                )
        model = cls(config)
        model.vision_model, model.text_model = vision_model, text_model
        return model

    @can_return_tuple
    def get_text_features(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        padding_side: str | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> BaseModelOutputWithPooling | tuple:
        """Text tower output whose `pooler_output` is the projected (unnormalised) embedding (batch, proj_dim).
        `padding_side`: as in `HFClipTextModel.forward`. A SigLIP text tower reads the rows padded to its
        `max_position_embeddings`, as it was trained (`towers`), unless `position_ids` are given."""
        if self.text_pooling is not None:
            if position_ids is not None:
                kwargs["position_ids"] = position_ids
            elif self.text_pooling.fixed_length is not None:
                _check_context_length(input_ids, attention_mask, self.text_pooling.fixed_length)
                input_ids, attention_mask = self.text_pooling.fixed_length_ids(input_ids, attention_mask), None
            with torch.no_grad() if "text" in self.locked_towers else contextlib.nullcontext():
                text_outputs = self.text_model(input_ids=input_ids, attention_mask=attention_mask, return_dict=True,
                                               **kwargs)
                pooled = self.text_pooling(text_outputs, attention_mask, input_ids)
                text_outputs.pooler_output = self.text_projection(pooled)
            return text_outputs
        text_outputs = self.text_model(input_ids, attention_mask, position_ids, padding_side, return_dict=True,
                                       **kwargs)
        text_outputs.pooler_output = self.text_projection(text_outputs.pooler_output)
        return text_outputs

    @can_return_tuple
    def get_image_features(
        self,
        pixel_values: torch.Tensor,
        interpolate_pos_encoding: bool = False,
        **kwargs: Unpack[TransformersKwargs],
    ) -> BaseModelOutputWithPooling | tuple:
        """Vision tower output whose `pooler_output` is the projected (unnormalised) embedding (batch, proj_dim)."""
        if self.vision_pooling is not None:
            if interpolate_pos_encoding:
                _check_backbone_accepts(self.vision_model, "interpolate_pos_encoding")
                kwargs["interpolate_pos_encoding"] = True
            with torch.no_grad() if "vision" in self.locked_towers else contextlib.nullcontext():
                vision_outputs = self.vision_model(pixel_values=pixel_values, return_dict=True, **kwargs)
                pooled = self.vision_pooling(vision_outputs)
                vision_outputs.pooler_output = self.visual_projection(pooled)
            return vision_outputs
        vision_outputs = self.vision_model(pixel_values, interpolate_pos_encoding, return_dict=True, **kwargs)
        vision_outputs.pooler_output = self.visual_projection(vision_outputs.pooler_output)
        return vision_outputs

    def get_input_embeddings(self) -> nn.Module:
        """The text tower's token embedding, as in Transformers' `SiglipModel`."""
        if self.text_pooling is not None:
            return self.text_model.get_input_embeddings()
        return self.text_model.embeddings.token_embedding

    def set_input_embeddings(self, value: nn.Module) -> None:
        if self.text_pooling is not None:
            self.text_model.set_input_embeddings(value)
        else:
            self.text_model.embeddings.token_embedding = value

    def loss_from_embeddings(self, image_embeds: torch.Tensor, text_embeds: torch.Tensor,
                             gather_distributed: bool = False) -> torch.Tensor:
        """The configured loss (`config.loss_type`, `hf_clip.loss.image_text_loss`) of L2-normalised (n, d) image
        and text embeddings (row i of each is a pair), with this model's clamped temperature and its bias: what
        `forward(return_loss=True, gather_distributed=...)` returns. `gather_distributed=True` is a collective."""
        with torch.autocast(device_type=image_embeds.device.type, enabled=False):
            logit_scale = self.clamped_logit_scale().float()
        return image_text_loss(image_embeds, text_embeds, logit_scale, self.logit_bias, **loss_settings(self.config),
                               gather_distributed=gather_distributed)

    def clamped_logit_scale(self) -> torch.Tensor:
        """exp(logit_scale), clamped to at most `config.logit_scale_max` (scalar tensor). Under FSDP2, outside the
        forward, `logit_scale` is a sharded (1,) DTensor: it is gathered, so every process must call this."""
        logit_scale = self.logit_scale
        if hasattr(logit_scale, "full_tensor"):
            logit_scale = logit_scale.full_tensor()
        return logit_scale.clamp(max=math.log(self.config.logit_scale_max)).exp().reshape(())

    @torch.no_grad()
    def clamp_logit_scale_(self) -> None:
        """Clamp the stored log temperature to [0, log(logit_scale_max)] in place (call after optimiser steps)."""
        self.logit_scale.clamp_(0, math.log(self.config.logit_scale_max))

    def compile_towers(self, **compile_kwargs) -> None:
        """`torch.compile` both towers in place (`nn.Module.compile`), so that `forward`, `get_image_features` and
        `get_text_features` run compiled while parameter names, `state_dict` and `save_pretrained` stay unchanged
        (no `_orig_mod.` prefix). `compile_kwargs` go to `torch.compile` (e.g. `backend`, `mode`)."""
        self.text_model.compile(**compile_kwargs)
        self.vision_model.compile(**compile_kwargs)

    def lock_image_tower(self, unlocked_layers: int = 0) -> None:
        """Freeze the image tower and its projection, except its last `unlocked_layers` blocks (plus, when any
        are unlocked, the post-LN and the projection that follow them). A composed (backbone) tower locked whole
        (LiT, `unlocked_layers=0`) has no gradients, stays in eval mode through `train()` and runs under `no_grad`;
        with blocks unlocked, the last ones of its block list (`towers.block_list`), every parameter registered
        after them (final norm, pooler, head), its pooling and its projection train."""
        if self.vision_pooling is not None:
            self._lock_composed_tower("vision", unlocked_layers)
            return
        self._lock_tower(self.vision_model, self.visual_projection, self.vision_model.post_layernorm, unlocked_layers)

    def lock_text_tower(self, unlocked_layers: int = 0) -> None:
        """Freeze the text tower and its projection, except its last `unlocked_layers` blocks (plus, when any
        are unlocked, the final LN and the projection that follow them). A composed tower is locked whole, as in
        `lock_image_tower`."""
        if self.text_pooling is not None:
            self._lock_composed_tower("text", unlocked_layers)
            return
        self._lock_tower(self.text_model, self.text_projection, self.text_model.final_layer_norm, unlocked_layers)

    def _composed_tower_modules(self, modality: str) -> tuple[nn.Module, ...]:
        if modality == "vision":
            return self.vision_model, self.vision_pooling, self.visual_projection
        return self.text_model, self.text_pooling, self.text_projection

    def _lock_composed_tower(self, modality: str, unlocked_layers: int) -> None:
        modules = self._composed_tower_modules(modality)
        for module in modules:
            module.requires_grad_(False)
        if unlocked_layers == 0:
            for module in modules:
                module.eval()
            self.locked_towers.add(modality)
            return
        blocks_name, blocks = block_list(modules[0])
        if not 0 <= unlocked_layers <= len(blocks):
            raise ValueError(f"unlocked_layers must be in [0, {len(blocks)}] for this {modality} tower's "
                             f"{len(blocks)} blocks (`{blocks_name}`), got {unlocked_layers}.")
        first_unlocked = f"{blocks_name}.{len(blocks) - unlocked_layers}."
        parameters = list(modules[0].named_parameters())
        start = next(index for index, (name, _) in enumerate(parameters) if name.startswith(first_unlocked))
        for _, parameter in parameters[start:]:  # the last blocks, and the norms and heads registered after them
            parameter.requires_grad_(True)
        for module in modules[1:]:
            module.requires_grad_(True)

    def train(self, mode: bool = True) -> "HFClipModel":
        """`nn.Module.train`; a locked composed tower stays in eval mode (its dropout and norms frozen)."""
        super().train(mode)
        for modality in self.locked_towers:
            for module in self._composed_tower_modules(modality):
                module.eval()
        return self

    @staticmethod
    def _lock_tower(tower: nn.Module, projection: nn.Module, final_norm: nn.Module, unlocked_layers: int) -> None:
        layers = tower.encoder.layers
        if not 0 <= unlocked_layers <= len(layers):
            raise ValueError(f"unlocked_layers must be in [0, {len(layers)}], got {unlocked_layers}.")
        for module in (tower, projection):
            module.requires_grad_(False)
        if unlocked_layers:
            for module in (*layers[len(layers) - unlocked_layers :], final_norm, projection):
                module.requires_grad_(True)

    def no_weight_decay_parameter_names(self) -> set[str]:
        """Parameters CLIP trains without weight decay: biases, norms, embeddings, the logit scale and bias."""
        names = {"logit_scale"} | ({"logit_bias"} if self.logit_bias is not None else set())
        for module_name, module in self.named_modules():
            prefix = f"{module_name}." if module_name else ""
            if isinstance(module, (nn.LayerNorm, nn.Embedding)):
                names.update(prefix + name for name, _ in module.named_parameters(recurse=False))
            elif isinstance(module, HFClipVisionEmbeddings):
                names.add(prefix + "class_embedding")
            elif getattr(module, "bias", None) is not None and isinstance(module.bias, nn.Parameter):
                names.add(prefix + "bias")
        return names

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        return_loss: bool | None = None,
        interpolate_pos_encoding: bool = False,
        gather_distributed: bool = False,
        padding_side: str | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> HFClipOutput | BaseModelOutputWithPooling | tuple:
        """input_ids: (n_texts, seq); pixel_values: (n_images, C, H, W).

        Returns logits_per_image (n_images, n_texts) and, with `return_loss=True`, the loss of `config.loss_type`
        (`hf_clip.loss.image_text_loss`), which needs n_images == n_texts (caption i belongs to image i). The loss
        scores this process's batch alone unless `gather_distributed=True`, which, under an initialised
        `torch.distributed` group, scores it against every rank's batch: a collective that all ranks must join, set
        by data-parallel training (`hf_clip_train`, `ContrastiveDataCollator` for Trainer). `padding_side` ("right",
        "left" or None, as the collator sets it) says where `attention_mask` pads, so the text tower needs no host read
        to decide on its mask (`HFClipTextModel.forward`).

        Given one modality only (as Transformers' `feature-extraction` and `image-feature-extraction` pipelines call
        it), returns that tower's `get_text_features` / `get_image_features` output: last_hidden_state
        (n, seq, width) and the projected, unnormalised pooler_output (n, projection_dim).
        """
        if input_ids is None and pixel_values is None:
            raise ValueError("HFClipModel.forward needs `input_ids`, `pixel_values` or both.")
        if (input_ids is None or pixel_values is None) and return_loss:
            raise ValueError("return_loss=True needs both `input_ids` and `pixel_values` (image-caption pairs).")
        if input_ids is None:
            return self.get_image_features(pixel_values, interpolate_pos_encoding, return_dict=True, **kwargs)
        if pixel_values is None:
            return self.get_text_features(input_ids, attention_mask, position_ids, padding_side, return_dict=True,
                                          **kwargs)
        if return_loss and input_ids.shape[0] != pixel_values.shape[0]:
            raise ValueError(
                f"return_loss=True needs one caption per image, got {pixel_values.shape[0]} images and "
                f"{input_ids.shape[0]} texts. Leave return_loss unset to only score images against texts."
            )
        vision_outputs = self.get_image_features(pixel_values, interpolate_pos_encoding, return_dict=True, **kwargs)
        text_outputs = self.get_text_features(input_ids, attention_mask, position_ids, padding_side, return_dict=True,
                                              **kwargs)
        with torch.autocast(device_type=pixel_values.device.type, enabled=False):  # similarities in fp32
            image_embeds = F.normalize(vision_outputs.pooler_output.float(), dim=-1)
            text_embeds = F.normalize(text_outputs.pooler_output.float(), dim=-1)
            logit_scale = self.clamped_logit_scale().float()
            logits_per_text = logit_scale * text_embeds @ image_embeds.T
            if self.logit_bias is not None:
                logits_per_text = logits_per_text + self.logit_bias.float()
            logits_per_image = logits_per_text.T

        loss = None
        if return_loss:
            loss = self.loss_from_embeddings(image_embeds, text_embeds, gather_distributed=gather_distributed)

        return HFClipOutput(
            loss=loss,
            logits_per_image=logits_per_image,
            logits_per_text=logits_per_text,
            text_embeds=text_embeds,
            image_embeds=image_embeds,
            text_model_output=text_outputs,
            vision_model_output=vision_outputs,
        )


class HFClipTextModelWithProjection(HFClipPreTrainedModel):
    """The text tower and its projection alone, for text embeddings (e.g. as a diffusion text encoder)."""

    config: HFClipTextConfig
    base_model_prefix = "text_model"
    input_modalities = ("text",)

    def __init__(self, config: HFClipTextConfig):
        super().__init__(config)
        self.text_model = HFClipTextModel._from_config(config)
        self.text_projection = nn.Linear(config.hidden_size, config.projection_dim, bias=False)
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        padding_side: str | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> HFClipTextModelOutput | tuple:
        """input_ids, attention_mask: (batch, seq); `padding_side` as in `HFClipTextModel.forward`. Returns
        text_embeds (batch, projection_dim), unnormalised."""
        text_outputs = self.text_model(input_ids, attention_mask, position_ids, padding_side, return_dict=True,
                                       **kwargs)
        return HFClipTextModelOutput(
            text_embeds=self.text_projection(text_outputs.pooler_output),
            last_hidden_state=text_outputs.last_hidden_state,
            hidden_states=text_outputs.hidden_states,
            attentions=text_outputs.attentions,
        )


class HFClipVisionModelWithProjection(HFClipPreTrainedModel):
    """The image tower and its projection alone, for image embeddings."""

    config: HFClipVisionConfig
    base_model_prefix = "vision_model"
    main_input_name = "pixel_values"
    input_modalities = ("image",)

    def __init__(self, config: HFClipVisionConfig):
        super().__init__(config)
        self.vision_model = HFClipVisionModel._from_config(config)
        self.visual_projection = nn.Linear(config.hidden_size, config.projection_dim, bias=False)
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor,
        interpolate_pos_encoding: bool = False,
        **kwargs: Unpack[TransformersKwargs],
    ) -> HFClipVisionModelOutput | tuple:
        """pixel_values: (batch, C, H, W). Returns image_embeds (batch, projection_dim), unnormalised."""
        vision_outputs = self.vision_model(pixel_values, interpolate_pos_encoding, return_dict=True, **kwargs)
        return HFClipVisionModelOutput(
            image_embeds=self.visual_projection(vision_outputs.pooler_output),
            last_hidden_state=vision_outputs.last_hidden_state,
            hidden_states=vision_outputs.hidden_states,
            attentions=vision_outputs.attentions,
        )


class HFClipForImageClassification(HFClipPreTrainedModel):
    """The image tower and its projection with a linear head over the L2-normalised image embedding.

    logits = classifier(normalize(visual_projection(vision_model(pixel_values).pooler_output))). The weight names of
    the image tower equal `HFClipModel`'s, so `from_pretrained` on an `HFClipModel` checkpoint loads it (the text
    tower is ignored and the head is initialised); `hf_clip.from_zero_shot` instead initialises the head from class
    text embeddings so that the logits equal the zero-shot ones. The labels are `config.id2label`.
    """

    main_input_name = "pixel_values"
    input_modalities = ("image",)
    _keys_to_ignore_on_load_unexpected = [
        r"position_ids", r"^text_model\.", r"^text_projection\.", r"^logit_scale$", r"^logit_bias$"
    ]

    def __init__(self, config: HFClipConfig):
        if not is_builtin(config.vision_config):
            raise ValueError(
                f"HFClipForImageClassification needs hf_clip's built-in image tower; this config's is a composed "
                f"{config.vision_config.model_type!r} backbone. Use HFClipModel (zero-shot) or Transformers' "
                "AutoModelForImageClassification on the vision backbone."
            )
        super().__init__(config)
        self.num_labels = config.num_labels
        self.vision_embed_dim = config.vision_config.hidden_size
        self.vision_model = HFClipVisionModel._from_config(config.vision_config)
        self.visual_projection = nn.Linear(self.vision_embed_dim, config.projection_dim, bias=False)
        self.classifier = nn.Linear(config.projection_dim, config.num_labels)
        self.post_init()

    def lock_image_tower(self, unlocked_layers: int = 0) -> None:
        """Freeze the image tower and its projection, except its last `unlocked_layers` blocks (plus, when any
        are unlocked, the post-LN and the projection that follow them). The head stays trainable."""
        HFClipModel._lock_tower(
            self.vision_model, self.visual_projection, self.vision_model.post_layernorm, unlocked_layers
        )

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor,
        labels: torch.Tensor | None = None,
        interpolate_pos_encoding: bool = False,
        **kwargs: Unpack[TransformersKwargs],
    ) -> ImageClassifierOutput | tuple:
        """pixel_values: (batch, C, H, W); labels: (batch,) class ids. Returns logits (batch, num_labels) and, with
        labels, the cross-entropy loss."""
        vision_outputs = self.vision_model(pixel_values, interpolate_pos_encoding, return_dict=True, **kwargs)
        image_embeds = self.visual_projection(vision_outputs.pooler_output)
        with torch.autocast(device_type=pixel_values.device.type, enabled=False):  # logits in fp32, as HFClipModel's
            image_embeds = F.normalize(image_embeds.float(), dim=-1)
            logits = F.linear(image_embeds, self.classifier.weight.float(), self.classifier.bias.float())

        loss = None
        if labels is not None:
            loss = self.loss_function(labels, logits, self.config)

        return ImageClassifierOutput(
            loss=loss, logits=logits, hidden_states=vision_outputs.hidden_states, attentions=vision_outputs.attentions
        )


__all__ = [
    "HFClipForImageClassification",
    "HFClipModel",
    "HFClipOutput",
    "HFClipPreTrainedModel",
    "HFClipTextModel",
    "HFClipTextModelWithProjection",
    "HFClipVisionModel",
    "HFClipVisionModelWithProjection",
]
