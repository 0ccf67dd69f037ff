"""The index folder's layout and what it records of the model that built it.

    embeddings/         a `datasets` dataset (save_to_disk): row_id, image_embedding, text_embedding, kept columns
    image.faiss         a FAISS index over image_embedding, whose id i is row i of embeddings/ (needs faiss)
    index_info.json     how it was built: the model and the fingerprint of its weights, dtype, metric, index type,
                        dimension, row count, and for an approximate index its recall@10 against exact search
    skipped_rows.jsonl  the rows that could not be embedded (undecodable image, empty caption), with the reason
    README.md           a dataset card, so the folder can be pushed to the Hub as a dataset repo
    shards/             while it is being built: the resumable embedding shards (`search.embed`) and plan.json
"""

import hashlib
from pathlib import Path
from typing import Any

import torch

EMBEDDINGS_DIR = "embeddings"
FAISS_FILE = "image.faiss"
INFO_FILE = "index_info.json"
SKIPPED_FILE = "skipped_rows.jsonl"
SHARDS_DIR = "shards"
PLAN_FILE = "plan.json"
CARD_FILE = "README.md"
FORMAT_VERSION = 1


def model_fingerprint(model) -> str:
    """sha256 over the model's state dict (names, shapes, dtypes and bytes, in order): two models embed alike
    exactly when their fingerprints are equal."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return f"sha256:{digest.hexdigest()}"


def describe_model(model, model_name_or_path: str) -> dict[str, Any]:
    """What an index records of the model that built it."""
    path = Path(model_name_or_path).expanduser()
    return {"name_or_path": str(path.resolve()) if path.exists() else model_name_or_path,
            "revision": getattr(model.config, "_commit_hash", None), "model_type": model.config.model_type,
            "fingerprint": model_fingerprint(model), "dtype": str(model.dtype).removeprefix("torch."),
            "dimension": model.config.projection_dim}
