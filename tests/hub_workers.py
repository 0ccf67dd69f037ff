"""Hub round-trip steps that run in their own process, pointed at the test server by `HF_ENDPOINT` (which
`huggingface_hub` reads at import).

    python tests/hub_workers.py push '{"checkpoint": DIR, "repo_id": ..., ...}'
    python tests/hub_workers.py pull '{"repo_id": ..., "out": FILE, ...}' [--without-hf-clip]

The last stdout line is a JSON report.
"""

import json
import sys

if "--without-hf-clip" in sys.argv:
    sys.modules["hf_clip"] = None  # hf_clip cannot be imported in this process

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

LABELS = ["red circle", "blue square", "green triangle"]


def probe_image() -> Image.Image:
    """The fixed 50×40 noise image the tests compare outputs on."""
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, size=(40, 50, 3), dtype=np.uint8))


def probe_inputs(processor) -> dict[str, torch.Tensor]:
    """The probe image and one caption per label, as model inputs."""
    return processor(text=[f"a {label}" for label in LABELS], images=probe_image(), padding=True,
                     return_tensors="pt")


def model_outputs(model, processor) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        outputs = model.eval()(**probe_inputs(processor))
    return {"logits_per_image": outputs.logits_per_image, "image_embeds": outputs.image_embeds,
            "text_embeds": outputs.text_embeds}


def push(job: dict) -> dict:
    import hf_clip

    model = hf_clip.HFClipModel.from_pretrained(job["checkpoint"])
    if job.get("logit_scale_shift"):
        with torch.no_grad():
            model.logit_scale.add_(job["logit_scale_shift"])
    processor = hf_clip.HFClipProcessor.from_pretrained(job["checkpoint"])
    if job.get("transformers_method"):  # PreTrainedModel.push_to_hub / ProcessorMixin.push_to_hub
        model.push_to_hub(job["repo_id"])
        return {"oid": processor.push_to_hub(job["repo_id"]).oid}
    card = hf_clip.ModelCardInfo(**job["card"]) if "card" in job else None
    commit = hf_clip.push_to_hub(model, processor, job["repo_id"], card, retry_base_delay=0.05, **job.get("kwargs", {}))
    return {"oid": commit.oid}


def push_transformers_clip(job: dict) -> dict:
    """A Transformers CLIPModel repo laid out like openai/clip-vit-base-patch32, plus a pickled pytorch_model.bin
    whose unpickling would write `job["marker"]`."""
    from huggingface_hub import HfApi
    from transformers import CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(job["checkpoint"])
    model.push_to_hub(job["repo_id"])
    CLIPProcessor.from_pretrained(job["checkpoint"]).push_to_hub(job["repo_id"])
    HfApi().upload_file(path_or_fileobj=job["pickle"], path_in_repo="pytorch_model.bin", repo_id=job["repo_id"])
    return {}


def pull(job: dict) -> dict:
    from safetensors.torch import save_file
    from transformers import AutoModel, AutoProcessor, pipeline

    remote = {"trust_remote_code": True} if job.get("trust_remote_code") else {}
    revision = job.get("revision")
    if job.get("hf_clip_model_class"):
        from hf_clip import HFClipModel

        model = HFClipModel.from_pretrained(job["repo_id"], revision=revision)
        processor = AutoProcessor.from_pretrained(job["repo_id"], revision=revision)
    else:
        if not remote:
            import hf_clip  # noqa: F401  (registers the Auto classes)
        model = AutoModel.from_pretrained(job["repo_id"], revision=revision, **remote)
        processor = AutoProcessor.from_pretrained(job["repo_id"], revision=revision, **remote)
    tensors = model_outputs(model, processor)
    tensors.update({f"state.{k}": v.contiguous() for k, v in model.state_dict().items()})
    save_file(tensors, job["out"])
    report = {"model_class": f"{type(model).__module__}.{type(model).__name__}",
              "processor_class": type(processor).__name__}
    if job.get("pipeline"):
        classifier = pipeline("zero-shot-image-classification", model=job["repo_id"], revision=revision, **remote)
        report["pipeline"] = classifier(probe_image(), candidate_labels=LABELS)
    return report


if __name__ == "__main__":
    torch.set_num_threads(2)
    command, job = sys.argv[1], json.loads(sys.argv[2])
    try:
        report = {"push": push, "push_transformers_clip": push_transformers_clip, "pull": pull}[command](job)
    except Exception as error:  # reported to the test, which checks the type and message
        print(json.dumps({"error": type(error).__name__, "message": str(error)}))
        sys.exit(1)
    print(json.dumps(report))
