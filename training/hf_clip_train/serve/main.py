"""`hf-clip-serve`: load a model (and an index) once, and answer over HTTP until SIGTERM or Ctrl-C.

    hf-clip-serve --model_name_or_path M                      # /v1/embeddings on http://127.0.0.1:8000
    hf-clip-serve --index OUT --port 8080                     # also /search and the search page, with the index's model
    HF_CLIP_SERVE_API_KEY=... hf-clip-serve --index OUT --host 0.0.0.0   # beyond loopback: a key is required
"""

import argparse
import ipaddress
import logging
import os
import signal
import socket
import sys

API_KEY_ENV = "HF_CLIP_SERVE_API_KEY"
LOOPBACK_NAMES = {"localhost"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hf-clip-serve", description="Serve CLIP embeddings (OpenAI's /v1/embeddings) and search over an index.")
    parser.add_argument("--model_name_or_path", default=None,
                        help="The hf_clip or Transformers CLIP model (folder or Hub id). With --index, default: the "
                             "model recorded in the index.")
    parser.add_argument("--index", default=None, metavar="DIR_OR_REPO",
                        help="An index folder written by hf-clip-index, or a Hub dataset repo holding one: enables "
                             "/search, the thumbnails and the search page.")
    parser.add_argument("--revision", default=None, help="Revision of a Hub dataset repo given to --index.")
    parser.add_argument("--host", default="127.0.0.1",
                        help="Address to bind (default 127.0.0.1, loopback only). Any other address needs an API key.")
    parser.add_argument("--port", type=int, default=8000, help="Port to bind (default 8000; 0: any free port).")
    parser.add_argument("--api_key", default=None,
                        help=f"Clients must send 'Authorization: Bearer KEY'. Default: ${API_KEY_ENV} if set. Prefer "
                             "the environment variable: a flag shows in the process list.")
    parser.add_argument("--max_batch_size", type=int, default=32,
                        help="Inputs per forward: concurrent requests are grouped up to this (1: no batching).")
    parser.add_argument("--max_wait_ms", type=float, default=2.0,
                        help="How long a batch waits for more inputs after its first arrived (default 2 ms).")
    parser.add_argument("--max_inputs", type=int, default=256, help="Inputs per /v1/embeddings request.")
    parser.add_argument("--max_body_mb", type=float, default=16.0, help="Largest request body, in MB (2^20 bytes).")
    parser.add_argument("--max_image_pixels", type=int, default=40_000_000,
                        help="Largest image (width × height, read from its header before decoding).")
    parser.add_argument("--long_text", choices=("truncate", "refuse"), default="truncate",
                        help="A text longer than the model's context: truncated (the response lists it under "
                             "'truncated') or refused with a 400.")
    parser.add_argument("--device", default=None, help="Device of the model (default: the accelerator if any, else "
                                                       "cpu).")
    parser.add_argument("--access_log", action="store_true", help="Log every request (method, path, status).")
    return parser


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.model_name_or_path is None and args.index is None:
        parser.error("give --model_name_or_path (embeddings only) or --index (search, with the index's model), or "
                     "both.")
    from hf_clip.hub import is_hub_repo_id

    for flag, value in (("--model_name_or_path", args.model_name_or_path), ("--index", args.index)):
        if value is not None and not os.path.exists(os.path.expanduser(value)) and not is_hub_repo_id(value):
            parser.error(f"{flag} {value!r}: no such folder, and not a Hub repo id ('name' or 'namespace/name').")
    if not 0 <= args.port <= 65535:
        parser.error(f"--port must be between 0 and 65535, got {args.port}.")
    args.api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    if not is_loopback(args.host) and args.api_key is None:
        parser.error(f"--host {args.host} opens the server beyond this machine, so it needs an API key: pass "
                     f"--api_key or set {API_KEY_ENV} (clients send 'Authorization: Bearer KEY').")
    return args


def load(args: argparse.Namespace):
    """The `ServedModel`: the index with its model, or the model alone."""
    import torch
    from transformers import AutoModel, AutoProcessor

    import hf_clip  # noqa: F401  (registers the hf_clip model type with the Auto classes)

    from .app import ServedModel
    from .embedding import Embedder

    device = args.device or (torch.accelerator.current_accelerator().type if torch.accelerator.is_available()
                             else "cpu")
    if args.index is not None:
        from ..cli import missing_search_extra

        missing = missing_search_extra()
        if missing:
            sys.exit(f"hf-clip-serve --index needs the search extra, and {', '.join(missing)} is missing. Install "
                     'it with: pip install "hf-clip[serve,search]"')
        from hf_clip.cli import UsageError
        from hf_clip_train.search import ImageTextIndex, IndexLoadError

        try:
            index = ImageTextIndex.load(args.index, model_name_or_path=args.model_name_or_path, revision=args.revision)
        except IndexLoadError as error:  # a missing, damaged or stale index, or another model: the user's to fix
            raise UsageError(f"--index {args.index}: {error}") from error
        index.model.to(device)
        name = args.model_name_or_path or index.info["model"]["name_or_path"]
        return ServedModel(Embedder(index.model, index.processor, index.transform), name, index)
    model = AutoModel.from_pretrained(args.model_name_or_path).to(device)
    processor = AutoProcessor.from_pretrained(args.model_name_or_path)
    return ServedModel(Embedder(model, processor), args.model_name_or_path)


def bound_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # Accepted connections inherit it: without it, a response's head and body (two writes) meet the client's delayed
    # ACK and every keep-alive request took ~44 ms more here.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.bind((host, port))
    except OSError as error:
        sock.close()
        sys.exit(f"hf-clip-serve cannot bind {host}:{port} ({error.strerror}); choose another --port (0: any free "
                 "one) or --host.")
    sock.set_inheritable(True)
    return sock


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.WARNING)
    import uvicorn
    from PIL import Image

    from .app import ServeLimits, create_app
    from .batching import BatchingSettings
    from .inputs import ImageLimits

    try:
        batching = BatchingSettings(args.max_batch_size, args.max_wait_ms)
        limits = ServeLimits(args.max_inputs, args.max_body_mb, ImageLimits(args.max_image_pixels), args.long_text)
    except ValueError as error:
        build_parser().error(str(error))
    Image.MAX_IMAGE_PIXELS = None  # decode_image checks the size against --max_image_pixels, and names it
    served = load(args)
    app = create_app(served, batching, limits, args.api_key)
    sock = bound_socket(args.host, args.port)
    port = sock.getsockname()[1]
    host = f"[{args.host}]" if ":" in args.host else args.host
    url = f"http://{host}:{port}"

    class AnnouncingServer(uvicorn.Server):
        async def startup(self, sockets=None):
            await super().startup(sockets)
            if self.started:
                print(f"hf-clip-serve: serving {served.name} on {url} (page: {url}/, API schema: {url}/docs)",
                      flush=True)

    config = uvicorn.Config(app, log_level="info" if args.access_log else "warning", access_log=args.access_log,
                            timeout_graceful_shutdown=60, server_header=False)
    stopped_by = []
    for stop_signal in (signal.SIGINT, signal.SIGTERM):  # uvicorn re-raises the signal it stopped for, once done
        signal.signal(stop_signal, lambda number, frame: stopped_by.append(signal.Signals(number).name))
    AnnouncingServer(config).run(sockets=[sock])
    cause = f" by {stopped_by[0]}" if stopped_by else ""
    print(f"hf-clip-serve: stopped{cause}, after answering the requests in flight", flush=True)
