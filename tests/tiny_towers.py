"""Tiny random backbones of every family hf_clip composes, saved as local "pretrained" folders (a model and its
tokenizer or image processor), built from configs with no download."""

from pathlib import Path

import torch
from conftest import CAPTIONS
from transformers import (
    AutoModel,
    BertConfig,
    BertTokenizer,
    CLIPImageProcessor,
    CLIPTextConfig,
    CLIPVisionConfig,
    ConvNextConfig,
    ConvNextImageProcessor,
    DebertaV2Config,
    Dinov2Config,
    ModernBertConfig,
    RobertaConfig,
    SiglipImageProcessor,
    SiglipTextConfig,
    SiglipVisionConfig,
    SwinConfig,
    ViTConfig,
    ViTImageProcessor,
    XLMRobertaConfig,
)

IMAGE_SIZE = 16
CONTEXT = 24
_LAYER = {"num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 48}


def vision_config(family: str):
    """A one-block `family` backbone config for 16-pixel images."""
    square = {"image_size": IMAGE_SIZE, "patch_size": 8}
    return {
        "vit": lambda: ViTConfig(hidden_size=24, **_LAYER, **square),
        "dinov2": lambda: Dinov2Config(hidden_size=24, num_hidden_layers=1, num_attention_heads=2, mlp_ratio=2,
                                       **square),
        "convnext": lambda: ConvNextConfig(hidden_sizes=[8, 24], depths=[1, 1], num_stages=2, patch_size=4,
                                           image_size=IMAGE_SIZE),
        "swin": lambda: SwinConfig(image_size=IMAGE_SIZE, patch_size=4, embed_dim=12, depths=[1, 1], num_heads=[1, 2],
                                   window_size=2),
        "clip_vision_model": lambda: CLIPVisionConfig(hidden_size=24, **_LAYER, **square),
        "siglip_vision_model": lambda: SiglipVisionConfig(hidden_size=24, **_LAYER, **square),
    }[family]()


VISION_FAMILIES = ("vit", "dinov2", "convnext", "swin", "clip_vision_model", "siglip_vision_model")
TEXT_FAMILIES = ("bert", "roberta", "xlm-roberta", "deberta-v2", "modernbert", "clip_text_model", "siglip_text_model")


def image_processor(family: str):
    size = {"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    if family == "clip_vision_model":
        return CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE}, crop_size=size)
    if family == "convnext":
        return ConvNextImageProcessor(size={"shortest_edge": IMAGE_SIZE}, crop_pct=1.0)
    if family == "siglip_vision_model":
        return SiglipImageProcessor(size=size)
    return ViTImageProcessor(size=size)


def wordpiece_tokenizer(folder: Path) -> BertTokenizer:
    """A WordPiece tokenizer over the suite's caption words, from a written vocab.txt."""
    words = sorted({word for caption in CAPTIONS for word in caption.split()} | {"photo", "of", "this", "is"})
    folder.mkdir(parents=True, exist_ok=True)
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    # Transformers 5 reads the file through `vocab=`; `vocab_file=` is ignored and leaves only the special tokens.
    tokenizer = BertTokenizer(vocab=str(vocab), model_max_length=CONTEXT)
    assert len(tokenizer) == len(words) + 5
    return tokenizer


def text_config(family: str, tokenizer):
    """A one-block `family` text backbone config sized to `tokenizer`."""
    vocab, width = len(tokenizer), 32
    special = {"pad_token_id": tokenizer.pad_token_id}
    return {
        "bert": lambda: BertConfig(vocab_size=vocab, hidden_size=width, max_position_embeddings=CONTEXT, **_LAYER,
                                   **special),
        "roberta": lambda: RobertaConfig(vocab_size=vocab, hidden_size=width, max_position_embeddings=CONTEXT + 2,
                                         **_LAYER, **special),
        "xlm-roberta": lambda: XLMRobertaConfig(vocab_size=vocab, hidden_size=width,
                                                max_position_embeddings=CONTEXT + 2, **_LAYER, **special),
        "deberta-v2": lambda: DebertaV2Config(vocab_size=vocab, hidden_size=width, max_position_embeddings=CONTEXT,
                                              **_LAYER, **special),
        "modernbert": lambda: ModernBertConfig(
            vocab_size=vocab, hidden_size=width, max_position_embeddings=CONTEXT, **_LAYER, **special,
            bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id,
            cls_token_id=tokenizer.cls_token_id, sep_token_id=tokenizer.sep_token_id),
        "clip_text_model": lambda: CLIPTextConfig(
            vocab_size=vocab, hidden_size=width, max_position_embeddings=CONTEXT, **_LAYER, **special,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id),
        "siglip_text_model": lambda: SiglipTextConfig(  # its head maps onto the vision width, as in SigLIP
            vocab_size=vocab, hidden_size=width, projection_size=24, max_position_embeddings=CONTEXT, **_LAYER,
            **special,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id),
    }[family]()


def tokenizer_for(family: str, folder: Path, clip_tokenizer):
    """CLIP's BPE (`train_clip_tokenizer`) for the CLIP and SigLIP text towers, WordPiece for the BERT-likes."""
    if family in ("clip_text_model", "siglip_text_model"):
        return clip_tokenizer
    return wordpiece_tokenizer(folder / "vocab")


def save_vision_folder(root: Path, family: str, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    folder = root / f"vision-{family}"
    build_model(vision_config(family)).save_pretrained(folder)
    image_processor(family).save_pretrained(folder)
    return folder


def save_text_folder(root: Path, family: str, clip_tokenizer, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    folder = root / f"text-{family}"
    tokenizer = tokenizer_for(family, root / f"tokenizer-{family}", clip_tokenizer)
    build_model(text_config(family, tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def build_model(config):
    """The tower model class `from_vision_text_pretrained` loads for `config`'s family."""
    if config.model_type == "siglip_text_model":
        from transformers import SiglipTextModel

        return SiglipTextModel(config)
    return AutoModel.from_config(config)
