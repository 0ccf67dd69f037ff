"""The embedded default dataset: procedural scenes with captions that state their attributes.

Each 64×64 image holds one shape with a colour, a size and a position on a noisy background; its captions name
those attributes in several phrasings. It is generated deterministically from a seed, offline, in seconds.

Splits:
- `train`: scenes of the *seen* (colour, shape) compositions.
- `test`: held-out scenes of seen compositions.
- `test_unseen`: scenes of compositions that never appear in training, e.g. a "blue circle" although blue and
  circles each appear with other partners. Zero-shot accuracy here measures compositional generalisation.

The zero-shot task classifies each image into one of the `len(COLORS) × len(SHAPES)` "colour shape" classes
(`CLASS_NAMES`), each prompted with every one of `TEMPLATES`.
"""

import hashlib
import io
from pathlib import Path

import numpy as np
from datasets import ClassLabel, Dataset, DatasetDict, Features, Image, Sequence, Value
from PIL import Image as PILImage
from PIL import ImageDraw

COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (50, 90, 230),
    "yellow": (235, 215, 40),
    "purple": (150, 60, 200),
    "white": (240, 240, 240),
}
SHAPES = ("circle", "square", "triangle", "cross")
SIZES = {"small": (10, 13), "big": (17, 22)}  # half-extent in pixels
POSITIONS = {"on the left": (0.25, 0.5), "on the right": (0.75, 0.5), "at the top": (0.5, 0.25),
             "at the bottom": (0.5, 0.75), "in the middle": (0.5, 0.5)}
UNSEEN_COMPOSITIONS = (("red", "triangle"), ("green", "cross"), ("blue", "circle"), ("yellow", "square"))
CLASS_NAMES = tuple(f"{color} {shape}" for color in COLORS for shape in SHAPES)
IMAGE_SIZE = 64
SOURCE_SHA = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()
DATASET_ID = "hf_clip-embedded-shapes"
TEMPLATES = (
    "a {}.",
    "a photo of a {}.",
    "a small {}.",
    "a big {}.",
    "a {} on the left.",
    "a {} on the right.",
    "a {} at the top.",
    "a {} at the bottom.",
    "a {} in the middle.",
)
"""Zero-shot prompt templates matching the captions, which name a size and a position."""


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, center: tuple[float, float], extent: float, fill) -> None:
    x, y = center
    if shape == "circle":
        draw.ellipse([x - extent, y - extent, x + extent, y + extent], fill=fill)
    elif shape == "square":
        side = extent * 0.9
        draw.rectangle([x - side, y - side, x + side, y + side], fill=fill)
    elif shape == "triangle":
        draw.polygon([(x, y - extent), (x - extent, y + extent * 0.8), (x + extent, y + extent * 0.8)], fill=fill)
    elif shape == "cross":
        arm = extent * 0.35
        draw.rectangle([x - extent, y - arm, x + extent, y + arm], fill=fill)
        draw.rectangle([x - arm, y - extent, x + arm, y + extent], fill=fill)
    else:
        raise ValueError(f"Unknown shape {shape!r}.")


def render_scene(color: str, shape: str, size: str, position: str, rng: np.random.Generator) -> PILImage.Image:
    """One IMAGE_SIZE×IMAGE_SIZE RGB scene; `rng` jitters background, extent, place and colour."""
    level = rng.integers(15, 70)
    background = np.clip(rng.normal(level, 8, (IMAGE_SIZE, IMAGE_SIZE, 3)), 0, 255).astype(np.uint8)
    image = PILImage.fromarray(background)
    low, high = SIZES[size]
    extent = rng.uniform(low, high)
    anchor_x, anchor_y = POSITIONS[position]
    margin = extent + 1
    x = np.clip(anchor_x * IMAGE_SIZE + rng.uniform(-5, 5), margin, IMAGE_SIZE - margin)
    y = np.clip(anchor_y * IMAGE_SIZE + rng.uniform(-5, 5), margin, IMAGE_SIZE - margin)
    fill = tuple(int(np.clip(c + rng.integers(-20, 21), 0, 255)) for c in COLORS[color])
    _draw_shape(ImageDraw.Draw(image), shape, (x, y), extent, fill)
    return image


def captions_for(color: str, shape: str, size: str, position: str) -> list[str]:
    """Several phrasings of the same attributes; training samples one per step."""
    return [
        f"a {size} {color} {shape} {position}",
        f"a {color} {shape} {position}",
        f"{position}, a {size} {color} {shape}",
        f"a photo of a {size} {color} {shape}",
    ]


def _split_rows(compositions: tuple[tuple[str, str], ...], num_samples: int, seed: int, source_sha: str):
    """The rows of one split, shuffled by `seed`; `source_sha` (this module's) only keys `datasets`' cache."""
    rng = np.random.default_rng(seed)
    rows = []
    for index in range(num_samples):
        color, shape = compositions[index % len(compositions)]
        size = ("small", "big")[rng.integers(2)]
        position = tuple(POSITIONS)[rng.integers(len(POSITIONS))]
        buffer = io.BytesIO()
        render_scene(color, shape, size, position, rng).save(buffer, format="PNG")
        rows.append({"image": {"bytes": buffer.getvalue(), "path": None},
                     "caption": captions_for(color, shape, size, position),
                     "label": CLASS_NAMES.index(f"{color} {shape}"), "color": list(COLORS).index(color),
                     "shape": SHAPES.index(shape)})
    for index in rng.permutation(num_samples):
        yield rows[index]


def _split(compositions: list[tuple[str, str]], num_samples: int, seed: int, features: Features) -> Dataset:
    if num_samples == 0:
        return Dataset.from_dict({name: [] for name in features}, features=features)
    # A tuple, not a list: `datasets` would shard a list argument across generator calls.
    return Dataset.from_generator(_split_rows, features=features, gen_kwargs={
        "compositions": tuple(compositions), "num_samples": num_samples, "seed": seed, "source_sha": SOURCE_SHA})


def build_shapes_dataset(num_train: int = 24_000, num_test: int = 1_200, num_unseen: int = 1_200,
                         seed: int = 0) -> DatasetDict:
    """The embedded dataset as a `DatasetDict` with `image` (PNG bytes), `caption` (list of str), `label` (the
    "colour shape" class) and the single attributes `color` and `shape`, all three `ClassLabel`s.

    Each split is rendered once and then read from `datasets`' cache (`HF_DATASETS_CACHE`), keyed by its size, its
    seed and this module's source."""
    seen = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in UNSEEN_COMPOSITIONS]
    features = Features({"image": Image(), "caption": Sequence(Value("string")),
                         "label": ClassLabel(names=list(CLASS_NAMES)), "color": ClassLabel(names=list(COLORS)),
                         "shape": ClassLabel(names=list(SHAPES))})
    return DatasetDict({
        "train": _split(seen, num_train, seed, features),
        "test": _split(seen, num_test, seed + 1, features),
        "test_unseen": _split(list(UNSEEN_COMPOSITIONS), num_unseen, seed + 2, features),
    })


def describe(num_train: int) -> str:
    """One paragraph on the dataset, for the model card."""
    unseen = ", ".join(f"{color} {shape}" for color, shape in UNSEEN_COMPOSITIONS)
    return (
        f"The embedded dataset is generated by `training/synthetic.py`: {IMAGE_SIZE}×{IMAGE_SIZE} scenes of one "
        f"shape ({', '.join(SHAPES)}) in one of {len(COLORS)} colours ({', '.join(COLORS)}), {len(SIZES)} sizes and "
        f"{len(POSITIONS)} positions on a noisy background, with captions that state those attributes "
        f"({num_train} training scenes). The compositions {unseen} never appear in training: split `test` holds "
        "new scenes of seen compositions, split `test_unseen` scenes of the unseen ones. Zero-shot classification "
        f"is over the {len(CLASS_NAMES)} colour-shape classes."
    )


def caption_corpus() -> list[str]:
    """Every caption and zero-shot prompt the dataset can produce, for training its tokenizer."""
    corpus = [caption for c in COLORS for s in SHAPES for z in SIZES for p in POSITIONS
              for caption in captions_for(c, s, z, p)]
    corpus += [template.format(name) for template in TEMPLATES for name in CLASS_NAMES]
    corpus += [f"This is a photo of {name}." for name in CLASS_NAMES]  # the pipeline's default template
    return corpus

