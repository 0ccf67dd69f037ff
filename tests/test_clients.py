"""Third-party clients of an hf_clip model with hf_clip imported: Transformers' feature-extraction pipelines and
sentence-transformers. (tests/test_everywhere.py runs them where hf_clip is not installed.)"""

import dataclasses

import pytest
import torch
from conftest import CAPTIONS, make_config
from PIL import Image
from transformers import AutoModel, AutoProcessor, pipeline
from transformers.modeling_outputs import BaseModelOutputWithPooling

from hf_clip import HFClipModel, HFClipOutput, HFClipProcessor, train_clip_tokenizer

IMAGES = [Image.new("RGB", (50, 40), (200, 30, 30)), Image.new("RGB", (1, 1), (0, 0, 200))]
TEXTS = ["a red circle", "a big blue square on the left"]


def test_paired_forward_keeps_its_output_fields():
    assert [field.name for field in dataclasses.fields(HFClipOutput)] == [
        "loss", "logits_per_image", "logits_per_text", "text_embeds", "image_embeds", "text_model_output",
        "vision_model_output"]


def test_one_modality_forward_returns_that_towers_features(saved_checkpoint):
    model = HFClipModel.from_pretrained(saved_checkpoint).eval()
    processor = HFClipProcessor.from_pretrained(saved_checkpoint)
    texts, images = processor(text=TEXTS, padding=True, return_tensors="pt"), processor(images=IMAGES,
                                                                                        return_tensors="pt")
    with torch.no_grad():
        for output, features in ((model(**texts), model.get_text_features(**texts)),
                                 (model(**images), model.get_image_features(**images))):
            assert type(output) is BaseModelOutputWithPooling
            assert torch.equal(output.pooler_output, features.pooler_output)
            assert torch.equal(output.last_hidden_state, features.last_hidden_state)
        paired = model(**texts, **images)
    assert type(paired) is HFClipOutput and paired.logits_per_image.shape == (2, 2)
    with pytest.raises(ValueError, match="return_loss=True needs both"):
        model(**images, return_loss=True)
    with pytest.raises(ValueError, match="needs `input_ids`, `pixel_values` or both"):
        model()


def test_image_feature_extraction_pipeline_pools_to_get_image_features(saved_checkpoint):
    extractor = pipeline("image-feature-extraction", model=str(saved_checkpoint))
    model = AutoModel.from_pretrained(saved_checkpoint).eval()
    pixel_values = extractor.image_processor(IMAGES[0], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        features = model.get_image_features(pixel_values=pixel_values)
    assert torch.equal(extractor(IMAGES[0], pool=True, return_tensors=True), features.pooler_output)
    assert torch.equal(extractor(IMAGES[0], return_tensors=True), features.last_hidden_state)


def test_feature_extraction_pipeline_gives_token_states_whose_end_of_text_row_is_the_pooled_output(
        saved_checkpoint):
    extractor = pipeline("feature-extraction", model=str(saved_checkpoint))
    model = AutoModel.from_pretrained(saved_checkpoint).eval()
    for text in TEXTS:
        input_ids = extractor.tokenizer(text, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            pooled = model.text_model(input_ids).pooler_output[0]
        tokens = extractor(text, return_tensors=True)[0]
        end_of_text = int((input_ids[0] == model.config.text_config.eos_token_id).nonzero()[0, 0])
        assert tokens.shape == (input_ids.shape[1], model.config.text_config.hidden_size)
        assert torch.equal(tokens[end_of_text], pooled)


@pytest.fixture(scope="module")
def context_77_checkpoint(tmp_path_factory):
    """A tiny model with CLIP's 77-token context, saved with its processor."""
    tokenizer = train_clip_tokenizer(CAPTIONS, vocab_size=600, model_max_length=77)
    layer = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1, "num_attention_heads": 2}
    config = make_config(tokenizer, projection_dim=32, text=layer, vision={**layer, "image_size": 32, "patch_size": 8})
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("context_77")
    HFClipModel(config).save_pretrained(path)
    HFClipProcessor.from_tokenizer(tokenizer, image_size=32).save_pretrained(path)
    return path


def test_sentence_transformers_embeddings_equal_get_features_also_after_save(context_77_checkpoint, tmp_path):
    sentence_transformers = pytest.importorskip("sentence_transformers")
    model = AutoModel.from_pretrained(context_77_checkpoint).eval()
    processor = AutoProcessor.from_pretrained(context_77_checkpoint)
    long_text = " ".join(["a small red circle on the left"] * 15)
    assert len(processor.tokenizer(long_text)["input_ids"]) > 77
    texts = [*TEXTS, long_text]
    with torch.no_grad():
        text_features = model.get_text_features(
            **processor(text=texts, padding=True, truncation=True, return_tensors="pt")).pooler_output
        image_features = model.get_image_features(**processor(images=IMAGES, return_tensors="pt")).pooler_output

    encoder = sentence_transformers.SentenceTransformer(str(context_77_checkpoint), device="cpu")
    encoder.save(str(tmp_path / "saved"))
    reloaded = sentence_transformers.SentenceTransformer(str(tmp_path / "saved"), device="cpu")
    for client in (encoder, reloaded):
        assert torch.equal(client.encode(texts, convert_to_tensor=True), text_features)
        assert torch.equal(client.encode(IMAGES, convert_to_tensor=True), image_features)
