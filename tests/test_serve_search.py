"""`mlxclip serve --index`: POST /search on a real server (subprocess, loopback, free port) over an index built here by
`mlxclip embed --data` + `mlxclip index` on generated images. Hits must equal `mlx_clip.index.search` called in this
process (and a numpy brute-force ranking); k bounds, bad queries, auth, /info and the 404 without an index."""

import base64

import mlx_clip  # noqa: F401  (before mlx.core: preloads the fast BLAS)
import numpy as np
import pytest

from mlx_clip import embed_batch as eb
from mlx_clip.index import search as index_search

httpx = pytest.importorskip("httpx")
from cli_util import invoke  # noqa: E402
from serve_util import (AUTH, KEY, ServerProcess, client, data_url, error_of, png_bytes, random_image,  # noqa: E402,F401
                        ref, ref_texts, tiny_dir)

N_ITEMS = 12
QUERIES = ["a photo of a cat", "red and green", "x"]


@pytest.fixture(scope="module")
def collection(tiny_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("search")
    for i in range(N_ITEMS):
        folder = root / "imgs" / ("a" if i % 2 else "b")
        folder.mkdir(parents=True, exist_ok=True)
        random_image(100 + i, (48, 40)).save(folder / f"{i}.png")
    invoke("embed", "--model", tiny_dir, "--data", root / "imgs", "--out", root / "emb", "--dtype", "float32",
            "--shard-size", 5)
    invoke("index", "--embeddings", root / "emb", "--out", root / "idx")
    return root


@pytest.fixture(scope="module")
def server(tiny_dir, collection, tmp_path_factory):
    s = ServerProcess(tiny_dir, "--index", collection / "idx", "--api-key", KEY, "--max-wait-ms", 1,
                      log_dir=tmp_path_factory.mktemp("logs"))
    yield s.wait_ready()
    s.close()


def _same_hits(got: list[dict], want: list[dict]) -> None:
    assert [h["rank"] for h in got] == list(range(1, len(want) + 1))
    assert [h["path"] for h in got] == [h["path"] for h in want]
    assert [(h["key"], h["label"], h["id"]) for h in got] == [(h["key"], h["label"], h["id"]) for h in want]
    np.testing.assert_allclose([h["score"] for h in got], [h["score"] for h in want], atol=2e-5)


def test_text_search_equals_in_process_search(client, collection, tiny_dir, ref):
    vectors, table = eb.read_vectors(collection / "emb")
    for text in QUERIES:
        got = client.post("/search", json={"text": text, "k": 5}).json()["results"]
        _same_hits(got, index_search(collection / "idx", tiny_dir, text=text, k=5))
        # and an independent numpy ranking of the embedded vectors
        scores = vectors.astype(np.float64) @ ref_texts(ref, [text])[0].astype(np.float64)
        order = np.argsort(-scores, kind="stable")[:5]
        assert [h["path"] for h in got] == [table.column("path")[int(j)].as_py() for j in order]


def test_image_search_equals_in_process_search(client, collection, tiny_dir):
    path = sorted((collection / "imgs" / "a").glob("*.png"))[2]
    body = client.post("/search", json={"image": data_url(path.read_bytes()), "k": 4}).json()
    assert body["kind"] == "exact" and body["model"] == "tiny"
    _same_hits(body["results"], index_search(collection / "idx", tiny_dir, image=path, k=4))
    assert body["results"][0]["path"] == str(path) and body["results"][0]["score"] == pytest.approx(1.0, abs=1e-5)
    fresh = png_bytes(random_image(7, (30, 50)))  # not in the index; plain base64 works too
    other = collection / "query.png"
    other.write_bytes(fresh)
    got = client.post("/search", json={"image": base64.b64encode(fresh).decode()}).json()["results"]
    _same_hits(got, index_search(collection / "idx", tiny_dir, image=other, k=10))


def test_k_bounds(client):
    assert len(client.post("/search", json={"text": "a", "k": 1}).json()["results"]) == 1
    assert len(client.post("/search", json={"text": "a"}).json()["results"]) == 10  # default k
    assert len(client.post("/search", json={"text": "a", "k": 1000}).json()["results"]) == N_ITEMS  # all there is
    for bad in (0, -3, 1001, "many"):
        assert "k" in error_of(client.post("/search", json={"text": "a", "k": bad}), 422, "invalid_body")


def test_bad_queries(client):
    assert "both" in error_of(client.post("/search", json={"text": "a", "image": "aGk="}), 400, "bad_query")
    assert "neither" in error_of(client.post("/search", json={"k": 3}), 400, "bad_query")
    error_of(client.post("/search", json={"text": "  "}), 400, "empty_input")
    error_of(client.post("/search", json={"image": "https://example.com/cat.png"}), 400, "url_not_fetched")
    error_of(client.post("/search", json={"image": "not base64!"}), 400, "bad_base64")
    error_of(client.post("/search", json={"image": data_url(b"not an image")}), 400, "unsupported_image_format")
    error_of(client.post("/search", content=b"{", headers={"content-type": "application/json"}), 422, "invalid_body")


def test_auth_info_and_page(client, server):
    assert httpx.post(server.url + "/search", json={"text": "a"}).status_code == 401
    wrong = {"Authorization": "Bearer nope"}
    assert httpx.post(server.url + "/search", json={"text": "a"}, headers=wrong).status_code == 401
    index = client.get("/info").json()["index"]
    assert index["count"] == N_ITEMS and index["kind"] == "exact" and index["dims"] == client.get(
        "/info").json()["dim"]
    page = httpx.get(server.url + "/").text
    assert 'id="search" hidden' in page and '"/search"' in page  # shown by the page's script once /info has an index


def test_no_index_answers_404(tiny_dir, tmp_path):
    s = ServerProcess(tiny_dir, log_dir=tmp_path)
    try:
        s.wait_ready()
        message = error_of(httpx.post(s.url + "/search", json={"text": "a"}), 404, "no_index")
        assert "--index" in message
        assert httpx.get(s.url + "/info").json()["index"] is None
    finally:
        s.close()


def test_page_search_box(server, client, tmp_path):
    """The page in headless Chromium (as test_serve_browser.py): the search box appears once /info (with the key)
    reports an index, and a text query lists the same paths and scores as POST /search."""
    import shutil

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if not (chromium and shutil.which("chromedriver")):
        pytest.skip("needs Debian's chromium and chromium-driver")
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
                 f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    browser = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    try:
        browser.get(server.url + "/")
        assert not browser.find_element(By.ID, "search").is_displayed()  # /info refused without the key
        browser.find_element(By.ID, "apikey").send_keys(KEY, Keys.TAB)
        WebDriverWait(browser, 10).until(lambda d: d.find_element(By.ID, "search").is_displayed())
        assert f"{N_ITEMS} items" in browser.find_element(By.ID, "index-info").text
        browser.find_element(By.ID, "query").send_keys(QUERIES[1])
        browser.find_element(By.ID, "find").click()
        WebDriverWait(browser, 30).until(lambda d: d.find_elements(By.CSS_SELECTOR, "tr.hit"))
        rows = [[c.text for c in r.find_elements(By.TAG_NAME, "td")]
                for r in browser.find_elements(By.CSS_SELECTOR, "tr.hit")]
    finally:
        browser.quit()
    want = client.post("/search", json={"text": QUERIES[1], "k": 10}).json()["results"]
    assert [r[1] for r in rows] == [h["path"] for h in want]
    np.testing.assert_allclose([float(r[2]) for r in rows], [h["score"] for h in want], atol=1e-4)
