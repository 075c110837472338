"""Helpers and fixtures for the serve tests: a real `mlxclip serve` in a subprocess on a free loopback port, the
same model loaded in the test process as the reference, and generated images."""

from __future__ import annotations

import base64
import io
import os
import signal
import socket
import subprocess
import struct
import sys
import time
import zlib
from pathlib import Path

import httpx
import mlx_clip  # noqa: F401  (before mlx.core: preloads the fast BLAS)
import mlx.core as mx
import numpy as np
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from converters.convert import init_model
from mlx_clip.io import load


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`python -m mlx_clip serve --model DIR --port P ARGS...`; `wait_ready()` polls /health until 200."""

    def __init__(self, model_dir, *args, log_dir: Path, env: dict | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = Path(log_dir) / f"server-{self.port}.log"
        cmd = [sys.executable, "-m", "mlx_clip", "serve", "--model", str(model_dir), "--port", str(self.port),
               *map(str, args)]
        self.proc = subprocess.Popen(cmd, stdout=self.log.open("w"), stderr=subprocess.STDOUT,
                                     env={**os.environ, **(env or {})})

    def wait_ready(self, timeout: float = 60.0) -> "ServerProcess":
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log.read_text()}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"server not ready after {timeout}s:\n{self.log.read_text()}")

    def rss_bytes(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS")

    def terminate(self) -> None:
        self.proc.send_signal(signal.SIGTERM)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def png_bytes(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def random_image(seed: int, size=(40, 30), mode: str = "RGB") -> Image.Image:
    """A smooth random picture (low-frequency noise upsampled), so resizing has something to do."""
    rng = np.random.default_rng(seed)
    small = (rng.random((4, 4, 3)) * 255).astype(np.uint8)
    return Image.fromarray(small).resize(size, Image.Resampling.BILINEAR).convert(mode)


def data_url(data: bytes, media: str = "image/png") -> str:
    return f"data:{media};base64,{base64.b64encode(data).decode()}"


def cosines(a, b) -> np.ndarray:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def error_of(response, status: int, code: str) -> str:
    assert response.status_code == status, response.text
    body = response.json()["error"]
    assert body["code"] == code, body
    return body["message"]


def png_bomb(side: int) -> bytes:
    """A valid 1-bit PNG of side x side black pixels: ~50 KB that decodes to side^2 pixels (400 M for 20000)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    z, row = zlib.compressobj(9), b"\x00" * (1 + (side + 7) // 8)
    idat = b"".join(z.compress(row) for _ in range(side)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def metric(client, name: str, **labels) -> float:
    for family in text_string_to_metric_families(client.get("/metrics").text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


KEY = "test-key-123"
AUTH = {"Authorization": f"Bearer {KEY}"}
MAX_CLIENT_BATCH = 8
MAX_PIXELS = 1_000_000


# ---- fixtures shared by the serve test modules (each module starts its own server) -----------------------------

@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return init_model("tiny", 0, tmp_path_factory.mktemp("serve") / "tiny")


@pytest.fixture(scope="module")
def ref(tiny_dir):
    """The same model loaded here: the reference every served vector must match."""
    return load(tiny_dir)


@pytest.fixture(scope="module")
def server(tiny_dir, tmp_path_factory):
    s = ServerProcess(tiny_dir, "--api-key", KEY, "--max-body-mb", 1, "--max-image-pixels", MAX_PIXELS,
                      "--max-client-batch", MAX_CLIENT_BATCH, "--max-batch", 16, "--max-wait-ms", 30,
                      log_dir=tmp_path_factory.mktemp("logs"))
    yield s.wait_ready()
    s.close()


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def images():
    """PNG bytes of varied sizes and modes (RGB, grayscale, RGBA, a JPEG)."""
    out = [png_bytes(random_image(i, size, mode)) for i, (size, mode) in
           enumerate([((40, 30), "RGB"), ((32, 32), "L"), ((50, 70), "RGBA"), ((33, 47), "RGB")])]
    return out + [png_bytes(random_image(9, (64, 48)), "JPEG")]


TEXTS = ["a photo of a cat", "a dog on the grass", "diagram of a red square", "x"]


def ref_images(ref, blobs) -> np.ndarray:
    model, _, pre = ref
    pixels = np.stack([pre.to_numpy(Image.open(io.BytesIO(b))) for b in blobs])
    return np.array(model.encode_image(mx.array(pixels), normalize=True))


def ref_texts(ref, texts) -> np.ndarray:
    model, tok, _ = ref
    return np.array(model.encode_text(tok(texts), normalize=True))
