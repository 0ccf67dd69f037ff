import json
import os
import textwrap

import pytest
import torch
from PIL import Image
from preloaded import run_python
from transformers import AutoConfig, AutoModel, AutoModelForZeroShotImageClassification, AutoProcessor, pipeline
from transformers.utils import logging as transformers_logging

from hf_clip import HFClipConfig, HFClipModel, HFClipProcessor

LABELS = ["red circle", "blue square", "green triangle"]


def _image():
    return Image.new("RGB", (50, 40), (200, 30, 30))


def _model_probabilities(checkpoint) -> dict[str, float]:
    """The model's own softmax over LABELS in the pipeline's default template, for one image."""
    model = AutoModel.from_pretrained(checkpoint).eval()
    processor = AutoProcessor.from_pretrained(checkpoint)
    prompts = [f"This is a photo of {label}." for label in LABELS]
    with torch.no_grad():
        inputs = processor(text=prompts, images=_image(), padding=True, return_tensors="pt")
        probs = model(**inputs).logits_per_image.softmax(-1)[0]
    return dict(zip(LABELS, probs.tolist()))


def test_auto_classes_are_registered(saved_checkpoint):
    assert type(AutoConfig.from_pretrained(saved_checkpoint)) is HFClipConfig
    assert type(AutoModel.from_pretrained(saved_checkpoint)) is HFClipModel
    assert type(AutoModelForZeroShotImageClassification.from_pretrained(saved_checkpoint)) is HFClipModel
    assert type(AutoProcessor.from_pretrained(saved_checkpoint)) is HFClipProcessor


def test_pipeline_runs_without_unsupported_error(saved_checkpoint, caplog):
    transformers_logging.enable_propagation()
    try:
        classifier = pipeline("zero-shot-image-classification", model=str(saved_checkpoint))
        result = classifier(_image(), candidate_labels=LABELS)
    finally:
        transformers_logging.disable_propagation()
    assert "not supported" not in caplog.text
    expected = _model_probabilities(saved_checkpoint)
    assert [r["label"] for r in result] == sorted(LABELS, key=expected.get, reverse=True)


def test_pipeline_agrees_with_the_model(saved_checkpoint):
    result = pipeline("zero-shot-image-classification", model=str(saved_checkpoint))(_image(), candidate_labels=LABELS)
    assert {r["label"]: r["score"] for r in result} == pytest.approx(_model_probabilities(saved_checkpoint), abs=1e-6)


def test_checkpoint_carries_remote_code(saved_checkpoint):
    config = json.loads((saved_checkpoint / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoConfig": "configuration_hf_clip.HFClipConfig",
        "AutoModel": "modeling_hf_clip.HFClipModel",
        "AutoModelForZeroShotImageClassification": "modeling_hf_clip.HFClipModel",
        "AutoModelForImageClassification": "modeling_hf_clip.HFClipForImageClassification",
        "AutoProcessor": "processing_hf_clip.HFClipProcessor",
    }
    for name in ("configuration_hf_clip.py", "modeling_hf_clip.py", "loss.py", "processing_hf_clip.py"):
        assert (saved_checkpoint / name).exists(), name


@pytest.mark.slow
def test_remote_code_without_hf_clip_gives_the_same_outputs(saved_checkpoint, tmp_path):
    model = HFClipModel.from_pretrained(saved_checkpoint).eval()
    processor = HFClipProcessor.from_pretrained(saved_checkpoint)
    inputs = processor(text=[f"a {label}" for label in LABELS], images=_image(), padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = model(**inputs).logits_per_image[0].tolist()
    scores = pipeline("zero-shot-image-classification", model=str(saved_checkpoint))(_image(), candidate_labels=LABELS)
    script = textwrap.dedent(f"""
        import json, sys
        sys.modules["hf_clip"] = None  # hf_clip cannot be imported here
        import torch
        from PIL import Image
        from transformers import AutoModel, AutoProcessor, pipeline
        path = {str(saved_checkpoint)!r}
        model = AutoModel.from_pretrained(path, trust_remote_code=True).eval()
        processor = AutoProcessor.from_pretrained(path, trust_remote_code=True)
        image = Image.new("RGB", (50, 40), (200, 30, 30))
        with torch.no_grad():
            logits = model(**processor(text={[f"a {label}" for label in LABELS]!r}, images=image, padding=True,
                                         return_tensors="pt")).logits_per_image
        classifier = pipeline("zero-shot-image-classification", model=path, trust_remote_code=True)
        print(json.dumps({{"module": type(model).__module__, "logits": logits[0].tolist(),
                           "scores": classifier(image, candidate_labels={LABELS!r})}}))
    """)
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf_home")}
    result = run_python(["-c", script], env=env, timeout=180)
    assert result.returncode == 0, result.stderr
    remote = json.loads(result.stdout.strip().splitlines()[-1])
    assert remote["module"].startswith("transformers_modules.")
    assert remote["logits"] == expected
    assert remote["scores"] == scores
