"""`hf-clip-search`: query an index by text or image (this module imports only the query side, which needs no more
than the `[search]` extra), and the `python -m hf_clip_train.search index|query` entry point.

    hf-clip-search OUT "a red circle" -k 5 --html hits.html    # python -m hf_clip_train.search query ...
"""

import argparse
import importlib
import sys
from pathlib import Path

from hf_clip.cli import UsageError, run_cli

from .checks import IndexLoadError
from .query import ImageTextIndex, SearchResult
from .render import format_hits_table, render_html


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
    parser.add_argument("--load_image_urls", action="store_true",
                        help="In the --html page, show image URLs of kept columns as thumbnails, which the browser "
                             "then fetches when the page is opened (by default they stay links, and the page loads "
                             "nothing from outside itself).")
    args = parser.parse_args(argv)
    if not args.queries and not args.image:
        parser.error("give at least one text query or --image PATH.")
    empty = [position for position, query in enumerate(args.queries, start=1) if not query.strip()]
    if empty:
        parser.error(f"text query {empty[0]} is empty: give words to search for, or --image PATH.")
    if args.k < 1:
        parser.error(f"-k must be at least 1, got {args.k}.")
    from hf_clip import to_rgb_image

    images = []
    for path in args.image:
        try:
            image = to_rgb_image(path)
        except (OSError, ValueError) as error:
            raise UsageError(f"--image {path}: {error}") from error
        image.filename = path
        images.append(image)
    try:
        index = ImageTextIndex.load(args.index, model_name_or_path=args.model_name_or_path, revision=args.revision)
    except IndexLoadError as error:
        raise UsageError(str(error)) from error
    if args.target == "text" and not index.has_text_embeddings:
        raise UsageError(f"--target text: {args.index} holds no caption embeddings (it was built without "
                         "--caption_column); search the image embeddings (--target image).")
    results = index.search([*args.queries, *images], k=args.k, target=args.target)
    print(format_hits_table(results, index.kept_features))
    if args.html:
        Path(args.html).write_text(render_html(results, index, load_image_urls=args.load_image_urls))
        print(f"Wrote {args.html}")
    return results


def main(argv: list[str] | None = None) -> None:
    """`python -m hf_clip_train.search index ...` or `python -m hf_clip_train.search query ...`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("index", "query"):
        sys.exit("usage: python -m hf_clip_train.search index [hf-clip-index flags] | query INDEX QUERY... [flags]")
    if argv[0] == "query":
        run_cli(search_main, argv[1:], prog="hf-clip-search")
    else:  # building imports what only the [train] extra has, so it is imported only to build
        run_cli(importlib.import_module(f"{__package__}.index_cli").index_main, argv[1:], prog="hf-clip-index")


if __name__ == "__main__":
    main()
