"""HFClipForImageClassification, from_zero_shot and weight_space_ensemble."""

import json
import os
import textwrap

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from preloaded import run_python
from transformers import AutoModelForImageClassification, pipeline

from hf_clip import (
    PHOTO_TEMPLATES,
    HFClipForImageClassification,
    HFClipModel,
    HFClipProcessor,
    from_zero_shot,
    weight_space_ensemble,
)

CLASSES = ["red circle", "blue square", "green triangle", "yellow cross"]


def _images(count: int) -> list[Image.Image]:
    return [Image.fromarray(np.random.default_rng(i).integers(0, 256, (40, 48, 3), dtype=np.uint8))
            for i in range(count)]


@pytest.fixture(scope="module")
def clip_and_processor(saved_checkpoint):
    return HFClipModel.from_pretrained(saved_checkpoint).eval(), HFClipProcessor.from_pretrained(saved_checkpoint)


def test_one_template_gives_exactly_the_models_zero_shot_logits(clip_and_processor):
    model, processor = clip_and_processor
    classifier = from_zero_shot(model, processor, CLASSES, ["a photo of a {}."]).eval()
    inputs = processor(text=[f"a photo of a {name}." for name in CLASSES], images=_images(12), padding=True,
                       return_tensors="pt")
    with torch.no_grad():
        expected = model(**inputs).logits_per_image
        logits = classifier(pixel_values=inputs["pixel_values"]).logits
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(logits.argmax(-1), expected.argmax(-1))
    assert classifier.config.id2label == dict(enumerate(CLASSES))
    assert classifier.config.label2id == {name: i for i, name in enumerate(CLASSES)}


def test_prompt_ensemble_matches_the_mean_of_normalised_prompt_embeddings(clip_and_processor):
    model, processor = clip_and_processor
    templates = list(PHOTO_TEMPLATES)
    classifier = from_zero_shot(model, processor, CLASSES, templates).eval()
    prompts = [template.format(name) for name in CLASSES for template in templates]
    inputs = processor(text=prompts, images=_images(12), padding=True, return_tensors="pt")
    with torch.no_grad():
        outputs = model(**inputs)
        class_embeds = F.normalize(outputs.text_embeds.view(len(CLASSES), len(templates), -1).mean(1), dim=-1)
        expected = model.clamped_logit_scale() * outputs.image_embeds @ class_embeds.T
        logits = classifier(pixel_values=inputs["pixel_values"]).logits
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(logits.argmax(-1), expected.argmax(-1))


@pytest.mark.slow
def test_saved_classifier_runs_in_the_image_classification_pipeline(clip_and_processor, tmp_path):
    model, processor = clip_and_processor
    classifier = from_zero_shot(model, processor, CLASSES).eval()
    classifier.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["auto_map"] == {
        "AutoConfig": "configuration_hf_clip.HFClipConfig",
        "AutoModel": "modeling_hf_clip.HFClipModel",
        "AutoModelForZeroShotImageClassification": "modeling_hf_clip.HFClipModel",
        "AutoModelForImageClassification": "modeling_hf_clip.HFClipForImageClassification",
        "AutoProcessor": "processing_hf_clip.HFClipProcessor",
    }
    assert type(AutoModelForImageClassification.from_pretrained(tmp_path)) is HFClipForImageClassification
    image = _images(1)[0]
    with torch.no_grad():
        probs = classifier(**processor(images=image, return_tensors="pt")).logits.softmax(-1)[0]
    result = pipeline("image-classification", model=str(tmp_path), top_k=len(CLASSES))(image)
    assert {r["label"]: r["score"] for r in result} == pytest.approx(dict(zip(CLASSES, probs.tolist())), abs=1e-6)

    script = textwrap.dedent(f"""
        import json, sys
        sys.modules["hf_clip"] = None  # hf_clip cannot be imported here
        import numpy as np
        from PIL import Image
        from transformers import pipeline
        image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 48, 3), dtype=np.uint8))
        classifier = pipeline("image-classification", model={str(tmp_path)!r}, trust_remote_code=True, top_k=None)
        print(json.dumps({{"module": type(classifier.model).__module__, "result": classifier(image)}}))
    """)
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf_home")}
    remote = run_python(["-c", script], env=env, timeout=180)
    assert remote.returncode == 0, remote.stderr[-4000:]
    remote_result = json.loads(remote.stdout.strip().splitlines()[-1])
    assert remote_result["module"].startswith("transformers_modules.")
    assert {r["label"]: r["score"] for r in remote_result["result"]} == pytest.approx(
        {r["label"]: r["score"] for r in result}, abs=1e-6)


def test_from_pretrained_on_a_clip_checkpoint_loads_the_image_tower(saved_checkpoint, clip_and_processor):
    model, _ = clip_and_processor
    classifier = HFClipForImageClassification.from_pretrained(saved_checkpoint, num_labels=3)
    assert classifier.classifier.out_features == 3
    clip_weights = model.state_dict()
    for name, tensor in classifier.state_dict().items():
        if not name.startswith("classifier."):
            assert torch.equal(tensor, clip_weights[name]), name


def test_cross_entropy_loss_with_labels(clip_and_processor):
    model, processor = clip_and_processor
    classifier = from_zero_shot(model, processor, CLASSES)
    pixel_values = processor(images=_images(4), return_tensors="pt")["pixel_values"]
    labels = torch.tensor([0, 3, 1, 2])
    outputs = classifier(pixel_values=pixel_values, labels=labels)
    torch.testing.assert_close(outputs.loss, F.cross_entropy(outputs.logits, labels))


def test_bad_class_names_and_templates_are_named(clip_and_processor):
    model, processor = clip_and_processor
    with pytest.raises(ValueError, match="repeats"):
        from_zero_shot(model, processor, ["cat", "dog", "cat"])
    with pytest.raises(ValueError, match="exactly one"):
        from_zero_shot(model, processor, CLASSES, ["a photo"])
    with pytest.raises(ValueError, match="non-empty"):
        from_zero_shot(model, processor, [])


def test_weight_space_ensemble_interpolates_every_weight(clip_and_processor):
    model, processor = clip_and_processor
    zero_shot = from_zero_shot(model, processor, CLASSES)
    finetuned = from_zero_shot(model, processor, CLASSES)
    with torch.no_grad():
        for parameter in finetuned.parameters():
            parameter.add_(torch.randn_like(parameter))
    zs, ft = zero_shot.state_dict(), finetuned.state_dict()
    for alpha in (0.0, 0.3, 1.0):
        merged = weight_space_ensemble(zero_shot, finetuned, alpha).state_dict()
        for name in ft:
            torch.testing.assert_close(merged[name], (1 - alpha) * zs[name] + alpha * ft[name], msg=name)
    assert torch.equal(finetuned.state_dict()["classifier.weight"], ft["classifier.weight"])  # inputs untouched

    with pytest.raises(ValueError, match="alpha"):
        weight_space_ensemble(zero_shot, finetuned, 1.5)
    with pytest.raises(ValueError, match="shape"):
        weight_space_ensemble(zero_shot, from_zero_shot(model, processor, CLASSES[:3]), 0.5)
    with pytest.raises(ValueError, match="names in only one"):
        weight_space_ensemble(zero_shot, model, 0.5)
