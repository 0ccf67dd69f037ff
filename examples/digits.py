"""A small real captioned dataset: scikit-learn's handwritten digits (1,797 scans of 10 classes), upscaled to 32×32.

    pip install scikit-learn
    python examples/digits.py outputs/digits-data           # save_to_disk: splits `train` (1,438) and `test` (359)
    python -m hf_clip_train.train --dataset_name outputs/digits-data --output_dir outputs/digits --max_steps 400

Each image gets captions that name its digit in a few phrasings ("a handwritten seven", "the digit 7", ...); the
`label` column is a `ClassLabel` of the digits' names, which zero-shot evaluation prompts with
`hf_clip.PHOTO_TEMPLATES`. The split is stratified and seeded: `test` holds a fifth of each digit's scans (35 to 37).
"""

import argparse

import numpy as np
from datasets import ClassLabel, Dataset, DatasetDict, Features, Image, Sequence, Value
from PIL import Image as PILImage

NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
IMAGE_SIZE = 32


def captions_for(digit: int) -> list[str]:
    name = NAMES[digit]
    return [f"a handwritten {name}", f"the digit {digit}", f"a scan of the number {name}",
            f"a photo of a {name}", f"{name}, written by hand"]


def build_digits_dataset(test_fraction: float = 0.2, seed: int = 0) -> DatasetDict:
    """`train` and `test` splits with `image` (32×32 grayscale PIL images), `caption` (list of str) and `label`."""
    from sklearn.datasets import load_digits  # the one dependency beyond hf_clip's own

    digits = load_digits()
    rng = np.random.default_rng(seed)
    test_rows = np.concatenate([rng.permutation(np.flatnonzero(digits.target == digit))[
        :round(test_fraction * np.sum(digits.target == digit))] for digit in range(len(NAMES))])
    is_test = np.zeros(len(digits.target), dtype=bool)
    is_test[test_rows] = True
    features = Features({"image": Image(), "caption": Sequence(Value("string")),
                         "label": ClassLabel(names=list(NAMES))})

    def split(rows: np.ndarray) -> Dataset:
        rows = rng.permutation(rows)
        images = [PILImage.fromarray((digits.images[i] * (255 / 16)).astype(np.uint8))
                  .resize((IMAGE_SIZE, IMAGE_SIZE), PILImage.Resampling.BICUBIC) for i in rows]
        return Dataset.from_dict({"image": images, "caption": [captions_for(int(digits.target[i])) for i in rows],
                                  "label": [int(digits.target[i]) for i in rows]}, features=features)

    return DatasetDict({"train": split(np.flatnonzero(~is_test)), "test": split(np.flatnonzero(is_test))})


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output_dir", help="Where to save the DatasetDict (datasets.load_from_disk reads it back).")
    build_digits_dataset().save_to_disk(parser.parse_args().output_dir)
