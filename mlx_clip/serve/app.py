"""The HTTP service behind `mlxclip serve`: a thin FastAPI layer over `Engine` (model + batcher).

Routes: POST /v1/embeddings (OpenAI-compatible), /embed/text, /embed/image, /similarity, /classify, /search (search.py:
`--index`, 404 without); GET /health, /info, /metrics, / (the web page). Extension point: `create_app(config,
routers=[...])` mounts more APIRouters; their handlers reach the model through `request.app.state.engine` and get
auth, limits and metrics like every route here.

`dimensions` (OpenAI's field) keeps the first N components and renormalizes them. CLIP is not trained for truncation
(unlike Matryoshka models), so quality drops with N; it exists to fit storage, and N = the full dim is a no-op.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import os
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import uvicorn
from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import ValidationError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

import mlx_clip
from mlx_clip.eval import DEFAULT_TEMPLATES
from mlx_clip.serve.config import ServeConfig
from mlx_clip.serve.engine import Engine
from mlx_clip.serve.errors import ApiError
from mlx_clip.serve.inputs import (ClassifyRequest, EmbeddingsRequest, ImagesRequest, SimilarityRequest, TextsRequest,
                                   check_items, check_templates, image_bytes, is_data_url, refuse_url)
from mlx_clip.serve.limits import LimitsMiddleware
from mlx_clip.serve.metrics import Metrics, MetricsMiddleware
from mlx_clip.serve.search import index_info, open_index
from mlx_clip.serve.search import router as search_router

PAGE = Path(__file__).parent / "static" / "index.html"


@functools.cache
def _page_html() -> str:  # the page is static: read once, not on every GET /
    return PAGE.read_text(encoding="utf-8")
router = APIRouter()


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _engine(request: Request) -> Engine:
    return request.app.state.engine


def _limit(request: Request) -> int:
    return request.app.state.config.max_client_batch


async def _images(engine: Engine, items: list[str], name: str) -> np.ndarray:
    data = [image_bytes(s, f"{name}[{i}]") for i, s in enumerate(items)]
    return await engine.embed_images(data, [f"{name}[{i}]" for i in range(len(items))])


# ---- public: page, health, info, metrics ---------------------------------------------------------------------------

@router.get("/", response_class=HTMLResponse, include_in_schema=False)
async def page() -> HTMLResponse:
    return HTMLResponse(_page_html())


@router.get("/health")
async def health(request: Request) -> JSONResponse:
    engine = _engine(request)
    if engine.ready:
        return JSONResponse({"status": "ok"})
    status = "failed" if engine.error is not None else "loading"
    return JSONResponse({"status": status}, status_code=503, headers={"Retry-After": "1"})


@router.get("/info")
async def info(request: Request) -> JSONResponse:
    return JSONResponse({**_engine(request).info, "version": mlx_clip.__version__,
                         "limits": request.app.state.config.public_limits(),
                         "index": index_info(request.app.state.index)})


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    body, content_type = request.app.state.metrics.exposition()
    return Response(body, media_type=content_type)


# ---- inference ---------------------------------------------------------------------------------------------------

@router.post("/v1/embeddings")
async def embeddings(body: EmbeddingsRequest, request: Request) -> JSONResponse:
    """OpenAI's embeddings call. Strings are texts; `data:image/...;base64,` strings are images (image tower)."""
    engine, inputs = _engine(request), [body.input] if isinstance(body.input, str) else body.input
    check_items("input", inputs, _limit(request))
    engine.check_ready()
    dim = engine.model.config.projection_dim
    if body.dimensions is not None and not 1 <= body.dimensions <= dim:
        raise ApiError(400, "bad_dimensions", f"dimensions must be in 1..{dim}, got {body.dimensions}",
                       param="dimensions")
    image_at = [i for i, s in enumerate(inputs) if is_data_url(s)]
    text_at = [i for i, s in enumerate(inputs) if not is_data_url(s)]
    for i in text_at:
        refuse_url(inputs[i], f"input[{i}]")
    data = [image_bytes(inputs[i], f"input[{i}]") for i in image_at]
    out, tokens = np.empty((len(inputs), dim), np.float32), 0
    jobs = []
    if image_at:
        jobs.append(engine.embed_images(data, [f"input[{i}]" for i in image_at]))
    if text_at:
        jobs.append(engine.embed_texts([inputs[i] for i in text_at]))
    results = await asyncio.gather(*jobs)
    if image_at:
        out[image_at] = results.pop(0)
    if text_at:
        out[text_at], tokens = results.pop(0)
    if body.dimensions is not None:
        out = _unit(out[:, : body.dimensions])
    encode = (lambda v: base64.b64encode(v.astype("<f4").tobytes()).decode()) if body.encoding_format == "base64" \
        else (lambda v: v.tolist())
    return JSONResponse({
        "object": "list", "model": engine.model_id,
        "data": [{"object": "embedding", "index": i, "embedding": encode(v)} for i, v in enumerate(out)],
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    })


@router.post("/embed/text")
async def embed_text(body: TextsRequest, request: Request) -> JSONResponse:
    check_items("texts", body.texts, _limit(request))
    vectors, tokens = await _engine(request).embed_texts(body.texts)
    return JSONResponse({"model": _engine(request).model_id, "dim": vectors.shape[1],
                         "embeddings": vectors.tolist(), "usage": {"prompt_tokens": tokens}})


async def _form_files(request: Request, limit: int) -> tuple[list[bytes], list[str]]:
    """Bytes and names of every file part of a multipart body (the body is already bounded by the middleware)."""
    try:
        async with request.form(max_files=limit, max_fields=limit) as form:
            files = [v for _, v in form.multi_items() if isinstance(v, UploadFile)]
            check_items("files", files, limit)
            return [await f.read() for f in files], [f"files[{i}] ({f.filename})" for i, f in enumerate(files)]
    except HTTPException as exc:
        if "Too many" in str(exc.detail):
            raise ApiError(413, "too_many_items", f"{exc.detail} (--max-client-batch)", param="files") from exc
        raise ApiError(400, "bad_multipart", f"unreadable multipart body: {exc.detail}") from exc


@router.post("/embed/image")
async def embed_image(request: Request) -> JSONResponse:
    """multipart/form-data (every file part is an image, in order) or JSON {"images": [base64 or data URL, ...]}."""
    engine, limit = _engine(request), _limit(request)
    if request.headers.get("content-type", "").startswith("multipart/form-data"):
        data, names = await _form_files(request, limit)
        vectors = await engine.embed_images(data, names)
    else:
        try:
            body = ImagesRequest.model_validate_json(await request.body())
        except ValidationError as exc:
            raise RequestValidationError(exc.errors()) from exc
        check_items("images", body.images, limit)
        vectors = await _images(engine, body.images, "images")
    return JSONResponse({"model": engine.model_id, "dim": vectors.shape[1], "embeddings": vectors.tolist()})


@router.post("/similarity")
async def similarity(body: SimilarityRequest, request: Request) -> JSONResponse:
    """Cosine of every image with every text, and per image a softmax over the texts at the model's logit scale."""
    engine = _engine(request)
    check_items("images", body.images, _limit(request), len(body.images) + len(body.texts))
    check_items("texts", body.texts, _limit(request), len(body.images) + len(body.texts))
    images, (texts, _) = await asyncio.gather(_images(engine, body.images, "images"), engine.embed_texts(body.texts))
    cosine = images @ texts.T
    scale = engine.logit_scale
    return JSONResponse({"cosine": cosine.tolist(), "probs": _softmax(scale * cosine).tolist(), "logit_scale": scale})


@router.post("/classify")
async def classify(body: ClassifyRequest, request: Request) -> JSONResponse:
    """Zero-shot: per label the mean of its normalized template embeddings, renormalized (CLIP's classifier, as
    `mlx_clip.eval.class_embeddings`); per image the labels ranked by softmax probability (ties keep label order)."""
    engine, templates = _engine(request), body.templates or list(DEFAULT_TEMPLATES)
    check_templates(templates)
    count = len(body.images) + len(body.labels) * len(templates)
    check_items("images", body.images, _limit(request), count)
    check_items("labels", body.labels, _limit(request), count)
    texts = [t.format(label) for label in body.labels for t in templates]
    images, (text_vectors, _) = await asyncio.gather(_images(engine, body.images, "images"), engine.embed_texts(texts))
    classes = _unit(text_vectors.reshape(len(body.labels), len(templates), -1).mean(axis=1))
    cosine = images @ classes.T
    scale = engine.logit_scale
    probs = _softmax(scale * cosine)
    top = body.top_k or len(body.labels)
    results = [[{"label": body.labels[j], "score": float(p[j]), "cosine": float(c[j])}
                for j in np.argsort(-p, kind="stable")[:top]] for p, c in zip(probs, cosine)]
    return JSONResponse({"results": results, "templates": templates, "logit_scale": scale})


# ---- the app -----------------------------------------------------------------------------------------------------

def _error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError):
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        problems = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()) if p != 'body') or 'body'}: {e.get('msg')}"
                             for e in exc.errors()[:5])
        return JSONResponse(ApiError(422, "invalid_body", f"request body does not fit: {problems}").body(), 422)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        error = ApiError(exc.status_code, "http_error", str(exc.detail), headers=dict(exc.headers or {}))
        return JSONResponse(error.body(), status_code=exc.status_code, headers=error.headers)


def default_loader(config: ServeConfig) -> Callable:
    from mlx_clip.io import load

    return lambda: load(config.model)


def create_app(config: ServeConfig, loader: Callable | None = None, routers: Sequence[APIRouter] = ()) -> FastAPI:
    """The ASGI app. `loader() -> (model, tokenizer, preprocess)` runs on the model thread after startup (default:
    `mlx_clip.load(config.model)`); /health answers 503 until it has run and warmed up."""
    metrics = Metrics()
    engine = Engine(config, loader or default_loader(config), metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await engine.start()
        yield
        await engine.stop()

    app = FastAPI(title="mlx-clip", version=mlx_clip.__version__, lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.config, app.state.engine, app.state.metrics = config, engine, metrics
    app.state.index = open_index(config.index)  # None without --index: /search then answers 404
    app.include_router(router)
    app.include_router(search_router)
    for extra in routers:
        app.include_router(extra)
    _error_handlers(app)
    paths = frozenset(r.path for group in (router, search_router, *routers) for r in group.routes)
    app.add_middleware(LimitsMiddleware, config=config, metrics=metrics)  # inner: auth, 429, 413
    app.add_middleware(MetricsMiddleware, metrics=metrics, routes=lambda: paths)  # outer: counts refusals too
    return app


def serve(config: ServeConfig, loader: Callable | None = None, routers: Sequence[APIRouter] = ()) -> None:
    """Run until SIGINT/SIGTERM; then stop accepting, finish in-flight requests within `graceful_timeout`, exit.
    Raises the loader's error if the model cannot be loaded. `routers`: as in `create_app`."""
    # MKL's OpenMP threads spin for 200 ms after each matmul by default, taking the cycles that the event loop and
    # the decoding threads need between batches (measured: ~20% more CPU per served image). Set before MKL starts.
    os.environ.setdefault("KMP_BLOCKTIME", "0")
    app = create_app(config, loader, routers)
    server = uvicorn.Server(uvicorn.Config(app, host=config.host, port=config.port, log_level="info",
                                           timeout_graceful_shutdown=config.graceful_timeout))
    engine = app.state.engine
    engine.on_failure = lambda exc: setattr(server, "should_exit", True)
    server.run()
    if engine.error is not None:
        raise engine.error
