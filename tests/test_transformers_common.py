"""Transformers' own common tests (ModelTesterMixin, ConfigTester, ProcessorTesterMixin) against hf_clip.

The testers mirror the shape of Transformers' CLIP tester: tiny towers (width 32, 2 layers, 4 heads), a 99-token
vocabulary with CLIP's default special ids (49406/49407, outside it), right-padded random attention masks.

The same file runs against Transformers' own CLIP classes to compare counts:
    HF_CLIP_COMMON_FAMILY=transformers pytest tests/test_transformers_common.py
Tests listed in `HARNESS_ONLY` are expected to fail for both families (unittest `expectedFailure`, so an
unexpected pass fails the run); each entry says why.
"""

import functools
import importlib
import os
import sys
import tempfile
import unittest
from pathlib import Path

import numpy as np
import pytest
import torch

COMMON = Path(__file__).resolve().parent / "transformers_common"
if not (COMMON / "test_modeling_common.py").is_file():
    if os.environ.get("HF_CLIP_REQUIRE_COMMON_TESTS"):
        raise RuntimeError(f"{COMMON} lacks the mixins; run `python tests/transformers_common/fetch.py`.")
    pytest.skip(
        "Transformers' common mixins are not extracted; `make install` runs tests/transformers_common/fetch.py.",
        allow_module_level=True,
    )

from transformers_common import fetch_hub_objects_for_ci  # noqa: E402

sys.modules.setdefault("fetch_hub_objects_for_ci", fetch_hub_objects_for_ci)

from transformers import CLIPImageProcessor  # noqa: E402
from transformers_common.test_configuration_common import ConfigTester  # noqa: E402
from transformers_common.test_modeling_common import (  # noqa: E402
    ModelTesterMixin,
    floats_tensor,
    ids_tensor,
    random_attention_mask,
)
from transformers_common.test_processing_common import ProcessorTesterMixin  # noqa: E402

FAMILY = os.environ.get("HF_CLIP_COMMON_FAMILY", "hf_clip")
FAMILIES = {"hf_clip": ("hf_clip", "HFClip"), "transformers": ("transformers", "CLIP")}
if FAMILY not in FAMILIES:
    raise ValueError(f"HF_CLIP_COMMON_FAMILY must be one of {sorted(FAMILIES)}, got {FAMILY!r}.")
_module, _prefix = importlib.import_module(FAMILIES[FAMILY][0]), FAMILIES[FAMILY][1]
Config, TextConfig, VisionConfig = (getattr(_module, _prefix + k) for k in ("Config", "TextConfig", "VisionConfig"))
Model, TextModel, VisionModel = (getattr(_module, _prefix + k) for k in ("Model", "TextModel", "VisionModel"))
TextModelWithProjection = getattr(_module, _prefix + "TextModelWithProjection")
VisionModelWithProjection = getattr(_module, _prefix + "VisionModelWithProjection")
ForImageClassification = getattr(_module, _prefix + "ForImageClassification")
Processor = getattr(_module, _prefix + "Processor")

# Test name -> why it fails for Transformers' CLIP too (checked with HF_CLIP_COMMON_FAMILY=transformers).
HARNESS_ONLY: dict[str, str] = {}

# (test class, test name) -> why it is not run; `*` matches every class. Transformers' CLIP tester skips these too.
SKIPPED: dict[tuple[str, str], str] = {
    ("*", "test_inputs_embeds"): "CLIP's towers take no `inputs_embeds`.",
    ("*", "test_inputs_embeds_matches_input_ids"): "CLIP's towers take no `inputs_embeds`.",
    ("TextModelTest", "test_training"): "The text towers return no loss.",
    ("VisionModelTest", "test_training"): "The vision towers return no loss.",
    ("TextModelTest", "test_training_gradient_checkpointing"): "The text towers return no loss.",
    ("VisionModelTest", "test_training_gradient_checkpointing"): "The vision towers return no loss.",
    ("ModelTest", "test_hidden_states_output"): "The dual model nests tower outputs; tested per tower.",
    ("ModelTest", "test_retain_grad_hidden_states_attentions"): "The dual model nests tower outputs; tested per tower.",
    ("ModelTest", "test_model_get_set_embeddings"): "The dual model has two input embeddings; tested per tower.",
    ("ForImageClassificationTest", "test_model_get_set_embeddings"): "Patch conv input embeddings; tested per tower.",
}
# Skipped only when the family is Transformers' CLIP, because its architecture differs from hf_clip's there.
SKIPPED_FOR_TRANSFORMERS_CLIP: dict[tuple[str, str], str] = {
    ("ForImageClassificationTest", "test_training_gradient_checkpointing"): (
        "CLIPForImageClassification pools the patch tokens, so `post_layernorm` gets no gradient; hf_clip's head "
        "reads the projected, post-LN class token."
    ),
}


# Tests that overwrite a saved model.safetensors on purpose and load it back. Every hf_clip save records its files in
# an integrity manifest, which refuses the altered file (tests/test_saved_manifest.py); so, as its error message tells
# whoever rewrites a saved file on purpose, these tests delete the manifest beside the file they write.
REWRITES_SAVED_WEIGHTS = ("test_model_weights_reload_no_missing_tied_weights",)


def _deleting_the_manifest(test):
    import transformers_common.test_modeling_common as common

    from hf_clip.integrity import MANIFEST_FILE

    @functools.wraps(test)
    def run(self):
        original = common.safe_save_file

        def save_file(tensors, filename, *args, **kwargs):
            Path(filename).with_name(MANIFEST_FILE).unlink(missing_ok=True)
            return original(tensors, filename, *args, **kwargs)

        common.safe_save_file = save_file
        try:
            return test(self)
        finally:
            common.safe_save_file = original

    return run


def _apply_lists(cls: type) -> type:
    """Mark the HARNESS_ONLY tests of `cls` as expected failures and skip the SKIPPED ones, with their reasons; the
    REWRITES_SAVED_WEIGHTS ones delete hf_clip's manifest where they overwrite weights."""
    skipped = {**SKIPPED, **(SKIPPED_FOR_TRANSFORMERS_CLIP if FAMILY == "transformers" else {})}
    for name in dir(cls):
        if not name.startswith("test_"):
            continue
        if name in REWRITES_SAVED_WEIGHTS and FAMILY == "hf_clip":
            setattr(cls, name, _deleting_the_manifest(getattr(cls, name)))
        for (class_name, listed), reason in skipped.items():
            if class_name in ("*", cls.__name__) and (name == listed or name.startswith(listed + "_")):
                setattr(cls, name, unittest.skip(reason)(getattr(cls, name)))
        if name in HARNESS_ONLY:
            setattr(cls, name, unittest.expectedFailure(getattr(cls, name)))
    return cls


class TextTester:
    def __init__(self, parent, batch_size=12, seq_length=7, is_training=True, vocab_size=99, hidden_size=32,
                 projection_dim=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                 attention_dropout=0.1, max_position_embeddings=512, initializer_range=0.02):
        self.parent = parent
        self.batch_size = batch_size
        self.seq_length = seq_length
        self.is_training = is_training
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.projection_dim = projection_dim
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size
        self.attention_dropout = attention_dropout
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range

    def get_config(self):
        return TextConfig(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            projection_dim=self.projection_dim,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            intermediate_size=self.intermediate_size,
            attention_dropout=self.attention_dropout,
            max_position_embeddings=self.max_position_embeddings,
            initializer_range=self.initializer_range,
        )

    def prepare_config_and_inputs(self):
        input_ids = ids_tensor([self.batch_size, self.seq_length], self.vocab_size)
        attention_mask = random_attention_mask([self.batch_size, self.seq_length])
        for row, length in enumerate(np.random.randint(1, self.seq_length - 1, size=(self.batch_size,))):
            attention_mask[row, :length] = 1
            attention_mask[row, length:] = 0
        return self.get_config(), input_ids, attention_mask

    def prepare_config_and_inputs_for_common(self):
        config, input_ids, attention_mask = self.prepare_config_and_inputs()
        return config, {"input_ids": input_ids, "attention_mask": attention_mask}


class VisionTester:
    def __init__(self, parent, batch_size=12, image_size=30, patch_size=2, num_channels=3, is_training=True,
                 hidden_size=32, projection_dim=32, num_hidden_layers=2, num_attention_heads=4,
                 intermediate_size=37, attention_dropout=0.1, initializer_range=0.02):
        self.parent = parent
        self.batch_size = batch_size
        self.image_size = image_size
        self.patch_size = patch_size
        self.num_channels = num_channels
        self.is_training = is_training
        self.hidden_size = hidden_size
        self.projection_dim = projection_dim
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size
        self.attention_dropout = attention_dropout
        self.initializer_range = initializer_range
        self.seq_length = (image_size // patch_size) ** 2 + 1

    def get_config(self):
        return VisionConfig(
            image_size=self.image_size,
            patch_size=self.patch_size,
            num_channels=self.num_channels,
            hidden_size=self.hidden_size,
            projection_dim=self.projection_dim,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            intermediate_size=self.intermediate_size,
            attention_dropout=self.attention_dropout,
            initializer_range=self.initializer_range,
        )

    def prepare_config_and_inputs(self):
        pixel_values = floats_tensor([self.batch_size, self.num_channels, self.image_size, self.image_size])
        return self.get_config(), pixel_values

    def prepare_config_and_inputs_for_common(self):
        config, pixel_values = self.prepare_config_and_inputs()
        return config, {"pixel_values": pixel_values}


class DualTester:
    """Both towers under one `Config`; `return_loss=True` as in Transformers' CLIP tester."""

    def __init__(self, parent, is_training=True):
        self.parent = parent
        self.text_model_tester = TextTester(parent)
        self.vision_model_tester = VisionTester(parent)
        self.batch_size = self.text_model_tester.batch_size
        self.is_training = is_training

    def get_config(self):
        return Config(
            text_config=self.text_model_tester.get_config().to_dict(),
            vision_config=self.vision_model_tester.get_config().to_dict(),
            projection_dim=64,
        )

    def prepare_config_and_inputs_for_common(self):
        _, input_ids, attention_mask = self.text_model_tester.prepare_config_and_inputs()
        _, pixel_values = self.vision_model_tester.prepare_config_and_inputs()
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": pixel_values}
        return self.get_config(), {**inputs, "return_loss": True}


class ImageClassificationTester(DualTester):
    def __init__(self, parent, is_training=True):
        super().__init__(parent, is_training)
        vision = self.vision_model_tester
        self.batch_size, self.seq_length = vision.batch_size, vision.seq_length
        self.hidden_size, self.num_hidden_layers = vision.hidden_size, vision.num_hidden_layers

    def prepare_config_and_inputs_for_common(self):
        _, pixel_values = self.vision_model_tester.prepare_config_and_inputs()
        return self.get_config(), {"pixel_values": pixel_values}


@_apply_lists
class TextModelTest(ModelTesterMixin, unittest.TestCase):
    all_model_classes = (TextModel, TextModelWithProjection)
    model_split_percents = [0.5, 0.8, 0.9]

    def setUp(self):
        self.model_tester = TextTester(self)
        self.config_tester = ConfigTester(self, config_class=TextConfig, hidden_size=37, num_attention_heads=1)

    def test_config(self):
        self.config_tester.run_common_tests()

    def test_model_shapes(self):
        config, input_ids, attention_mask = self.model_tester.prepare_config_and_inputs()
        batch, seq, width = self.model_tester.batch_size, self.model_tester.seq_length, self.model_tester.hidden_size
        with torch.no_grad():
            output = TextModel(config).eval()(input_ids, attention_mask=attention_mask)
            projected = TextModelWithProjection(config).eval()(input_ids, attention_mask=attention_mask)
        self.assertEqual(output.last_hidden_state.shape, (batch, seq, width))
        self.assertEqual(output.pooler_output.shape, (batch, width))
        self.assertEqual(projected.text_embeds.shape, (batch, self.model_tester.projection_dim))


@_apply_lists
class VisionModelTest(ModelTesterMixin, unittest.TestCase):
    all_model_classes = (VisionModel, VisionModelWithProjection)
    test_resize_embeddings = False

    def setUp(self):
        self.model_tester = VisionTester(self)
        self.config_tester = ConfigTester(
            self, config_class=VisionConfig, has_text_modality=False, hidden_size=37, num_attention_heads=1
        )

    def test_config(self):
        self.config_tester.run_common_tests()

    def test_model_get_set_embeddings(self):
        config, _ = self.model_tester.prepare_config_and_inputs_for_common()
        for model_class in self.all_model_classes:
            model = model_class(config)
            self.assertIsInstance(model.get_input_embeddings(), torch.nn.Conv2d)
            self.assertIsNone(model.get_output_embeddings())

    def test_model_shapes(self):
        config, pixel_values = self.model_tester.prepare_config_and_inputs()
        tester = self.model_tester
        with torch.no_grad():
            output = VisionModel(config).eval()(pixel_values)
            projected = VisionModelWithProjection(config).eval()(pixel_values)
        self.assertEqual(output.last_hidden_state.shape, (tester.batch_size, tester.seq_length, tester.hidden_size))
        self.assertEqual(output.pooler_output.shape, (tester.batch_size, tester.hidden_size))
        self.assertEqual(projected.image_embeds.shape, (tester.batch_size, tester.projection_dim))


@_apply_lists
class ModelTest(ModelTesterMixin, unittest.TestCase):
    all_model_classes = (Model,)
    additional_model_inputs = ["pixel_values"]
    test_resize_embeddings = False
    test_attention_outputs = False
    _is_composite = True

    def setUp(self):
        self.model_tester = DualTester(self)
        self.config_tester = ConfigTester(
            self, config_class=Config, has_text_modality=False,
            common_properties=["projection_dim", "logit_scale_init_value"],
        )

    def test_config(self):
        self.config_tester.run_common_tests()

    def test_model_shapes(self):
        config, inputs = self.model_tester.prepare_config_and_inputs_for_common()
        with torch.no_grad():
            output = Model(config).eval()(**inputs)
        batch = self.model_tester.batch_size
        self.assertEqual(output.logits_per_image.shape, (batch, batch))
        self.assertEqual(output.logits_per_text.shape, (batch, batch))
        self.assertEqual(output.loss.shape, ())

    def test_load_vision_text_config(self):
        config, _ = self.model_tester.prepare_config_and_inputs_for_common()
        with tempfile.TemporaryDirectory() as tmp:
            config.save_pretrained(tmp)
            vision_config = VisionConfig.from_pretrained(tmp)
            text_config = TextConfig.from_pretrained(tmp)
        self.assertDictEqual(config.vision_config.to_dict(), vision_config.to_dict())
        self.assertDictEqual(config.text_config.to_dict(), text_config.to_dict())


@_apply_lists
class ForImageClassificationTest(ModelTesterMixin, unittest.TestCase):
    all_model_classes = (ForImageClassification,)
    test_resize_embeddings = False
    test_attention_outputs = False
    _is_composite = True

    def setUp(self):
        self.model_tester = ImageClassificationTester(self)

    def _prepare_for_class(self, inputs_dict, model_class, return_labels=False):
        """Labels come from Transformers' model-name registry, which lists `CLIPForImageClassification` only."""
        inputs_dict = super()._prepare_for_class(inputs_dict, model_class, return_labels=return_labels)
        if return_labels and "labels" not in inputs_dict:
            inputs_dict["labels"] = torch.zeros(self.model_tester.batch_size, dtype=torch.long)
        return inputs_dict


@_apply_lists
class ProcessorTest(ProcessorTesterMixin, unittest.TestCase):
    processor_class = Processor

    @classmethod
    def _setup_tokenizer(cls):
        from conftest import CAPTIONS

        from hf_clip import train_clip_tokenizer

        return train_clip_tokenizer(CAPTIONS, vocab_size=600, model_max_length=77)

    @classmethod
    def _setup_image_processor(cls):
        size = {"shortest_edge": 20}
        crop = {"height": 18, "width": 18}
        return CLIPImageProcessor(size=size, crop_size=crop)
