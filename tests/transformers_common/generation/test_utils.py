"""Stand-in for Transformers' `tests/generation/test_utils.py`, which the sdist does not ship.

`ModelTesterMixin` only checks `issubclass(tester, GenerationTesterMixin)` against `model.can_generate()`;
CLIP-style models cannot generate, so their testers must not derive from it.
"""


class GenerationTesterMixin:
    pass
