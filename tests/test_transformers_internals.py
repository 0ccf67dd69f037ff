"""The Transformers internals hf_clip still overrides, each pinned by the Transformers behaviour it depends on, and
the behaviours that let it drop its other overrides.

If a test named `test_*_override_needed_while_*` fails after a Transformers upgrade, the behaviour it names has
changed: the override it pins may no longer be needed (or may need rework).

Overrides that remain:
- `HFClipPreTrainedModel.from_pretrained`: safetensors only by default, with hf_clip's messages;
- `HFClipPreTrainedModel.save_pretrained`: writes (or refreshes) the folder's integrity manifest after saving;
- `HFClipPreTrainedModel._initialize_weights`: runs the OpenAI init on every module of custom code;
- `HFClipPreTrainedModel._load_pretrained_model`: checks the weight files against their folder's manifest first;
- `HFClipProcessor.save_pretrained`: keeps the remote-code `auto_map` out of the image processor.
`HFClipPreTrainedModel.save_pretrained` no longer writes the `auto_map` (the config carries it, and a model's saved
code carries the processor's module); it only adds the manifest.
"""

import json

import pytest
import torch
from conftest import write_pickle_bomb
from transformers import AutoImageProcessor, CLIPModel, CLIPProcessor, PreTrainedModel
from transformers.dynamic_module_utils import custom_object_save, get_relative_imports
from transformers.processing_utils import ProcessorMixin

import hf_clip.modeling_hf_clip
from hf_clip import HFClipConfig, HFClipModel, HFClipProcessor, HFClipTextModel
from hf_clip.configuration_hf_clip import REMOTE_CODE_AUTO_MAP
from hf_clip.convert import transformers_from_hf_clip
from hf_clip.integrity import MANIFEST_FILE, CorruptFileError, read_manifest, sha256_of, write_manifest
from hf_clip.modeling_hf_clip import HFClipAttention, HFClipPreTrainedModel


def test_from_pretrained_override_needed_while_transformers_falls_back_to_pickled_weights(tmp_path, tiny_config):
    """Without `use_safetensors`, Transformers reads `pytorch_model.bin` when a folder has no safetensors; hf_clip's
    override makes safetensors the default, so a pickle is never read unless asked for."""
    clip = transformers_from_hf_clip(HFClipModel(tiny_config))
    clip.config.save_pretrained(tmp_path)
    torch.save(clip.state_dict(), tmp_path / "pytorch_model.bin")
    assert isinstance(CLIPModel.from_pretrained(tmp_path), CLIPModel)  # the behaviour the override guards against

    bomb = tmp_path / "bomb"
    HFClipModel(tiny_config).config.save_pretrained(bomb)
    write_pickle_bomb(bomb / "pytorch_model.bin", bomb / "UNPICKLED")
    with pytest.raises(OSError, match=r"only pytorch_model.bin .*use_safetensors=False"):
        HFClipModel.from_pretrained(bomb)
    assert not (bomb / "UNPICKLED").exists()


def test_from_pretrained_override_needed_while_transformers_raises_oserror_for_missing_safetensors(tmp_path,
                                                                                                  tiny_config):
    """The override's explanation replaces Transformers' `OSError` for `use_safetensors=True` without the file."""
    HFClipModel(tiny_config).config.save_pretrained(tmp_path)
    with pytest.raises(OSError) as raised:
        PreTrainedModel.from_pretrained.__func__(HFClipModel, tmp_path, use_safetensors=True)
    assert str(raised.value) == f"Error no file named model.safetensors found in directory {tmp_path}."


def test_save_pretrained_override_needed_while_transformers_writes_no_manifest_and_keeps_a_stale_one(tmp_path,
                                                                                                    tiny_config):
    """`PreTrainedModel.save_pretrained` writes the weights and config and leaves every other file of the folder as it
    was: no manifest in a new folder, and an earlier manifest, now stale, in a re-saved one (from_pretrained would
    then report damage). hf_clip's override writes the manifest after every save."""
    model = HFClipModel(tiny_config)
    PreTrainedModel.save_pretrained(model, tmp_path / "plain")
    assert not (tmp_path / "plain" / MANIFEST_FILE).exists()

    model.save_pretrained(tmp_path / "resaved")
    recorded = read_manifest(tmp_path / "resaved")["model.safetensors"]["sha256"]
    with torch.no_grad():
        model.logit_scale.add_(1.0)
    PreTrainedModel.save_pretrained(model, tmp_path / "resaved")
    assert read_manifest(tmp_path / "resaved")["model.safetensors"]["sha256"] == recorded  # stale
    assert sha256_of(tmp_path / "resaved" / "model.safetensors") != recorded
    model.save_pretrained(tmp_path / "resaved")
    assert read_manifest(tmp_path / "resaved")["model.safetensors"]["sha256"] == sha256_of(
        tmp_path / "resaved" / "model.safetensors")


def test_load_pretrained_model_override_needed_while_transformers_reads_altered_weights_without_a_check(tmp_path,
                                                                                                     tiny_config):
    """`from_pretrained` hands the resolved weight files to `cls._load_pretrained_model(model, state_dict,
    checkpoint_files, load_config, ...)`, and Transformers' own loading reads a weights file whose bytes changed
    since it was saved without noticing; hf_clip's override checks the files against the folder's manifest first."""
    model = HFClipModel(tiny_config)
    model.save_pretrained(tmp_path)
    write_manifest(tmp_path, ["model.safetensors", "config.json"])
    weights = tmp_path / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # a byte of the last tensor: the header still parses
    weights.write_bytes(bytes(data))

    handed = []

    class TransformersLoading(HFClipModel):
        @staticmethod
        def _load_pretrained_model(model, state_dict, checkpoint_files, load_config, *args, **kwargs):
            handed.append([str(path) for path in checkpoint_files])
            return PreTrainedModel._load_pretrained_model(model, state_dict, checkpoint_files, load_config, *args,
                                                          **kwargs)

    loaded = TransformersLoading.from_pretrained(tmp_path)  # the behaviour the override guards against
    assert handed == [[str(weights)]]
    assert any(not torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
    with pytest.raises(CorruptFileError, match="model.safetensors"):
        HFClipModel.from_pretrained(tmp_path)


def test_initialize_weights_override_needed_while_transformers_skips_parameterless_modules_of_custom_code(
        tiny_config):
    """For custom code, `PreTrainedModel._initialize_weights` skips a module whose own (non-recursive) parameters
    are all initialised, which holds vacuously for a module with none, such as `HFClipAttention`, whose init sets
    its q/k/v/out projections. hf_clip's override initialises every module."""
    model = HFClipTextModel(tiny_config.text_config)
    attention = model.encoder.layers[0].self_attn
    assert isinstance(attention, HFClipAttention) and not list(attention.parameters(recurse=False))
    assert model.is_custom_code()
    seen = []
    model._init_weights = seen.append
    for initialize in (PreTrainedModel._initialize_weights, HFClipPreTrainedModel._initialize_weights):
        attention.__dict__.pop("_is_hf_initialized", None)
        initialize(model, attention, is_custom_code=True)
    assert seen == [attention]  # skipped by Transformers, initialised by hf_clip


def test_processor_save_override_needed_while_processor_mixin_writes_auto_map_into_the_image_processor(tokenizer,
                                                                                                      tmp_path):
    processor = HFClipProcessor.from_tokenizer(tokenizer, image_size=32)
    ProcessorMixin.save_pretrained(processor, tmp_path / "mixin")
    assert processor.image_processor.auto_map == {"AutoProcessor": "processing_hf_clip.HFClipProcessor"}
    saved = json.loads((tmp_path / "mixin" / "processor_config.json").read_text())
    assert "auto_map" in saved["image_processor"]

    processor = HFClipProcessor.from_tokenizer(tokenizer, image_size=32)
    processor.save_pretrained(tmp_path / "hf_clip")
    assert "auto_map" not in processor.image_processor.to_dict() and "auto_map" not in processor.to_dict()
    saved = json.loads((tmp_path / "hf_clip" / "processor_config.json").read_text())
    assert saved["auto_map"] == {"AutoProcessor": "processing_hf_clip.HFClipProcessor"}
    assert "auto_map" not in saved["image_processor"]
    tokenizer_config = json.loads((tmp_path / "hf_clip" / "tokenizer_config.json").read_text())
    assert tokenizer_config["auto_map"] == {"AutoProcessor": "processing_hf_clip.HFClipProcessor"}


def test_custom_object_save_keeps_the_configs_auto_map_so_no_model_save_override_is_needed(tmp_path, tiny_config):
    """`custom_object_save` adds the class's own auto class to an existing `config.auto_map`; the config carries
    every other entry, so `PreTrainedModel.save_pretrained` writes all of them."""
    config = HFClipConfig.from_dict(tiny_config.to_dict())
    assert config.auto_map == REMOTE_CODE_AUTO_MAP
    config.auto_map = {"AutoModelForZeroShotImageClassification": "modeling_hf_clip.HFClipModel"}
    custom_object_save(HFClipModel(tiny_config), tmp_path, config=config)
    assert config.auto_map == {"AutoModelForZeroShotImageClassification": "modeling_hf_clip.HFClipModel",
                               "AutoModel": "modeling_hf_clip.HFClipModel"}


def test_relative_imports_decide_which_modules_travel_with_a_saved_model(tmp_path, tiny_config):
    """`get_relative_imports` finds `from .x import` lines by regex; the model module's import of the processor
    module is what puts `processing_hf_clip.py` beside every saved model (and its import of `integrity`, which
    checks loaded files against their manifest, puts `integrity.py` there; its import of `towers`, the composed
    towers, puts `towers.py` there)."""
    assert "processing_hf_clip" in get_relative_imports(hf_clip.modeling_hf_clip.__file__)
    HFClipModel(tiny_config).save_pretrained(tmp_path)
    assert {path.name for path in tmp_path.glob("*.py")} == {
        "configuration_hf_clip.py", "modeling_hf_clip.py", "loss.py", "processing_hf_clip.py", "integrity.py",
        "towers.py"}
    assert json.loads((tmp_path / "config.json").read_text())["auto_map"] == REMOTE_CODE_AUTO_MAP


def test_config_keeps_the_auto_map_entries_it_was_loaded_with(tiny_config):
    config_dict = {**tiny_config.to_dict(), "auto_map": {"AutoModel": "alice/clip--modeling_hf_clip.HFClipModel"}}
    config = HFClipConfig.from_dict(config_dict)
    assert config.auto_map == {**REMOTE_CODE_AUTO_MAP, "AutoModel": "alice/clip--modeling_hf_clip.HFClipModel"}


def test_model_input_names_equal_clip_processors(tokenizer):
    processor = HFClipProcessor.from_tokenizer(tokenizer, image_size=32)
    clip_processor = CLIPProcessor(image_processor=processor.image_processor, tokenizer=processor.tokenizer)
    assert processor.model_input_names == clip_processor.model_input_names == [
        "pixel_values", "input_ids", "attention_mask"]


def test_image_processor_saved_and_loaded_back_equals_the_original(tokenizer, tmp_path):
    processor = HFClipProcessor.from_tokenizer(tokenizer, image_size=32)
    original = processor.image_processor.to_dict()
    processor.save_pretrained(tmp_path)
    assert processor.image_processor.to_dict() == original
    assert AutoImageProcessor.from_pretrained(tmp_path).to_dict() == original
    assert HFClipProcessor.from_pretrained(tmp_path).image_processor.to_dict() == original
    assert HFClipProcessor.from_pretrained(tmp_path).to_dict() == processor.to_dict()
