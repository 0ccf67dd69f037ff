"""`hf-clip-index` (embed a dataset split, store it and index it) and `hf-clip-search` (query an index).

    hf-clip-index --model_name_or_path M --dataset_name D --caption_column caption --keep_columns caption \\
        --output_dir OUT                                       # python -m hf_clip_train.search index ...
    accelerate launch -m hf_clip_train.search index ...        # each process embeds its share of the shards
    hf-clip-search OUT "a red circle" -k 5 --html hits.html    # python -m hf_clip_train.search query ...
"""

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from transformers import AutoModel, AutoProcessor

from ..args import DatasetArguments, IndexArguments, LoaderArguments, ModelArguments, parse_with_config_file
from ..data.batches import worker_count
from ..data.sources import columns_of, load_train_split
from ..runtime import process_state, setup_logging
from .embed import EmbeddingSettings
from .folder import build_search_index
from .layout import SKIPPED_FILE
from .query import ImageTextIndex, SearchResult, push_index_to_hub
from .render import format_hits_table, render_html

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
    source = {"dataset_name": data_args.dataset_name, "dataset_config_name": data_args.dataset_config_name,
              "split": data_args.train_split, "max_rows": data_args.max_train_samples,
              "embedded_num_train": data_args.embedded_num_train if data_args.dataset_name is None else None}
    info = build_search_index(model, processor, dataset, index_args.output_dir, settings,
                              index_type=index_args.index_type, target_recall=index_args.target_recall,
                              overwrite=index_args.overwrite_output_dir, source=source,
                              model_name_or_path=model_args.model_name_or_path)

    # 4. Report, and push.
    if info is not None:
        print(format_index_summary(Path(index_args.output_dir), info))
        if index_args.hub_dataset_id:
            commit = push_index_to_hub(index_args.output_dir, index_args.hub_dataset_id)
            print(f"Pushed to the Hub: {commit.commit_url}")
    state.wait_for_everyone()
    return info


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


def search_main(argv: list[str] | None = None) -> list[SearchResult]:
    """`hf-clip-search`: query an index by text or image, print the hits as a table, optionally write an HTML page."""
    parser = argparse.ArgumentParser(prog="hf-clip-search", description="Query an index built by hf-clip-index.")
    parser.add_argument("index", help="Index folder written by hf-clip-index, or a Hub dataset repo id holding one.")
    parser.add_argument("queries", nargs="*", help="Text queries.")
    parser.add_argument("--image", action="append", default=[], metavar="PATH",
                        help="An image file to query with (repeat for several).")
    parser.add_argument("-k", "--k", type=int, default=10, help="Hits per query (default 10).")
    parser.add_argument("--target", choices=("image", "text"), default="image",
                        help="Search the image embeddings (default) or the caption embeddings.")
    parser.add_argument("--model_name_or_path", default=None,
                        help="Where the index's model is, when not where index_info.json says.")
    parser.add_argument("--revision", default=None, help="Revision of a Hub dataset repo.")
    parser.add_argument("--html", default=None, metavar="PAGE", help="Also write the hits as a static HTML page.")
    args = parser.parse_args(argv)
    if not args.queries and not args.image:
        parser.error("give at least one text query or --image PATH.")
    if args.k < 1:
        parser.error(f"-k must be at least 1, got {args.k}.")
    from hf_clip import to_rgb_image

    images = []
    for path in args.image:
        image = to_rgb_image(path)
        image.filename = path
        images.append(image)
    index = ImageTextIndex.load(args.index, model_name_or_path=args.model_name_or_path, revision=args.revision)
    results = index.search([*args.queries, *images], k=args.k, target=args.target)
    print(format_hits_table(results, index.kept_features))
    if args.html:
        Path(args.html).write_text(render_html(results, index))
        print(f"Wrote {args.html}")
    return results


def main(argv: list[str] | None = None) -> None:
    """`python -m hf_clip_train.search index ...` or `python -m hf_clip_train.search query ...`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("index", "query"):
        sys.exit("usage: python -m hf_clip_train.search index [hf-clip-index flags] | query INDEX QUERY... [flags]")
    (index_main if argv[0] == "index" else search_main)(argv[1:])


if __name__ == "__main__":
    main()
