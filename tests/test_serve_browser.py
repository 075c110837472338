"""The web page at GET / in a real headless Chromium (Debian's chromium + chromedriver, driven by selenium): choose a
generated PNG, type labels, click, and the zero-shot scores and similarities render, equal to what /classify and
/similarity answer for the same image. Skipped only when chromium or chromedriver is absent."""

import shutil

import mlx_clip  # noqa: F401  (before mlx.core: preloads the fast BLAS)
import numpy as np
import pytest

from converters.convert import init_model
from serve_util import ServerProcess, data_url, png_bytes, random_image

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER),
                                reason="needs Debian's chromium and chromium-driver (apt-get install chromium "
                                       "chromium-driver; .ci/run installs them)")
webdriver = pytest.importorskip("selenium.webdriver")
KEY = "page-key"
LABELS = ["red circle", "blue square", "green grass"]
SCREENSHOT = "/tmp/mlxclip_serve_page.png"  # to look at; not part of the repo


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    model_dir = init_model("tiny", 0, tmp_path_factory.mktemp("page") / "tiny")
    s = ServerProcess(model_dir, "--api-key", KEY, log_dir=tmp_path_factory.mktemp("logs"))
    yield s.wait_ready()
    s.close()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
                 "--window-size=900,900", f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def test_page_classifies_an_uploaded_image(server, browser, tmp_path):
    import httpx
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    image = tmp_path / "upload.png"
    image.write_bytes(png_bytes(random_image(5, (80, 60))))
    browser.get(server.url + "/")
    browser.find_element(By.ID, "file").send_keys(str(image))
    WebDriverWait(browser, 10).until(lambda d: d.find_element(By.ID, "preview").get_attribute("src").startswith("data:"))
    browser.find_element(By.ID, "labels").send_keys(", ".join(LABELS))
    browser.find_element(By.ID, "apikey").send_keys(KEY)
    browser.find_element(By.ID, "run").click()
    WebDriverWait(browser, 20).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#scores tr.score")) == 3)
    browser.save_screenshot(SCREENSHOT)
    rows = [[td.text for td in tr.find_elements(By.TAG_NAME, "td")]
            for tr in browser.find_elements(By.CSS_SELECTOR, "#scores tr.score")]

    # What the page shows is what the API answers for the same image and labels.
    auth = {"Authorization": f"Bearer {KEY}"}
    url = data_url(image.read_bytes())
    ranked = httpx.post(server.url + "/classify", json={"images": [url], "labels": LABELS}, headers=auth).json()
    cosine = httpx.post(server.url + "/similarity", json={"images": [url], "texts": LABELS}, headers=auth).json()
    assert [r[0] for r in rows] == [r["label"] for r in ranked["results"][0]]
    np.testing.assert_allclose([float(r[1].rstrip("%")) for r in rows],
                               [100 * r["score"] for r in ranked["results"][0]], atol=0.051)
    np.testing.assert_allclose([float(r[3]) for r in rows],
                               [cosine["cosine"][0][LABELS.index(r[0])] for r in rows], atol=1e-4)
    assert "top label" in browser.find_element(By.ID, "status").text


def test_page_shows_the_error_without_key(server, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    image = tmp_path / "upload.png"
    image.write_bytes(png_bytes(random_image(6)))
    browser.get(server.url + "/")
    browser.find_element(By.ID, "file").send_keys(str(image))
    WebDriverWait(browser, 10).until(lambda d: d.find_element(By.ID, "preview").get_attribute("src").startswith("data:"))
    browser.find_element(By.ID, "labels").send_keys("a, b")
    browser.find_element(By.ID, "run").click()
    status = browser.find_element(By.ID, "status")
    WebDriverWait(browser, 10).until(lambda d: "API key" in status.text)
    assert status.get_attribute("class") == "error"
