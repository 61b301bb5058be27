"""Fixtures for the lab tests: tiny MNIST-format IDX files, and a local HTTP server serving them."""
from __future__ import annotations

import functools
import http.server
import threading
from pathlib import Path

import numpy as np
import pytest

from batchnorm.lab.data import write_idx

MNIST_NAMES = {
    "x_train": "train-images-idx3-ubyte.gz",
    "y_train": "train-labels-idx1-ubyte.gz",
    "x_test": "t10k-images-idx3-ubyte.gz",
    "y_test": "t10k-labels-idx1-ubyte.gz",
}


def make_mnist(folder: Path, n_train: int = 96, n_test: int = 48, seed: int = 0) -> dict[str, np.ndarray]:
    """Write four small IDX files in MNIST's format and names; the labels are learnable (a bright
    square at a label-dependent place), so a few epochs show some learning."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, n in (("train", n_train), ("test", n_test)):
        y = rng.integers(0, 10, size=n).astype(np.uint8)
        x = rng.integers(0, 60, size=(n, 28, 28)).astype(np.uint8)
        for i, label in enumerate(y):
            row, col = divmod(int(label), 5)
            x[i, 4 + 10 * row: 12 + 10 * row, 2 + 5 * col: 6 + 5 * col] = 250
        arrays[f"x_{split}"], arrays[f"y_{split}"] = x, y
    folder.mkdir(parents=True, exist_ok=True)
    for key, name in MNIST_NAMES.items():
        write_idx(folder / name, arrays[key])
    return arrays


@pytest.fixture(name="make_mnist")
def make_mnist_fixture():
    """The function that writes tiny MNIST files (test modules are not a package, so no imports)."""
    return make_mnist


@pytest.fixture
def mnist_dir(tmp_path: Path) -> Path:
    """A --data-dir holding mnist/ with four tiny IDX files."""
    make_mnist(tmp_path / "data" / "mnist")
    return tmp_path / "data"


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    requests: list[str] = []

    def log_message(self, *args) -> None:  # keep the test output clean
        pass

    def do_GET(self) -> None:
        type(self).requests.append(self.path)
        super().do_GET()


@pytest.fixture
def http_server(tmp_path: Path):
    """(base_url, folder, requests): an HTTP server on 127.0.0.1 serving `folder`."""
    folder = tmp_path / "served"
    folder.mkdir()
    handler = type("Handler", (_QuietHandler,), {"requests": []})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/", folder, handler.requests
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
