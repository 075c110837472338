"""`mlxclip serve` limits and failure modes against a real server (subprocess, loopback): body size by Content-Length
and by streamed bytes, a decompression-bomb PNG with flat memory, too many items, bad images, empty input, URLs
(never fetched), auth, 503 before the model is warm, 429 beyond --max-concurrent, and SIGTERM with requests in
flight. Every refusal is checked for its status and stable error code."""

import concurrent.futures as cf
import http.server
import io
import threading
import time

import mlx_clip  # noqa: F401  (before mlx.core: preloads the fast BLAS)
import numpy as np
import pytest
from PIL import Image

from mlx_clip.io import load
from mlx_clip.serve import ServeConfig, create_app

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")
from serve_util import (AUTH, KEY, MAX_CLIENT_BATCH, ServerProcess, client, data_url, error_of,  # noqa: E402,F401
                        free_port, images, metric, png_bomb, png_bytes, random_image, ref, ref_texts, server, tiny_dir)


# ---- limits and bad input ----------------------------------------------------------------------------------------

def test_body_limit_by_content_length_and_by_streamed_bytes(client):
    big = b'{"texts": ["' + b"a" * (1024 * 1024 + 10) + b'"]}'
    error_of(client.post("/embed/text", content=big, headers={"content-type": "application/json"}), 413,
             "body_too_large")

    def chunks():  # a generator body goes out chunked, without Content-Length
        yield b'{"texts": ["'
        for _ in range(40):
            yield b"a" * 65536
        yield b'"]}'

    r = client.post("/embed/text", content=chunks(), headers={"content-type": "application/json"})
    assert "content-length" not in r.request.headers
    error_of(r, 413, "body_too_large")
    assert client.post("/embed/text", json={"texts": ["still serving"]}).status_code == 200


def test_pixel_bomb_refused_from_header_with_flat_memory(client, server):
    bomb = png_bomb(20000)
    assert len(bomb) < 200_000
    client.post("/embed/image", json={"images": [data_url(bomb)]})  # first call: let allocators settle
    rss = server.rss_bytes()
    for _ in range(5):
        msg = error_of(client.post("/embed/image", json={"images": [data_url(bomb)]}), 413, "image_too_large")
        assert "400000000 pixels" in msg and "before decoding" in msg
        error_of(client.post("/embed/image", files=[("files", ("bomb.png", bomb, "image/png"))]), 413,
                 "image_too_large")
    assert server.rss_bytes() - rss < 30 * 2**20  # decoding it would take >= 50 MB (1 bit) and 1.2 GB as RGB
    over_ours = png_bytes(Image.new("L", (2000, 1000)))  # over --max-image-pixels, far under Pillow's own guard
    msg = error_of(client.post("/v1/embeddings", json={"input": [data_url(over_ours)]}), 413, "image_too_large")
    assert "2000x1000" in msg and "--max-image-pixels" in msg
    assert client.post("/embed/text", json={"texts": ["still serving"]}).status_code == 200


def test_too_many_items(client, images):
    n = MAX_CLIENT_BATCH + 1
    error_of(client.post("/v1/embeddings", json={"input": ["a"] * n}), 413, "too_many_items")
    error_of(client.post("/embed/text", json={"texts": ["a"] * n}), 413, "too_many_items")
    error_of(client.post("/embed/image", files=[("files", (f"{i}.png", images[0], "image/png")) for i in range(n)]),
             413, "too_many_items")
    # /classify counts what the model must embed: images + labels x templates
    error_of(client.post("/classify", json={"images": [data_url(images[0])], "labels": ["a", "b", "c", "d"],
                                            "templates": ["{}", "a {}"]}), 413, "too_many_items")


def test_bad_images_are_400_naming_the_problem(client, images):
    truncated = images[0][: len(images[0]) // 2]
    ppm = png_bytes(random_image(3), "PPM")  # Pillow reads it, but it is not on the allow-list
    cases = [(data_url(truncated), "bad_image"), (data_url(b"not an image at all"), "unsupported_image_format"),
             (data_url(ppm, "image/x-portable-pixmap"), "unsupported_image_format"),
             ("data:text/plain;base64,aGVsbG8=", "unsupported_image_format"),
             ("data:image/png;base64,@@@not-base64@@@", "bad_base64"), ("data:image/png,raw", "bad_data_url")]
    for value, code in cases:
        msg = error_of(client.post("/embed/image", json={"images": [data_url(images[1]), value]}), 400, code)
        assert "images[1]" in msg
    msg = error_of(client.post("/embed/image", files=[("files", ("half.png", truncated, "image/png"))]), 400,
                   "bad_image")
    assert "half.png" in msg
    assert Image.open(io.BytesIO(ppm)).format == "PPM"


def test_empty_and_malformed_requests(client):
    for path, body in [("/v1/embeddings", {"input": []}), ("/v1/embeddings", {"input": ""}),
                       ("/embed/text", {"texts": []}), ("/embed/text", {"texts": ["ok", "  "]}),
                       ("/embed/image", {"images": []}), ("/similarity", {"images": [], "texts": ["a"]})]:
        error_of(client.post(path, json=body), 400, "empty_input")
    error_of(client.post("/embed/image", files=[("other", (None, "x"))]), 400, "empty_input")
    msg = error_of(client.post("/v1/embeddings", json={"model": "tiny"}), 422, "invalid_body")
    assert "input" in msg
    error_of(client.post("/embed/text", content=b"{not json", headers={"content-type": "application/json"}), 422,
             "invalid_body")
    error_of(client.post("/v1/embeddings", json={"input": [[1, 2, 3]]}), 422, "invalid_body")  # token ids


def test_urls_are_refused_and_never_fetched(client):
    hits = []

    class Trap(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            hits.append(self.path)
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    trap = http.server.HTTPServer(("127.0.0.1", free_port()), Trap)
    threading.Thread(target=trap.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{trap.server_port}/cat.png"
    try:
        for path, body in [("/v1/embeddings", {"input": [url]}), ("/embed/image", {"images": [url]}),
                           ("/similarity", {"images": [url], "texts": ["a"]}),
                           ("/classify", {"images": [url], "labels": ["a"]})]:
            assert "never fetches" in error_of(client.post(path, json=body), 400, "url_not_fetched")
        time.sleep(0.2)
    finally:
        trap.shutdown()
    assert hits == []


def test_auth(server, client, images):
    for path, body in [("/v1/embeddings", {"input": "a"}), ("/embed/text", {"texts": ["a"]}),
                       ("/embed/image", {"images": [data_url(images[0])]}),
                       ("/similarity", {"images": [data_url(images[0])], "texts": ["a"]}),
                       ("/classify", {"images": [data_url(images[0])], "labels": ["a"]})]:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
            r = httpx.post(server.url + path, json=body, headers=headers)
            error_of(r, 401, "invalid_api_key")
            assert r.headers["www-authenticate"] == "Bearer"
        assert client.post(path, json=body).status_code == 200
    for path in ("/info", "/metrics"):
        assert httpx.get(server.url + path).status_code == 401
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}  # public
    assert 'id="labels"' in httpx.get(server.url + "/").text  # the page is public; its calls send the key
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).embeddings.create(
            model="tiny", input="a")


# ---- readiness, backpressure, shutdown ---------------------------------------------------------------------------

def test_health_is_503_until_loaded_and_warm(tiny_dir, ref):
    """In-process uvicorn with a loader that waits for a signal: the server answers (503) while the model loads.
    It also mounts an extra router (the extension point a search index uses): protected, and it reaches the model."""
    from fastapi import APIRouter, Request

    gate, extra = threading.Event(), APIRouter()

    @extra.post("/extra")
    async def extra_route(request: Request):
        vectors, _ = await request.app.state.engine.embed_texts(["from a plug-in"])
        return {"dim": int(vectors.shape[1])}

    def slow_loader():
        gate.wait(30)
        return load(tiny_dir)

    app = create_app(ServeConfig(model=str(tiny_dir), api_key=KEY), loader=slow_loader, routers=[extra])
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        r = httpx.get(url + "/health")
        assert r.status_code == 503 and r.json()["status"] == "loading" and r.headers["retry-after"] == "1"
        error_of(httpx.post(url + "/embed/text", json={"texts": ["a"]}, headers=AUTH), 503, "not_ready")
        gate.set()
        deadline = time.monotonic() + 30
        while httpx.get(url + "/health").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert httpx.post(url + "/embed/text", json={"texts": ["a"]}, headers=AUTH).status_code == 200
        error_of(httpx.post(url + "/extra"), 401, "invalid_api_key")
        assert httpx.post(url + "/extra", headers=AUTH).json() == {"dim": ref[0].config.projection_dim}
    finally:
        gate.set()
        server.should_exit = True
        thread.join(30)


@pytest.fixture(scope="module")
def slow_server(tiny_dir, tmp_path_factory):
    """Batches wait 1.5 s to fill, so requests stay in flight long enough to observe."""
    s = ServerProcess(tiny_dir, "--max-concurrent", 4, "--max-wait-ms", 1500, "--max-batch", 64,
                      "--graceful-timeout", 10, log_dir=tmp_path_factory.mktemp("logs"))
    yield s.wait_ready()
    s.close()


def _fill(server, n: int, pool):
    """Start n slow requests and wait until the server counts them in flight."""
    futures = [pool.submit(httpx.post, server.url + "/embed/text", json={"texts": [f"request {i}"]}, timeout=60)
               for i in range(n)]
    deadline = time.monotonic() + 10
    with httpx.Client(base_url=server.url) as c:
        while metric(c, "mlxclip_in_flight_requests") < n and time.monotonic() < deadline:
            time.sleep(0.02)
    return futures


def test_429_beyond_max_concurrent(slow_server):
    with cf.ThreadPoolExecutor(4) as pool:
        futures = _fill(slow_server, 4, pool)
        r = httpx.post(slow_server.url + "/embed/text", json={"texts": ["one too many"]})
        error_of(r, 429, "overloaded")
        assert int(r.headers["retry-after"]) >= 1
        assert httpx.get(slow_server.url + "/health").status_code == 200  # health is never throttled
        assert [f.result().status_code for f in futures] == [200] * 4


def test_sigterm_finishes_in_flight_requests(slow_server, ref):
    with cf.ThreadPoolExecutor(4) as pool:
        futures = _fill(slow_server, 4, pool)
        slow_server.terminate()
        sent = time.monotonic()
        time.sleep(0.3)
        with pytest.raises(httpx.ConnectError):  # stopped accepting...
            httpx.get(slow_server.url + "/health")
        assert not all(f.done() for f in futures)  # ...while the batch is still waiting to run
        results = [f.result() for f in futures]
    assert [r.status_code for r in results] == [200] * 4  # none dropped
    want = ref_texts(ref, [f"request {i}" for i in range(4)])
    np.testing.assert_allclose([r.json()["embeddings"][0] for r in results], want, atol=2e-5)
    slow_server.proc.wait(15)
    assert time.monotonic() - sent < 10  # within --graceful-timeout
    assert slow_server.proc.returncode in (0, -15)  # uvicorn re-raises SIGTERM after its graceful shutdown

