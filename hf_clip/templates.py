"""Prompt templates for zero-shot classification: each holds one `{}` for the class name.

A class is represented by the ensemble of its prompts (see `hf_clip.zero_shot.zero_shot_classifier`); pass your own
list of templates wherever these are accepted.
"""

PHOTO_TEMPLATES = ("a photo of a {}.", "a picture of a {}.", "an image of a {}.", "a close-up photo of a {}.")
"""General photographs."""

__all__ = ["PHOTO_TEMPLATES"]
