"""The model side of the server: tokenising and preparing inputs, and the batched forward the batching worker runs."""

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from PIL import Image


@dataclass
class TokenizedText:
    """One text input: its token ids (at most the context length), how many tokens it had, and whether it was cut."""

    input_ids: list[int]
    num_tokens: int
    truncated: bool


class Embedder:
    """L2-normalised CLIP embeddings of texts and images, computed as `get_text_features` / `get_image_features` do.

    `tokenize` runs on the event loop's thread only (a fast tokenizer must not be used by two threads at once),
    `prepare_image` on any thread, `forward` on the batching worker's thread, which owns the model. Images are
    prepared by `pixel_transform` (image -> (3, H, W)): an index's own evaluation transform, so that queries are
    embedded as the index's rows were, or by default the processor's image processor.
    """

    def __init__(self, model, processor, pixel_transform: Callable[[Image.Image], torch.Tensor] | None = None):
        self.model, self.processor, self.tokenizer = model.eval(), processor, processor.tokenizer
        self.pixel_transform = pixel_transform or self._image_processor_pixels
        text_config = model.config.text_config
        limits = [text_config.max_position_embeddings, self.tokenizer.model_max_length]
        self.context_length = min(limit for limit in limits if isinstance(limit, int) and limit > 0)
        self.dimension = model.config.projection_dim

    def _image_processor_pixels(self, image: Image.Image) -> torch.Tensor:
        return self.processor.image_processor(images=[image], return_tensors="pt")["pixel_values"][0]

    def tokenize(self, texts: Sequence[str]) -> list[TokenizedText]:
        full = self.tokenizer(list(texts), truncation=False, verbose=False)["input_ids"]
        long = [i for i, ids in enumerate(full) if len(ids) > self.context_length]
        cut = dict(zip(long, self.tokenizer([texts[i] for i in long], truncation=True,
                                            max_length=self.context_length)["input_ids"])) if long else {}
        return [TokenizedText(cut.get(i, ids), len(ids), i in cut) for i, ids in enumerate(full)]

    def prepare_image(self, image: Image.Image) -> torch.Tensor:
        """(3, H, W) pixel values of an RGB image."""
        return self.pixel_transform(image.convert("RGB"))

    def pad(self, texts: Sequence[TokenizedText]) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, L) input ids padded to the longest with the tokenizer's pad id on its padding side, and the mask."""
        length = max(len(text.input_ids) for text in texts)
        input_ids = torch.full((len(texts), length), self.tokenizer.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(texts), length), dtype=torch.long)
        for row, text in enumerate(texts):
            n = len(text.input_ids)
            span = slice(length - n, length) if self.tokenizer.padding_side == "left" else slice(0, n)
            input_ids[row, span] = torch.tensor(text.input_ids)
            attention_mask[row, span] = 1
        return input_ids, attention_mask

    @torch.inference_mode()
    def forward(self, kind: str, items: list) -> torch.Tensor:
        """(len(items), d) float32 embeddings on the CPU: `items` are `TokenizedText`s for "text", (3, H, W) pixel
        values for "image"."""
        device = self.model.device
        if kind == "text":
            input_ids, attention_mask = self.pad(items)
            features = self.model.get_text_features(input_ids=input_ids.to(device),
                                                    attention_mask=attention_mask.to(device)).pooler_output
        elif kind == "image":
            pixels = torch.stack(items).to(device, dtype=self.model.dtype)
            features = self.model.get_image_features(pixel_values=pixels).pooler_output
        else:
            raise ValueError(f"Unknown input kind {kind!r}: 'text' or 'image'.")
        return torch.nn.functional.normalize(features.float(), dim=-1).cpu()
