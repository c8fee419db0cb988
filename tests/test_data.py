"""Data layer: tiny files in the real IDX / CIFAR formats, written here, read back exactly."""

from __future__ import annotations

import gzip
import hashlib
import os
import pickle
import random
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from rigl.config import ConfigError
from rigl.experiments.data import datasets as data
from rigl.experiments.data import files as data_files
from rigl.experiments.data.datasets import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    ChecksumError,
    CorruptFileError,
    DataNotFoundError,
    data_root,
    list_datasets,
    load_dataset,
)

# --------------------------------------------------------------------------- fixture builders

IDX_CODES = {
    "uint8": 0x08,
    "int8": 0x09,
    "int16": 0x0B,
    "int32": 0x0C,
    "float32": 0x0D,
    "float64": 0x0E,
}
IDX_NAMES = {
    ("train", "images"): "train-images-idx3-ubyte",
    ("train", "labels"): "train-labels-idx1-ubyte",
    ("test", "images"): "t10k-images-idx3-ubyte",
    ("test", "labels"): "t10k-labels-idx1-ubyte",
}


def idx_bytes(array: np.ndarray) -> bytes:
    """The IDX encoding: 0x0000, dtype code, ndim, big-endian uint32 dims, big-endian values."""
    header = bytes([0, 0, IDX_CODES[array.dtype.name], array.ndim])
    dims = struct.pack(f">{array.ndim}I", *array.shape)
    return header + dims + array.astype(array.dtype.newbyteorder(">")).tobytes()


def write_idx(path: Path, array: np.ndarray) -> Path:
    payload = idx_bytes(array)
    path.write_bytes(gzip.compress(payload) if path.suffix == ".gz" else payload)
    return path


def make_idx_folder(folder: Path, *, gz: bool, n_train: int = 3, n_test: int = 2) -> dict:
    """Random uint8 28x28 images and labels in the four official file names."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for split, n in (("train", n_train), ("test", n_test)):
        arrays[split, "images"] = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        arrays[split, "labels"] = rng.integers(0, 10, size=n, dtype=np.uint8)
    for key, stem in IDX_NAMES.items():
        write_idx(folder / (stem + (".gz" if gz else "")), arrays[key])
    return arrays


def make_cifar_folder(folder: Path, n_per_batch: int = 2) -> dict:
    """``cifar-10-batches-py/`` with tiny batches pickled as the official ones are (a dict of
    bytes keys; uint8 (N, 3072) data; labels a list), protocol 2."""
    rng = np.random.default_rng(1)
    batches = folder / "cifar-10-batches-py"
    batches.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for name in [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"]:
        images = rng.integers(0, 256, size=(n_per_batch, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, size=n_per_batch)]
        batch = {b"batch_label": name.encode(), b"labels": labels, b"data": images,
                 b"filenames": [f"{name}_{i}.png".encode() for i in range(n_per_batch)]}  # fmt: skip
        (batches / name).write_bytes(pickle.dumps(batch, protocol=2))
        arrays[name] = (images, labels)
    return arrays


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def expected_mnist(images: np.ndarray, train_images: np.ndarray) -> np.ndarray:
    """Pixels / 255, standardised with the scalar mean and std of the training images."""
    train = train_images / 255.0
    return ((images / 255.0 - train.mean()) / train.std()).astype(np.float32)


# --------------------------------------------------------------------------- IDX


@pytest.mark.parametrize("suffix", ["", ".gz"])
@pytest.mark.parametrize("dtype", ["uint8", "int8", "int16", "int32", "float32", "float64"])
def test_read_idx_round_trips_every_dtype(tmp_path, dtype, suffix):
    values = np.arange(24) * 10 if dtype == "uint8" else np.arange(24) * 1000 - 7000
    array = values.astype(dtype).reshape(2, 3, 4)  # int8 wraps around, on purpose
    back = data_files.read_idx(write_idx(tmp_path / f"x-idx3{suffix}", array))
    assert back.dtype == np.dtype(dtype) and back.shape == (2, 3, 4)
    np.testing.assert_array_equal(back, array)


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("name", ["mnist", "fashion_mnist"])
def test_mnist_family_reads_tiny_idx_files_exactly(tmp_path, gz, name):
    arrays = make_idx_folder(tmp_path / name, gz=gz)
    splits = load_dataset(name, root=tmp_path, download=False, verify=False)
    assert splits.input_shape == (1, 28, 28) and splits.num_classes == 10
    x, y = splits.train.tensors
    assert x.dtype == torch.float32 and y.dtype == torch.int64 and x.shape == (3, 1, 28, 28)
    train_images = arrays["train", "images"]
    np.testing.assert_allclose(
        x.numpy()[:, 0], expected_mnist(train_images, train_images), rtol=1e-6
    )
    np.testing.assert_array_equal(y.numpy(), arrays["train", "labels"])
    xt, yt = splits.test.tensors
    np.testing.assert_allclose(xt.numpy()[:, 0], expected_mnist(arrays["test", "images"], train_images), rtol=1e-6)  # fmt: skip
    np.testing.assert_array_equal(yt.numpy(), arrays["test", "labels"])
    flat = load_dataset(name, root=tmp_path, download=False, verify=False, flatten=True)
    assert flat.input_shape == (784,) and flat.train.tensors[0].shape == (3, 784)


def test_raw_files_pass_verification_because_only_official_names_are_checked(tmp_path):
    make_idx_folder(tmp_path / "mnist", gz=False)
    assert len(load_dataset("mnist", root=tmp_path, download=False).train) == 3


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (lambda good: b"\x01\x00" + good[2:], "bad IDX magic number"),
        (lambda good: good[:2] + b"\x42" + good[3:], "bad IDX magic number"),
        (lambda good: good[:-5], "truncated"),
        (lambda good: good + b"\x00", "trailing bytes"),
        (lambda good: good[:6], "ends early"),
        (lambda good: b"", "too short"),
    ],
)
def test_corrupt_idx_files_raise_naming_the_file(tmp_path, corrupt, message):
    good = idx_bytes(np.zeros((3, 28, 28), dtype=np.uint8))
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(corrupt(good))
    with pytest.raises(CorruptFileError, match=message) as err:
        data_files.read_idx(path)
    assert str(path) in str(err.value)


def test_truncated_gzip_and_corrupt_header_through_load_dataset(tmp_path):
    make_idx_folder(tmp_path / "mnist", gz=True)
    images = tmp_path / "mnist" / "train-images-idx3-ubyte.gz"
    images.write_bytes(images.read_bytes()[:40])
    with pytest.raises(CorruptFileError, match="train-images-idx3-ubyte.gz"):
        load_dataset("mnist", root=tmp_path, download=False, verify=False)
    write_idx(images, np.zeros((4, 28, 28), dtype=np.uint8))  # 4 images, 3 labels
    with pytest.raises(CorruptFileError, match="4 images but .* 3 labels"):
        load_dataset("mnist", root=tmp_path, download=False, verify=False)


def test_missing_folder_says_which_files_go_where(tmp_path):
    with pytest.raises(DataNotFoundError) as err:
        load_dataset("fashion_mnist", root=tmp_path, download=False)
    message = str(err.value)
    assert isinstance(err.value, FileNotFoundError)
    assert str(tmp_path / "fashion_mnist") in message and "RIGL_DATA_DIR" in message
    for stem in IDX_NAMES.values():
        assert f"{stem}.gz" in message
    assert "fashion-mnist" in message  # where to get them


def test_wrong_md5_of_an_official_file_name_raises_with_both_hashes(tmp_path):
    make_idx_folder(tmp_path / "mnist", gz=True)
    path = tmp_path / "mnist" / "train-images-idx3-ubyte.gz"
    official = data_files.OFFICIAL_MD5["mnist"]["train-images-idx3-ubyte.gz"]
    with pytest.raises(ChecksumError) as err:
        load_dataset("mnist", root=tmp_path, download=False)
    assert (
        str(path) in str(err.value) and official in str(err.value) and md5(path) in str(err.value)
    )


def test_correct_md5_passes_verification(tmp_path, monkeypatch):
    folder = tmp_path / "mnist"
    make_idx_folder(folder, gz=True)
    table = {f"{stem}.gz": md5(folder / f"{stem}.gz") for stem in IDX_NAMES.values()}
    monkeypatch.setitem(data_files.OFFICIAL_MD5, "mnist", table)
    assert len(load_dataset("mnist", root=tmp_path, download=False).test) == 2


def test_download_from_a_mirror_then_verify(tmp_path, monkeypatch):
    mirror = tmp_path / "mirror"
    arrays = make_idx_folder(mirror, gz=True)
    table = {f"{stem}.gz": md5(mirror / f"{stem}.gz") for stem in IDX_NAMES.values()}
    monkeypatch.setitem(data_files.OFFICIAL_MD5, "mnist", table)
    monkeypatch.setitem(data_files.MIRRORS, "mnist", [mirror.as_uri() + "/"])  # file:// URLs
    splits = load_dataset("mnist", root=tmp_path / "root")
    np.testing.assert_array_equal(splits.test.tensors[1].numpy(), arrays["test", "labels"])
    assert sorted(p.name for p in (tmp_path / "root" / "mnist").iterdir()) == sorted(table)


def test_failed_download_explains_and_leaves_no_bad_file(tmp_path, monkeypatch):
    mirror = tmp_path / "mirror"
    make_idx_folder(mirror, gz=True)  # reachable, but the official checksums do not match
    monkeypatch.setitem(data_files.MIRRORS, "mnist", [mirror.as_uri() + "/"])
    with pytest.raises(DataNotFoundError, match="download failed.*MD5 mismatch"):
        load_dataset("mnist", root=tmp_path / "root")
    assert list((tmp_path / "root" / "mnist").iterdir()) == []
    monkeypatch.setitem(data_files.MIRRORS, "mnist", [(tmp_path / "empty").as_uri() + "/"])
    with pytest.raises(DataNotFoundError, match="download failed"):
        load_dataset("mnist", root=tmp_path / "root")


# --------------------------------------------------------------------------- CIFAR-10


def expected_cifar(images: np.ndarray) -> np.ndarray:
    x = images.reshape(-1, 3, 32, 32) / 255.0
    return (x - np.reshape(CIFAR10_MEAN, (1, 3, 1, 1))) / np.reshape(CIFAR10_STD, (1, 3, 1, 1))


def test_cifar10_reads_batches_folder_exactly(tmp_path):
    arrays = make_cifar_folder(tmp_path / "cifar10")
    splits = load_dataset("cifar10", root=tmp_path, download=False, verify=False)
    assert splits.input_shape == (3, 32, 32) and splits.num_classes == 10
    x, y = splits.train.tensors
    train = [arrays[f"data_batch_{i}"] for i in range(1, 6)]
    assert x.shape == (10, 3, 32, 32) and x.dtype == torch.float32
    np.testing.assert_allclose(x.numpy(), expected_cifar(np.concatenate([t[0] for t in train])), rtol=1e-5, atol=1e-6)  # fmt: skip
    assert y.tolist() == [label for t in train for label in t[1]]
    assert splits.test.tensors[1].tolist() == arrays["test_batch"][1]


def test_cifar10_extracts_the_tarball_after_checking_its_md5(tmp_path, monkeypatch):
    arrays = make_cifar_folder(tmp_path / "build")
    archive = tmp_path / "cifar10" / "cifar-10-python.tar.gz"
    archive.parent.mkdir()
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "build" / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    with pytest.raises(
        ChecksumError, match="cifar-10-python.tar.gz.*c58f30108f718f92721af3b95e74349a"
    ):
        load_dataset("cifar10", root=tmp_path, download=False)
    monkeypatch.setitem(data_files.OFFICIAL_MD5, "cifar10", {archive.name: md5(archive)})
    splits = load_dataset("cifar10", root=tmp_path, download=False)
    assert splits.test.tensors[1].tolist() == arrays["test_batch"][1]
    assert (tmp_path / "cifar10" / "cifar-10-batches-py" / "data_batch_5").is_file()


def test_cifar10_bad_batches_and_missing_files(tmp_path):
    with pytest.raises(DataNotFoundError, match=r"cifar-10-python\.tar\.gz.*cifar-10-batches-py"):
        load_dataset("cifar10", root=tmp_path, download=False)
    make_cifar_folder(tmp_path / "cifar10")
    batch = tmp_path / "cifar10" / "cifar-10-batches-py" / "data_batch_3"
    batch.write_bytes(batch.read_bytes()[:100])
    with pytest.raises(CorruptFileError, match="data_batch_3"):
        load_dataset("cifar10", root=tmp_path, download=False, verify=False)
    batch.write_bytes(pickle.dumps({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}))
    with pytest.raises(CorruptFileError, match=r"data_batch_3.*uint8 \(N, 3072\)"):
        load_dataset("cifar10", root=tmp_path, download=False, verify=False)


class _Sneaky:
    def __reduce__(self):
        return (os.getcwd, ())


def test_cifar_batch_reader_refuses_arbitrary_pickled_code(tmp_path):
    path = tmp_path / "data_batch_1"
    path.write_bytes(pickle.dumps({b"data": _Sneaky(), b"labels": []}))
    with pytest.raises(CorruptFileError, match="posix.getcwd is not allowed|getcwd"):
        data_files.read_cifar_batch(path)


# --------------------------------------------------------------------------- mnist1d, mnist5k


def test_mnist1d_generates_caches_and_is_deterministic(tmp_path, monkeypatch):
    py_state, np_state = random.getstate(), np.random.get_state()
    first = load_dataset("mnist1d", root=tmp_path / "a", seed=3, num_samples=200)
    assert (
        random.getstate() == py_state and np.random.get_state()[1].tolist() == np_state[1].tolist()
    )
    assert first.input_shape == (40,) and first.num_classes == 10
    assert first.train.tensors[0].shape == (160, 40) and first.test.tensors[0].shape == (40, 40)
    assert first.train.tensors[0].dtype == torch.float32 and first.info["source"] == "generated"
    assert set(first.train.tensors[1].tolist()) == set(range(10))
    assert abs(first.train.tensors[0].mean().item()) < 1e-5  # standardised with train stats
    again = load_dataset("mnist1d", root=tmp_path / "b", seed=3, num_samples=200)
    assert torch.equal(first.train.tensors[0], again.train.tensors[0])
    other = load_dataset("mnist1d", root=tmp_path / "a", seed=4, num_samples=200)
    assert not torch.equal(first.train.tensors[0], other.train.tensors[0])

    def no_generation(*args):
        raise AssertionError("the second call must read the cache")

    monkeypatch.setattr(data, "_generate_mnist1d", no_generation)
    cached = load_dataset("mnist1d", root=tmp_path / "a", seed=3, num_samples=200)
    assert cached.info["source"] == "cache" and Path(cached.info["cache_file"]).is_file()
    assert torch.equal(first.test.tensors[0], cached.test.tensors[0])
    assert not [p for p in (tmp_path / "a" / "mnist1d").iterdir() if p.name.startswith(".")]


def test_mnist5k_split_sizes_shapes_and_determinism():
    a = load_dataset("mnist5k", seed=0)
    assert a.input_shape == (784,) and a.num_classes == 10
    assert (len(a.train), len(a.test)) == (4000, 1000)
    assert a.test.tensors[1].bincount().tolist() == [100] * 10  # stratified
    assert abs(a.train.tensors[0].mean().item()) < 1e-4
    b = load_dataset("mnist5k", seed=0, flatten=False)
    assert b.input_shape == (1, 28, 28) and b.train.tensors[0].shape == (4000, 1, 28, 28)
    assert torch.equal(a.train.tensors[0], b.train.tensors[0].reshape(4000, 784))
    c = load_dataset("mnist5k", seed=1)
    assert not torch.equal(a.test.tensors[0], c.test.tensors[0])


def test_train_and_test_size_subsample_deterministically():
    a = load_dataset("mnist5k", seed=5, train_size=50, test_size=20)
    b = load_dataset("mnist5k", seed=5, train_size=50, test_size=20)
    assert (len(a.train), len(a.test)) == (50, 20) and a.info["full_train_size"] == 4000
    assert torch.equal(a.train.tensors[0], b.train.tensors[0])
    with pytest.raises(ConfigError, match=r"train_size=5000 must be an int in \[1, 4000\]"):
        load_dataset("mnist5k", train_size=5000)


# --------------------------------------------------------------------------- text


def test_text_dataset_windows_and_next_character_targets(tmp_path):
    text = "".join(f"line {i}: héllo wörld\n" for i in range(40))
    path = tmp_path / "corpus.txt"
    path.write_text(text, encoding="utf-8")
    splits = load_dataset("text", path=path, seq_len=16)
    vocab = splits.info["vocab"]
    assert vocab == "".join(sorted(set(text))) and splits.num_classes == len(vocab)
    assert splits.input_shape == (16,)
    x, y = splits.train.tensors
    assert x.dtype == torch.int64 and y.dtype == torch.int64 and x.shape == y.shape
    assert "".join(vocab[i] for i in x[1].tolist()) == text[16:32]
    assert "".join(vocab[i] for i in y[1].tolist()) == text[17:33]
    cut = int(0.9 * len(text))
    assert "".join(vocab[i] for i in splits.test.tensors[0][0].tolist()) == text[cut : cut + 16]
    overlapping = load_dataset("text", path=path, seq_len=16, stride=1)
    assert len(overlapping.train) == cut - 16


def test_text_dataset_errors(tmp_path):
    with pytest.raises(ConfigError, match="needs path="):
        load_dataset("text")
    with pytest.raises(DataNotFoundError, match="nope.txt"):
        load_dataset("text", path=tmp_path / "nope.txt")
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9 ".encode("latin-1") * 50)
    with pytest.raises(CorruptFileError, match="latin1.txt: not UTF-8"):
        load_dataset("text", path=bad)
    short = tmp_path / "short.txt"
    short.write_text("abc" * 20, encoding="utf-8")
    with pytest.raises(CorruptFileError, match="short.txt.*too short"):
        load_dataset("text", path=short, seq_len=16)


# --------------------------------------------------------------------------- registry


def test_unknown_name_and_option_list_what_is_valid():
    with pytest.raises(ValueError, match="unknown dataset 'imagenet'") as err:
        load_dataset("imagenet")
    for name in list_datasets():
        assert name in str(err.value)
    assert {"mnist1d", "mnist5k", "mnist", "fashion_mnist", "cifar10", "text"} <= set(
        list_datasets()
    )
    with pytest.raises(ConfigError, match=r"unknown option\(s\) \['colour'\].*flatten"):
        load_dataset("mnist", colour=True)


def test_data_root_prefers_argument_then_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("RIGL_DATA_DIR", str(tmp_path / "env"))
    assert data_root() == tmp_path / "env" and data_root(tmp_path) == tmp_path
    monkeypatch.delenv("RIGL_DATA_DIR")
    assert data_root() == Path.home() / ".cache" / "rigl"


def test_idx_writer_matches_hand_written_header():
    raw = idx_bytes(np.array([[1, 2]], dtype=np.uint8))
    assert raw == b"\x00\x00\x08\x02" + b"\x00\x00\x00\x01\x00\x00\x00\x02" + b"\x01\x02"
