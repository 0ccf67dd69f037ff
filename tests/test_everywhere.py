"""hf_clip folders in the hands of clients that do not import hf_clip.

Every way of saving leaves a folder that every Auto class for what it holds loads with `trust_remote_code=True`:
a model, a processor, a tokenizer or an image processor saved alone, `Trainer.save_model` with a
`processing_class`, the three separate saves of Transformers' run_clip.py (from hf_clip's classes, and from the
remote-code classes in a process without hf_clip), and Transformers' `push_to_hub` methods to the test Hub server.
One process without hf_clip checks every folder, the feature-extraction pipelines, sentence-transformers and the
plain CLIP export (`hf_clip.export.export_clip`), so the subprocess imports are paid once.
"""

import json
import os
import sys
from pathlib import Path

import pytest
import torch
from conftest import hub_env, tiny_siglip_model_and_processor, write_pickle_bomb
from hub_workers import LABELS, probe_image
from preloaded import run_python
from safetensors.torch import load_file
from transformers import AutoImageProcessor, AutoTokenizer, Trainer, TrainingArguments, pipeline

from hf_clip import HFClipModel, HFClipProcessor
from hf_clip.configuration_hf_clip import REMOTE_CODE_AUTO_MAP
from hf_clip.export import export_clip

WORKERS = Path(__file__).with_name("elsewhere_workers.py")
REPO = Path(__file__).resolve().parents[1]
PROBE_TEXTS = [f"a {label}" for label in LABELS]
EVERYTHING = ["model", "processor", "tokenizer", "image_processor"]
REMOTE_MODEL = "transformers_modules."


def _run(command: str, job: dict, env: dict) -> dict:
    result = run_python([str(WORKERS), command, json.dumps(job)], env=env, cwd=REPO, timeout=600)
    assert result.returncode == 0, result.stderr[-6000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def saved_routes(saved_checkpoint, tmp_path_factory):
    """{route: (folder, what it holds)}, each saved from hf_clip's classes by one route."""
    root = tmp_path_factory.mktemp("routes")
    model = HFClipModel.from_pretrained(saved_checkpoint).eval()
    processor = HFClipProcessor.from_pretrained(saved_checkpoint)
    routes = {"quick_start": (saved_checkpoint, EVERYTHING)}

    routes["model_only"] = (root / "model_only", ["model"])
    model.save_pretrained(routes["model_only"][0])
    routes["processor_only"] = (root / "processor_only", ["processor", "tokenizer", "image_processor"])
    processor.save_pretrained(routes["processor_only"][0])
    routes["tokenizer_only"] = (root / "tokenizer_only", ["tokenizer"])
    AutoTokenizer.from_pretrained(saved_checkpoint).save_pretrained(routes["tokenizer_only"][0])
    routes["image_processor_only"] = (root / "image_processor_only", ["image_processor"])
    AutoImageProcessor.from_pretrained(saved_checkpoint).save_pretrained(routes["image_processor_only"][0])

    routes["trainer"] = (root / "trainer", EVERYTHING)
    args = TrainingArguments(output_dir=str(root / "trainer"), report_to="none", use_cpu=True)
    Trainer(model=model, args=args, processing_class=processor).save_model()

    routes["separate_saves"] = (root / "separate_saves", EVERYTHING)
    model.save_pretrained(routes["separate_saves"][0])
    AutoTokenizer.from_pretrained(saved_checkpoint).save_pretrained(routes["separate_saves"][0])
    AutoImageProcessor.from_pretrained(saved_checkpoint).save_pretrained(routes["separate_saves"][0])
    return routes


@pytest.fixture(scope="module")
def plain_clip(saved_checkpoint, tmp_path_factory):
    model = HFClipModel.from_pretrained(saved_checkpoint).eval()
    return export_clip(model, HFClipProcessor.from_pretrained(saved_checkpoint), tmp_path_factory.mktemp("plain"))


@pytest.fixture(scope="module")
def hub_report(hub_server, saved_checkpoint, tmp_path_factory):
    """Transformers' push_to_hub of hf_clip's model and processor, and a repo holding only pytorch_model.bin."""
    tmp = tmp_path_factory.mktemp("hub")
    marker = tmp / "UNPICKLED"
    write_pickle_bomb(tmp / "pytorch_model.bin", marker)
    report = _run("hub", {"checkpoint": str(saved_checkpoint), "repo_id": "alice/pushed-by-transformers",
                          "pickled_repo_id": "alice/only-a-pickle", "pickle": str(tmp / "pytorch_model.bin"),
                          "pickled_config": str(tmp / "config.json")}, hub_env(hub_server, tmp / "hf_home"))
    return {**report, "unpickled": marker.exists()}


@pytest.fixture(scope="module")
def without_hf_clip(saved_routes, plain_clip, hub_report, hub_server, tmp_path_factory):
    """The report and tensors of one process where hf_clip cannot be imported."""
    tmp = tmp_path_factory.mktemp("without_hf_clip")
    folders = {name: {"path": str(path), "holds": holds} for name, (path, holds) in saved_routes.items()}
    folders["push_to_hub"] = {"path": "alice/pushed-by-transformers", "holds": EVERYTHING}
    job = {"folders": folders, "run_clip_output": str(tmp / "run_clip"), "plain_clip": str(plain_clip),
           "out": str(tmp / "tensors.safetensors")}
    env = {**hub_env(hub_server, tmp / "hf_home"), "TOKENIZERS_PARALLELISM": "false"}
    report = _run("without_hf_clip", job, env)
    return report, load_file(tmp / "tensors.safetensors"), tmp / "run_clip"


@pytest.fixture(scope="module")
def reference(saved_checkpoint):
    """hf_clip's own outputs for the probe inputs."""
    model = HFClipModel.from_pretrained(saved_checkpoint).eval()
    processor = HFClipProcessor.from_pretrained(saved_checkpoint)
    inputs = processor(text=PROBE_TEXTS, images=probe_image(), padding=True, return_tensors="pt")
    with torch.no_grad():
        outputs = model(**inputs)
    scores = pipeline("zero-shot-image-classification", model=str(saved_checkpoint))(
        probe_image(), candidate_labels=LABELS)
    return {"input_ids": inputs["input_ids"], "pixel_values": inputs["pixel_values"], "outputs": outputs,
            "scores": {entry["label"]: entry["score"] for entry in scores}}


def test_every_saved_model_config_carries_the_full_auto_map(saved_routes):
    for name, (path, holds) in saved_routes.items():
        if "model" in holds:
            assert json.loads((Path(path) / "config.json").read_text())["auto_map"] == REMOTE_CODE_AUTO_MAP, name
            for module in ("configuration_hf_clip.py", "modeling_hf_clip.py", "loss.py", "processing_hf_clip.py"):
                assert (Path(path) / module).is_file(), (name, module)


def test_an_image_processor_saved_alone_names_no_remote_code(saved_routes):
    saved = json.loads((saved_routes["image_processor_only"][0] / "preprocessor_config.json").read_text())
    assert "auto_map" not in saved and saved["image_processor_type"] == "CLIPImageProcessor"


@pytest.mark.slow
def test_every_save_route_loads_with_every_auto_class_without_hf_clip(without_hf_clip, reference):
    report, tensors, _ = without_hf_clip
    expected_routes = {"quick_start", "model_only", "processor_only", "tokenizer_only", "image_processor_only",
                       "trainer", "separate_saves", "push_to_hub", "run_clip"}
    assert set(report["folders"]) == expected_routes
    for name, loaded in report["folders"].items():
        if "model" in loaded:
            assert loaded["config"].startswith(REMOTE_MODEL) and loaded["config"].endswith(".HFClipConfig"), name
            assert loaded["model"].startswith(REMOTE_MODEL) and loaded["model"].endswith(".HFClipModel"), name
            assert loaded["zero_shot_model"].endswith(".HFClipModel"), name
        if "processor" in loaded:
            assert loaded["processor"].startswith(REMOTE_MODEL), name
            assert loaded["processor"].endswith(".HFClipProcessor"), name
        if "tokenizer" in loaded:
            assert loaded["tokenizer"].endswith(".CLIPTokenizer"), name
            assert torch.equal(tensors[f"{name}.input_ids"], reference["input_ids"]), name
        if "image_processor" in loaded:
            assert loaded["image_processor"].endswith(".CLIPImageProcessor"), name
            assert loaded["image_processor_auto_map"] is None, name
            assert torch.equal(tensors[f"{name}.pixel_values"], reference["pixel_values"]), name
        if "model" in loaded and "processor" in loaded:
            torch.testing.assert_close(tensors[f"{name}.logits_per_image"],
                                       reference["outputs"].logits_per_image, atol=1e-6, rtol=1e-6)


@pytest.mark.slow
def test_run_clip_route_without_hf_clip_keeps_every_file(without_hf_clip):
    _, _, run_clip = without_hf_clip
    for module in ("configuration_hf_clip.py", "modeling_hf_clip.py", "loss.py", "processing_hf_clip.py"):
        assert (run_clip / module).is_file(), module
    assert json.loads((run_clip / "config.json").read_text())["auto_map"] == REMOTE_CODE_AUTO_MAP


@pytest.mark.slow
def test_feature_extraction_pipelines_with_trust_remote_code(without_hf_clip):
    report, tensors, _ = without_hf_clip
    assert report["feature_extraction"]["image_pipeline_model"].endswith(".HFClipModel")
    assert torch.equal(tensors["pipeline.image_pooled"], tensors["pipeline.get_image_features"])
    ids = tensors["pipeline.input_ids"][0]
    eos = int((ids == ids.max()).nonzero()[0, 0])  # train_clip_tokenizer puts end-of-text at the highest id
    assert torch.equal(tensors["pipeline.text_tokens"][0, eos], tensors["pipeline.text_tower_pooled"][0])


@pytest.mark.slow
def test_sentence_transformers_with_trust_remote_code_equals_the_features(without_hf_clip):
    _, tensors, _ = without_hf_clip
    assert torch.equal(tensors["remote.st_text"], tensors["remote.text_features"])
    assert torch.equal(tensors["remote.st_image"], tensors["remote.image_features"])


@pytest.mark.slow
def test_plain_clip_export_loads_as_clip_without_hf_clip(without_hf_clip, reference, plain_clip):
    report, tensors, _ = without_hf_clip
    assert report["plain"]["model"] == "transformers.models.clip.modeling_clip.CLIPModel"
    assert report["plain"]["processor"] == "transformers.models.clip.processing_clip.CLIPProcessor"
    assert report["plain"]["tokenizer"].endswith(".CLIPTokenizer")
    for key in ("logits_per_image", "text_embeds", "image_embeds"):
        torch.testing.assert_close(tensors[f"plain.{key}"], getattr(reference["outputs"], key), atol=1e-6, rtol=1e-6)
    scores = {entry["label"]: entry["score"] for entry in report["plain"]["pipeline"]}
    assert scores == pytest.approx(reference["scores"], abs=1e-6)
    assert [entry["label"] for entry in report["plain"]["pipeline"]] == sorted(
        reference["scores"], key=reference["scores"].get, reverse=True)
    assert torch.equal(tensors["plain.st_text"], tensors["plain.text_features"])
    assert torch.equal(tensors["plain.st_image"], tensors["plain.image_features"])
    for path in Path(plain_clip).iterdir():
        assert path.suffix != ".py" and "hf_clip" not in path.read_text(errors="ignore").lower(), path.name


@pytest.mark.slow
def test_hub_repo_with_only_pytorch_model_bin_gets_hf_clips_explanation(hub_report):
    message = hub_report["pickled_repo_error"]
    assert message is not None and not hub_report["unpickled"]
    assert "'alice/only-a-pickle' has no model.safetensors, only pytorch_model.bin" in message
    assert "arbitrary code" in message
    assert ("HFClipModel.from_pretrained('alice/only-a-pickle', use_safetensors=False).save_pretrained('converted')"
            in message)


def test_export_clip_refuses_a_siglip_model_and_says_why(tokenizer, tmp_path):
    model, processor = tiny_siglip_model_and_processor(tokenizer)
    with pytest.raises(ValueError, match=r"loss_type 'siglip'.*logit_bias \(-10\).*drop_logit_bias=True"):
        export_clip(model, processor, tmp_path / "refused")
    assert not (tmp_path / "refused").exists()
    out = export_clip(model, processor, tmp_path / "dropped", drop_logit_bias=True)
    assert "logit_bias" not in load_file(out / "model.safetensors")


def test_export_clip_stores_the_clamped_temperature(saved_checkpoint, tmp_path):
    from transformers import CLIPModel

    model = HFClipModel.from_pretrained(saved_checkpoint).eval()
    with torch.no_grad():
        model.logit_scale.fill_(7.0)  # above ln(100): hf_clip's forward clamps it, CLIPModel would not
    out = export_clip(model, HFClipProcessor.from_pretrained(saved_checkpoint), tmp_path / "plain")
    clip = CLIPModel.from_pretrained(out)
    assert clip.logit_scale.exp().item() == pytest.approx(model.clamped_logit_scale().item(), rel=1e-6)


def test_hf_clip_export_clip_command_writes_a_plain_clip_folder(saved_checkpoint, tmp_path):
    from hf_clip.export import main

    main(["clip", str(saved_checkpoint), str(tmp_path / "plain")])
    assert json.loads((tmp_path / "plain" / "config.json").read_text())["model_type"] == "clip"
    assert os.path.isfile(tmp_path / "plain" / "preprocessor_config.json")


def test_export_onnx_without_the_onnx_extra_names_it(saved_checkpoint, tmp_path, monkeypatch, capsys):
    from hf_clip.export import export_onnx, main

    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if the [onnx] extra were only partly installed
    model = HFClipModel.from_pretrained(saved_checkpoint)
    with pytest.raises(ImportError, match=r'onnxruntime not installed\. Install it with: pip install "hf-clip\[onnx'):
        export_onnx(model, HFClipProcessor.from_pretrained(saved_checkpoint), tmp_path)
    with pytest.raises(SystemExit) as exited:
        main(["onnx", str(saved_checkpoint), str(tmp_path / "out")])
    assert exited.value.code == 1 and 'pip install "hf-clip[onnx]"' in capsys.readouterr().err
