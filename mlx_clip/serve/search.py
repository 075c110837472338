"""POST /search (`mlxclip serve --index INDEX`): a text or an image query ranked against an `mlxclip index` dir.

The query is embedded by the server's engine (the same batcher and model as /embed/*), so its vector is the model's;
the ranking is `Index.search`, run on the model thread: MLX keeps seeing one thread, and a large index's matmul never
blocks the event loop. Without an index the route answers 404 with a JSON error, so clients learn why.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import Field, ValidationError

from mlx_clip.index import Index
from mlx_clip.serve.errors import ApiError
from mlx_clip.serve.inputs import _Body, check_items, image_bytes, refuse_url

MAX_K = 1000  # hits per query: enough for any page of results, and bounded so a response stays small
router = APIRouter()


class SearchRequest(_Body):
    text: str | None = Field(None, description="Text query.")
    image: str | None = Field(None, description="Image query: base64 bytes or a data URL (data:image/png;base64,...).")
    k: int = Field(10, ge=1, le=MAX_K, description=f"Hits to return, 1..{MAX_K}.")


def open_index(path) -> Index | None:
    """The index of `--index` (None without one); opened at startup so a wrong path fails before serving."""
    return None if path is None else Index(path)


def index_info(index: Index | None) -> dict | None:
    """What GET /info shows: the index's kind and size, never its path on the server."""
    if index is None:
        return None
    info = index.info
    return {"kind": info["kind"], "count": info["count"], "dims": info["dims"], "column": info.get("column"),
            "model": info.get("model")}


async def _query(body: SearchRequest, engine):
    if (body.text is None) == (body.image is None):
        raise ApiError(400, "bad_query", "send exactly one of 'text' or 'image' (got "
                       f"{'both' if body.text is not None else 'neither'})", param="text")
    if body.text is not None:
        check_items("text", [body.text], 1)
        refuse_url(body.text, "text")
        vectors, _ = await engine.embed_texts([body.text])
        return vectors
    return await engine.embed_images([image_bytes(body.image, "image")], ["image"])


@router.post("/search")
async def search(request: Request) -> JSONResponse:
    """JSON {"text": "..."} or {"image": "data:image/png;base64,..."}, optional "k" (default 10) ->
    {"results": [{"rank", "score", "id", "key", "path", "caption", "label"}, ...]}, best first."""
    index: Index | None = request.app.state.index
    if index is None:  # before reading the body: nothing the client sends can help
        raise ApiError(404, "no_index", "this server has no search index: start it with `mlxclip serve --index "
                       "INDEX` (an index dir built by `mlxclip index`)")
    try:
        body = SearchRequest.model_validate_json(await request.body())
    except ValidationError as exc:
        raise RequestValidationError(exc.errors()) from exc
    engine = request.app.state.engine
    vectors = await _query(body, engine)
    if vectors.shape[1] != index.dims:
        raise ApiError(409, "index_mismatch", f"the model embeds {vectors.shape[1]} dims, the index holds "
                       f"{index.dims}: the index was built with another model ({index.info.get('model')})")
    scores, rows = await engine.batcher.call(index.search, vectors, body.k)
    return JSONResponse({"model": engine.model_id, "kind": index.info["kind"],
                         "results": index.results(scores[0], rows[0])})
