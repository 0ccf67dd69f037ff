"""`hf-clip-index`: embed a dataset split, store it and index it (it needs the `[train]` extra).

    hf-clip-index --model_name_or_path M --dataset_name D --caption_column caption --keep_columns caption \\
        --output_dir OUT                                       # python -m hf_clip_train.search index ...
    accelerate launch -m hf_clip_train.search index ...        # each process embeds its share of the shards
"""

import json
import logging
from pathlib import Path
from typing import Any

from transformers import AutoModel, AutoProcessor

from hf_clip.cli import UsageError

from ..args import DatasetArguments, IndexArguments, LoaderArguments, ModelArguments, parse_with_config_file
from ..data.batches import worker_count
from ..data.sources import columns_of, load_train_split
from ..runtime import process_state, setup_logging
from .embed import EmbeddingSettings
from .folder import ChangedSettingsError, FinishedIndexError, NothingToIndexError, build_search_index
from .layout import SKIPPED_FILE
from .query import push_index_to_hub

INDEX_ARGUMENT_CLASSES = (ModelArguments, DatasetArguments, LoaderArguments, IndexArguments)
INDEX_DEFAULTS = {"caption_column": None}


def parse_index_args(argv: list[str] | None = None
                     ) -> tuple[ModelArguments, DatasetArguments, LoaderArguments, IndexArguments]:
    model_args, data_args, loader_args, index_args = parse_with_config_file(INDEX_ARGUMENT_CLASSES, argv,
                                                                            defaults=INDEX_DEFAULTS)
    if model_args.model_name_or_path is None:
        raise ValueError("--model_name_or_path is required: the hf_clip or Transformers CLIP model to embed with.")
    return model_args, data_args, loader_args, index_args


def index_main(argv: list[str] | None = None) -> dict[str, Any] | None:
    """`hf-clip-index`: embed a dataset split, store it and index it; returns index_info.json's content on the main
    process (None on the others)."""
    # 1. Arguments, processes, the model.
    model_args, data_args, loader_args, index_args = parse_index_args(argv)
    state = process_state()
    setup_logging(state.is_main_process)
    logging.getLogger("faiss").setLevel(logging.WARNING)
    model = AutoModel.from_pretrained(model_args.model_name_or_path).to(state.device)
    processor = AutoProcessor.from_pretrained(model_args.model_name_or_path)

    # 2. The split, checked for its columns and cut to --max_train_samples.
    columns = columns_of(data_args, caption=data_args.caption_column is not None, label=False)
    needed = {"image_column": columns.image}
    if columns.caption is not None:
        needed["caption_column"] = columns.caption
    needed.update({f"keep_columns ({name})": name for name in index_args.keep_columns})
    dataset = load_train_split(data_args, needed, max_rows=data_args.max_train_samples)

    # 3. Embed (each process its shards), merge and index.
    settings = EmbeddingSettings(columns, index_args.keep_columns, index_args.shard_size,
                                 loader_args.per_device_eval_batch_size,
                                 worker_count(loader_args.dataloader_num_workers))
    source = {"dataset_name": local_path_or_name(data_args.dataset_name),
              "dataset_config_name": data_args.dataset_config_name, "split": data_args.train_split,
              "max_rows": data_args.max_train_samples,
              "embedded_num_train": data_args.embedded_num_train if data_args.dataset_name is None else None}
    try:
        info = build_search_index(model, processor, dataset, index_args.output_dir, settings,
                                  index_type=index_args.index_type, target_recall=index_args.target_recall,
                                  overwrite=index_args.overwrite_output_dir, source=source,
                                  model_name_or_path=model_args.model_name_or_path)
    except (NothingToIndexError, FinishedIndexError, ChangedSettingsError) as error:
        raise UsageError(str(error)) from error

    # 4. Report, and push.
    if info is not None:
        print(format_index_summary(Path(index_args.output_dir), info))
        if index_args.hub_dataset_id:
            commit = push_index_to_hub(index_args.output_dir, index_args.hub_dataset_id)
            print(f"Pushed to the Hub: {commit.commit_url}")
    state.wait_for_everyone()
    return info


def local_path_or_name(name: str | None) -> str | None:
    """A dataset name that is a local path (or glob) made absolute, so the index records which data it was; a Hub
    id as it is."""
    if name is None or "://" in name or not Path(name.split("*")[0] or ".").expanduser().exists():
        return name
    return str(Path(name).expanduser().absolute())


def format_index_summary(output_dir: Path, info: dict[str, Any]) -> str:
    lines = [f"Indexed {info['num_rows']} of {info['num_source_rows']} rows into {output_dir} ({info['index_type']} "
             f"{info['metric']} index, {info['dimension']} dimensions, {info['backend']})."]
    if info.get("recall_at_10") is not None:
        by_kind = ", ".join(f"{kind} queries {recall:.3f}" for kind, recall in info["recall_at_10_by_query"].items())
        lines.append(f"Approximate index ({info['factory']}, {info['nprobe']} of {info['nlist']} lists probed): "
                     f"recall@10 {info['recall_at_10']:.3f} against exact search ({by_kind}; "
                     f"{info['recall_queries']} queries).")
    if info["num_skipped_rows"]:
        ids = [json.loads(line)["row_id"] for line in (output_dir / SKIPPED_FILE).read_text().splitlines()[:10]]
        more = ", ..." if info["num_skipped_rows"] > len(ids) else ""
        lines.append(f"Skipped {info['num_skipped_rows']} unusable rows (listed in {SKIPPED_FILE}): "
                     f"{', '.join(map(str, ids))}{more}")
    return "\n".join(lines)
