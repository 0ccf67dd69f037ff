"""Clients of saved hf_clip folders, run in their own process.

    python tests/elsewhere_workers.py hub '{"checkpoint": DIR, "repo_id": ..., "pickled_repo_id": ..., ...}'
    python tests/elsewhere_workers.py without_hf_clip '{"folders": {...}, "out": FILE, ...}'

`hub` (hf_clip importable, `HF_ENDPOINT` at the test server) pushes a model and its processor with Transformers'
own `push_to_hub` methods, and loads a repo that holds only a pickled `pytorch_model.bin` with
`HFClipModel.from_pretrained`. `without_hf_clip` runs in a process where hf_clip cannot be imported: the save route
of Transformers' run_clip.py, then every Auto class, pipeline and sentence-transformers check on every folder.
The last stdout line is a JSON report; tensors go to the safetensors file `out`.
"""

import json
import sys

if sys.argv[1] == "without_hf_clip":
    sys.modules["hf_clip"] = None  # hf_clip cannot be imported in this process

import torch  # noqa: E402
from hub_workers import LABELS, probe_image  # noqa: E402

PROBE_TEXTS = [f"a {label}" for label in LABELS]


def hub(job: dict) -> dict:
    from huggingface_hub import HfApi

    import hf_clip

    model = hf_clip.HFClipModel.from_pretrained(job["checkpoint"])
    processor = hf_clip.HFClipProcessor.from_pretrained(job["checkpoint"])
    model.push_to_hub(job["repo_id"])
    processor.push_to_hub(job["repo_id"])

    api = HfApi()
    api.create_repo(job["pickled_repo_id"])
    model.config.to_json_file(job["pickled_config"])
    for source, name in ((job["pickled_config"], "config.json"), (job["pickle"], "pytorch_model.bin")):
        api.upload_file(path_or_fileobj=source, path_in_repo=name, repo_id=job["pickled_repo_id"])
    try:
        hf_clip.HFClipModel.from_pretrained(job["pickled_repo_id"])
    except OSError as error:
        return {"pickled_repo_error": str(error)}
    return {"pickled_repo_error": None}


def _names(obj) -> str:
    return f"{type(obj).__module__}.{type(obj).__name__}"


def _run_clip_route(source: str, output_dir: str) -> None:
    """What Transformers' examples/pytorch/contrastive-image-text/run_clip.py does with `--trust_remote_code`:
    model, tokenizer and image processor loaded one by one, then `trainer.save_model()` and the two processor
    parts saved on their own into the output folder."""
    from transformers import AutoImageProcessor, AutoModel, AutoTokenizer, Trainer, TrainingArguments

    model = AutoModel.from_pretrained(source, trust_remote_code=True)
    tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=True)
    image_processor = AutoImageProcessor.from_pretrained(source, trust_remote_code=True)
    args = TrainingArguments(output_dir=output_dir, report_to="none", use_cpu=True)
    Trainer(model=model, args=args).save_model()
    tokenizer.save_pretrained(output_dir)
    image_processor.save_pretrained(output_dir)


def _check_folder(name: str, path: str, holds: list[str], tensors: dict) -> dict:
    """Load what `path` holds with every Auto class for it (trust_remote_code=True); record classes and outputs."""
    from transformers import (
        AutoConfig,
        AutoImageProcessor,
        AutoModel,
        AutoModelForZeroShotImageClassification,
        AutoProcessor,
        AutoTokenizer,
    )

    report = {}
    if "model" in holds:
        report["config"] = _names(AutoConfig.from_pretrained(path, trust_remote_code=True))
        model = AutoModel.from_pretrained(path, trust_remote_code=True).eval()
        report["model"] = _names(model)
        report["zero_shot_model"] = _names(
            AutoModelForZeroShotImageClassification.from_pretrained(path, trust_remote_code=True))
    if "tokenizer" in holds:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=True)
        report["tokenizer"] = _names(tokenizer)
        tensors[f"{name}.input_ids"] = tokenizer(PROBE_TEXTS, padding=True, return_tensors="pt")["input_ids"]
    if "image_processor" in holds:
        image_processor = AutoImageProcessor.from_pretrained(path, trust_remote_code=True)
        report["image_processor"] = _names(image_processor)
        report["image_processor_auto_map"] = image_processor.to_dict().get("auto_map")
        tensors[f"{name}.pixel_values"] = image_processor(probe_image(), return_tensors="pt")["pixel_values"]
    if "processor" in holds:
        processor = AutoProcessor.from_pretrained(path, trust_remote_code=True)
        report["processor"] = _names(processor)
        if "model" in holds:
            inputs = processor(text=PROBE_TEXTS, images=probe_image(), padding=True, return_tensors="pt")
            with torch.no_grad():
                tensors[f"{name}.logits_per_image"] = model(**inputs).logits_per_image
    return report


def _feature_extraction(path: str, tensors: dict) -> dict:
    """Transformers' feature-extraction pipelines on an hf_clip folder, against the model's own features."""
    from transformers import AutoModel, AutoProcessor, pipeline

    model = AutoModel.from_pretrained(path, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(path, trust_remote_code=True)
    image_pipe = pipeline("image-feature-extraction", model=path, trust_remote_code=True)
    text_pipe = pipeline("feature-extraction", model=path, trust_remote_code=True)
    image, text = probe_image(), PROBE_TEXTS[0]
    with torch.no_grad():
        tensors["pipeline.get_image_features"] = model.get_image_features(
            **image_pipe.image_processor(image, return_tensors="pt")).pooler_output
        ids = processor.tokenizer(text, return_tensors="pt")
        tensors["pipeline.text_tower_pooled"] = model.text_model(**ids).pooler_output
    tensors["pipeline.image_pooled"] = image_pipe(image, pool=True, return_tensors=True)
    tensors["pipeline.text_tokens"] = text_pipe(text, return_tensors=True)
    tensors["pipeline.input_ids"] = ids["input_ids"]
    return {"image_pipeline_model": _names(image_pipe.model), "text_pipeline_model": _names(text_pipe.model)}


def _sentence_transformers(name: str, path: str, tensors: dict, trust_remote_code: bool) -> None:
    """sentence-transformers' embeddings of the probe texts and image, and the model's own features."""
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel, AutoProcessor

    encoder = SentenceTransformer(path, device="cpu", trust_remote_code=trust_remote_code)
    tensors[f"{name}.st_text"] = encoder.encode(PROBE_TEXTS, convert_to_tensor=True)
    tensors[f"{name}.st_image"] = encoder.encode([probe_image()], convert_to_tensor=True)
    model = AutoModel.from_pretrained(path, trust_remote_code=trust_remote_code).eval()
    processor = AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)
    with torch.no_grad():
        tensors[f"{name}.text_features"] = model.get_text_features(
            **processor(text=PROBE_TEXTS, padding=True, return_tensors="pt")).pooler_output
        tensors[f"{name}.image_features"] = model.get_image_features(
            **processor(images=probe_image(), return_tensors="pt")).pooler_output


def _plain_clip(path: str, tensors: dict) -> dict:
    from transformers import AutoModel, AutoProcessor, pipeline

    model = AutoModel.from_pretrained(path).eval()
    processor = AutoProcessor.from_pretrained(path)
    inputs = processor(text=PROBE_TEXTS, images=probe_image(), padding=True, return_tensors="pt")
    with torch.no_grad():
        outputs = model(**inputs)
    for key in ("logits_per_image", "text_embeds", "image_embeds"):
        tensors[f"plain.{key}"] = outputs[key]
    classifier = pipeline("zero-shot-image-classification", model=path)
    _sentence_transformers("plain", path, tensors, trust_remote_code=False)
    return {"model": _names(model), "processor": _names(processor), "tokenizer": _names(processor.tokenizer),
            "pipeline": classifier(probe_image(), candidate_labels=LABELS)}


def without_hf_clip(job: dict) -> dict:
    from safetensors.torch import save_file

    _run_clip_route(job["folders"]["quick_start"]["path"], job["run_clip_output"])
    folders = {**job["folders"], "run_clip": {"path": job["run_clip_output"],
                                              "holds": ["model", "processor", "tokenizer", "image_processor"]}}
    tensors = {}
    report = {"folders": {name: _check_folder(name, spec["path"], spec["holds"], tensors)
                          for name, spec in folders.items()}}
    report["feature_extraction"] = _feature_extraction(job["folders"]["quick_start"]["path"], tensors)
    _sentence_transformers("remote", job["folders"]["quick_start"]["path"], tensors, trust_remote_code=True)
    report["plain"] = _plain_clip(job["plain_clip"], tensors)
    save_file({key: value.contiguous() for key, value in tensors.items()}, job["out"])
    return report


if __name__ == "__main__":
    torch.set_num_threads(2)
    command, job = sys.argv[1], json.loads(sys.argv[2])
    print(json.dumps({"hub": hub, "without_hf_clip": without_hf_clip}[command](job)))
