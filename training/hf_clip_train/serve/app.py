"""The FastAPI application: `/v1/embeddings` (OpenAI's shape), `/search`, `/thumbnails/...`, `/health`, the page."""

import asyncio
import base64
import functools
import io
import json
import platform
from collections.abc import Coroutine
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from importlib import resources
from importlib.metadata import PackageNotFoundError, version
from typing import Any, Literal

import torch
from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from PIL import Image
from pydantic import BaseModel, Field, StrictInt, StrictStr
from starlette.exceptions import HTTPException

from .batching import BatchingSettings, DynamicBatcher
from .embedding import Embedder, TokenizedText
from .guard import RequestGuard, error_body
from .inputs import ImageLimits, InputError, decode_image, is_image_input

THUMBNAIL_SIZE = 160
LONG_TEXT_POLICIES = ("truncate", "refuse")
OPEN_PATHS = ("/", "/openapi.json", "/docs", "/docs/oauth2-redirect")


@dataclass
class ServeLimits:
    """What one request may hold: inputs per request, body size, image size, and what a text longer than the
    model's context gets (`long_text`: "truncate", said so in the response, or "refuse" with a 400)."""

    max_inputs: int = 256
    max_body_mb: float = 16.0
    image: ImageLimits = field(default_factory=ImageLimits)
    long_text: str = "truncate"

    def __post_init__(self):
        if self.max_inputs < 1:
            raise ValueError(f"--max_inputs must be at least 1, got {self.max_inputs}.")
        if self.max_body_mb <= 0:
            raise ValueError(f"--max_body_mb must be positive, got {self.max_body_mb}.")
        if self.image.max_pixels < 1:
            raise ValueError(f"--max_image_pixels must be at least 1, got {self.image.max_pixels}.")
        if self.long_text not in LONG_TEXT_POLICIES:
            raise ValueError(f"--long_text must be one of {', '.join(LONG_TEXT_POLICIES)}, got {self.long_text!r}.")

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 2**20)


class EmbeddingRequest(BaseModel):
    """OpenAI's embeddings request: `input` is a string or a list of strings, each a text or an image as a base64
    data URI (`data:image/png;base64,...`)."""

    input: StrictStr | list[StrictStr]
    model: StrictStr | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: StrictInt | None = None
    user: StrictStr | None = None


class SearchRequest(BaseModel):
    """A text query, or an image query as a base64 data URI; `k` hits from the `offset`-th on, among the image
    embeddings (`target="image"`) or the caption embeddings (`"text"`)."""

    query: StrictStr
    k: StrictInt = 10
    target: Literal["image", "text"] = "image"
    offset: StrictInt = Field(0, description="Rank of the first hit returned (0: the best); for the next page.")


def package_version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


class ServedModel:
    """What the application serves: the embedder (and its model), and optionally an `ImageTextIndex`."""

    def __init__(self, embedder: Embedder, name: str, index=None):
        self.embedder, self.name, self.index = embedder, name, index
        self.positions: dict[int, int] = {}
        self.image_columns: list[str] = []
        self.class_labels: dict[str, Any] = {}
        self.thumbnail = functools.lru_cache(maxsize=2048)(self._thumbnail)
        if index is not None:
            import datasets

            self.positions = {int(row_id): position for position, row_id in enumerate(index.row_ids)}
            self.image_columns = [name for name, feature in index.kept_features.items()
                                  if isinstance(feature, datasets.Image)]
            self.class_labels = {name: feature for name, feature in index.kept_features.items()
                                 if isinstance(feature, datasets.ClassLabel)}

    def describe(self) -> dict[str, Any]:
        model = self.embedder.model
        return {"name_or_path": self.name, "model_type": model.config.model_type, "dimension": self.embedder.dimension,
                "context_length": self.embedder.context_length, "dtype": str(model.dtype).removeprefix("torch."),
                "device": str(model.device)}

    def describe_index(self) -> dict[str, Any] | None:
        if self.index is None:
            return None
        info = self.index.info
        return {"path": str(self.index.path), "num_rows": len(self.index), "index_type": info["index_type"],
                "metric": info["metric"], "text_embeddings": self.index.has_text_embeddings,
                "kept_columns": self.index.kept_columns, "image_columns": self.image_columns,
                "model": info["model"]["name_or_path"], "faiss": self.index.faiss_index is not None}

    def cell(self, name: str, value: Any, row_id: int) -> Any:
        """A kept column's value as JSON: an image as the URL of its thumbnail, a class id as its name."""
        if name in self.image_columns:
            return None if value is None else f"/thumbnails/{row_id}/{name}"
        if name in self.class_labels and isinstance(value, int):
            return self.class_labels[name].int2str(value)
        if value is None or isinstance(value, (str, int, float, bool)):
            return value
        if isinstance(value, (list, tuple)):
            return [self.cell("", item, row_id) for item in value]
        if isinstance(value, dict):
            return {key: self.cell("", item, row_id) for key, item in value.items()}
        return str(value)

    def _thumbnail(self, row_id: int, column: str) -> bytes:
        """The PNG thumbnail (at most 160 px on a side) of an image column of an index row."""
        if column not in self.image_columns:
            raise InputError(f"The index has no image column {column!r}; its image columns are "
                             f"{self.image_columns or 'none'}.", status=404, param="column")
        if row_id not in self.positions:
            raise InputError(f"The index has no row {row_id} (it holds {len(self.positions)} rows; /search returns "
                             "their ids).", status=404, param="row_id")
        image = self.index.embeddings.select_columns([column])[self.positions[row_id]][column]
        if image is None:
            raise InputError(f"Row {row_id} has no image in column {column!r}.", status=404, param="row_id")
        image = image.convert("RGB")
        image.thumbnail((THUMBNAIL_SIZE, THUMBNAIL_SIZE), Image.Resampling.BICUBIC)
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return buffer.getvalue()


CLIENT_CLOSED_REQUEST = 499


async def unless_client_leaves(connection: Request, work: Coroutine[Any, Any, Any]) -> Any:
    """The result of `work`, or None if the client disconnects first: then `work` is cancelled, and with it the
    inputs it queued for the batching worker, which drops them."""
    task = asyncio.ensure_future(work)

    async def disconnected() -> None:
        while (await connection.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if task.done():
        return task.result()
    task.cancel()
    return None


def error_response(status: int, message: str, error_type: str = "invalid_request_error", code: str | None = None,
                   param: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, error_type, code, param), status_code=status)


def validation_message(error: RequestValidationError) -> tuple[int, str]:
    """(status, message) of a body FastAPI could not read: 400 for malformed JSON, 422 for wrong fields or types."""
    problems = error.errors()
    if any(problem["type"] == "json_invalid" for problem in problems):
        problem = next(problem for problem in problems if problem["type"] == "json_invalid")
        where = problem.get("loc", ("body", "?"))[-1]
        cause = problem.get("ctx", {}).get("error", problem["msg"])
        return 400, f"The request body is malformed JSON ({cause} at character {where})."
    whole = next((problem for problem in problems if tuple(problem["loc"]) == ("body",)
                  and isinstance(problem.get("input"), (bytes, str))), None)
    if whole is not None:
        try:
            json.loads(whole["input"])
        except ValueError as error:
            return 400, f"The request body is malformed JSON ({error})."
        return 415, "The request body is JSON sent without the header 'Content-Type: application/json'."
    parts = []
    for problem in problems:
        location = ".".join(str(part) for part in problem["loc"] if part != "body") or "body"
        got = problem.get("input")
        shown = "" if isinstance(got, dict) or got is None else f" (got {type(got).__name__} {str(got)[:40]!r})"
        parts.append(f"{location}: {problem['msg']}{shown}")
    return 422, "Invalid request: " + "; ".join(parts) + "."


def create_app(served: ServedModel, batching: BatchingSettings, limits: ServeLimits,
               api_key: str | None = None) -> RequestGuard:
    """The server's ASGI application: the FastAPI routes (`.app`) behind the `RequestGuard`. Its batching worker
    starts with the application and stops after the last request has been answered."""
    embedder = served.embedder
    batcher = DynamicBatcher(embedder.forward, batching)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        batcher.start()
        try:
            yield
        finally:
            await run_in_threadpool(batcher.stop)

    app = FastAPI(title="hf_clip serve", version=package_version("hf-clip") or "unknown", lifespan=lifespan,
                  description="CLIP embeddings (OpenAI's embeddings API) and search over an hf-clip-index index.")
    app.state.batcher = batcher

    @app.exception_handler(InputError)
    async def input_error(request: Request, error: InputError):
        return error_response(error.status, error.message, param=error.param)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, error: RequestValidationError):
        status, message = validation_message(error)
        return error_response(status, message)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException):
        message = error.detail if error.status_code != 404 else (
            f"No route {request.method} {request.url.path}: the routes are GET /, GET /health, POST /v1/embeddings, "
            "POST /search, GET /thumbnails/ROW_ID/COLUMN and GET /openapi.json.")
        return error_response(error.status_code, str(message))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, error: Exception):
        return error_response(500, f"Internal error ({type(error).__name__}: {error}); the server keeps serving.",
                              "server_error")

    def tokenized(texts: list[tuple[str, str]]) -> list[TokenizedText]:
        """Tokenise (param, text) pairs; refuse empty texts, and long ones when `long_text` is "refuse"."""
        for param, text in texts:
            if not text.strip():
                raise InputError(f"{param} is an empty string: give a text or an image data URI.", param=param)
        tokens = embedder.tokenize([text for _, text in texts])
        if limits.long_text == "refuse":
            for (param, _), text in zip(texts, tokens):
                if text.truncated:
                    raise InputError(f"{param} has {text.num_tokens} tokens; the model's context is "
                                     f"{embedder.context_length} (this server refuses longer texts: --long_text "
                                     "refuse; start it with --long_text truncate to cut them).", param=param)
        return tokens

    def prepared_images(images: list[tuple[str, str]]) -> list[torch.Tensor]:
        return [embedder.prepare_image(decode_image(uri, param, limits.image)) for param, uri in images]

    async def embed(inputs: list[tuple[str, str]]) -> tuple[torch.Tensor, list[TokenizedText | None]]:
        """(n, d) embeddings of (param, input) pairs in order, and each text's tokens (None for images)."""
        text_at = [i for i, (_, value) in enumerate(inputs) if not is_image_input(value)]
        image_at = [i for i, (_, value) in enumerate(inputs) if is_image_input(value)]
        texts = tokenized([inputs[i] for i in text_at]) if text_at else []
        pixels = await run_in_threadpool(prepared_images, [inputs[i] for i in image_at]) if image_at else []
        parts = await asyncio.gather(*([batcher.submit("text", texts)] if texts else []),
                                     *([batcher.submit("image", pixels)] if pixels else []))
        embeddings = torch.empty(len(inputs), embedder.dimension)
        if texts:
            embeddings[text_at] = parts[0]
        if pixels:
            embeddings[image_at] = parts[-1]
        tokens: list[TokenizedText | None] = [None] * len(inputs)
        for i, text in zip(text_at, texts):
            tokens[i] = text
        return embeddings, tokens

    @app.post("/v1/embeddings", summary="OpenAI-style embeddings of texts and images (base64 data URIs)")
    async def embeddings(request: EmbeddingRequest, connection: Request) -> Response:
        inputs = [request.input] if isinstance(request.input, str) else request.input
        if not inputs:
            raise InputError("input is an empty list: give at least one text or image data URI.", param="input")
        if len(inputs) > limits.max_inputs:
            raise InputError(f"input holds {len(inputs)} items; this server takes at most {limits.max_inputs} per "
                             "request (--max_inputs).", param="input")
        if request.dimensions is not None and request.dimensions != embedder.dimension:
            raise InputError(f"dimensions is {request.dimensions}, but this model's embeddings have "
                             f"{embedder.dimension} (leave it out).", param="dimensions")
        single = isinstance(request.input, str)
        named = [("input" if single else f"input[{i}]", value) for i, value in enumerate(inputs)]
        embedded = await unless_client_leaves(connection, embed(named))
        if embedded is None:
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        vectors, tokens = embedded
        data = []
        for i, vector in enumerate(vectors):
            if request.encoding_format == "base64":
                value = base64.b64encode(vector.numpy().astype("<f4").tobytes()).decode()
            else:
                value = vector.tolist()
            data.append({"object": "embedding", "index": i, "embedding": value})
        used = sum(text.num_tokens if not text.truncated else embedder.context_length
                   for text in tokens if text is not None)
        return JSONResponse({
            "object": "list", "data": data, "model": request.model or served.name,
            "usage": {"prompt_tokens": used, "total_tokens": used},
            "truncated": [i for i, text in enumerate(tokens) if text is not None and text.truncated],
        })

    @app.post("/search", summary="The k index rows nearest to a text or image query")
    async def search(request: SearchRequest, connection: Request) -> Response:
        index = served.index
        if index is None:
            raise InputError("This server was started without an index, so it cannot search: start hf-clip-serve "
                             "with --index DIR_OR_REPO (a folder written by hf-clip-index, or a Hub dataset repo). "
                             "/v1/embeddings works without one.", status=404, param="index")
        size = len(index)
        if not 1 <= request.k <= size:
            raise InputError(f"k must be between 1 and the index size, {size}; got {request.k}.", param="k")
        if not 0 <= request.offset < size:
            raise InputError(f"offset must be between 0 and {size - 1} (the index holds {size} rows); got "
                             f"{request.offset}.", param="offset")
        if request.target == "text" and not index.has_text_embeddings:
            raise InputError("target 'text' needs caption embeddings, and this index was built without "
                             "--caption_column; search target 'image'.", param="target")
        embedded = await unless_client_leaves(connection, embed([("query", request.query)]))
        if embedded is None:
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        vectors, tokens = embedded
        wanted = min(request.offset + request.k, size)
        result = (await run_in_threadpool(index.search_embeddings, vectors, wanted, request.target))[0]
        hits = [{"rank": rank, "row_id": row_id, "score": score,
                 "columns": {name: served.cell(name, value, row_id) for name, value in row.items()}}
                for rank, (row_id, score, row) in enumerate(zip(result.row_ids, result.scores, result.rows),
                                                           start=1)][request.offset:]
        following = request.offset + request.k
        return JSONResponse({
            "query": {"kind": "text" if tokens[0] is not None else "image",
                      "truncated": bool(tokens[0] is not None and tokens[0].truncated)},
            "target": request.target, "k": request.k, "offset": request.offset, "num_rows": size,
            "next_offset": following if following < size else None, "hits": hits,
        })

    @app.get("/thumbnails/{row_id}/{column}", summary="A PNG thumbnail of an index row's image column",
             response_class=Response, responses={200: {"content": {"image/png": {}}}})
    def thumbnail(row_id: str, column: str) -> Response:
        if served.index is None:
            raise InputError("This server was started without an index: there are no thumbnails.", status=404,
                             param="index")
        if not row_id.isdigit():
            raise InputError(f"Row id {row_id!r} is not a number: thumbnails are /thumbnails/ROW_ID/COLUMN.",
                             status=404, param="row_id")
        png = served.thumbnail(int(row_id), column)
        return Response(png, media_type="image/png", headers={"cache-control": "max-age=3600"})

    @app.get("/health", summary="The model, the index, the versions and readiness")
    async def health() -> JSONResponse:
        ready = batcher.running
        return JSONResponse({
            "status": "ready" if ready else "stopping", "ready": ready, "model": served.describe(),
            "index": served.describe_index(),
            "batching": {"max_batch_size": batching.max_batch_size, "max_wait_ms": batching.max_wait_ms,
                         "batches": batcher.statistics.batches, "inputs": batcher.statistics.inputs,
                         "waiting": batcher.waiting()},
            "limits": {"max_inputs": limits.max_inputs, "max_body_mb": limits.max_body_mb,
                       "max_image_pixels": limits.image.max_pixels, "long_text": limits.long_text},
            "auth": api_key is not None,
            "versions": {name: package_version(name) for name in
                         ("hf-clip", "transformers", "torch", "fastapi", "starlette", "uvicorn", "datasets")}
            | {"python": platform.python_version()},
        }, status_code=200 if ready else 503)

    hits_css = resources.files("hf_clip_train").joinpath("hits.css").read_text()
    page = resources.files(__package__).joinpath("page.html").read_text().replace("/* HITS_CSS */\n", hits_css)

    @app.get("/", response_class=HTMLResponse, summary="The search page")
    async def search_page() -> HTMLResponse:
        return HTMLResponse(page)

    return RequestGuard(app, limits.max_body_bytes, api_key, OPEN_PATHS)
