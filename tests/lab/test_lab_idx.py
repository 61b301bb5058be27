"""The IDX reader: round trips, and clear errors for every way a file can be broken."""
from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest

from batchnorm.lab.data import IDXError, read_idx, write_idx


@pytest.mark.parametrize("dtype", ["uint8", "int8", "int16", "int32", "float32", "float64"])
@pytest.mark.parametrize("name", ["a.idx", "a.idx.gz"], ids=["raw", "gzip"])
def test_round_trip(tmp_path, dtype, name):
    array = (np.arange(2 * 3 * 5) - 7).astype(dtype).reshape(2, 3, 5)
    write_idx(tmp_path / name, array)
    back = read_idx(tmp_path / name)
    assert back.dtype == array.dtype and back.shape == (2, 3, 5)
    np.testing.assert_array_equal(back, array)


def test_reads_mnist_layout_byte_for_byte(tmp_path):
    # The layout from LeCun's page, written by hand: magic 0x00000801, count, then the bytes.
    raw = struct.pack(">I", 0x801) + struct.pack(">I", 3) + bytes([7, 2, 1])
    (tmp_path / "labels").write_bytes(raw)
    np.testing.assert_array_equal(read_idx(tmp_path / "labels"), [7, 2, 1])
    (tmp_path / "labels.gz").write_bytes(gzip.compress(raw))
    np.testing.assert_array_equal(read_idx(tmp_path / "labels.gz"), [7, 2, 1])


def _idx(shape, payload_len=None, magic=b"\x00\x00\x08"):
    body = magic + bytes([len(shape)]) + struct.pack(f">{len(shape)}I", *shape)
    n = int(np.prod(shape)) if payload_len is None else payload_len
    return body + bytes(n)


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "too short"),
        (b"\x00\x00", "too short"),
        (b"PK\x03\x04" + bytes(20), "not an IDX file"),
        (_idx((2, 2), magic=b"\x00\x00\x07"), "not an IDX file"),
        (_idx((2, 2), magic=b"\x01\x00\x08"), "not an IDX file"),
        (b"\x00\x00\x08\x03" + struct.pack(">I", 5), "declares 3 dimensions"),
        (_idx((10, 28, 28), payload_len=100), "truncated"),
        (_idx((4,), payload_len=9), "trailing bytes"),
    ],
    ids=["empty", "short", "zip-magic", "bad-type", "nonzero-magic", "short-header", "truncated-data", "trailing"],
)
def test_broken_files_raise_clear_errors(tmp_path, content, message):
    path = tmp_path / "broken-idx3-ubyte"
    path.write_bytes(content)
    with pytest.raises(IDXError, match=message) as info:
        read_idx(path)
    assert str(path) in str(info.value)  # the message names the file


def test_truncated_gzip(tmp_path):
    good = gzip.compress(_idx((50, 28, 28)))
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(good[: len(good) // 2])
    with pytest.raises(IDXError, match="corrupt or truncated gzip"):
        read_idx(path)


def test_missing_file(tmp_path):
    with pytest.raises(IDXError, match="no such file"):
        read_idx(tmp_path / "nope.gz")


def test_write_rejects_unsupported_dtype(tmp_path):
    with pytest.raises(ValueError, match="IDX stores"):
        write_idx(tmp_path / "a.idx", np.zeros(3, dtype=np.complex64))
    assert not (tmp_path / "a.idx").exists()


@pytest.mark.parametrize(
    "name, array, message",
    [
        ("train-images-idx3-ubyte.gz", np.zeros((96, 27, 27), np.uint8), r"expected uint8 images of shape \(N, 28, 28\)"),
        ("train-labels-idx1-ubyte.gz", np.full(96, 12, np.uint8), "expected uint8 labels 0..9"),
        ("train-labels-idx1-ubyte.gz", np.zeros(95, np.uint8), "has 96 images but .* has 95 labels"),
    ],
    ids=["wrong-image-size", "label-out-of-range", "count-mismatch"],
)
def test_well_formed_idx_that_is_not_mnist(mnist_dir, name, array, message):
    from batchnorm.lab.data import load

    write_idx(mnist_dir / "mnist" / name, array)
    with pytest.raises(IDXError, match=message):
        load("mnist", mnist_dir)


def test_unpacked_files_and_torchvision_layout(tmp_path, make_mnist):
    from batchnorm.lab.data import load

    arrays = make_mnist(tmp_path / "data" / "MNIST" / "raw")  # torchvision's folder
    for path in (tmp_path / "data" / "MNIST" / "raw").iterdir():  # and gunzipped, as torchvision leaves them
        path.with_suffix("").write_bytes(gzip.decompress(path.read_bytes()))
        path.unlink()
    dataset = load("mnist", tmp_path / "data")
    np.testing.assert_array_equal(dataset.y_train.numpy(), arrays["y_train"])
    expected = (arrays["x_test"][:, None].astype(np.float32) / 255 - 0.5) / 0.5
    np.testing.assert_allclose(dataset.x_test.numpy(), expected, rtol=0, atol=1e-6)
