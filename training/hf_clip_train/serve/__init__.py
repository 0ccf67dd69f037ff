"""`hf-clip-serve`: an embedding and search server over a CLIP model and an `hf-clip-index` index (the `[serve]`
extra: FastAPI on uvicorn).

- `main`: the console script (`python -m hf_clip_train.serve`);
- `app`: the routes (`/v1/embeddings`, `/search`, `/thumbnails/ROW_ID/COLUMN`, `/health`, `/`);
- `batching`: the worker thread that owns the model and groups concurrent inputs into one forward;
- `embedding`: tokenising, image preparation and the forward; `inputs`: data URIs and safe image decoding;
- `guard`: path traversal, the API key and the body size, refused before a route runs.
"""
