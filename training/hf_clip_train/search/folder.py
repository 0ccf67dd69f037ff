"""Building an index folder (`search.layout`): the plan that a resumed build must match, embedding into resumable
shards (`search.embed`), merging them, indexing (`search.ann`), and the dataset card."""

import json
import logging
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import datasets

from hf_clip import __version__ as hf_clip_version

from ..data.batches import ProcessShare
from ..runtime import process_state
from .ann import METRIC, build_index, check_index_type, import_faiss
from .embed import EmbeddingSettings, embed_dataset, merge_embedding_shards
from .layout import (
    CARD_FILE,
    EMBEDDINGS_DIR,
    FAISS_FILE,
    FORMAT_VERSION,
    INFO_FILE,
    PLAN_FILE,
    SHARDS_DIR,
    SKIPPED_FILE,
    describe_model,
)

logger = logging.getLogger(__name__)


def prepare_output_dir(output_dir: Path, plan: dict[str, Any], overwrite: bool) -> None:
    """Start or resume: refuse a finished index (unless `overwrite`) and shards begun with other settings (`plan`:
    what decides the shards' contents)."""
    shard_dir = output_dir / SHARDS_DIR
    if overwrite:
        for name in (EMBEDDINGS_DIR, SHARDS_DIR):
            shutil.rmtree(output_dir / name, ignore_errors=True)
        for name in (FAISS_FILE, INFO_FILE, SKIPPED_FILE, CARD_FILE):
            (output_dir / name).unlink(missing_ok=True)
    if (output_dir / INFO_FILE).exists():
        raise FileExistsError(f"{output_dir} already holds a finished index; pass --overwrite_output_dir "
                              "(overwrite=True) to rebuild it, or choose another output folder.")
    plan_path = shard_dir / PLAN_FILE
    if plan_path.exists():
        started = json.loads(plan_path.read_text())
        changed = [f"{key} {started.get(key)!r} (now {value!r})" for key, value in plan.items()
                   if started.get(key) != value]
        if changed:
            raise ValueError(f"{shard_dir} holds shards of a run with other settings: {'; '.join(changed)}. Resume "
                             "with the same settings, or pass --overwrite_output_dir (overwrite=True) to start over.")
        logger.info("Resuming the shards in %s", shard_dir)
        return
    shard_dir.mkdir(parents=True, exist_ok=True)
    plan_path.write_text(json.dumps(plan, indent=2))


def dataset_card(info: dict[str, Any]) -> str:
    """The README.md of an index folder, for the Hub."""
    source = info["source"]
    name = source.get("dataset_name") or "the hf_clip embedded shapes dataset"
    split = f"the `{source['split']}` split of " if source.get("split") else ""
    lines = ["---", "tags:", "- hf_clip", "- clip", "- embeddings", "- image-retrieval", "---", "",
             f"# Search index of {name}", "",
             f"CLIP embeddings of {split}{name} ({info['num_rows']} rows embedded, {info['num_skipped_rows']} "
             f"skipped), made with `{info['model']['name_or_path']}` by hf_clip {info['hf_clip_version']}: "
             "`image_embedding`" + (" and `text_embedding`" if info["text_embeddings"] else "")
             + f" ({info['dimension']} dimensions, L2-normalised), the dataset's `row_id` and the kept columns "
             + f"{info['kept_columns']}, with a {info['index_type']} index over the image embeddings.", "",
             "```python", "from hf_clip_train.search import ImageTextIndex", "",
             "index = ImageTextIndex.load(REPO_ID, model_name_or_path=MODEL)  # the model that built the index",
             'print(index.search("a photo of a dog", k=5))', "```", ""]
    return "\n".join(lines)


def finish_index(output_dir: Path, num_rows: int, model_info: dict[str, Any], source: dict[str, Any],
                 keep_columns: Sequence[str], index_type: str, target_recall: float) -> dict[str, Any]:
    """Merge the shards into embeddings/, build the search index, write skipped_rows.jsonl, README.md and, last,
    index_info.json (its presence marks a finished index); the shards are then removed."""
    shard_dir = output_dir / SHARDS_DIR
    merged, skipped = merge_embedding_shards(shard_dir, num_rows)
    shutil.rmtree(output_dir / EMBEDDINGS_DIR, ignore_errors=True)
    merged.save_to_disk(str(output_dir / EMBEDDINGS_DIR))
    embeddings = datasets.load_from_disk(str(output_dir / EMBEDDINGS_DIR))
    built = build_index(embeddings, index_type, target_recall)
    if built.index is not None:
        import_faiss("Writing the index").write_index(built.index, str(output_dir / FAISS_FILE))
    with open(output_dir / SKIPPED_FILE, "w") as handle:
        handle.writelines(json.dumps(item) + "\n" for item in skipped)
    info = {
        "format_version": FORMAT_VERSION, "hf_clip_version": hf_clip_version, "model": model_info,
        "dtype": model_info["dtype"], "embedding_dtype": "float32", "metric": METRIC, "normalized": True,
        "dimension": model_info["dimension"], "num_rows": len(embeddings), "num_source_rows": num_rows,
        "num_skipped_rows": len(skipped), "text_embeddings": "text_embedding" in embeddings.column_names,
        "kept_columns": list(keep_columns), "source": source, **built.info,
    }
    (output_dir / CARD_FILE).write_text(dataset_card(info))
    (output_dir / INFO_FILE).write_text(json.dumps(info, indent=2))
    shutil.rmtree(shard_dir)
    return info


def build_search_index(model, processor, dataset: datasets.Dataset | datasets.IterableDataset,
                       output_dir: str | Path, settings: EmbeddingSettings, *, index_type: str = "flat",
                       target_recall: float = 0.95, overwrite: bool = False, source: dict[str, Any] | None = None,
                       model_name_or_path: str | None = None) -> dict[str, Any] | None:
    """Embed `dataset` into `output_dir` (resuming its finished shards), merge the shards and index them; returns
    index_info.json's content on the main process, None on the others. Under `accelerate launch` / `torchrun` every
    process must call it: each embeds its share of the shards. `source` (recorded in index_info.json, and checked
    when resuming) describes the dataset; `model_name_or_path` (default: the model's own) is where
    `ImageTextIndex.load` finds the model again."""
    check_index_type(index_type)
    state = process_state()
    output_dir = Path(output_dir)
    model_info = describe_model(model, model_name_or_path or model.name_or_path)
    columns = settings.columns
    source = {**(source or {}), "image_column": columns.image, "caption_column": columns.caption,
              "base_dir": None if columns.base_dir is None else str(Path(columns.base_dir).resolve()),
              "streaming": isinstance(dataset, datasets.IterableDataset)}
    plan = {"format_version": FORMAT_VERSION, "model_fingerprint": model_info["fingerprint"], "source": source,
            "num_rows": None if source["streaming"] else len(dataset), "keep_columns": list(settings.keep_columns),
            "shard_size": settings.shard_size}
    if state.is_main_process:
        prepare_output_dir(output_dir, plan, overwrite)
    state.wait_for_everyone()
    started = time.perf_counter()
    num_rows = embed_dataset(model, processor, dataset, output_dir / SHARDS_DIR, settings,
                             ProcessShare(state.process_index, state.num_processes))
    logger.info("Embedded this process's shards in %.1f s", time.perf_counter() - started)
    state.wait_for_everyone()
    info = None
    if state.is_main_process:
        info = finish_index(output_dir, num_rows, model_info, source, settings.keep_columns, index_type,
                            target_recall)
    state.wait_for_everyone()
    return info
