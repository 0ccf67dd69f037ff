"""Composed towers: hf_clip models built from Transformers vision and text backbones of every family, against
Transformers' `VisionTextDualEncoderModel` and `SiglipModel` with the same weights (to 1e-5), trained a step, saved,
reloaded, and used by the zero-shot pipeline and remote code without hf_clip."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hub_workers import LABELS, probe_image
from huggingface_hub.errors import StrictDataclassClassValidationError
from safetensors.torch import load_file
from tiny_towers import (
    CONTEXT,
    TEXT_FAMILIES,
    VISION_FAMILIES,
    save_text_folder,
    save_vision_folder,
    text_config,
    vision_config,
)
from transformers import (
    AutoModel,
    AutoProcessor,
    SiglipConfig,
    SiglipModel,
    SiglipTextModel,
    VisionTextDualEncoderModel,
    pipeline,
)

from hf_clip import HFClipConfig, HFClipModel, HFClipProcessor, grad_cache_backward, match_special_tokens
from hf_clip.convert import export_dual_encoder, transformers_from_composed

REPO = Path(__file__).resolve().parents[1]
PROJECTION_DIM = 16
TEXTS = [f"a photo of a {label}" for label in LABELS]
# The families whose `AutoModel` a VisionTextDualEncoderModel can hold: it pools with `pooler_output`.
DUAL_ENCODER_TEXT = ("bert", "roberta", "xlm-roberta", "clip_text_model")
ALL_PAIRS = [(vision, "bert") for vision in VISION_FAMILIES] + [("vit", text) for text in TEXT_FAMILIES[1:]]


@pytest.fixture(scope="module")
def folders(tmp_path_factory, tokenizer):
    """{family: saved pretrained folder}, made on first use."""
    root = tmp_path_factory.mktemp("towers")
    saved = {}

    def folder(family: str) -> Path:
        if family not in saved:
            saved[family] = (save_vision_folder(root, family) if family in VISION_FAMILIES
                             else save_text_folder(root, family, tokenizer))
        return saved[family]

    return folder


def _batch(processor, n: int = len(LABELS), seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    images = [torch.rand(3, 20, 24, generator=generator) for _ in range(n)]
    padding = "max_length" if "siglip" in type(processor.tokenizer).__name__.lower() else True
    return dict(processor(text=TEXTS[:n], images=images, padding=padding, truncation=True, max_length=CONTEXT,
                          return_tensors="pt"))


def _compose(folders, vision: str, text: str, **kwargs) -> tuple[HFClipModel, HFClipProcessor]:
    torch.manual_seed(1)
    model = HFClipModel.from_vision_text_pretrained(str(folders(vision)), str(folders(text)),
                                                    projection_dim=PROJECTION_DIM, **kwargs)
    return model.eval(), HFClipProcessor.from_vision_text_pretrained(str(folders(vision)), str(folders(text)))


def _reference(model: HFClipModel, vision_folder: Path, text_folder: Path):
    """Transformers' model with the towers from the same folders and `model`'s projections and temperature, and
    a function giving its text and image embeddings."""
    text_family = model.config.text_config.model_type
    if text_family in DUAL_ENCODER_TEXT and model.config.vision_config.model_type != "convnext":
        reference = VisionTextDualEncoderModel.from_vision_text_pretrained(
            str(vision_folder), str(text_folder), projection_dim=PROJECTION_DIM)
        reference.load_state_dict(model.state_dict(), strict=True)
        reference.eval()

        def embeds(batch):
            outputs = reference(**batch)
            return outputs.text_embeds, outputs.image_embeds, outputs.logits_per_image

        return embeds
    # DeBERTa-v2 and ModernBERT have no pooler_output and ConvNeXt no `hidden_size` (the dual encoder cannot hold
    # them), and SigLIP's text model has no AutoModel: each family's own model pooled as the family does (its
    # pooler_output, else the first token), and the projections as formulas.
    # SigLIP's text model reads text as it was trained: padded to max_length, with no mask.
    text_class = SiglipTextModel if text_family == "siglip_text_model" else AutoModel
    text_model = text_class.from_pretrained(text_folder).eval()
    vision_model = AutoModel.from_pretrained(vision_folder).eval()

    def embeds(batch):
        if text_family == "siglip_text_model":
            hidden = text_model(input_ids=_siglip_ids(text_folder, TEXTS[:batch["input_ids"].shape[0]]))
        else:
            hidden = text_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        pooled = hidden.pooler_output if model.config.text_pooling == "pooler" else hidden.last_hidden_state[:, 0]
        text_embeds = F.normalize(pooled @ model.text_projection.weight.T, dim=-1)
        image_pooled = vision_model(pixel_values=batch["pixel_values"]).pooler_output
        image_embeds = F.normalize(image_pooled @ model.visual_projection.weight.T, dim=-1)
        return text_embeds, image_embeds, model.logit_scale.exp() * image_embeds @ text_embeds.T

    return embeds


def _siglip_ids(text_folder: Path, texts: list[str]) -> torch.Tensor:
    """`texts` as SigLIP reads them: the folder's tokenizer, padding="max_length", no mask."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(text_folder)
    return tokenizer(texts, padding="max_length", max_length=CONTEXT, truncation=True,
                     return_tensors="pt")["input_ids"]


def _train_step(model: HFClipModel, batch: dict) -> float:
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    loss = model(**batch, return_loss=True).loss
    loss.backward()
    optimizer.step()
    model.eval()
    return loss.item()


def _outputs(model, batch):
    with torch.no_grad():
        return model(**batch)


def _check_pair(folders, vision: str, text: str, tmp_path: Path) -> None:
    model, processor = _compose(folders, vision, text)
    batch = _batch(processor)
    reference = _reference(model, folders(vision), folders(text))
    outputs = _outputs(model, batch)
    with torch.no_grad():
        text_embeds, image_embeds, logits = reference(batch)
    torch.testing.assert_close(outputs.text_embeds, text_embeds, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(outputs.image_embeds, image_embeds, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(outputs.logits_per_image, logits, atol=1e-5, rtol=1e-5)

    loss = _train_step(model, batch)
    assert torch.isfinite(torch.tensor(loss))
    trained = _outputs(model, batch)
    assert not torch.allclose(trained.logits_per_image, outputs.logits_per_image)
    model.save_pretrained(tmp_path / "composed")
    processor.save_pretrained(tmp_path / "composed")
    reloaded = AutoModel.from_pretrained(tmp_path / "composed").eval()
    assert type(reloaded) is HFClipModel and reloaded.config.text_config.model_type == text
    assert reloaded.config.tower_sources["text"]["name_or_path"] == str(folders(text))
    reloaded_processor = AutoProcessor.from_pretrained(tmp_path / "composed")
    again = _outputs(reloaded, _batch(reloaded_processor))
    torch.testing.assert_close(again.logits_per_image, trained.logits_per_image, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize(("vision", "text"), ALL_PAIRS)
def test_every_family_composes_matches_transformers_train_save_and_reload(folders, vision, text, tmp_path):
    """Each of 6 vision and 7 text families (about 1.5 s each with one-block configs)."""
    _check_pair(folders, vision, text, tmp_path)


def test_composed_train_step_save_reload_then_zero_shot_pipeline(folders, tmp_path):
    model, processor = _compose(folders, "vit", "bert")
    _train_step(model, _batch(processor))
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    classifier = pipeline("zero-shot-image-classification", model=str(tmp_path / "model"))
    scores = {entry["label"]: entry["score"] for entry in classifier(probe_image(), candidate_labels=LABELS)}
    prompts = [f"This is a photo of {label}." for label in LABELS]
    with torch.no_grad():
        logits = model(**processor(text=prompts, images=probe_image(), padding=True, return_tensors="pt"))
    expected = logits.logits_per_image.softmax(dim=-1)[0]
    torch.testing.assert_close(torch.tensor([scores[label] for label in LABELS]), expected, atol=1e-6, rtol=1e-5)


def test_dual_encoder_folder_saved_as_run_clip_saves_it_loads_directly_and_exports_back(folders, tmp_path):
    """run_clip.py saves the model, then the tokenizer and the image processor on their own."""
    torch.manual_seed(2)
    reference = VisionTextDualEncoderModel.from_vision_text_pretrained(
        str(folders("vit")), str(folders("roberta")), projection_dim=PROJECTION_DIM).eval()
    reference.save_pretrained(tmp_path / "run_clip")
    processor = HFClipProcessor.from_vision_text_pretrained(str(folders("vit")), str(folders("roberta")))
    processor.tokenizer.save_pretrained(tmp_path / "run_clip")
    processor.image_processor.save_pretrained(tmp_path / "run_clip")

    model = HFClipModel.from_pretrained(tmp_path / "run_clip").eval()
    loaded_processor = HFClipProcessor.from_pretrained(tmp_path / "run_clip")
    batch = _batch(loaded_processor)
    batch.pop("token_type_ids", None)
    expected, outputs = _outputs(reference, batch), _outputs(model, batch)
    for key in ("text_embeds", "image_embeds", "logits_per_image"):
        torch.testing.assert_close(outputs[key], expected[key], atol=1e-5, rtol=1e-5)

    _train_step(model, batch)
    exported = export_dual_encoder(model, processor, tmp_path / "exported")
    assert not list(exported.glob("*.py")) and "hf_clip" not in (exported / "config.json").read_text()
    back = AutoModel.from_pretrained(exported).eval()
    assert type(back) is VisionTextDualEncoderModel
    torch.testing.assert_close(_outputs(back, batch).logits_per_image, _outputs(model, batch).logits_per_image,
                               atol=1e-5, rtol=1e-5)


def _siglip_folder(folders, tmp_path) -> tuple[Path, SiglipModel]:

    torch.manual_seed(3)
    config = SiglipConfig(text_config=text_config("siglip_text_model", _tokenizer_of(folders)).to_dict(),
                          vision_config=vision_config("siglip_vision_model").to_dict())
    reference = SiglipModel(config).eval()
    with torch.no_grad():  # a trained SigLIP's temperature is past CLIP's bound of 100
        reference.logit_scale.fill_(4.9)
        reference.logit_bias.fill_(-2.5)
    reference.save_pretrained(tmp_path / "siglip")
    return tmp_path / "siglip", reference


def _tokenizer_of(folders):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folders("siglip_text_model"))


def _siglip_batch(folders) -> dict:
    processor = HFClipProcessor.from_vision_text_pretrained(str(folders("siglip_vision_model")),
                                                            str(folders("siglip_text_model")))
    return _batch(processor)


def test_siglip_folder_loads_exactly_and_trains_with_the_sigmoid_loss_and_its_bias(folders, tmp_path):
    path, reference = _siglip_folder(folders, tmp_path)
    model = HFClipModel.from_pretrained(path).eval()
    assert model.config.loss_type == "siglip" and model.logit_bias.item() == -2.5
    batch = _siglip_batch(folders)  # padded to the longest, with its mask, as hf_clip's collators pad
    siglip_batch = {"input_ids": _siglip_ids(folders("siglip_text_model"), TEXTS),  # as SigLIP reads text
                    "pixel_values": batch["pixel_values"]}
    expected = reference(**siglip_batch, return_loss=True)
    outputs = model(**batch, return_loss=True)
    for key in ("text_embeds", "image_embeds"):
        torch.testing.assert_close(outputs[key], expected[key], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(outputs.logits_per_image, expected.logits_per_image, atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(outputs.loss, expected.loss, atol=1e-5, rtol=1e-6)
    expected.loss.backward()
    outputs.loss.backward()
    reference_grads = dict(reference.named_parameters())
    for name, parameter in model.named_parameters():
        reference_name = name.replace("vision_model.vision_model.", "vision_model.").replace(
            "text_model.text_model.", "text_model.")
        torch.testing.assert_close(parameter.grad.reshape(-1), reference_grads[reference_name].grad.reshape(-1),
                                   atol=1e-5, rtol=1e-4, msg=name)

    model.save_pretrained(tmp_path / "hf_clip")
    reloaded = AutoModel.from_pretrained(tmp_path / "hf_clip").eval()
    torch.testing.assert_close(_outputs(reloaded, batch).logits_per_image, expected.logits_per_image.detach(),
                               atol=1e-5, rtol=1e-6)
    back = transformers_from_composed(reloaded).eval()
    assert type(back) is SiglipModel
    torch.testing.assert_close(_outputs(back, siglip_batch).logits_per_image, expected.logits_per_image.detach(),
                               atol=1e-5, rtol=1e-6)


def test_siglip_text_embeds_as_siglip_reads_it_however_the_batch_is_padded(folders, tmp_path):
    """SigLIP's head reads the last of max_length positions, as it was trained. Text padded to the longest (as
    hf_clip's collators, search, serving and Transformers' zero-shot pipeline pad it), masked or not, on either side,
    embeds as `SiglipModel` embeds the same text padded to max_length with no mask."""
    path, reference = _siglip_folder(folders, tmp_path)
    model = HFClipModel.from_pretrained(path).eval()
    tokenizer = HFClipProcessor.from_vision_text_pretrained(str(folders("siglip_vision_model")),
                                                            str(folders("siglip_text_model"))).tokenizer
    with torch.no_grad():
        texts = ["a red circle", "a photo of a big blue square on the left", "green"]
        expected = reference.get_text_features(input_ids=_siglip_ids(folders("siglip_text_model"), texts))
        expected = getattr(expected, "pooler_output", expected)
        right = tokenizer(texts, padding=True, return_tensors="pt")
        assert right["input_ids"].shape[1] < CONTEXT and not right["attention_mask"].all()
        tokenizer.padding_side = "left"
        left = tokenizer(texts, padding=True, return_tensors="pt")
        for name, inputs in {"right, masked": dict(right), "right, no mask": {"input_ids": right["input_ids"]},
                             "left, masked": dict(left)}.items():
            features = model.get_text_features(**inputs)
            assert features.last_hidden_state.shape[1] == CONTEXT, name
            torch.testing.assert_close(features.pooler_output, expected, atol=1e-5, rtol=1e-5, msg=name)
        with pytest.raises(ValueError, match=f"more than the model's context of {CONTEXT} tokens"):
            model.get_text_features(input_ids=torch.ones(1, CONTEXT + 1, dtype=torch.long))


def test_zero_shot_pipeline_on_a_loaded_siglip_ranks_with_siglips_logits(folders, tmp_path):
    """Transformers' zero-shot pipeline pads the prompts to the longest: hf_clip still embeds them as SigLIP does,
    so the scores are the softmax of `SiglipModel`'s logits on the prompts padded to max_length (the pipeline applies
    a sigmoid only when model_type contains "siglip"; an hf_clip model's is "hf_clip")."""
    path, reference = _siglip_folder(folders, tmp_path)
    processor = HFClipProcessor.from_vision_text_pretrained(str(folders("siglip_vision_model")),
                                                            str(folders("siglip_text_model")))
    HFClipModel.from_pretrained(path).save_pretrained(tmp_path / "hf_clip")
    processor.save_pretrained(tmp_path / "hf_clip")
    result = pipeline("zero-shot-image-classification", model=str(tmp_path / "hf_clip"))(
        probe_image(), candidate_labels=LABELS)
    prompts = [f"This is a photo of {label}." for label in LABELS]
    with torch.no_grad():
        logits = reference(input_ids=processor.tokenizer(prompts, padding="max_length", max_length=CONTEXT,
                                                         return_tensors="pt")["input_ids"],
                           pixel_values=processor(images=probe_image(), return_tensors="pt")["pixel_values"]
                           ).logits_per_image[0]
    scores = {entry["label"]: entry["score"] for entry in result}
    torch.testing.assert_close(torch.tensor([scores[label] for label in LABELS]), logits.softmax(-1), atol=1e-6,
                               rtol=1e-5)
    assert [entry["label"] for entry in result] == [LABELS[i] for i in logits.argsort(descending=True).tolist()]


def test_siglip_folder_with_the_clip_loss_says_the_bias_is_dropped(folders, tmp_path, caplog):
    path, _ = _siglip_folder(folders, tmp_path)
    from transformers.utils import logging as transformers_logging

    transformers_logging.enable_propagation()
    try:
        model = HFClipModel.from_pretrained(path, loss_type="clip")
    finally:
        transformers_logging.disable_propagation()
    assert model.logit_bias is None and model.config.logit_bias_init_value is None
    assert "logit_bias is dropped" in caplog.text
    model.save_pretrained(tmp_path / "clip_loss")
    assert HFClipModel.from_pretrained(tmp_path / "clip_loss").config.loss_type == "clip"


def test_lock_image_tower_on_a_composed_tower_is_lit(folders, tmp_path):
    model, processor = _compose(folders, "vit", "bert")
    vision_before = {name: tensor.clone() for name, tensor in model.vision_model.state_dict().items()}
    model.lock_image_tower()
    model.train()
    assert not model.vision_model.training and model.text_model.training
    assert not any(p.requires_grad for p in [*model.vision_model.parameters(), *model.visual_projection.parameters()])
    batch = _batch(processor)
    features = model.get_image_features(pixel_values=batch["pixel_values"])
    assert not features.pooler_output.requires_grad and features.last_hidden_state.grad_fn is None
    text_before = model.text_projection.weight.clone()
    _train_step(model, batch)
    model.train()
    assert not model.vision_model.training
    for name, tensor in model.vision_model.state_dict().items():
        assert torch.equal(tensor, vision_before[name]), name
    assert not torch.equal(model.text_projection.weight, text_before)
    model.save_pretrained(tmp_path / "lit")
    saved = load_file(tmp_path / "lit" / "model.safetensors")
    for name, tensor in load_file(folders("vit") / "model.safetensors").items():
        assert torch.equal(saved[f"vision_model.{name}"], tensor), name  # the pretrained file's tensors, bit for bit
    with pytest.raises(ValueError, match=r"unlocked_layers must be in \[0, 1\]"):
        model.lock_text_tower(unlocked_layers=2)


@pytest.mark.parametrize("vision", ["vit", "convnext", "clip_vision_model"])
def test_lock_image_tower_with_its_last_block_unlocked(folders, vision):
    model, _ = _compose(folders, vision, "bert")
    model.lock_image_tower(unlocked_layers=1)
    trainable = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
    assert not any(".embeddings." in name for name in trainable if name.startswith("vision_model."))
    last_block = {"vit": "vision_model.layers.0.", "convnext": "vision_model.encoder.stages.1.",
                  "clip_vision_model": "vision_model.encoder.layers.0."}[vision]
    assert any(name.startswith(last_block) for name in trainable)
    assert {name for name in trainable if name.startswith("visual_projection.")}
    assert "vision" not in model.locked_towers and model.train().vision_model.training


@pytest.mark.parametrize("loss_type", ["clip", "siglip"])
def test_grad_cache_on_a_composed_model_equals_one_backward(folders, loss_type):
    model, processor = _compose(folders, "vit", "bert", loss_type=loss_type)
    batch = _batch(processor, n=3)
    # Dropout off: the micro-batches of GradCache draw other dropout masks than one pass over the batch does.
    model.eval()
    model.zero_grad()
    model(**batch, return_loss=True).loss.backward()
    expected = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    loss = grad_cache_backward(model, batch, num_micro_batches=3, gather_distributed=False)
    torch.testing.assert_close(loss, model(**batch, return_loss=True).loss.detach(), atol=1e-6, rtol=1e-6)
    for name, parameter in model.named_parameters():  # test_grad_cache.py's tolerance
        torch.testing.assert_close(parameter.grad, expected[name], atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.slow
def test_a_composed_folder_loads_as_remote_code_where_hf_clip_cannot_be_imported(folders, tmp_path):
    from preloaded import run_python

    model, processor = _compose(folders, "vit", "bert")
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    assert (tmp_path / "model" / "towers.py").is_file()
    script = (
        "import sys, json, torch\n"
        "sys.modules['hf_clip'] = None\n"
        "from transformers import AutoModel, AutoProcessor\n"
        f"path = {str(tmp_path / 'model')!r}\n"
        "model = AutoModel.from_pretrained(path, trust_remote_code=True).eval()\n"
        "processor = AutoProcessor.from_pretrained(path, trust_remote_code=True)\n"
        f"inputs = processor(text={TEXTS!r}, images=[torch.zeros(3, 20, 24)] * 3, padding=True, return_tensors='pt')\n"
        "with torch.no_grad():\n"
        "    logits = model(**inputs).logits_per_image\n"
        "print(json.dumps({'model': type(model).__module__, 'logits': logits.tolist()}))\n"
    )
    result = run_python(["-c", script], cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["model"].startswith("transformers_modules.")
    inputs = processor(text=TEXTS, images=[torch.zeros(3, 20, 24)] * 3, padding=True, return_tensors="pt")
    torch.testing.assert_close(torch.tensor(report["logits"]), _outputs(model, inputs).logits_per_image,
                               atol=1e-6, rtol=1e-6)


def test_bad_compositions_say_what_is_wrong(folders, tmp_path):
    with pytest.raises(ValueError, match="no class token"):
        _compose(folders, "convnext", "bert", vision_pooling="cls")
    with pytest.raises(ValueError, match="projection_type` is 'none'"):
        _compose(folders, "vit", "bert", text_projection_type="none")
    with pytest.raises(ValueError, match="returns no pooler_output"):
        _compose(folders, "vit", "deberta-v2", text_pooling="pooler")
    with pytest.raises(ValueError, match="pools text"):
        _compose(folders, "vit", "bert", vision_pooling="eos")
    with pytest.raises(StrictDataclassClassValidationError, match="projection_type` is 'none'"):
        HFClipConfig(vision_config=vision_config("vit"), vision_projection_type="none", projection_dim=7)
    with pytest.raises(StrictDataclassClassValidationError, match="patch dropout .0.5. drops the patch tokens"):
        HFClipConfig(vision_config={**vision_config("convnext").to_dict(), "patch_dropout": 0.5})
    with pytest.raises(ValueError, match="does not know"):
        HFClipConfig(text_config={"model_type": "not_a_backbone"})
    with pytest.raises(ValueError, match=r"text tower's backbone, ViTModel \('vit'\), takes no `input_ids`: it is "
                                         "not a text model but a vision model"):
        _compose(folders, "vit", "vit")
    with pytest.raises(ValueError, match=r"vision tower's backbone, BertModel \('bert'\), takes no `pixel_values`"):
        _compose(folders, "bert", "bert")

    bare_text = tmp_path / "bare_text"
    AutoModel.from_pretrained(folders("bert")).save_pretrained(bare_text)
    with pytest.raises(ValueError, match="has no tokenizer.*tokenizer=AutoTokenizer"):
        HFClipProcessor.from_vision_text_pretrained(str(folders("vit")), str(bare_text))
    bare_vision = tmp_path / "bare_vision"
    AutoModel.from_pretrained(folders("vit")).save_pretrained(bare_vision)
    with pytest.raises(ValueError, match="has no image processor.*image_processor=AutoImageProcessor"):
        HFClipProcessor.from_vision_text_pretrained(str(bare_vision), str(folders("bert")))

    model, processor = _compose(folders, "convnext", "bert", text_projection_type="mlp")
    with pytest.raises(ValueError, match="interpolate_pos_encoding"):
        model.get_image_features(pixel_values=torch.zeros(1, 3, 16, 16), interpolate_pos_encoding=True)
    with pytest.raises(ValueError, match="text projection is 'mlp'"):
        export_dual_encoder(model, processor, tmp_path / "refused")
    assert not (tmp_path / "refused").exists() and not list(tmp_path.glob(".refused*"))
    with pytest.raises(ValueError, match="composed model"):
        from hf_clip.convert import clip_config_from_hf_clip_config

        clip_config_from_hf_clip_config(model.config)


def test_a_family_automodel_maps_to_several_classes_is_checked_and_built_as_its_architectures_say():
    """AutoModel maps FunnelConfig to FunnelModel and FunnelBaseModel and picks by `architectures`; the tower's
    input check reads the same class that is built."""
    from transformers import FunnelConfig

    funnel = FunnelConfig(vocab_size=64, d_model=32, n_head=2, d_head=16, d_inner=64, block_sizes=[1, 1],
                          architectures=["FunnelBaseModel"])
    model = HFClipModel(HFClipConfig(vision_config=vision_config("vit"), text_config=funnel,
                                     projection_dim=PROJECTION_DIM, text_pooling="cls"))
    assert type(model.text_model).__name__ == "FunnelBaseModel"


def test_a_siglip2_folder_is_refused_with_what_its_vision_tower_needs(folders, tmp_path):
    """SigLIP 2's vision tower reads variable-resolution patches with their mask and spatial shapes, which hf_clip's
    image inputs do not carry: its folder, or its vision model as a tower, is refused with that, not with a load
    report."""
    from transformers import Siglip2Config, Siglip2Model

    layer = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}
    siglip2 = Siglip2Model(Siglip2Config(text_config={"vocab_size": 64, "max_position_embeddings": 16, **layer},
                                         vision_config={"num_patches": 16, "patch_size": 4, **layer}))
    siglip2.save_pretrained(tmp_path / "siglip2")
    siglip2.vision_model.save_pretrained(tmp_path / "siglip2_vision")
    needs = r"Siglip2VisionModel \('siglip2_vision_model'\), needs `pixel_attention_mask`, `spatial_shapes`"
    with pytest.raises(StrictDataclassClassValidationError, match=needs):
        HFClipModel.from_pretrained(tmp_path / "siglip2")
    with pytest.raises(ValueError, match=needs + ".*a SigLIP vision tower works"):
        HFClipModel.from_vision_text_pretrained(str(tmp_path / "siglip2_vision"), str(folders("bert")),
                                                projection_dim=PROJECTION_DIM)


def test_context_length_and_inputs_come_from_the_text_model(folders):
    processor = HFClipProcessor.from_vision_text_pretrained(str(folders("vit")), str(folders("roberta")))
    assert processor.tokenizer.model_max_length == CONTEXT
    assert "token_type_ids" not in processor(text=TEXTS, padding=True)
    model, _ = _compose(folders, "vit", "roberta")
    match_special_tokens(model, processor.tokenizer)  # the tokenizer has no eos; the tower pools with its pooler
    assert model.config.text_config.pad_token_id == processor.tokenizer.pad_token_id


def test_feature_extraction_pipelines_on_a_composed_folder(folders, tmp_path):
    model, processor = _compose(folders, "vit", "bert")
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    image_pipe = pipeline("image-feature-extraction", model=str(tmp_path / "model"))
    text_pipe = pipeline("feature-extraction", model=str(tmp_path / "model"))
    with torch.no_grad():
        image_features = model.get_image_features(**processor(images=probe_image(), return_tensors="pt"))
        text_tokens = model.text_model(**processor(text=TEXTS[0], return_tensors="pt")).last_hidden_state
    torch.testing.assert_close(image_pipe(probe_image(), pool=True, return_tensors=True),
                               image_features.pooler_output, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(text_pipe(TEXTS[0], return_tensors=True), text_tokens, atol=1e-6, rtol=1e-6)


def test_end_of_text_pooling_needs_an_end_of_text_id_in_the_config(folders):
    with pytest.raises(ValueError, match="neither an `eos_token_id` nor a `sep_token_id`; use 'last'"):
        _compose(folders, "vit", "bert", text_pooling="eos")  # BERT configs name no [SEP] id
    model, processor = _compose(folders, "vit", "clip_text_model", text_pooling="eos")
    tokens = processor.tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(model.get_text_features(**tokens).pooler_output,
                           model.text_projection(model.text_model(**tokens).pooler_output))


@pytest.mark.parametrize("text_pooling", ["cls", "mean", "last", "attention"])
def test_text_poolings_are_their_formulas_and_ignore_padding(folders, text_pooling):
    model, processor = _compose(folders, "vit", "bert", text_pooling=text_pooling, text_projection_type="mlp")
    assert not hasattr(model.text_model, "pooler") or model.text_model.pooler is None  # no unused parameters
    tokens = processor.tokenizer(TEXTS, padding=True, return_tensors="pt")
    longer = processor.tokenizer(TEXTS, padding="max_length", max_length=CONTEXT, return_tensors="pt")
    with torch.no_grad():
        features = model.get_text_features(**tokens).pooler_output
        padded = model.get_text_features(**longer).pooler_output
        hidden = model.text_model(**tokens).last_hidden_state
    torch.testing.assert_close(padded, features, atol=1e-5, rtol=1e-5)
    mask = tokens["attention_mask"]
    lengths = mask.sum(-1)
    rows = torch.arange(len(TEXTS))
    expected_pooled = {
        "cls": hidden[:, 0],
        "mean": (hidden * mask[..., None]).sum(1) / lengths[:, None],
        "last": hidden[rows, lengths - 1],
    }.get(text_pooling)
    if expected_pooled is not None:
        projection = model.text_projection
        expected = projection.fc2(F.gelu(projection.fc1(expected_pooled)))
        torch.testing.assert_close(features, expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize(("vision", "vision_pooling"), [("vit", "mean"), ("convnext", "attention"), ("swin", "mean")])
def test_vision_poolings_over_tokens_and_feature_maps(folders, vision, vision_pooling):
    model, processor = _compose(folders, vision, "bert", vision_pooling=vision_pooling)
    pixel_values = _batch(processor)["pixel_values"]
    with torch.no_grad():
        features = model.get_image_features(pixel_values=pixel_values).pooler_output
        hidden = model.vision_model(pixel_values=pixel_values).last_hidden_state
    assert features.shape == (len(pixel_values), PROJECTION_DIM)
    if vision_pooling == "mean":
        torch.testing.assert_close(features, hidden.mean(1) @ model.visual_projection.weight.T, atol=1e-6, rtol=1e-5)
    model.train()
    model(**_batch(processor), return_loss=True).loss.backward()
    assert model.vision_pooling.attention is None or model.vision_pooling.attention.probe.grad is not None


@pytest.mark.parametrize(("text", "pooler_type", "proj_type"),
                         [("xlm-roberta", "mean_pooler", "mlp"), ("bert", "cls_pooler", "linear")])
def test_open_clip_model_with_an_hf_text_tower_converts_exactly(folders, tmp_path, text, pooler_type, proj_type):
    """open_clip built offline: its `hf_model_name` is a local folder, from which it reads the text config."""
    open_clip = pytest.importorskip("open_clip")
    from transformers import AutoConfig

    from hf_clip.convert import hf_clip_from_open_clip_hf_text

    model_config = {
        "embed_dim": PROJECTION_DIM,
        "vision_cfg": {"image_size": 16, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
        "text_cfg": {"hf_model_name": str(folders(text)), "hf_tokenizer_name": str(folders(text)),
                     "hf_model_pretrained": False, "hf_pooler_type": pooler_type, "hf_proj_type": proj_type},
    }
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "tiny-hf-text.json").write_text(json.dumps(model_config))
    open_clip.add_model_config(tmp_path / "configs")
    torch.manual_seed(4)
    reference = open_clip.create_model("tiny-hf-text", pretrained=None).eval()
    model = hf_clip_from_open_clip_hf_text(reference.state_dict(), AutoConfig.from_pretrained(folders(text)),
                                           pooler_type=pooler_type, proj_type=proj_type, vision_head_width=16).eval()
    processor = HFClipProcessor.from_vision_text_pretrained(str(folders("vit")), str(folders(text)))
    tokens = processor.tokenizer(TEXTS, padding=True, return_tensors="pt")
    pixel_values = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        image_features, text_features, scale = reference(pixel_values, tokens["input_ids"])[:3]
        outputs = model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"],
                        pixel_values=pixel_values)
    torch.testing.assert_close(outputs.image_embeds, image_features, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(outputs.text_embeds, text_features, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(outputs.logits_per_image, scale * image_features @ text_features.T, atol=1e-5,
                               rtol=1e-5)
    model.save_pretrained(tmp_path / "converted")
    reloaded = AutoModel.from_pretrained(tmp_path / "converted").eval()
    torch.testing.assert_close(_outputs(reloaded, {**tokens, "pixel_values": pixel_values}).logits_per_image,
                               outputs.logits_per_image, atol=1e-6, rtol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("text", ["bert", "siglip_text_model"])
def test_onnx_export_of_a_composed_model_matches_pytorch(folders, text, tmp_path):
    """Texts of unequal length, padded to the longest (SigLIP's tower lays them out to max_length in the graph)."""
    pytest.importorskip("onnxruntime")
    import onnxruntime

    from hf_clip.export import export_onnx

    model, processor = _compose(folders, "vit", text)
    written = export_onnx(model, processor, tmp_path / "onnx")
    tokens = processor.tokenizer(["a red circle", *TEXTS, "a photo of a big blue square on the left"], padding=True,
                                 return_tensors="np")
    assert not tokens["attention_mask"].all()
    pixel_values = _batch(processor)["pixel_values"]
    text_session = onnxruntime.InferenceSession(str(written["text_model.onnx"]))
    vision_session = onnxruntime.InferenceSession(str(written["vision_model.onnx"]))
    text_embeds = text_session.run(None, {"input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"]})
    image_embeds = vision_session.run(None, {"pixel_values": pixel_values.numpy()})
    with torch.no_grad():
        expected_text = model.get_text_features(**{k: torch.tensor(v) for k, v in tokens.items()}).pooler_output
        expected_image = model.get_image_features(pixel_values=pixel_values).pooler_output
    torch.testing.assert_close(torch.tensor(text_embeds[0]), expected_text, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.tensor(image_embeds[0]), expected_image, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_sentence_transformers_embeds_with_a_composed_folder(folders, tmp_path):
    sentence_transformers = pytest.importorskip("sentence_transformers")
    model, processor = _compose(folders, "vit", "bert")
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    encoder = sentence_transformers.SentenceTransformer(str(tmp_path / "model"), device="cpu")
    with torch.no_grad():
        text_features = model.get_text_features(**processor(text=TEXTS, padding=True, return_tensors="pt"))
        image_features = model.get_image_features(**processor(images=probe_image(), return_tensors="pt"))
    torch.testing.assert_close(encoder.encode(TEXTS, convert_to_tensor=True), text_features.pooler_output)
    torch.testing.assert_close(encoder.encode([probe_image()], convert_to_tensor=True), image_features.pooler_output)


@pytest.mark.slow
def test_two_process_ddp_of_a_composed_model_matches_one_process(tmp_path):
    """2 gloo ranks under real DDP, each with half the batch: the loss and every parameter gradient of a ViT + BERT
    model (dropout off, so both runs draw the same network) equal one process's on the whole batch."""
    from conftest import assert_two_ranks_match_one_process, run_two_ranks
    from tiny_towers import wordpiece_tokenizer

    tokenizer = wordpiece_tokenizer(tmp_path / "vocab")
    text = text_config("bert", tokenizer)
    text.hidden_dropout_prob = text.attention_probs_dropout_prob = 0.0
    torch.manual_seed(0)
    model = HFClipModel(HFClipConfig(vision_config=vision_config("vit"), text_config=text,
                                     projection_dim=PROJECTION_DIM, label_smoothing=0.1)).train()
    captions = [f"a {size} {color} circle" for size in ("small", "big") for color in ("red", "green", "blue", "yellow")]
    tokens = tokenizer(captions, padding=True, return_tensors="pt", return_token_type_ids=False)
    batch = {**tokens, "pixel_values": torch.randn(len(captions), 3, 16, 16)}
    features = {"image": F.normalize(torch.randn(8, 16), dim=-1), "text": F.normalize(torch.randn(8, 16), dim=-1),
                "scale": torch.tensor(30.0)}
    result = run_two_ranks("ddp_contrastive_step", tmp_path, model, batch, extra_files={"features": features})
    assert_two_ranks_match_one_process(result, model, batch)


def test_the_model_card_of_a_composed_model_names_its_towers(folders):
    from hf_clip import render_model_card

    model, _ = _compose(folders, "vit", "bert", text_pooling="mean")
    card = str(render_model_card(model, "me/vit-bert-clip"))
    assert "| composed from | `local model vision-vit` | `local model text-bert` |" in card
    assert str(folders("vit")) not in card
    assert "| backbone | `vit` | `bert` |" in card and "| pooling, projection | pooler, linear | mean, linear |" in card
