"""ONNX export of both towers (`hf_clip.export.export_onnx`), run in onnxruntime against PyTorch.

Skipped where the `[onnx]` extra (onnx, onnxscript, onnxruntime) is not installed; `make install` installs it.
"""


from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import CAPTIONS, make_config, tiny_siglip_model_and_processor
from PIL import Image

pytest.importorskip("onnx")
pytest.importorskip("onnxscript")
ort = pytest.importorskip("onnxruntime")

from hf_clip import HFClipModel, HFClipProcessor, train_clip_tokenizer  # noqa: E402
from hf_clip.export import main  # noqa: E402

TOLERANCE = 1e-4
COLOURS = {"red": (220, 30, 30), "green": (30, 180, 40), "blue": (40, 60, 230), "yellow": (230, 220, 30),
           "purple": (140, 40, 170), "orange": (250, 140, 20), "white": (245, 245, 245), "black": (15, 15, 15)}


def _colour_images(count: int, seed: int) -> tuple[list[Image.Image], list[int]]:
    """Noisy solid-colour 24x24 pictures and their colour index."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, len(COLOURS), size=count).tolist()
    rgb = np.array(list(COLOURS.values()), dtype=np.float64)
    images = [Image.fromarray(np.clip(rgb[label] + rng.normal(0, 25, (24, 24, 3)), 0, 255).astype(np.uint8))
              for label in labels]
    return images, labels


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A small model trained for 60 steps to name the colour of a picture, and its ONNX export (fp32 and int8) by
    `hf-clip-export onnx --quantize`."""
    names = list(COLOURS)
    captions = [f"a {template} {name} picture" for name in names for template in ("photo of a", "bright", "")]
    tokenizer = train_clip_tokenizer(captions + CAPTIONS, vocab_size=600, model_max_length=16)
    layer = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2}
    config = make_config(tokenizer, projection_dim=32, text=layer, vision={**layer, "image_size": 24, "patch_size": 8})
    processor = HFClipProcessor.from_tokenizer(tokenizer, image_size=24)
    images, labels = _colour_images(256, seed=0)
    pixel_values = processor(images=images, return_tensors="pt")["pixel_values"]
    prompts = processor(text=[f"a photo of a {name} picture" for name in names], padding=True, return_tensors="pt")
    labels = torch.tensor(labels)
    torch.manual_seed(0)
    model = HFClipModel(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    for _ in range(60):
        rows = torch.randperm(len(labels))[:32]
        texts = {key: prompts[key][labels[rows]] for key in ("input_ids", "attention_mask")}
        loss = model(**texts, pixel_values=pixel_values[rows], return_loss=True).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    checkpoint, out = tmp_path_factory.mktemp("checkpoint"), tmp_path_factory.mktemp("onnx")
    model.save_pretrained(checkpoint)
    processor.save_pretrained(checkpoint)
    main(["onnx", str(checkpoint), str(out), "--quantize"])  # the `hf-clip-export onnx` console script
    return model, processor, out


def _session(path) -> "ort.InferenceSession":
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _text_batch(processor, texts: list[str], side: str) -> dict[str, torch.Tensor]:
    processor.tokenizer.padding_side = side
    try:
        return processor(text=texts, padding=True, truncation=True, return_tensors="pt")
    finally:
        processor.tokenizer.padding_side = "right"


def test_export_writes_graphs_processor_and_readme(trained):
    model, _, out = trained
    assert {path.name for path in out.glob("*.onnx")} == {"text_model.onnx", "vision_model.onnx",
                                                          "text_model_int8.onnx", "vision_model_int8.onnx"}
    for name in ("processor_config.json", "preprocessor_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (out / name).is_file(), name
    text, vision = _session(out / "text_model.onnx"), _session(out / "vision_model.onnx")
    assert [i.name for i in text.get_inputs()] == ["input_ids", "attention_mask"]
    assert [o.name for o in text.get_outputs()] == ["text_embeds", "logit_scale"]
    assert [i.name for i in vision.get_inputs()] == ["pixel_values"]
    assert [o.name for o in vision.get_outputs()] == ["image_embeds", "logit_scale"]
    assert text.get_inputs()[0].shape == ["batch", "sequence"] and vision.get_inputs()[0].shape[0] == "batch"
    readme = (out / "README.md").read_text()
    assert "| `input_ids` | int64 | (batch, sequence) |" in readme
    assert f"| `image_embeds` | float32 | (batch, {model.config.projection_dim}) |" in readme
    assert f"Every token id must lie in 0..{model.config.text_config.vocab_size - 1}" in readme
    assert "OnnxHFClipModel(this_folder)" in readme
    assert HFClipProcessor.from_pretrained(out).tokenizer.get_vocab() == trained[1].tokenizer.get_vocab()


@pytest.mark.parametrize("side", ["right", "left"])
def test_text_graph_matches_pytorch_at_other_batch_sizes_and_lengths(trained, side):
    """Traced at batch 2 and length 8; run at batches 1, 3 and 5, lengths from 4 up to the 16-token context."""
    model, processor, out = trained
    session = _session(out / "text_model.onnx")
    batches = [["a red picture"], ["red", "a photo of a bright yellow picture", "a green one"],
               ["a", "b c", "a photo of a bright orange picture on the left at the top " * 3, "white", "purple"]]
    seen_lengths = set()
    for texts in batches:
        inputs = _text_batch(processor, texts, side)
        seen_lengths.add(inputs["input_ids"].shape[1])
        text_embeds, logit_scale = session.run(None, {k: inputs[k].numpy() for k in ("input_ids", "attention_mask")})
        with torch.no_grad():
            expected = model.get_text_features(**inputs).pooler_output
        np.testing.assert_allclose(text_embeds, expected.numpy(), atol=TOLERANCE, rtol=0)
        assert logit_scale == pytest.approx(model.clamped_logit_scale().item(), abs=1e-6)
    assert 8 not in seen_lengths and max(seen_lengths) == 16


def test_left_and_right_padding_give_the_same_onnx_embeddings(trained):
    _, processor, out = trained
    session = _session(out / "text_model.onnx")
    texts = ["red", "a photo of a bright yellow picture", "a green one"]
    embeds = {}
    for side in ("right", "left"):
        inputs = _text_batch(processor, texts, side)
        embeds[side] = session.run(["text_embeds"], {k: v.numpy() for k, v in inputs.items()})[0]
    np.testing.assert_allclose(embeds["left"], embeds["right"], atol=TOLERANCE, rtol=0)


def test_vision_graph_matches_pytorch_on_tiny_and_large_images_at_other_batch_sizes(trained):
    model, processor, out = trained
    session = _session(out / "vision_model.onnx")
    rng = np.random.default_rng(1)
    batches = [[Image.new("RGB", (1, 1), (200, 10, 10))],
               [Image.fromarray(rng.integers(0, 256, (1200, 900, 3), dtype=np.uint8)),
                Image.new("RGB", (1, 1), (0, 0, 255)), Image.fromarray(rng.integers(0, 256, (40, 70, 3), np.uint8))]]
    for images in batches:
        pixel_values = processor(images=images, return_tensors="pt")["pixel_values"]
        image_embeds, logit_scale = session.run(None, {"pixel_values": pixel_values.numpy()})
        with torch.no_grad():
            expected = model.get_image_features(pixel_values=pixel_values).pooler_output
        assert image_embeds.shape == (len(images), model.config.projection_dim)
        np.testing.assert_allclose(image_embeds, expected.numpy(), atol=TOLERANCE, rtol=0)


def test_scores_rebuilt_from_the_graphs_equal_the_models_logits(trained):
    model, processor, out = trained
    images, _ = _colour_images(4, seed=1000)
    texts = [f"a photo of a {name} picture" for name in COLOURS]
    inputs = processor(text=texts, images=images, padding=True, return_tensors="pt")
    text_embeds, logit_scale = _session(out / "text_model.onnx").run(
        None, {k: inputs[k].numpy() for k in ("input_ids", "attention_mask")})
    image_embeds = _session(out / "vision_model.onnx").run(
        ["image_embeds"], {"pixel_values": inputs["pixel_values"].numpy()})[0]
    image_embeds = F.normalize(torch.from_numpy(image_embeds), dim=-1)
    logits = float(logit_scale) * image_embeds @ F.normalize(torch.from_numpy(text_embeds), dim=-1).T
    with torch.no_grad():
        expected = model(**inputs).logits_per_image
    torch.testing.assert_close(logits, expected, atol=TOLERANCE * float(logit_scale), rtol=0)


def _zero_shot_predictions(text_path, vision_path, processor, images) -> np.ndarray:
    texts = [f"a photo of a {name} picture" for name in COLOURS]
    text_inputs = processor(text=texts, padding=True, return_tensors="np")
    text_embeds = _session(text_path).run(
        ["text_embeds"], {k: text_inputs[k] for k in ("input_ids", "attention_mask")})[0]
    pixel_values = processor(images=images, return_tensors="np")["pixel_values"]
    image_embeds = _session(vision_path).run(["image_embeds"], {"pixel_values": pixel_values})[0]
    text_embeds /= np.linalg.norm(text_embeds, axis=-1, keepdims=True)
    image_embeds /= np.linalg.norm(image_embeds, axis=-1, keepdims=True)
    return (image_embeds @ text_embeds.T).argmax(-1)


def test_int8_graphs_keep_zero_shot_predictions_of_a_trained_model(trained):
    """Dynamic int8 quantisation of a model trained to name colours: top-1 agreement with fp32 >= 99% on 400 new
    pictures, and the fp32 graphs themselves are right on >= 90% of them."""
    _, processor, out = trained
    images, labels = _colour_images(400, seed=2000)
    fp32 = _zero_shot_predictions(out / "text_model.onnx", out / "vision_model.onnx", processor, images)
    int8 = _zero_shot_predictions(out / "text_model_int8.onnx", out / "vision_model_int8.onnx", processor, images)
    assert (fp32 == np.array(labels)).mean() >= 0.90
    assert (int8 == fp32).mean() >= 0.99


def test_siglip_graphs_also_output_the_logit_bias(tokenizer, tmp_path):
    from hf_clip.export import export_onnx

    model, processor = tiny_siglip_model_and_processor(tokenizer)
    export_onnx(model, processor, tmp_path)
    inputs = processor(text=CAPTIONS[:3], images=[Image.new("RGB", (9, 9), "red")] * 2, padding=True,
                       return_tensors="pt")
    text_embeds, logit_scale, logit_bias = _session(tmp_path / "text_model.onnx").run(
        None, {k: inputs[k].numpy() for k in ("input_ids", "attention_mask")})
    image_embeds = _session(tmp_path / "vision_model.onnx").run(["image_embeds"],
                                                                {"pixel_values": inputs["pixel_values"].numpy()})[0]
    image_embeds = F.normalize(torch.from_numpy(image_embeds), dim=-1)
    logits = float(logit_scale) * image_embeds @ F.normalize(torch.from_numpy(text_embeds), dim=-1).T
    with torch.no_grad():
        expected = model(**inputs).logits_per_image
    torch.testing.assert_close(logits + float(logit_bias), expected, atol=1e-4, rtol=0)
    assert "logit_bias" in (tmp_path / "README.md").read_text()


def _bad_text_inputs(model, processor) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Text inputs the PyTorch model refuses, each made from a good right-padded batch."""
    text_config = model.config.text_config
    good = processor(text=["a red picture", "a photo of a bright yellow picture"], padding=True, return_tensors="np")
    ids, mask = good["input_ids"], good["attention_mask"]
    negative, beyond, no_eos = ids.copy(), ids.copy(), ids.copy()
    negative[0, 1] = -3
    beyond[1, 1] = text_config.vocab_size
    no_eos[0][no_eos[0] == text_config.eos_token_id] = ids[0, 1]
    context = text_config.max_position_embeddings
    long_ids = np.concatenate([np.full((2, context), ids[0, 1]), ids], axis=1)
    return {
        "negative token id": (negative, mask),
        "token id beyond the vocabulary": (beyond, mask),
        "row without end-of-text": (no_eos, mask),
        "text longer than the context": (long_ids, np.ones_like(long_ids)),
        "padded past the context": (np.concatenate([ids, np.zeros((2, context), ids.dtype)], axis=1),
                                    np.concatenate([mask, np.zeros((2, context), mask.dtype)], axis=1)),
        "attention_mask shorter than input_ids": (ids, mask[:, :-1]),
        "attention_mask of another batch": (ids, mask[:1]),
        "input_ids of one dimension": (ids[0], mask[0]),
    }


def _error_of(function, *args) -> tuple[type, str]:
    with pytest.raises(Exception) as raised:
        function(*args)
    return type(raised.value), str(raised.value)


def test_onnx_wrapper_refuses_bad_text_with_eagers_exceptions_and_messages(trained):
    """WEAK (ONNX): the text graph returned an embedding for a negative id or a row without end-of-text, where eager
    refuses; an over-long text gave "Gather idx=..."; a mask of another shape an internal broadcast error.
    `OnnxHFClipModel` checks what eager checks, with the same exception types and messages."""
    from hf_clip.export import OnnxHFClipModel

    model, processor, out = trained
    onnx_model = OnnxHFClipModel(out)
    for case, (ids, mask) in _bad_text_inputs(model, processor).items():
        eager = _error_of(model.get_text_features, torch.from_numpy(ids), torch.from_numpy(mask))
        assert _error_of(onnx_model.get_text_features, ids, mask) == eager, case
        assert _error_of(OnnxHFClipModel(out, int8=True).get_text_features, ids, mask) == eager, case


def test_the_text_graph_alone_checks_no_input_value_as_docs_checks_md_says(trained):
    """What docs/checks.md tells callers of the raw graph: a negative id or a row without end-of-text still gives an
    embedding (the caller must check them); an over-long text or a mask of another shape fails inside the graph."""
    model, processor, out = trained
    session = _session(out / "text_model.onnx")
    bad = _bad_text_inputs(model, processor)
    for case in ("negative token id", "row without end-of-text"):
        ids, mask = bad[case]
        assert np.isfinite(session.run(["text_embeds"], {"input_ids": ids, "attention_mask": mask})[0]).all(), case
    for case in ("text longer than the context", "attention_mask shorter than input_ids"):
        ids, mask = bad[case]
        with pytest.raises(Exception, match="onnxruntime|ONNXRuntimeError|Gather|idx|broadcast"):
            session.run(["text_embeds"], {"input_ids": ids, "attention_mask": mask})
    checks = (Path(__file__).parents[1] / "docs" / "checks.md").read_text()
    for stated in ("negative", "end-of-text", "max_position_embeddings", "attention_mask", "OnnxHFClipModel"):
        assert stated in checks, stated


@pytest.mark.parametrize("side", ["right", "left"])
def test_onnx_wrapper_equals_eager_on_good_inputs(trained, side):
    from hf_clip.export import OnnxHFClipModel

    model, processor, out = trained
    onnx_model = OnnxHFClipModel(out)
    inputs = _text_batch(processor, ["red", "a photo of a bright yellow picture", "a green one"], side)
    with torch.no_grad():
        expected = model.get_text_features(**inputs).pooler_output.numpy()
    got = onnx_model.get_text_features(inputs["input_ids"].numpy(), inputs["attention_mask"].numpy())
    np.testing.assert_allclose(got, expected, atol=TOLERANCE, rtol=0)
    if side == "right":  # no mask: every token attended, as in PyTorch
        ids = inputs["input_ids"][1:2]
        with torch.no_grad():
            unmasked = model.get_text_features(input_ids=ids).pooler_output.numpy()
        np.testing.assert_allclose(onnx_model.get_text_features(ids.numpy()), unmasked, atol=TOLERANCE, rtol=0)
    images, _ = _colour_images(3, seed=5)
    pixel_values = processor(images=images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        expected_images = model.get_image_features(pixel_values=pixel_values).pooler_output.numpy()
    np.testing.assert_allclose(onnx_model.get_image_features(pixel_values.numpy()), expected_images,
                               atol=TOLERANCE, rtol=0)
    wrong_size = torch.zeros(1, 3, 32, 32)
    assert _error_of(onnx_model.get_image_features, wrong_size.numpy()) == _error_of(model.get_image_features,
                                                                                      wrong_size)
