import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import CLIPProcessor

import hf_clip.tokenization
from hf_clip import HFClipConfig, HFClipProcessor, to_rgb_image, train_clip_tokenizer

TOKENIZATION_MODULE = Path(hf_clip.tokenization.__file__)

SIZE = 32


@pytest.fixture(scope="module")
def processor(tokenizer):
    return HFClipProcessor.from_tokenizer(tokenizer, image_size=SIZE)


def _png_16bit(path, value: int, size=(7, 5)):
    Image.fromarray(np.full(size[::-1], value, dtype=np.uint16)).save(path)
    return path


def _odd_images(tmp_path):
    """Every kind of input a user might hand the processor."""
    palette = Image.new("P", (20, 10))
    palette.putpalette([255, 0, 0] * 256)
    return {
        "rgb": Image.new("RGB", (40, 30), (10, 200, 30)),
        "grayscale": Image.new("L", (40, 30), 128),
        "rgba": Image.new("RGBA", (40, 30), (255, 0, 0, 128)),
        "palette": palette,
        "cmyk": Image.new("CMYK", (40, 30), (0, 255, 255, 0)),
        "binary": Image.new("1", (9, 9), 1),
        "16-bit png": Image.open(_png_16bit(tmp_path / "deep.png", 40000)),
        "1x1": Image.new("RGB", (1, 1), (1, 2, 3)),
        "huge": Image.new("RGB", (4000, 3000), (9, 9, 9)),
        "very wide": Image.new("RGB", (100_000, 1), (9, 9, 9)),
        "very tall": Image.new("RGB", (2, 50_000), (9, 9, 9)),
        "numpy HWC uint8": np.zeros((30, 40, 3), dtype=np.uint8),
        "numpy HW": np.zeros((30, 40), dtype=np.uint8),
        "numpy CHW float": np.random.rand(3, 30, 40).astype(np.float32),
        "numpy HWC uint16": np.full((30, 40, 3), 65535, dtype=np.uint16),
        "numpy RGBA": np.zeros((30, 40, 4), dtype=np.uint8),
        "tensor CHW": torch.rand(3, 30, 40),
        "tensor 1HW": torch.rand(1, 30, 40),
        "file path": str(_png_16bit(tmp_path / "path.png", 1000)),
    }


def test_every_odd_image_alone_and_batched(processor, tmp_path):
    images = _odd_images(tmp_path)
    for name, image in images.items():
        pixels = processor(images=image, return_tensors="pt")["pixel_values"]
        assert pixels.shape == (1, 3, SIZE, SIZE), name
        assert torch.isfinite(pixels).all(), name
    batch = processor(images=list(images.values()), return_tensors="pt")["pixel_values"]
    assert batch.shape == (len(images), 3, SIZE, SIZE)
    stacked = processor(images=torch.rand(4, 3, 30, 40), return_tensors="pt")["pixel_values"]
    assert stacked.shape == (4, 3, SIZE, SIZE)
    nested = processor(images=[[images["rgb"]], [images["palette"]]], return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(nested, batch[[0, 3]])


def test_conversions_preserve_content(tmp_path):
    assert to_rgb_image(Image.open(_png_16bit(tmp_path / "white.png", 65535))).getpixel((0, 0)) == (255, 255, 255)
    assert to_rgb_image(Image.open(_png_16bit(tmp_path / "mid.png", 32896))).getpixel((0, 0)) == (128, 128, 128)
    half_red = to_rgb_image(Image.new("RGBA", (2, 2), (255, 0, 0, 0)))
    assert half_red.getpixel((0, 0)) == (255, 255, 255)  # fully transparent -> white background
    assert to_rgb_image(Image.new("CMYK", (2, 2), (0, 255, 255, 0))).getpixel((0, 0)) == (255, 0, 0)
    assert to_rgb_image(np.full((2, 2), 1.0)).getpixel((0, 0)) == (255, 255, 255)
    chw = to_rgb_image(torch.zeros(3, 5, 7))
    assert chw.size == (7, 5)
    assert to_rgb_image(Image.new("RGB", (100_000, 2))).size == (32, 2)  # centre part only: the crop keeps no more


@pytest.mark.parametrize(
    "bad, error, message",
    [
        ({"not": "an image"}, TypeError, "Unsupported image type dict"),
        (np.zeros((5, 5, 2), dtype=np.uint8), ValueError, "1, 3 or 4 channels"),
        (np.full((5, 5), 2.0), ValueError, r"\[0, 1\]"),
        (np.full((5, 5), np.nan), ValueError, "finite"),
        (np.zeros((5, 5), dtype=np.int64), ValueError, "dtype int64"),
        (np.zeros((0, 5, 3), dtype=np.uint8), ValueError, "no pixels"),
        ([], ValueError, "empty list"),
    ],
)
def test_bad_images_get_clear_errors(processor, bad, error, message):
    with pytest.raises(error, match=message):
        processor(images=bad)


def test_corrupt_file_names_the_file(processor, tmp_path):
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    with pytest.raises(ValueError, match="corrupt.jpg"):
        processor(images=str(corrupt))
    with pytest.raises(ValueError, match="missing.png"):
        processor(images=str(tmp_path / "missing.png"))


def test_text_encoding_and_errors(processor, tokenizer):
    encoding = processor(text=["a red circle", "a big blue square at the top"], padding=True, return_tensors="pt")
    ids, mask = encoding["input_ids"], encoding["attention_mask"]
    assert ids.shape == mask.shape and ids[0, 0] == tokenizer.bos_token_id
    assert ids[0, mask[0].sum() - 1] == tokenizer.eos_token_id and mask[0, -1] == 0  # right padded
    long = processor(text="red " * 100, truncation=True, return_tensors="pt")["input_ids"]
    assert long.shape[1] == tokenizer.model_max_length and long[0, -1] == tokenizer.eos_token_id
    for truncation in (None, False):
        with pytest.raises(ValueError, match="more than the model's 24; use truncation=True"):
            processor(text="red " * 100, truncation=truncation)
    with pytest.raises(ValueError, match=r"text\[1\] is empty"):
        processor(text=["a red circle", "   "])
    with pytest.raises(TypeError, match=r"text\[0\] is a int"):
        processor(text=[3])
    with pytest.raises(ValueError, match="Pass `text`, `images` or both"):
        processor()


def test_defaults_and_keyword_routing_follow_clip_processor(processor, tokenizer):
    """`CLIPProcessor`'s defaults (no padding, truncation or tensors) and `ProcessingKwargs` routing."""
    clip = CLIPProcessor(image_processor=processor.image_processor, tokenizer=tokenizer)
    texts = ["a red circle", "a big blue square at the top"]
    image = Image.new("RGB", (40, 30), (10, 200, 30))
    ours, theirs = processor(text=texts, images=image), clip(text=texts, images=image)
    assert isinstance(ours["input_ids"], list) and ours["input_ids"] == theirs["input_ids"]
    np.testing.assert_array_equal(np.asarray(ours["pixel_values"]), np.asarray(theirs["pixel_values"]))
    for kwargs in ({"images_kwargs": {"crop_size": {"height": 20, "width": 20}}},
                   {"crop_size": {"height": 20, "width": 20}}):
        pixels = processor(images=image, return_tensors="pt", **kwargs)["pixel_values"]
        assert pixels.shape == (1, 3, 20, 20), kwargs
    assert processor(text=texts, text_kwargs={"max_length": 4, "truncation": True})["input_ids"][1][-1] == (
        tokenizer.eos_token_id
    )
    with pytest.raises(ValueError, match="max_length"):
        processor(text=texts, max_length=4, text_kwargs={"max_length": 5})


def test_to_dict_is_the_same_before_and_after_saving(processor, tmp_path):
    processor.save_pretrained(tmp_path)
    assert HFClipProcessor.from_pretrained(tmp_path).to_dict() == processor.to_dict()


def test_tokenizer_training_is_clip_style(tokenizer):
    assert tokenizer.eos_token_id == len(tokenizer) - 1 and tokenizer.bos_token_id == len(tokenizer) - 2
    assert tokenizer.pad_token == tokenizer.eos_token == "<|endoftext|>"
    assert tokenizer("A RED Circle")["input_ids"] == tokenizer("a red circle")["input_ids"]  # lowercased
    assert tokenizer.decode(tokenizer("a red circle")["input_ids"], skip_special_tokens=True) == "a red circle"
    assert len(tokenizer.tokenize("red")) == 1  # a learned whole-word merge
    unseen = tokenizer("zebra émoji 😀")["input_ids"]  # bytes never seen in training still encode
    assert tokenizer.unk_token_id not in unseen[1:-1]
    config = HFClipConfig.from_preset("tiny", tokenizer=tokenizer)
    assert config.text_config.eos_token_id == tokenizer.eos_token_id


def test_tokenizer_training_rejects_bad_input():
    with pytest.raises(TypeError, match="Caption 1 is a NoneType"):
        train_clip_tokenizer(["a caption", None])
    with pytest.raises(ValueError, match="vocab_size must be at least"):
        train_clip_tokenizer(["a caption"], vocab_size=10)
    with pytest.raises(ValueError, match="No captions"):
        train_clip_tokenizer(iter([]))


@pytest.mark.slow
def test_save_writes_what_auto_classes_need(processor, tmp_path):
    processor.save_pretrained(tmp_path)
    processor_config = json.loads((tmp_path / "processor_config.json").read_text())
    assert processor_config["processor_class"] == "HFClipProcessor"
    assert (tmp_path / "tokenizer.json").exists()
    script = textwrap.dedent(f"""
        import sys
        sys.modules["hf_clip"] = None  # a process that never imports hf_clip
        from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer
        from PIL import Image
        tokenizer = AutoTokenizer.from_pretrained({str(tmp_path)!r})
        image_processor = AutoImageProcessor.from_pretrained({str(tmp_path)!r})
        processor = AutoProcessor.from_pretrained({str(tmp_path)!r}, trust_remote_code=True)
        print(type(tokenizer).__name__, type(image_processor).__name__, type(processor).__name__)
        print(tokenizer("a red circle")["input_ids"])
        print(list(image_processor(Image.new("RGB", (50, 40)), return_tensors="pt")["pixel_values"].shape))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    names, ids, shape = result.stdout.strip().splitlines()[-3:]
    assert names == "CLIPTokenizer CLIPImageProcessor HFClipProcessor"
    assert json.loads(ids) == processor.tokenizer("a red circle")["input_ids"]
    assert json.loads(shape) == [1, 3, SIZE, SIZE]


@pytest.mark.slow
def test_works_without_torchvision(tokenizer, tmp_path):
    """In a process where torchvision cannot be imported, the PIL backend is used with the same results."""
    reference = HFClipProcessor.from_tokenizer(tokenizer, image_size=SIZE)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (50, 40, 3), dtype=np.uint8))
    image.save(tmp_path / "image.png")
    expected = reference(images=image, return_tensors="pt")["pixel_values"]
    reference.save_pretrained(tmp_path / "processor")
    script = textwrap.dedent(f"""
        import sys
        sys.modules["torchvision"] = None
        import torch
        from transformers.utils import is_torchvision_available
        assert not is_torchvision_available()
        from PIL import Image
        from hf_clip import HFClipProcessor
        from safetensors.torch import save_file
        from transformers import AutoProcessor
        fresh = HFClipProcessor.from_tokenizer(AutoProcessor.from_pretrained({str(tmp_path / "processor")!r}).tokenizer,
                                               image_size={SIZE})
        loaded = AutoProcessor.from_pretrained({str(tmp_path / "processor")!r})
        image = Image.open({str(tmp_path / "image.png")!r})
        for processor in (fresh, loaded):
            print(type(processor.image_processor).__name__)
            pixels = processor(images=image, text="a red circle", return_tensors="pt")["pixel_values"]
            save_file({{"pixels": pixels}}, sys.argv[1] + type(processor).__name__)
    """)
    out = str(tmp_path / "pixels_")
    result = subprocess.run([sys.executable, "-c", script, out], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["CLIPImageProcessorPil", "CLIPImageProcessorPil"]
    pixels = load_file(out + "HFClipProcessor")["pixels"]
    # Resampling differs slightly between torchvision and PIL; the pictures must still agree closely.
    assert (pixels - expected).abs().mean() < 0.02


@pytest.mark.slow
def test_tokenizer_training_is_deterministic_across_processes():
    """tokenizers' BpeTrainer breaks merge ties by ids it assigns in hash-map order; ours must not vary."""
    # Each process loads hf_clip/tokenization.py alone (it imports only `tokenizers`, and Transformers when called),
    # not the whole package with torch: the same function at a sixth of the start-up cost.
    script = textwrap.dedent(f"""
        import hashlib
        import importlib.util
        spec = importlib.util.spec_from_file_location("tokenization", {str(TOKENIZATION_MODULE)!r})
        tokenization = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(tokenization)
        train_clip_tokenizer = tokenization.train_clip_tokenizer
        captions = [f"a {{s}} {{c}} {{t}} {{p}}" for s in ("small", "big") for c in ("red", "green", "blue", "white")
                    for t in ("circle", "square", "cross") for p in ("on the left", "at the top")] * 3
        tokenizer = train_clip_tokenizer(captions, vocab_size=700, model_max_length=24)
        print(hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode()).hexdigest())
    """)
    digests = {subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
               for _ in range(6)}
    assert len(digests) == 1 and len(next(iter(digests)).strip()) == 64
