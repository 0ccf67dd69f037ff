"""Tokenizers for hf_clip models: train a CLIP-style byte-level BPE tokenizer from captions (for models trained from
scratch), and check that a model's text config agrees with its tokenizer on special tokens."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

from tokenizers import Tokenizer, models, pre_tokenizers, trainers

if TYPE_CHECKING:
    from transformers import CLIPTokenizer

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
END_OF_WORD = "</w>"


def _strings(captions: Iterable[str], counter: list[int]) -> Iterator[str]:
    """Yield the captions, checking each is a str; `counter[0]` ends as the number yielded."""
    for index, caption in enumerate(captions):
        if not isinstance(caption, str):
            raise TypeError(f"Caption {index} is a {type(caption).__name__}, not a str.")
        counter[0] = index + 1
        yield caption


def train_clip_tokenizer(
    captions: Iterable[str],
    vocab_size: int = 8192,
    model_max_length: int = 77,
    min_frequency: int = 2,
) -> CLIPTokenizer:
    """Train a `CLIPTokenizer` (lowercasing, byte-level BPE with `</w>` word ends, start/end tokens) on `captions`.

    The vocabulary is laid out as OpenAI's: the 256 byte symbols, the same with `</w>`, one token per learned
    merge, then `<|startoftext|>` and `<|endoftext|>` last, so end-of-text is the highest id. Padding uses
    end-of-text and is on the right. `vocab_size` is an upper bound: a small corpus may learn fewer merges.
    Derive the model's text config from the result with `HFClipConfig.from_preset(..., tokenizer=tokenizer)`.
    """
    from transformers import CLIPTokenizer

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    min_vocab_size = 2 * len(alphabet) + 2
    if vocab_size < min_vocab_size:
        raise ValueError(f"vocab_size must be at least {min_vocab_size} (byte symbols, word ends and 2 specials).")
    if model_max_length < 2:
        raise ValueError("model_max_length must leave room for the start and end tokens (>= 2).")

    byte_symbols = sorted(alphabet, key=lambda symbol: ord(symbol))
    word_end_symbols = [symbol + END_OF_WORD for symbol in byte_symbols]
    # Reuse CLIPTokenizer's own normaliser and pre-tokeniser, so training splits text exactly as inference will.
    reference = CLIPTokenizer().backend_tokenizer
    backend = Tokenizer(models.BPE(unk_token=EOS_TOKEN, end_of_word_suffix=END_OF_WORD, continuing_subword_prefix=""))
    backend.normalizer = reference.normalizer
    backend.pre_tokenizer = reference.pre_tokenizer
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - 2,
        min_frequency=min_frequency,
        initial_alphabet=alphabet,
        end_of_word_suffix=END_OF_WORD,
        # BpeTrainer otherwise numbers the "x</w>" symbols in hash-map order, and those ids break ties between
        # equally frequent merges, so two runs on the same captions could learn different vocabularies
        # (huggingface/tokenizers#1794). Registering them up front fixes their ids; only the merges are kept.
        special_tokens=word_end_symbols,
        show_progress=False,
    )
    seen_captions = [0]
    backend.train_from_iterator(_strings(captions, seen_captions), trainer=trainer)
    if seen_captions[0] == 0:
        raise ValueError("No captions to train the tokenizer on.")
    merges = [tuple(merge) for merge in json.loads(backend.to_str())["model"]["merges"]]

    vocab_tokens = byte_symbols + word_end_symbols
    merges = merges[: vocab_size - len(vocab_tokens) - 2]
    seen = set(vocab_tokens)
    for left, right in merges:
        if (merged := left + right) not in seen:
            seen.add(merged)
            vocab_tokens.append(merged)
    vocab_tokens += [BOS_TOKEN, EOS_TOKEN]
    vocab = {token: index for index, token in enumerate(vocab_tokens)}
    return CLIPTokenizer(
        vocab=vocab,
        merges=merges,
        model_max_length=model_max_length,
        padding_side="right",
    )


def match_special_tokens(model, tokenizer) -> None:
    """Set the text config's eos/bos/pad ids to the tokenizer's where it defines them, as
    `Trainer(processing_class=...)` would, after checking that the text tower still pools at the same token.

    A composed text tower that does not pool with "eos" (`HFClipConfig.text_pooling`) is left as it is.
    Legacy CLIP configs (eos_token_id 2) pool at the highest token id, which is the first end-of-text token only when
    end-of-text is the tokenizer's last id. Any other disagreement raises `ValueError`, since the model and the
    tokenizer would then disagree on where a text ends.
    """
    if getattr(model.config, "text_pooling", None) not in (None, "eos"):
        return  # a composed text tower that pools elsewhere than at the end-of-text token: nothing depends on ids
    text_config = model.config.get_text_config()
    eos_token_id = tokenizer.eos_token_id
    if eos_token_id is None:
        raise ValueError("The tokenizer has no eos token; the text tower pools at the end-of-text token.")
    legacy_equivalent = text_config.eos_token_id == 2 and eos_token_id == len(tokenizer) - 1
    if text_config.eos_token_id != eos_token_id and not legacy_equivalent:
        raise ValueError(
            f"The text config pools at eos_token_id {text_config.eos_token_id} but the tokenizer ends text with id "
            f"{eos_token_id}; fix text_config.eos_token_id in config.json."
        )
    for name in ("eos_token_id", "bos_token_id", "pad_token_id"):
        token_id = getattr(tokenizer, name)
        if token_id is not None:
            setattr(text_config, name, token_id)


__all__ = ["match_special_tokens", "train_clip_tokenizer"]
