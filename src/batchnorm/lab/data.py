"""Datasets: circles (seed 000), scikit-learn's digits, MNIST and Fashion-MNIST from IDX files.

    load(config)                       -> Dataset      what `--data` names, as float tensors
    read_idx(path) / write_idx(path, a)                the IDX format, gzipped or not
    download(name, data_dir, base_url)                 fetch the four IDX files, SHA-256 verified

Images come out as (N, 1, 28, 28) floats scaled to [-1, 1] as in seed 002's `data_tf`
((x / max - 0.5) / 0.5); the MLPs flatten them. Every train/test split is fixed (random_state=42,
the tutorials' choice), so a run's seed changes only the initialization and the batch order.
"""
from __future__ import annotations

import gzip
import hashlib
import os
import struct
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "Dataset", "load", "read_idx", "write_idx", "download", "IDXError", "DataError",
    "ChecksumError", "MNIST_FILES", "SOURCES",
]


class DataError(ValueError):
    """The data asked for is missing or unusable; the message says how to get it."""


class IDXError(DataError):
    """A file is not a well-formed IDX file (bad magic, truncated, wrong size)."""


class ChecksumError(DataError):
    """A downloaded file's SHA-256 differs from the published one; the file was not kept."""


@dataclass
class Dataset:
    name: str
    x_train: Tensor  # (N, 2) for circles, (N, 1, 28, 28) for images
    y_train: Tensor  # (N,) int64 class indices
    x_test: Tensor
    y_test: Tensor
    classes: int
    description: str  # one sentence for the report: source, size, preprocessing


# ---------------------------------------------------------------------------------------------
# The IDX format (LeCun et al., http://yann.lecun.com/exdb/mnist/): two zero bytes, a type code,
# the number of dimensions, then each dimension as a big-endian uint32, then the data, big-endian.
# ---------------------------------------------------------------------------------------------

_IDX_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_IDX_CODES = {np.dtype(v).newbyteorder("="): k for k, v in _IDX_TYPES.items()}


def _read_maybe_gzip(path: Path) -> bytes:
    raw = path.read_bytes()
    if raw[:2] != b"\x1f\x8b":  # not gzip: an already-unpacked IDX file
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError) as e:  # BadGzipFile is an OSError; a cut-off stream is EOFError
        raise IDXError(f"{path}: corrupt or truncated gzip file ({e}); delete it and download it again") from e


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (gzipped or not) into a numpy array of its shape and type."""
    path = Path(path)
    if not path.is_file():
        raise IDXError(f"{path}: no such file")
    data = _read_maybe_gzip(path)
    if len(data) < 4:
        raise IDXError(f"{path}: {len(data)} bytes is too short for an IDX header (expected at least 4)")
    zero, code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or code not in _IDX_TYPES:
        raise IDXError(
            f"{path}: not an IDX file (magic bytes {data[:4].hex()}; expected 0000 then a type code "
            f"in {sorted(hex(c) for c in _IDX_TYPES)} and the number of dimensions)"
        )
    header = 4 + 4 * ndim
    if ndim == 0 or len(data) < header:
        raise IDXError(f"{path}: IDX header declares {ndim} dimensions but the file has {len(data)} bytes")
    shape = struct.unpack(f">{ndim}I", data[4:header])
    dtype = np.dtype(_IDX_TYPES[code])
    expected = header + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) != expected:
        what = "truncated" if len(data) < expected else "has trailing bytes"
        raise IDXError(
            f"{path}: {what}: header says shape {tuple(shape)} of {dtype.name} ({expected} bytes), file has {len(data)} bytes"
        )
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def write_idx(path: str | os.PathLike, array: np.ndarray, compress: bool | None = None) -> None:
    """Write `array` as an IDX file; gzipped when `compress` or when the name ends in .gz."""
    from .io import write_bytes

    array = np.asarray(array)
    code = _IDX_CODES.get(array.dtype.newbyteorder("="))
    if code is None:
        raise ValueError(f"IDX stores uint8, int8, int16, int32, float32 or float64 (got {array.dtype})")
    payload = struct.pack(">HBB", 0, code, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    payload += array.astype(_IDX_TYPES[code]).tobytes()
    path = Path(path)
    if compress or (compress is None and path.suffix == ".gz"):
        payload = gzip.compress(payload, mtime=0)
    write_bytes(path, payload)


# ---------------------------------------------------------------------------------------------
# Where the MNISTs come from. SHA-256 of the *gzipped* files as published (the same digests appear
# in TensorFlow Datasets' checksum lists, Keras and several independent loaders); sizes in bytes
# as served. torchvision publishes MD5s of the same files (mnist.py), listed for a second check:
#   sha256sum -c  or  md5sum -c  on a downloaded file must match the row below.
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _File:
    name: str
    sha256: str
    size: int
    md5: str  # torchvision's published digest of the same file, for cross-checking by hand


MNIST_FILES = {
    "mnist": (
        _File("train-images-idx3-ubyte.gz", "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609", 9912422, "f68b3c2dcbeaaa9fbdd348bbdeb94873"),
        _File("train-labels-idx1-ubyte.gz", "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c", 28881, "d53e105ee54ea40749a09fcbcd1e9432"),
        _File("t10k-images-idx3-ubyte.gz", "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6", 1648877, "9fb629c4189551a2d022fa330f9573f3"),
        _File("t10k-labels-idx1-ubyte.gz", "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6", 4542, "ec29112dd5afa0611ce80d1b7f02629c"),
    ),
    "fashion-mnist": (
        _File("train-images-idx3-ubyte.gz", "08dc20ab1689590a0bcd66e874647b6ee8464e2d501b5a3f1f78831db19a3fdc", 26421880, "8d4fb7e6c68d591d4c3dfef9ec88bf0d"),
        _File("train-labels-idx1-ubyte.gz", "b0197879cbda89f3dc7b894f9fd52b858e68ea4182b6947c9d8c2b67e5f18dcc", 29515, "25c81989df183df01b3e8a0aad5dffbe"),
        _File("t10k-images-idx3-ubyte.gz", "78dcbbfb5a27efaf1b6c1d616caca68560be8766c5bffcb2791df9273a534229", 4422102, "bef4ecab320f06d8554ea6380940ec79"),
        _File("t10k-labels-idx1-ubyte.gz", "42bd18137a62d5998cdeae52bf3a0676ac6b706f5cf8439b47bb5b151ae3dccf", 5148, "bb300cfdad3c16e7a12a480ee83cd310"),
    ),
}

# Mirrors tried in order (the first is torchvision's default for MNIST; LeCun's own page now
# often refuses scripted downloads). The checksum, not the server, is what we trust.
SOURCES = {
    "mnist": (
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
        "https://storage.googleapis.com/cvdf-datasets/mnist/",
        "http://yann.lecun.com/exdb/mnist/",
    ),
    "fashion-mnist": ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
}


def _sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _fetch(url: str, dest: Path, expected: _File, timeout: float) -> None:
    """Stream `url` into a temp file beside `dest`; keep it only if its SHA-256 matches."""
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.part")
    digest = hashlib.sha256()
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(tmp, "wb") as f:
            for chunk in iter(lambda: response.read(1 << 16), b""):
                digest.update(chunk)
                f.write(chunk)
        if digest.hexdigest() != expected.sha256:
            raise ChecksumError(  # the caller names the URL
                f"SHA-256 is {digest.hexdigest()}, expected {expected.sha256} "
                f"({tmp.stat().st_size} bytes, expected {expected.size}); the file was not kept"
            )
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            tmp.unlink()


def download(
    name: str,
    data_dir: str | os.PathLike = "data",
    base_url: str | None = None,
    *,
    timeout: float = 60.0,
    log: Callable[[str], None] = print,
    files: tuple[_File, ...] | None = None,
) -> Path:
    """Download `name` ("mnist" | "fashion-mnist") into data_dir/name/, verifying every SHA-256.

    Files already present with the right digest are kept; a file that fails the check is never
    left behind, neither a fetched one nor a corrupt copy that was already there (it is deleted
    when no mirror gives a good one, so that nothing reads it). `base_url` replaces the mirror list (a local mirror, or the tests' server);
    `files` replaces the checksum table (only the tests need that). Returns the folder.
    """
    if name not in MNIST_FILES:
        raise DataError(f"unknown dataset {name!r} to download: choose one of {', '.join(MNIST_FILES)}")
    folder = Path(data_dir) / name
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"--data-dir {data_dir}: cannot create {folder} ({e.strerror}); choose a folder you can write to") from e
    bases = (base_url,) if base_url else SOURCES[name]
    for expected in files or MNIST_FILES[name]:
        dest = folder / expected.name
        if dest.is_file() and _sha256_of(dest) == expected.sha256:
            log(f"{dest}: present, SHA-256 ok")
            continue
        errors = []
        for base in bases:
            url = base.rstrip("/") + "/" + expected.name
            log(f"downloading {url}")
            try:
                _fetch(url, dest, expected, timeout)
                log(f"{dest}: SHA-256 ok")
                break
            except (urllib.error.URLError, OSError, ChecksumError) as e:
                errors.append(f"{url}: {e}")
        else:
            only_checksums = all("SHA-256 is" in e for e in errors)
            kind = ChecksumError if only_checksums else DataError
            deleted = ""
            if dest.exists():  # present but failed its checksum above: a corrupt copy nothing should read
                dest.unlink()
                deleted = f"\n  the corrupt copy already in {dest} (SHA-256 mismatch) was deleted"
            raise kind(f"could not download {expected.name} for {name}:\n  " + "\n  ".join(errors) + deleted)
    return folder


# ---------------------------------------------------------------------------------------------
# Loaders
# ---------------------------------------------------------------------------------------------

_TORCHVISION_FOLDERS = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST"}


def _find(data_dir: Path, name: str, stem: str) -> Path | None:
    """The IDX file `stem` (gzipped or not) in data_dir/name/, torchvision's layout, or data_dir."""
    for folder in (data_dir / name, data_dir / _TORCHVISION_FOLDERS[name] / "raw", data_dir):
        for candidate in (folder / f"{stem}.gz", folder / stem):
            if candidate.is_file():
                return candidate
    return None


def _images(x: np.ndarray, scale: float) -> Tensor:
    """uint8 (N, H, W) -> float32 (N, 1, H, W) in [-1, 1], seed 002's (x / max - 0.5) / 0.5."""
    x = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)) / scale
    return ((x - 0.5) / 0.5).unsqueeze(1)  # (N, H, W) -> (N, 1, H, W)


def load_mnist(name: str, data_dir: str | os.PathLike | None) -> Dataset:
    """MNIST or Fashion-MNIST from the four standard IDX files (gzipped or not)."""
    data_dir = Path(data_dir) if data_dir else Path("data")
    how = (
        f"get it with `batchnorm download {name} --data-dir {data_dir}` (or put the four IDX files "
        f"train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, "
        f"t10k-labels-idx1-ubyte.gz in {data_dir / name}), or run offline on --data digits"
    )
    fix = f"delete it and run `batchnorm download {name} --data-dir {data_dir}` to fetch a verified copy"
    arrays = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        for kind, stem in (("x", f"{prefix}-images-idx3-ubyte"), ("y", f"{prefix}-labels-idx1-ubyte")):
            path = _find(data_dir, name, stem)
            if path is None:
                raise DataError(f"{name} not found: no {stem}[.gz] in {data_dir / name} or {data_dir}; {how}")
            try:
                arrays[kind, split] = (path, read_idx(path))
            except OSError as e:  # a folder where the file should be, no permission, ...
                raise IDXError(f"{path}: cannot be read ({e.strerror}); {fix}") from e
            except IDXError as e:
                raise IDXError(f"{e}; {fix}") from e
    for split in ("train", "test"):
        (xpath, x), (ypath, y) = arrays["x", split], arrays["y", split]
        if x.ndim != 3 or x.shape[1:] != (28, 28) or x.dtype != np.uint8:
            raise IDXError(f"{xpath}: expected uint8 images of shape (N, 28, 28), got {x.dtype.name} {x.shape}; {fix}")
        if y.ndim != 1 or y.dtype != np.uint8 or (y.size and y.max() > 9):
            raise IDXError(f"{ypath}: expected uint8 labels 0..9 of shape (N,), got {y.dtype.name} {y.shape}; {fix}")
        if len(x) != len(y):
            raise IDXError(f"{xpath} has {len(x)} images but {ypath} has {len(y)} labels; {fix}")
    (_, x_train), (_, y_train) = arrays["x", "train"], arrays["y", "train"]
    (_, x_test), (_, y_test) = arrays["x", "test"], arrays["y", "test"]
    return Dataset(
        name=name,
        x_train=_images(x_train, 255.0), y_train=torch.from_numpy(y_train.astype(np.int64)),
        x_test=_images(x_test, 255.0), y_test=torch.from_numpy(y_test.astype(np.int64)),
        classes=10,
        description=(
            f"{'MNIST' if name == 'mnist' else 'Fashion-MNIST'} from the IDX files in "
            f"{arrays['x', 'train'][0].parent}: {len(x_train)} train / {len(x_test)} test images, "
            f"28x28, scaled to [-1, 1] as in seed 002."
        ),
    )


def load_circles() -> Dataset:
    """Seed 000 exactly: make_circles(2000, noise=0.1, factor=0.4, random_state=42), 70/30 split."""
    from sklearn.datasets import make_circles
    from sklearn.model_selection import train_test_split

    x, y = make_circles(n_samples=2000, noise=0.1, factor=0.4, random_state=42)
    x = torch.tensor(x, dtype=torch.float)
    y = torch.tensor(y, dtype=torch.long)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.3, random_state=42)
    return Dataset(
        "circles", x_train, y_train, x_test, y_test, classes=2,
        description=(
            "Concentric circles, seed 000 exactly: make_circles(n_samples=2000, noise=0.1, factor=0.4, "
            f"random_state=42), train_test_split(test_size=0.3, random_state=42): {len(x_train)} train / "
            f"{len(x_test)} test points."
        ),
    )


def load_digits() -> Dataset:
    """scikit-learn's bundled 8x8 digits, made to look like MNIST so the same nets apply.

    MNIST centers each digit, size-normalized to 20x20, in a 28x28 frame. We do the same: the 8x8
    image (values 0..16) is resized to 20x20 (bilinear) and padded by 4 pixels on every side.
    """
    from sklearn.datasets import load_digits as sklearn_digits
    from sklearn.model_selection import train_test_split

    bunch = sklearn_digits()
    x = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (N, 8, 8) -> (N, 1, 8, 8)
    x = torch.nn.functional.interpolate(x, size=(20, 20), mode="bilinear", align_corners=False)
    x = torch.nn.functional.pad(x, (4, 4, 4, 4))  # (N, 1, 20, 20) -> (N, 1, 28, 28)
    x = (x.clamp(0, 1) - 0.5) / 0.5
    y = torch.tensor(bunch.target, dtype=torch.long)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.3, random_state=42)
    return Dataset(
        "digits", x_train, y_train, x_test, y_test, classes=10,
        description=(
            f"scikit-learn's bundled digits (1797 8x8 images), resized to 20x20 and padded to 28x28 like "
            f"MNIST, scaled to [-1, 1]; train_test_split(test_size=0.3, random_state=42): "
            f"{len(x_train)} train / {len(x_test)} test images."
        ),
    )


def load(data: str, data_dir: str | os.PathLike | None = None, limit: int = 0) -> Dataset:
    """The dataset `--data` names; `limit` > 0 keeps the first `limit` train and test examples."""
    if data == "circles":
        dataset = load_circles()
    elif data == "digits":
        dataset = load_digits()
    elif data in MNIST_FILES:
        dataset = load_mnist(data, data_dir)
    else:
        raise DataError(f"unknown dataset {data!r}: choose circles, digits, mnist or fashion-mnist")
    if limit:
        dataset.x_train, dataset.y_train = dataset.x_train[:limit], dataset.y_train[:limit]
        dataset.x_test, dataset.y_test = dataset.x_test[:limit], dataset.y_test[:limit]
        dataset.description += f" Limited to the first {limit} train and test examples (--limit)."
    return dataset
