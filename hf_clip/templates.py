"""Prompt templates for zero-shot classification: each holds one `{}` for the class name.

A class is represented by the ensemble of its prompts (see `hf_clip.zero_shot.zero_shot_classifier`); pass your own
list of templates wherever these are accepted.
"""

PHOTO_TEMPLATES = ("a photo of a {}.", "a picture of a {}.", "an image of a {}.", "a close-up photo of a {}.")
"""General photographs."""

SHAPES_TEMPLATES = (
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
"""The embedded shapes dataset of `training.synthetic`, whose captions name a size and a position."""

__all__ = ["PHOTO_TEMPLATES", "SHAPES_TEMPLATES"]
