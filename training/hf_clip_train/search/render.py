"""What `hf-clip-search` shows: the hits of each query as a text table, or as a static, self-contained HTML page of
thumbnails."""

import base64
import html
import io
import os
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import datasets
from PIL import Image

from .hub import public_index_info
from .query import ImageTextIndex, SearchResult

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp")


def cell_text(value: Any, feature: Any = None, width: int = 60) -> str:
    """A kept cell as one short line of text: images as <image>, class ids by name, a list by its first item."""
    if isinstance(value, Image.Image) or isinstance(feature, datasets.Image):
        return "<image>"
    if isinstance(feature, datasets.ClassLabel) and isinstance(value, int):
        return feature.int2str(value)
    if isinstance(value, (list, tuple)):
        value = f"{value[0]} (+{len(value) - 1} more)" if len(value) > 1 else (value[0] if value else "")
    text = " ".join(str(value).split())
    return text if len(text) <= width else text[: width - 1] + "…"


def query_label(query: Any) -> str:
    return repr(query) if isinstance(query, str) else f"<image {getattr(query, 'filename', '') or 'query'}>"


def format_hits_table(results: Sequence[SearchResult], features: datasets.Features) -> str:
    """One block per query: rank, score, row id and the kept columns (`features`) of each hit."""
    blocks = []
    for result in results:
        cells = [[cell_text(row[name], feature) for name, feature in features.items()] for row in result.rows]
        widths = [max([len(name)] + [len(row[i]) for row in cells]) for i, name in enumerate(features)]
        header = f"{'rank':>4}  {'score':>7}  {'row_id':>8}" + "".join(
            f"  {name:<{width}}" for name, width in zip(features, widths))
        lines = [f"query: {query_label(result.query)}", header.rstrip(), "-" * len(header.rstrip())]
        for rank, (row_id, score, row) in enumerate(zip(result.row_ids, result.scores, cells), start=1):
            line = f"{rank:>4}  {score:>7.4f}  {row_id:>8}" + "".join(
                f"  {text:<{width}}" for text, width in zip(row, widths))
            lines.append(line.rstrip())
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def _thumbnail_uri(image: Image.Image, size: int = 160) -> str:
    image = image.convert("RGB")
    scale = size / max(image.size)
    if scale < 1 or max(image.size) < size // 2:
        image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                             Image.Resampling.NEAREST if scale > 1 else Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def is_web_url(value: Any) -> bool:
    return isinstance(value, str) and value.lower().startswith(("http://", "https://"))


def file_under(value: str, base_dir: str | os.PathLike | None) -> Path | None:
    """The file a relative path names inside `base_dir` (links resolved); None for an absolute path, a path that
    leaves the folder (`../`), a missing file, or no `base_dir`."""
    if base_dir is None or not Path(base_dir).is_dir() or Path(value).is_absolute() or value.startswith("~"):
        return None
    base = Path(base_dir).resolve()
    path = (base / value).resolve()
    return path if path.is_relative_to(base) and path.is_file() else None


def thumbnail_source(value: Any, base_dir: str | os.PathLike | None, load_image_urls: bool = False) -> str | None:
    """An <img src> for a kept cell that is one of the dataset's own images (a PIL image, encoded bytes) or an image
    file under `base_dir` (the dataset's folder), as an embedded data URI; with `load_image_urls`, an image URL as
    itself (the browser fetches it). None for anything else: other cells, absolute paths, paths out of the folder,
    and URLs by default."""
    from hf_clip import to_rgb_image

    if is_web_url(value):
        return html.escape(value, quote=True) if load_image_urls and value.lower().endswith(IMAGE_SUFFIXES) else None
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    if isinstance(value, str):
        if not value.lower().endswith(IMAGE_SUFFIXES):
            return None
        value = file_under(value, base_dir)
        if value is None:
            return None
    if not isinstance(value, (Path, bytes, Image.Image)):
        return None
    try:
        return _thumbnail_uri(to_rgb_image(str(value) if isinstance(value, Path) else value))
    except (OSError, ValueError, TypeError):
        return None


def cell_html(value: Any, feature: Any = None, width: int = 80) -> str:
    """A kept cell as HTML text: `cell_text`, escaped; a web URL as a link to it (never loaded by the page)."""
    text = html.escape(cell_text(value, feature, width))
    if is_web_url(value):
        return f'<a href="{html.escape(value, quote=True)}" rel="noreferrer noopener">{text}</a>'
    return text


def content_security_policy(load_image_urls: bool) -> str:
    """The page's policy: it loads nothing but its own inline style and data: images, plus web images when asked."""
    images = "data: http: https:" if load_image_urls else "data:"
    return f"default-src 'none'; style-src 'unsafe-inline'; img-src {images}"


HTML_STYLE = """
body { font-family: system-ui, sans-serif; margin: 24px; color: #222; background: #fafafa; }
h1 { font-size: 20px; margin: 0 0 4px; } .meta { color: #666; font-size: 13px; margin-bottom: 20px; }
section { margin-bottom: 28px; }
h2 { font-size: 16px; margin: 0 0 10px; display: flex; align-items: center; gap: 10px; }
h2 img { width: 48px; height: 48px; image-rendering: pixelated; border-radius: 4px; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, 172px); gap: 12px; }
""" + resources.files("hf_clip_train").joinpath("hits.css").read_text()


def render_html(results: Sequence[SearchResult], index: ImageTextIndex, load_image_urls: bool = False) -> str:
    """A static, self-contained page: per query, its hits as thumbnails (from the first kept column holding the
    dataset's images or image files under its folder, `thumbnail_source`) with rank, score, row id and the other kept
    columns, web URLs as links. The page loads nothing from outside itself (its Content-Security-Policy says so)
    unless `load_image_urls`, which shows image URLs as thumbnails. Its header names the dataset and the model as
    a published index does: no local path (`public_index_info`)."""
    info = public_index_info(index.info)
    base_dir = index.info["source"].get("base_dir")
    sections = []
    for result in results:
        title = html.escape(query_label(result.query))
        if not isinstance(result.query, str):
            title = f'<img src="{_thumbnail_uri(result.query)}" alt="query image"> image query'
        figures = []
        for rank, (row_id, score, row) in enumerate(zip(result.row_ids, result.scores, result.rows), start=1):
            source, texts = None, []
            for name, feature in index.kept_features.items():
                candidate = thumbnail_source(row[name], base_dir, load_image_urls) if source is None else None
                if candidate is not None:
                    source = candidate
                elif not isinstance(feature, datasets.Image):
                    texts.append(f"{html.escape(name)}: {cell_html(row[name], feature)}")
            picture = (f'<img src="{source}" alt="row {row_id}">' if source
                       else '<div class="noimg">no image column kept</div>')
            caption = "<br>".join([f'<span class="score">#{rank} · {score:.3f}</span> '
                                   f'<span class="row">row {row_id}</span>', *texts])
            figures.append(f"<figure>{picture}<figcaption>{caption}</figcaption></figure>")
        sections.append(f"<section><h2>{title}</h2><div class=\"grid\">{''.join(figures)}</div></section>")
    source = info["source"]
    name = source.get("dataset_name") or ("the embedded shapes dataset" if "dataset_name" in source else "a dataset")
    split = f" ({source['split']})" if source.get("split") else ""
    meta = html.escape(f"{info['num_rows']} rows of {name}{split} · model {info['model']['name_or_path']} · "
                       f"{info['index_type']} {info['metric']} index · cosine similarity")
    policy = content_security_policy(load_image_urls)
    return ("<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta http-equiv=\"Content-Security-Policy\" content=\"{policy}\"><title>hf_clip search</title>"
            f"<style>{HTML_STYLE}</style></head><body><h1>hf_clip search</h1><div class=\"meta\">{meta}</div>"
            + "".join(sections) + "</body></html>\n")
