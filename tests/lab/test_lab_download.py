"""The checksum-verified downloader, against a server on 127.0.0.1 that the test starts."""
from __future__ import annotations

import hashlib
import re

import pytest

from batchnorm.lab import data
from batchnorm.lab.data import MNIST_FILES, ChecksumError, DataError, download, load

MNIST_NAMES = {f.name: f.name for f in MNIST_FILES["mnist"]}  # in the order the table lists them


def _table(folder, corrupt: str | None = None):
    """The checksum table for the files in `folder`, with one digest wrong if `corrupt` names it."""
    rows = []
    for name in MNIST_NAMES.values():
        body = (folder / name).read_bytes()
        digest = hashlib.sha256(body).hexdigest()
        if name == corrupt:
            digest = hashlib.sha256(b"something else").hexdigest()
        rows.append(data._File(name, digest, len(body), hashlib.md5(body).hexdigest()))
    return tuple(rows)


def test_download_verifies_and_loads(tmp_path, http_server, make_mnist):
    base_url, served, requests = http_server
    make_mnist(served)
    folder = download("mnist", tmp_path / "data", base_url, files=_table(served), log=lambda s: None)
    assert folder == tmp_path / "data" / "mnist"
    for name in MNIST_NAMES.values():
        assert (folder / name).read_bytes() == (served / name).read_bytes()
    assert sorted(requests) == sorted(f"/{n}" for n in MNIST_NAMES.values())
    dataset = load("mnist", tmp_path / "data")
    assert dataset.x_train.shape == (96, 1, 28, 28) and dataset.y_test.shape == (48,)

    # Present and verified: nothing is fetched again.
    requests.clear()
    download("mnist", tmp_path / "data", base_url, files=_table(served), log=lambda s: None)
    assert requests == []


def test_bad_checksum_keeps_nothing(tmp_path, http_server, make_mnist):
    base_url, served, _ = http_server
    make_mnist(served)
    bad = "t10k-images-idx3-ubyte.gz"
    with pytest.raises(ChecksumError, match=f"{bad}.*SHA-256 is .*expected .*not kept") as info:
        download("mnist", tmp_path / "data", base_url, files=_table(served, corrupt=bad), log=lambda s: None)
    assert base_url in str(info.value)
    folder = tmp_path / "data" / "mnist"
    assert not (folder / bad).exists()
    assert not [p for p in folder.iterdir() if p.name.endswith(".part")]  # no partial file either
    # The files listed before it were fine and are kept; the ones after it were never fetched.
    assert (folder / "train-images-idx3-ubyte.gz").exists()
    assert not (folder / "t10k-labels-idx1-ubyte.gz").exists()


def test_a_corrupted_local_file_is_fetched_again(tmp_path, http_server, make_mnist):
    base_url, served, requests = http_server
    make_mnist(served)
    download("mnist", tmp_path / "data", base_url, files=_table(served), log=lambda s: None)
    victim = tmp_path / "data" / "mnist" / "train-labels-idx1-ubyte.gz"
    victim.write_bytes(b"garbage")
    requests.clear()
    download("mnist", tmp_path / "data", base_url, files=_table(served), log=lambda s: None)
    assert requests == ["/train-labels-idx1-ubyte.gz"]
    assert victim.read_bytes() == (served / victim.name).read_bytes()


def test_unreachable_file_is_a_clear_error(tmp_path, http_server):
    base_url, served, _ = http_server  # serves an empty folder: every file is a 404
    with pytest.raises(DataError, match="(?s)could not download train-images-idx3-ubyte.gz for mnist.*404"):
        download("mnist", tmp_path / "data", base_url, files=_table_for_missing(), log=lambda s: None)
    assert list((tmp_path / "data" / "mnist").iterdir()) == []


def _table_for_missing():
    return tuple(data._File(n, "0" * 64, 1, "0" * 32) for n in MNIST_NAMES.values())


def test_unknown_dataset():
    with pytest.raises(DataError, match="unknown dataset 'cifar'"):
        download("cifar", "unused")


def test_the_published_checksum_table_is_complete():
    # Every dataset has its four files, each with a 64-hex-digit SHA-256 and a 32-digit MD5
    # (torchvision's), all distinct; a typo in the table would make every real download fail.
    digests = set()
    for name, files in MNIST_FILES.items():
        assert sorted(f.name for f in files) == sorted(MNIST_NAMES.values()), name
        for f in files:
            assert re.fullmatch(r"[0-9a-f]{64}", f.sha256) and re.fullmatch(r"[0-9a-f]{32}", f.md5)
            assert f.size > 1000
            digests.add(f.sha256)
        assert name in data.SOURCES
    assert len(digests) == 8


def test_download_command(tmp_path, http_server, make_mnist, monkeypatch, capsys):
    from batchnorm.lab.cli import main

    base_url, served, _ = http_server
    make_mnist(served)
    monkeypatch.setitem(data.MNIST_FILES, "mnist", _table(served))
    assert main(["download", "mnist", "--data-dir", str(tmp_path / "data"), "--base-url", base_url]) == 0
    assert "SHA-256 ok" in capsys.readouterr().out
    assert len(list((tmp_path / "data" / "mnist").iterdir())) == 4

    monkeypatch.setitem(data.MNIST_FILES, "mnist", _table(served, corrupt="train-labels-idx1-ubyte.gz"))
    (tmp_path / "data" / "mnist" / "train-labels-idx1-ubyte.gz").unlink()
    assert main(["download", "mnist", "--data-dir", str(tmp_path / "data"), "--base-url", base_url]) == 2
    err = capsys.readouterr().err
    assert "batchnorm: error:" in err and "SHA-256 is" in err and "not kept" in err
    assert not (tmp_path / "data" / "mnist" / "train-labels-idx1-ubyte.gz").exists()


@pytest.mark.parametrize("server", ["missing", "bad-checksum"])
def test_a_corrupt_local_file_is_deleted_when_the_download_fails(tmp_path, http_server, make_mnist, server):
    # docs/lab.md: a file that fails the check is deleted, never kept; also one already on disk.
    base_url, served, _ = http_server
    make_mnist(served)
    table = _table(served)
    victim = tmp_path / "data" / "mnist" / "train-images-idx3-ubyte.gz"
    victim.parent.mkdir(parents=True)
    victim.write_bytes(b"garbage, not the published file")
    if server == "missing":
        (served / victim.name).unlink()  # the mirror has lost it: a 404
    else:
        (served / victim.name).write_bytes(b"a different corrupt copy")
    with pytest.raises(DataError, match=f"(?s)could not download {victim.name}.*corrupt copy .* was deleted"):
        download("mnist", tmp_path / "data", base_url, files=table, log=lambda s: None)
    assert not victim.exists()
    assert not [p for p in victim.parent.iterdir() if p.name.endswith(".part")]
