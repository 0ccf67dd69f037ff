"""Every save by an hf_clip model writes or refreshes its folder's integrity manifest (`hf_clip.integrity`), so altered
weight bytes in any saved folder are refused at load, and re-saving over a folder never leaves a stale manifest."""

import json

import pytest
import torch
from safetensors.torch import load_file

from hf_clip import HFClipForImageClassification, HFClipModel, HFClipTextModelWithProjection
from hf_clip.integrity import MANIFEST_FILE, CorruptFileError, sha256_of, write_manifest


def _flip_a_tensor_byte(path) -> None:
    """Flips a byte of the last tensor's data: the safetensors header still parses, the weights load wrong."""
    weights = bytearray(path.read_bytes())
    weights[-100] ^= 0xFF
    path.write_bytes(bytes(weights))


def test_plain_save_pretrained_folder_with_altered_tensor_bytes_is_refused_at_load(tiny_config, tmp_path):
    """WEAK (load): a folder written by plain `save_pretrained` had no manifest, so altered bytes loaded silently."""
    HFClipModel(tiny_config).save_pretrained(tmp_path)
    manifest = json.loads((tmp_path / MANIFEST_FILE).read_text())["files"]
    assert sorted(manifest) == ["config.json", "model.safetensors"]
    assert manifest["model.safetensors"]["sha256"] == sha256_of(tmp_path / "model.safetensors")
    HFClipModel.from_pretrained(tmp_path)

    _flip_a_tensor_byte(tmp_path / "model.safetensors")
    with pytest.raises(CorruptFileError, match=r"model.safetensors does not match its saved SHA-256"):
        HFClipModel.from_pretrained(tmp_path)


def test_resaving_over_a_training_folder_refreshes_its_manifest(tiny_config, tmp_path):
    """WEAK (load): re-saving over a folder that training had saved left its manifest stale, and the next load
    reported damage."""
    torch.manual_seed(0)
    trained = HFClipModel(tiny_config)
    trained.save_pretrained(tmp_path)
    write_manifest(tmp_path, ["model.safetensors", "config.json"])  # as hf_clip_train's save does
    finetuned = HFClipModel.from_pretrained(tmp_path)
    with torch.no_grad():
        finetuned.text_projection.weight.mul_(2)
    finetuned.config.logit_scale_max = 50.0
    finetuned.save_pretrained(tmp_path)

    reloaded = HFClipModel.from_pretrained(tmp_path)
    torch.testing.assert_close(reloaded.text_projection.weight, finetuned.text_projection.weight, rtol=0, atol=0)
    assert reloaded.config.logit_scale_max == 50.0
    files = json.loads((tmp_path / MANIFEST_FILE).read_text())["files"]
    assert files["config.json"]["sha256"] == sha256_of(tmp_path / "config.json")


def test_sharded_save_records_every_shard_and_refuses_an_altered_one(tiny_config, tmp_path):
    HFClipModel(tiny_config).save_pretrained(tmp_path, max_shard_size="200KB")
    shards = sorted(path.name for path in tmp_path.glob("model-*.safetensors"))
    assert len(shards) > 1
    files = json.loads((tmp_path / MANIFEST_FILE).read_text())["files"]
    assert sorted(files) == sorted(["config.json", "model.safetensors.index.json", *shards])
    HFClipModel.from_pretrained(tmp_path)
    _flip_a_tensor_byte(tmp_path / shards[-1])
    with pytest.raises(CorruptFileError, match=f"{shards[-1]} does not match its saved SHA-256"):
        HFClipModel.from_pretrained(tmp_path)


@pytest.mark.parametrize("model_class", [HFClipForImageClassification, HFClipTextModelWithProjection])
def test_every_hf_clip_model_class_writes_the_manifest(model_class, tiny_config, tmp_path):
    config = tiny_config.text_config if model_class is HFClipTextModelWithProjection else tiny_config
    model_class(config).save_pretrained(tmp_path)
    _flip_a_tensor_byte(tmp_path / "model.safetensors")
    with pytest.raises(CorruptFileError, match="model.safetensors does not match its saved SHA-256"):
        model_class.from_pretrained(tmp_path)


def test_a_save_on_another_process_than_the_main_one_writes_no_manifest(tiny_config, tmp_path):
    HFClipModel(tiny_config).save_pretrained(tmp_path, is_main_process=False)
    assert not (tmp_path / MANIFEST_FILE).exists()


def test_saving_a_given_state_dict_records_the_weights_written(tiny_config, tmp_path):
    model = HFClipModel(tiny_config)
    state_dict = {name: tensor * 0 + 1 for name, tensor in model.state_dict().items()}
    model.save_pretrained(tmp_path, state_dict=state_dict)
    assert torch.equal(load_file(tmp_path / "model.safetensors")["logit_scale"], torch.tensor(1.0))
    HFClipModel.from_pretrained(tmp_path)  # the manifest describes the bytes that were written
