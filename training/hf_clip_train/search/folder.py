"""Building an index folder (`search.layout`): the plan that a resumed build must match, embedding into resumable
shards (`search.embed`), merging them, indexing (`search.ann`), and the dataset card."""

import json
import logging
import os
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
from .checks import FILES_KEY, record_index_files
from .embed import EmbeddingSettings, embed_dataset, merge_embedding_shards
from .hub import dataset_card
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


class FinishedIndexError(FileExistsError):
    """An output folder that already holds a finished index (pass overwrite to rebuild it)."""


class ChangedSettingsError(ValueError):
    """Shards begun with other settings than the run that would resume them."""


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
        raise FinishedIndexError(f"{output_dir} already holds a finished index; pass --overwrite_output_dir "
                              "(overwrite=True) to rebuild it, or choose another output folder.")
    plan_path = shard_dir / PLAN_FILE
    if plan_path.exists():
        started = json.loads(plan_path.read_text())
        changed = [f"{key} {started.get(key)!r} (now {value!r})" for key, value in plan.items()
                   if started.get(key) != value]
        if changed:
            raise ChangedSettingsError(
                f"{shard_dir} holds shards of a run with other settings: {'; '.join(changed)}. Resume with the same "
                "settings, or pass --overwrite_output_dir (overwrite=True) to start over.")
        logger.info("Resuming the shards in %s", shard_dir)
        return
    shard_dir.mkdir(parents=True, exist_ok=True)
    plan_path.write_text(json.dumps(plan, indent=2))


class NothingToIndexError(ValueError):
    """A dataset split with no row, or none that could be embedded."""


def nothing_to_index(num_rows: int, skipped: list[dict[str, Any]], source: dict[str, Any], skipped_file: Path
                     ) -> NothingToIndexError:
    """The error for a build with no row to index: the split is empty, or every row was skipped."""
    split = f"the {source['split']!r} split of " if source.get("split") else ""
    name = f"{split}{source.get('dataset_name') or 'the embedded dataset'}"
    if num_rows == 0:
        return NothingToIndexError(f"{name} has no rows: there is nothing to index.")
    first = skipped[0]
    return NothingToIndexError(
        f"No row of {name} could be embedded: all {num_rows} were skipped (listed in {skipped_file}; row "
        f"{first['row_id']}: {first['error']}). Check --image_column and --caption_column, and that the images "
        "decode.")


def remove_unfinished_build(output_dir: Path, skipped: list[dict[str, Any]]) -> None:
    """After a build that embedded no row: remove its shards and any file of an index, and list the skipped rows."""
    shutil.rmtree(output_dir / SHARDS_DIR, ignore_errors=True)
    shutil.rmtree(output_dir / EMBEDDINGS_DIR, ignore_errors=True)
    for name in (FAISS_FILE, CARD_FILE, SKIPPED_FILE):
        (output_dir / name).unlink(missing_ok=True)
    if skipped:
        with open(output_dir / SKIPPED_FILE, "w") as handle:
            handle.writelines(json.dumps(item) + "\n" for item in skipped)


def finish_index(output_dir: Path, num_rows: int, model_info: dict[str, Any], source: dict[str, Any],
                 keep_columns: Sequence[str], index_type: str, target_recall: float) -> dict[str, Any]:
    """Merge the shards into embeddings/, build the search index, write skipped_rows.jsonl, README.md and, last,
    index_info.json (its presence marks a finished index); the shards are then removed."""
    shard_dir = output_dir / SHARDS_DIR
    merged, skipped = merge_embedding_shards(shard_dir, num_rows)
    if len(merged) == 0:
        remove_unfinished_build(output_dir, skipped)
        raise nothing_to_index(num_rows, skipped, source, output_dir / SKIPPED_FILE)
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
    info[FILES_KEY] = record_index_files(output_dir)
    (output_dir / CARD_FILE).write_text(dataset_card(info))
    temporary = output_dir / f"{INFO_FILE}.tmp-{os.getpid()}"
    temporary.write_text(json.dumps(info, indent=2))
    os.replace(temporary, output_dir / INFO_FILE)
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
    if not isinstance(dataset, datasets.IterableDataset) and len(dataset) == 0:
        raise nothing_to_index(0, [], source or {}, Path(output_dir) / SKIPPED_FILE)
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
    info, refused = None, None
    if state.is_main_process:
        try:
            info = finish_index(output_dir, num_rows, model_info, source, settings.keep_columns, index_type,
                                target_recall)
        except NothingToIndexError as error:
            refused = error
    state.wait_for_everyone()
    if refused is not None:
        raise refused
    return info
