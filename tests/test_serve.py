"""`mlxclip serve` end to end, the embeddings: a real uvicorn server (subprocess, loopback, free port) on a tiny random
model, driven by real clients (httpx and the official `openai` client). Every vector is checked against `encode_image`
/ `encode_text` called directly in this process; /similarity and /classify against numpy and `eval.class_embeddings`.
Limits, bad input, auth, readiness and shutdown: test_serve_limits.py."""

import asyncio
import base64
import concurrent.futures as cf
import threading
import time

import mlx_clip  # noqa: F401  (before mlx.core: preloads the fast BLAS)
import numpy as np
import pytest
from click.testing import CliRunner
from prometheus_client.parser import text_string_to_metric_families

from mlx_clip import cli
from mlx_clip.eval import class_embeddings
from mlx_clip.io import load
from mlx_clip.serve import ServeConfig

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
from serve_util import (KEY, MAX_CLIENT_BATCH, TEXTS, ServerProcess, client, cosines, data_url,  # noqa: E402,F401
                        error_of, images, metric, ref, ref_images, ref_texts, server, tiny_dir)


# ---- embeddings --------------------------------------------------------------------------------------------------

def test_openai_client_texts_and_images(server, ref, images):
    """The official client (which asks for base64 by default and decodes it) gets the model's own vectors."""
    oa = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)
    inputs = [TEXTS[0], data_url(images[0]), TEXTS[1], data_url(images[4], "image/jpeg")]
    result = oa.embeddings.create(model="tiny", input=inputs)
    got = np.array([d.embedding for d in result.data])
    assert [d.index for d in result.data] == [0, 1, 2, 3] and result.model == "tiny"  # the dir's name, not its path
    np.testing.assert_allclose(got[[0, 2]], ref_texts(ref, [TEXTS[0], TEXTS[1]]), atol=2e-5)
    np.testing.assert_allclose(got[[1, 3]], ref_images(ref, [images[0], images[4]]), atol=2e-5)
    tok = ref[1]  # usage counts text tokens with start/end, as the BPE encodes them
    assert result.usage.prompt_tokens == sum(len(tok.encode(t)) + 2 for t in (TEXTS[0], TEXTS[1]))
    floats = oa.embeddings.create(model="tiny", input=TEXTS[2], encoding_format="float")
    np.testing.assert_allclose(floats.data[0].embedding, ref_texts(ref, [TEXTS[2]])[0], atol=2e-5)


def test_base64_is_the_same_float32(client):
    body = {"input": TEXTS, "model": "tiny"}
    floats = client.post("/v1/embeddings", json=body | {"encoding_format": "float"}).json()
    packed = client.post("/v1/embeddings", json=body | {"encoding_format": "base64"}).json()
    for f, p in zip(floats["data"], packed["data"]):
        decoded = np.frombuffer(base64.b64decode(p["embedding"]), dtype="<f4")
        np.testing.assert_array_equal(decoded, np.array(f["embedding"], np.float32))
    assert floats["object"] == "list" and floats["usage"]["total_tokens"] == floats["usage"]["prompt_tokens"] > 0


def test_dimensions_truncate_and_renormalize(client, server, ref):
    full = ref_texts(ref, TEXTS)
    got = np.array([d["embedding"] for d in client.post(
        "/v1/embeddings", json={"input": TEXTS, "dimensions": 8}).json()["data"]])
    want = full[:, :8] / np.linalg.norm(full[:, :8], axis=1, keepdims=True)
    np.testing.assert_allclose(got, want, atol=2e-5)
    oa = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)
    assert len(oa.embeddings.create(model="tiny", input="a", dimensions=5).data[0].embedding) == 5
    for bad in (0, full.shape[1] + 1):
        error_of(client.post("/v1/embeddings", json={"input": "a", "dimensions": bad}), 400, "bad_dimensions")


def test_embed_text(client, ref):
    body = client.post("/embed/text", json={"texts": TEXTS}).json()
    assert body["dim"] == ref[0].config.projection_dim
    np.testing.assert_allclose(body["embeddings"], ref_texts(ref, TEXTS), atol=2e-5)
    np.testing.assert_allclose(np.linalg.norm(body["embeddings"], axis=1), 1.0, atol=1e-5)


def test_embed_image_multipart_and_json(client, ref, images):
    want = ref_images(ref, images)
    files = [("files", (f"img{i}.png", b, "image/png")) for i, b in enumerate(images)]
    multipart = client.post("/embed/image", files=files).json()["embeddings"]
    np.testing.assert_allclose(multipart, want, atol=2e-5)
    as_json = [base64.b64encode(images[0]).decode(), data_url(images[1])] + [data_url(b) for b in images[2:]]
    np.testing.assert_allclose(client.post("/embed/image", json={"images": as_json}).json()["embeddings"], want,
                               atol=2e-5)


def test_similarity_matches_numpy(client, ref, images):
    body = client.post("/similarity", json={"images": [data_url(b) for b in images[:3]], "texts": TEXTS}).json()
    cos = ref_images(ref, images[:3]).astype(np.float64) @ ref_texts(ref, TEXTS).T.astype(np.float64)
    logits = np.exp(float(np.array(ref[0].logit_scale))) * cos
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    np.testing.assert_allclose(body["cosine"], cos, atol=3e-5)
    np.testing.assert_allclose(body["probs"], probs, atol=3e-5)


def test_classify_matches_eval_class_embeddings(client, ref, images):
    labels, templates = ["cat", "dog", "red square"], ["a photo of a {}.", "a drawing of the {}"]
    body = client.post("/classify", json={"images": [data_url(b) for b in images[:2]], "labels": labels,
                                          "templates": templates}).json()  # 2 + 3 x 2 = 8 embeddings: the limit
    classes = class_embeddings(ref[0], ref[1], labels, templates)  # the evaluation code, called directly
    cos = ref_images(ref, images[:2]) @ classes.T
    logits = np.exp(float(np.array(ref[0].logit_scale))) * cos
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    for result, p, c in zip(body["results"], probs, cos):
        order = np.argsort(-p, kind="stable")
        assert [r["label"] for r in result] == [labels[j] for j in order]
        np.testing.assert_allclose([r["score"] for r in result], p[order], atol=3e-5)
        np.testing.assert_allclose([r["cosine"] for r in result], c[order], atol=3e-5)
    top = client.post("/classify", json={"images": [data_url(images[0])], "labels": labels, "top_k": 1}).json()
    assert len(top["results"][0]) == 1 and top["templates"] == ["a photo of a {}."]
    error_of(client.post("/classify", json={"images": [data_url(images[0])], "labels": labels,
                                            "templates": ["no slot"]}), 400, "bad_template")


def test_batch_invariance_under_concurrency(client, server, ref, images):
    """Each input alone, then all at once from 10 threads (plus one multi-item request): same vectors, and the
    batcher really did put several requests into one model call."""
    alone_img = [client.post("/embed/image", json={"images": [data_url(b)]}).json()["embeddings"][0] for b in images]
    alone_txt = [client.post("/embed/text", json={"texts": [t]}).json()["embeddings"][0] for t in TEXTS]
    before = metric(client, "mlxclip_batch_size_count", kind="image")
    barrier = threading.Barrier(10)

    def one(i):
        barrier.wait()
        if i < len(images):
            return client.post("/embed/image", json={"images": [data_url(images[i])]}).json()["embeddings"][0]
        if i < len(images) + len(TEXTS):
            return client.post("/embed/text", json={"texts": [TEXTS[i - len(images)]]}).json()["embeddings"][0]
        return client.post("/embed/image", json={"images": [data_url(b) for b in images]}).json()["embeddings"]

    with cf.ThreadPoolExecutor(10) as pool:
        out = list(pool.map(one, range(10)))
    together_img, together_txt, multi = out[: len(images)], out[len(images): len(images) + len(TEXTS)], out[-1]
    assert cosines(alone_img, together_img).min() > 0.9999
    assert cosines(alone_img, multi).min() > 0.9999
    assert cosines(alone_txt, together_txt).min() > 0.9999
    np.testing.assert_allclose(alone_img, ref_images(ref, images), atol=2e-5)
    calls = metric(client, "mlxclip_batch_size_count", kind="image") - before
    assert calls < 2 * len(images), f"{calls} model calls for {2 * len(images)} images: nothing was batched"


def test_long_texts_are_exact_and_cheap(client, ref):
    """Only the context reaches the model: a 500-word text embeds as the tokenizer truncates it, and a 200,000-letter
    random "word" (hours of BPE if tokenized whole) is answered at once."""
    long = " ".join(f"word{i}, and" for i in range(500))
    got = client.post("/embed/text", json={"texts": [long, "short"]}).json()["embeddings"]
    np.testing.assert_allclose(got, ref_texts(ref, [long, "short"]), atol=2e-5)
    junk = "".join(np.random.default_rng(0).choice(list("abcdefghijklmnopqrstuvwxyz"), 200_000))
    start = time.monotonic()
    assert client.post("/embed/text", json={"texts": [junk]}).status_code == 200
    assert time.monotonic() - start < 10


def test_more_images_than_decode_slots(tiny_dir, ref, images):
    """At most 4 x max_batch images wait decoded at once; a request with more (here 10 > 4) still completes, in
    order, through the Engine that the routes call."""
    from mlx_clip.serve.engine import Engine

    async def run():
        engine = Engine(ServeConfig(model=str(tiny_dir), max_batch=1), loader=lambda: load(tiny_dir))
        await engine.start()
        while not engine.ready:
            await asyncio.sleep(0.01)
        try:
            return await asyncio.wait_for(engine.embed_images(images * 2, [f"i{k}" for k in range(10)]), 60)
        finally:
            await engine.stop()

    np.testing.assert_allclose(asyncio.run(run()), ref_images(ref, images * 2), atol=2e-5)


def test_info_and_metrics(client, ref):
    info = client.get("/info").json()
    assert info["ready"] and info["dim"] == ref[0].config.projection_dim
    assert info["limits"]["max_client_batch"] == MAX_CLIENT_BATCH and info["limits"]["auth"] is True
    client.post("/embed/text", json={"texts": ["for the metrics"]})
    httpx.post(str(client.base_url) + "/embed/text", json={"texts": ["a"]})  # a 401
    names = {f.name for f in text_string_to_metric_families(client.get("/metrics").text)}
    assert {"mlxclip_requests", "mlxclip_errors", "mlxclip_request_latency_seconds", "mlxclip_queue_depth",
            "mlxclip_batch_size", "mlxclip_inference_seconds", "mlxclip_in_flight_requests"} <= names
    assert metric(client, "mlxclip_requests_total", route="/embed/text", code="200") >= 1
    assert metric(client, "mlxclip_errors_total", route="/embed/text", code="401") >= 1
    assert metric(client, "mlxclip_queue_depth", kind="text") == 0


# ---- CLI ---------------------------------------------------------------------------------------------------------

def test_cli_defaults_match_serve_config():
    from dataclasses import fields

    params = {p.name: p for p in cli.main.commands["serve"].params}
    for f in fields(ServeConfig):
        assert f.name in params, f.name
        if f.name != "api_key":
            assert params[f.name].default == f.default, f.name
    result = CliRunner().invoke(cli.main, ["serve", "--help"])
    for flag in ("--max-batch", "--max-wait-ms", "--max-concurrent", "--max-body-mb", "--max-image-pixels",
                 "--max-client-batch", "--api-key", "--graceful-timeout", "MLXCLIP_API_KEY"):
        assert flag in result.output


def test_cli_bad_model_exits_1(tmp_path):
    s = ServerProcess(tmp_path / "missing", log_dir=tmp_path)
    assert s.proc.wait(60) == 1
    assert "error:" in s.log.read_text() and "missing" in s.log.read_text()
