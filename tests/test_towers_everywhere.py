"""What is built in, on a COMPOSED model (towers that are Transformers backbones, `HFClipModel.
from_vision_text_pretrained`): `transformers.Trainer` fine-tuning (`hf_clip_train.finetune_trainer`), `hf_clip.
push_to_hub` to the tests' Hub-protocol server and back, `hf-clip-index` search against a brute-force cosine search,
and FSDP2 (`accelerate launch --use_fsdp`, auto-wrapping the model's `_no_split_modules`) against DDP."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import hub_env
from hub_workers import model_outputs
from test_hub import assert_bit_identical, local_outputs, run_worker
from tiny_towers import save_text_folder, save_vision_folder
from transformers import AutoModel, AutoProcessor, Trainer

from hf_clip import HFClipModel, HFClipProcessor

PROJECTION_DIM = 16


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, tokenizer) -> dict[str, Path]:
    """Tiny "pretrained" folders: a ViT with its image processor, a BERT with its WordPiece tokenizer."""
    root = tmp_path_factory.mktemp("pretrained")
    return {"vision": save_vision_folder(root, "vit"), "text": save_text_folder(root, "bert", tokenizer)}


@pytest.fixture(scope="module")
def composed(pretrained, tmp_path_factory) -> Path:
    """A ViT + BERT model composed from the pretrained folders, saved with its processor."""
    vision, text = str(pretrained["vision"]), str(pretrained["text"])
    torch.manual_seed(0)
    model = HFClipModel.from_vision_text_pretrained(vision, text, projection_dim=PROJECTION_DIM)
    folder = tmp_path_factory.mktemp("composed")
    model.save_pretrained(folder)
    HFClipProcessor.from_vision_text_pretrained(vision, text).save_pretrained(folder)
    return folder


def test_trainer_fine_tunes_a_composed_model_and_the_saved_folder_gives_the_trained_outputs(composed, tmp_path,
                                                                                           monkeypatch):
    """`hf-clip-finetune` (Trainer) on the composed folder: the weights move, and what it saved reloads with
    `AutoModel` to the trained model's weights and outputs."""
    from conftest import finetune_in_process

    from hf_clip_train import finetune_trainer

    trainers = []

    class RecordingTrainer(Trainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            trainers.append(self)

    monkeypatch.setattr(finetune_trainer, "Trainer", RecordingTrainer)
    out = tmp_path / "finetuned"
    finetune_in_process(["--output_dir", out, "--model_name_or_path", composed, "--embedded_num_train", "64",
                         "--eval_splits", "test", "--max_eval_samples", "16", "--per_device_train_batch_size", "8",
                         "--per_device_eval_batch_size", "16", "--max_steps", "2", "--learning_rate", "1e-2",
                         "--dataloader_num_workers", "0", "--save_strategy", "no", "--report_to", "none",
                         "--use_cpu", "--seed", "0"])
    trained = trainers[0].model.eval()
    assert type(trained) is HFClipModel and trained.config.is_composed

    start = HFClipModel.from_pretrained(composed).state_dict()
    weights = trained.state_dict()
    assert any(not torch.equal(weights[name], start[name]) for name in start if name.startswith("vision_model."))
    assert any(not torch.equal(weights[name], start[name]) for name in start if name.startswith("text_model."))

    reloaded = AutoModel.from_pretrained(out).eval()
    assert type(reloaded) is HFClipModel
    reloaded_weights = reloaded.state_dict()
    assert set(reloaded_weights) == set(weights)
    for name, tensor in weights.items():
        assert torch.equal(reloaded_weights[name], tensor), name
    processor = AutoProcessor.from_pretrained(out)
    expected, got = model_outputs(trained, processor), model_outputs(reloaded, processor)
    for name, tensor in expected.items():
        torch.testing.assert_close(got[name], tensor, atol=1e-6, rtol=0, msg=name)


def test_push_to_hub_of_a_composed_model_pulls_back_equal_and_its_card_names_the_towers(hub_server, composed,
                                                                                        pretrained, tmp_path):
    """`hf_clip.push_to_hub` (model and processor) to the local Hub server, then `AutoModel` / `AutoProcessor` in a
    fresh process and cache: the same weights and outputs. The card's tower table names each backbone family and
    its source as "local model NAME", and no pushed file holds a local path."""
    run_worker("push", {"checkpoint": str(composed), "repo_id": "composed-clip"},
               hub_env(hub_server, tmp_path / "hf_home_push"))
    files = hub_server.hub.repos["alice/composed-clip"].history("main")[0].files
    card = files["README.md"].decode()
    assert "`vit`" in card and "`bert`" in card
    assert "`local model vision-vit`" in card and "`local model text-bert`" in card
    for name, content in files.items():
        for folder in (pretrained["vision"], pretrained["text"], composed):
            assert str(folder).encode() not in content, (name, folder)
    config = json.loads(files["config.json"])
    assert (config["vision_config"]["model_type"], config["text_config"]["model_type"]) == ("vit", "bert")
    assert config["tower_sources"]["vision"]["name_or_path"] == "local model vision-vit"

    report = run_worker("pull", {"repo_id": "alice/composed-clip", "out": str(tmp_path / "pulled.safetensors")},
                        hub_env(hub_server, tmp_path / "hf_home_pull"))
    assert report["model_class"] == "hf_clip.modeling_hf_clip.HFClipModel"
    assert report["processor_class"] == "HFClipProcessor"
    assert_bit_identical(local_outputs(composed), tmp_path / "pulled.safetensors")


def test_search_index_of_a_composed_model_returns_the_brute_force_cosine_top_k(composed, tmp_path):
    """`hf-clip-index` on 40 scenes of the embedded dataset with the composed folder; a text query's top 8 are a
    brute-force cosine search's over the model's own `get_image_features` / `get_text_features`."""
    from accelerate import PartialState

    from hf_clip_train.data import _embedded_dataset, image_transform_for
    from hf_clip_train.search import ImageTextIndex, index_main

    num_rows, k = 40, 8
    try:
        index_main(["--model_name_or_path", str(composed), "--output_dir", str(tmp_path / "index"),
                    "--train_split", "test", "--embedded_num_train", "0", "--max_train_samples", str(num_rows),
                    "--caption_column", "caption", "--keep_columns", "label", "--dataloader_num_workers", "0"])
    finally:
        PartialState._reset_state()
    index = ImageTextIndex.load(tmp_path / "index")
    assert len(index) == num_rows
    result = index.search("a red circle", k=k)

    model, processor = HFClipModel.from_pretrained(composed).eval(), AutoProcessor.from_pretrained(composed)
    transform = image_transform_for(processor, train=False)
    images = _embedded_dataset(0)["test"].select(range(num_rows))["image"]
    with torch.no_grad():
        image_embeds = F.normalize(model.get_image_features(
            pixel_values=torch.stack([transform(image) for image in images])).pooler_output, dim=-1)
        tokens = processor.tokenizer(["a red circle"], return_tensors="pt")
        text_embeds = F.normalize(model.get_text_features(
            input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]).pooler_output, dim=-1)
    scores, rows = (text_embeds @ image_embeds.T)[0].topk(k)
    assert result.row_ids == rows.tolist()
    torch.testing.assert_close(torch.tensor(result.scores), scores, atol=1e-5, rtol=0)


def _transformer_wrap_policy(model):
    """Accelerate's FSDP2 auto-wrap policy for `model` as `--fsdp_auto_wrap_policy TRANSFORMER_BASED_WRAP` without
    `--fsdp_transformer_layer_cls_to_wrap` builds it: from the model's `_no_split_modules`."""
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy

    plugin = FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="TRANSFORMER_BASED_WRAP")
    return fsdp2_prepare_auto_wrap_policy(plugin, model)


def test_fsdp_auto_wrap_puts_each_backbone_block_of_a_composed_model_in_its_own_group(composed, pretrained,
                                                                                      tokenizer):
    """`_no_split_modules` names the block classes the model holds: a composed ViT + BERT model's layers and the
    ViT's embeddings (Accelerate refuses a name it cannot find, as it did the built-in `HFClipEncoderLayer` here),
    not the module holding the token embedding (Accelerate shards that embedding as a unit of its own, which fails
    inside a sharded `BertEmbeddings`); a built-in text tower beside a ViT keeps its `HFClipEncoderLayer`, and a
    model of built-in towers keeps Transformers CLIP's list."""
    model = HFClipModel.from_pretrained(composed)
    assert model._no_split_modules == {"ViTEmbeddings", "ViTLayer", "BertLayer"}
    policy = _transformer_wrap_policy(model)
    wrapped = {name for name, module in model.named_modules() if policy(module)}
    assert wrapped == {"vision_model.embeddings", "vision_model.layers.0", "text_model.encoder.layer.0"}

    from hf_clip import HFClipConfig

    config = HFClipConfig.from_pretrained(composed)
    builtin_text = HFClipConfig.from_preset("tiny", tokenizer=tokenizer, projection_dim=PROJECTION_DIM,
                                            text_config={"hidden_size": 32, "intermediate_size": 64,
                                                         "num_hidden_layers": 1, "num_attention_heads": 2})
    config.text_config = builtin_text.text_config
    mixed = HFClipModel(config)
    assert mixed._no_split_modules == {"ViTEmbeddings", "ViTLayer", "HFClipEncoderLayer"}
    wrapped = {name for name, module in mixed.named_modules() if _transformer_wrap_policy(mixed)(module)}
    assert "text_model.encoder.layers.0" in wrapped and "vision_model.layers.0" in wrapped

    builtin = HFClipModel(builtin_text)  # built-in towers keep Transformers CLIP's list, which device_map relies on
    assert set(builtin._no_split_modules) == {"HFClipTextEmbeddings", "HFClipEncoderLayer", "HFClipVisionEmbeddings"}


def _accelerate_fsdp2_wrapping_no_split_modules() -> list[str]:
    """test_fsdp's launch command without `--fsdp_transformer_layer_cls_to_wrap`: Accelerate wraps the classes of
    the model's `_no_split_modules`, as for any Transformers model."""
    from test_fsdp import _accelerate_fsdp2

    launcher = list(_accelerate_fsdp2())
    at = launcher.index("--fsdp_transformer_layer_cls_to_wrap")
    del launcher[at:at + 2]
    return launcher


@pytest.mark.slow
def test_fsdp2_lit_run_of_a_composed_model_trains_like_ddp_and_saves_a_folder_that_loads(pretrained, tmp_path):
    """`accelerate launch --use_fsdp --fsdp_version 2` on 2 CPU processes, LiT on a composed ViT + BERT model for 3
    steps of 8 rows each, against 2 DDP ranks (torchrun): the same losses, the same trained weights; the locked ViT
    is saved bit-identical to the pretrained folder, and the folder loads with `AutoModel`."""
    from test_training_run import _launch, _losses, _torchrun

    towers = ["--vision_model_name_or_path", str(pretrained["vision"]), "--text_model_name_or_path",
              str(pretrained["text"]), "--projection_dim", str(PROJECTION_DIM), "--lock_image", "--max_steps", "3",
              "--per_device_train_batch_size", "8", "--eval_splits", "none", "--seed", "0"]
    sharded, data_parallel = tmp_path / "fsdp", tmp_path / "ddp"
    result = _launch(sharded, *towers, launcher=_accelerate_fsdp2_wrapping_no_split_modules())
    assert "2 process(es)" in result.stderr
    _launch(data_parallel, *towers, launcher=_torchrun())

    sharded_losses = _losses(sharded)
    assert sorted(sharded_losses) == [1, 2, 3]
    assert sharded_losses == pytest.approx(_losses(data_parallel), abs=1e-6)

    reloaded = AutoModel.from_pretrained(sharded)
    assert type(reloaded) is HFClipModel and reloaded.config.is_composed
    weights, reference = reloaded.state_dict(), AutoModel.from_pretrained(data_parallel).state_dict()
    assert set(weights) == set(reference)
    for name, tensor in reference.items():
        torch.testing.assert_close(weights[name], tensor, atol=1e-6, rtol=0, msg=name)
    for name, tensor in AutoModel.from_pretrained(pretrained["vision"]).state_dict().items():
        assert torch.equal(weights[f"vision_model.{name}"], tensor), name
    start = HFClipModel.from_vision_text_pretrained(str(pretrained["vision"]), str(pretrained["text"]),
                                                    projection_dim=PROJECTION_DIM)
    assert any(not torch.equal(weights[name], tensor) for name, tensor in start.state_dict().items()
               if name.startswith("text_model."))
