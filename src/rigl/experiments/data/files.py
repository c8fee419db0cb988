"""On-disk dataset formats: IDX (MNIST, Fashion-MNIST), CIFAR-10 python batches, UTF-8 text,
checksums, download.

Everything here returns plain numpy arrays; ``rigl.experiments.data.datasets`` turns them into
tensors. Readers validate what they read and raise :class:`CorruptFileError` naming the
file and what is wrong; a missing file raises :class:`DataNotFoundError` saying which
files belong in which folder and where to get them.

IDX format (LeCun et al., http://yann.lecun.com/exdb/mnist/): a 4-byte magic number
``0x00 0x00 <dtype code> <ndim>``, then ``ndim`` big-endian uint32 dimension sizes, then
the values in row-major order, big-endian.

Longer than ~300 lines: one short reader per format plus their checksums and downloads,
which share the error types, the official-file tables and the atomic write.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import os
import pickle
import shutil
import tarfile
import tempfile
import urllib.request
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, BinaryIO, ClassVar

import numpy as np


class DataNotFoundError(FileNotFoundError):
    """Dataset files are missing and could not be downloaded."""


class CorruptFileError(ValueError):
    """A dataset file exists but is not what its name promises."""


class ChecksumError(CorruptFileError):
    """A file named like an official dataset file has the wrong MD5."""


# Official MD5 checksums (the values published with the datasets and used by torchvision).
# Keyed by file name; only files with these exact names are checked. Tests may patch this.
OFFICIAL_MD5: dict[str, dict[str, str]] = {
    "mnist": {
        "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
        "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
        "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
        "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
    },
    "fashion_mnist": {
        "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
        "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
        "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
        "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
    },
    "cifar10": {
        "cifar-10-python.tar.gz": "c58f30108f718f92721af3b95e74349a",
        "data_batch_1": "c99cafc152244af753f735de768cd75f",
        "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
        "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
        "data_batch_4": "634d18415352ddfa80567beed471001a",
        "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
        "test_batch": "40351d587109b95175f43aff81a1287e",
    },
}

# Where each dataset can be downloaded from, tried in order. Tests may patch this.
MIRRORS: dict[str, list[str]] = {
    "mnist": [
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
        "https://storage.googleapis.com/cvdf-datasets/mnist/",
    ],
    "fashion_mnist": [
        "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
        "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",
    ],
    "cifar10": ["https://www.cs.toronto.edu/~kriz/"],
}
DOWNLOAD_TIMEOUT_S = 10.0  # per socket operation, so a slow but live download still finishes

IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
CIFAR_ARCHIVE = "cifar-10-python.tar.gz"
CIFAR_FOLDER = "cifar-10-batches-py"
CIFAR_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR_TEST_BATCHES = ("test_batch",)

# IDX dtype codes -> big-endian numpy dtypes.
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


# --------------------------------------------------------------------------- checksums


def md5_of(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)  # integrity check against published values
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_official(path: Path, dataset: str) -> None:
    """Check ``path`` against the official MD5 when its name is an official file name."""
    expected = OFFICIAL_MD5.get(dataset, {}).get(path.name)
    if expected is None:
        return
    actual = md5_of(path)
    if actual != expected:
        raise ChecksumError(
            f"{path}: MD5 mismatch for the official {dataset} file {path.name!r}: "
            f"expected {expected}, got {actual}. The file is corrupt or not the official "
            f"one; delete it and download it again (or pass verify=False to skip the check)."
        )


# --------------------------------------------------------------------------- IDX


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (raw, or gzipped when the name ends in ``.gz``) into a native-endian array."""
    path = Path(path)
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as handle:
            raw = handle.read()
    except (OSError, EOFError, zlib.error) as err:  # BadGzipFile is an OSError
        raise CorruptFileError(f"{path}: cannot read the file ({err}); is it truncated?") from err
    if len(raw) < 4:
        raise CorruptFileError(f"{path}: only {len(raw)} bytes, too short for an IDX header")
    zero, code, ndim = int.from_bytes(raw[:2], "big"), raw[2], raw[3]
    if zero != 0 or code not in _IDX_DTYPES or ndim == 0:
        raise CorruptFileError(
            f"{path}: bad IDX magic number {raw[:4].hex()} (expected 0000 <dtype code "
            f"{'/'.join(f'{c:02x}' for c in _IDX_DTYPES)}> <ndim >= 1>); not an IDX file"
        )
    header_len = 4 + 4 * ndim
    if len(raw) < header_len:
        raise CorruptFileError(f"{path}: header declares {ndim} dimensions but the file ends early")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_IDX_DTYPES[code])
    expected = header_len + int(np.prod(shape)) * dtype.itemsize
    if len(raw) != expected:
        what = "truncated" if len(raw) < expected else "has trailing bytes"
        raise CorruptFileError(
            f"{path}: {what}: header says shape {shape} of {dtype.name} "
            f"({expected} bytes in all) but the file has {len(raw)} bytes"
        )
    values = np.frombuffer(raw, dtype=dtype, offset=header_len).reshape(shape)
    return values.astype(dtype.newbyteorder("="))


def find_idx_file(folder: Path, stem: str) -> Path | None:
    """The gzipped file if present, else the raw one, else None."""
    for candidate in (folder / f"{stem}.gz", folder / stem):
        if candidate.is_file():
            return candidate
    return None


def load_idx_folder(
    folder: Path, dataset: str, *, download: bool, verify: bool
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{"train": (images uint8 (N, 28, 28), labels int64 (N,)), "test": (...)}``."""
    stems = [stem for pair in IDX_FILES.values() for stem in pair]
    missing = [s for s in stems if find_idx_file(folder, s) is None]
    if missing:
        _download_or_explain(folder, dataset, [f"{s}.gz" for s in missing], download)
    out = {}
    for split, (image_stem, label_stem) in IDX_FILES.items():
        image_path, label_path = (
            find_idx_file(folder, image_stem),
            find_idx_file(folder, label_stem),
        )
        assert image_path is not None and label_path is not None
        if verify:
            verify_official(image_path, dataset)
            verify_official(label_path, dataset)
        images, labels = read_idx(image_path), read_idx(label_path)
        if images.ndim != 3 or labels.ndim != 1:
            raise CorruptFileError(
                f"{image_path} / {label_path}: expected images (N, rows, cols) and labels (N,), "
                f"got shapes {images.shape} and {labels.shape}"
            )
        if len(images) != len(labels):
            raise CorruptFileError(
                f"{image_path} has {len(images)} images but {label_path} has {len(labels)} labels"
            )
        out[split] = (images, labels.astype(np.int64))
    return out


# --------------------------------------------------------------------------- CIFAR-10


class _ArrayUnpickler(pickle.Unpickler):
    """Loads the CIFAR batch dicts but refuses any global other than numpy's array rebuilders,
    so a malicious pickle cannot run code."""

    _ALLOWED: ClassVar[set[tuple[str, str]]] = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),  # how protocol-2 pickles written by Python 3 store bytes
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a CIFAR batch")
        return super().find_class(module, name)


def read_cifar_batch(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """One python-pickle batch -> (images uint8 (N, 3, 32, 32), labels int64 (N,))."""
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            batch = _ArrayUnpickler(handle, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as err:
        raise CorruptFileError(f"{path}: not a CIFAR-10 python batch ({err})") from err
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        raise CorruptFileError(f"{path}: expected a dict with keys b'data' and b'labels'")
    data, labels = np.asarray(batch[b"data"]), np.asarray(batch[b"labels"], dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise CorruptFileError(
            f"{path}: b'data' must be uint8 (N, 3072), got {data.dtype} {data.shape}"
        )
    if labels.shape != (len(data),):
        raise CorruptFileError(f"{path}: {len(data)} images but {labels.size} labels")
    return data.reshape(-1, 3, 32, 32), labels  # rows are R(1024) G(1024) B(1024), row-major


def extract_cifar_archive(archive: Path, dest: Path) -> None:
    """Extract the ``cifar-10-batches-py`` folder of the official tarball into ``dest``."""
    try:
        with tarfile.open(archive, "r:gz") as tar:
            members = [m for m in tar.getmembers() if m.name.startswith(f"{CIFAR_FOLDER}/")]
            if not members:
                raise CorruptFileError(f"{archive}: no {CIFAR_FOLDER}/ folder inside the archive")
            if hasattr(tarfile, "data_filter"):  # no links out of dest, no absolute paths
                tar.extractall(dest, members=members, filter="data")
            else:  # Python < 3.10.12 / 3.11.4: check by hand
                for m in members:
                    if not (m.isfile() or m.isdir()) or ".." in Path(m.name).parts:
                        raise CorruptFileError(f"{archive}: unsafe archive member {m.name!r}")
                tar.extractall(dest, members=members)
    except (tarfile.TarError, OSError, EOFError, zlib.error) as err:
        raise CorruptFileError(f"{archive}: cannot extract the archive ({err})") from err


def load_cifar_folder(
    folder: Path, *, download: bool, verify: bool
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``folder`` holds ``cifar-10-batches-py/`` or ``cifar-10-python.tar.gz`` (extracted here)."""
    batches = folder / CIFAR_FOLDER
    names = CIFAR_TRAIN_BATCHES + CIFAR_TEST_BATCHES
    if not all((batches / n).is_file() for n in names):
        archive = folder / CIFAR_ARCHIVE
        if not archive.is_file():
            _download_or_explain(folder, "cifar10", [CIFAR_ARCHIVE], download)
        if verify:
            verify_official(archive, "cifar10")
        extract_cifar_archive(archive, folder)
        absent = [n for n in names if not (batches / n).is_file()]
        if absent:
            raise CorruptFileError(f"{archive}: the archive lacks {CIFAR_FOLDER}/{absent}")
    out = {}
    for split, split_names in (("train", CIFAR_TRAIN_BATCHES), ("test", CIFAR_TEST_BATCHES)):
        parts = []
        for name in split_names:
            if verify:
                verify_official(batches / name, "cifar10")
            parts.append(read_cifar_batch(batches / name))
        out[split] = (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))
    return out


# --------------------------------------------------------------------------- text


def read_text_ids(path: Path) -> tuple[np.ndarray, str]:
    """A UTF-8 file -> (int64 character ids, vocabulary = the sorted distinct characters)."""
    if not path.is_file():
        raise DataNotFoundError(f"text file {path} does not exist; pass path=<a UTF-8 text file>")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise CorruptFileError(
            f"{path}: not UTF-8 (byte {err.start}: {err.reason}); re-encode it as UTF-8"
        ) from err
    return text_ids(text)


def text_ids(text: str) -> tuple[np.ndarray, str]:
    """A string -> (int64 character ids, vocabulary = the sorted distinct characters)."""
    vocab = "".join(sorted(set(text)))
    lookup = {ch: i for i, ch in enumerate(vocab)}
    return np.fromiter((lookup[ch] for ch in text), dtype=np.int64, count=len(text)), vocab


def text_windows(ids: np.ndarray, seq_len: int, stride: int) -> tuple[np.ndarray, np.ndarray]:
    """(N, seq_len) input windows starting every ``stride`` ids, and their next-id targets."""
    starts = np.arange(0, len(ids) - seq_len, stride)  # each window needs seq_len + 1 ids
    offsets = starts[:, None] + np.arange(seq_len)[None, :]
    return ids[offsets], ids[offsets + 1]


# --------------------------------------------------------------------------- download


@contextlib.contextmanager
def atomic_write(path: Path) -> Iterator[BinaryIO]:
    """Write through a temporary file beside ``path``, renamed over it only on success, so
    no reader (or a crash) ever leaves half a file under the real name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as handle:
            yield handle
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def download_file(url: str, dest: Path, timeout: float = DOWNLOAD_TIMEOUT_S) -> None:
    with atomic_write(dest) as out, urllib.request.urlopen(url, timeout=timeout) as response:
        shutil.copyfileobj(response, out, length=1 << 20)


def _download_or_explain(folder: Path, dataset: str, files: Sequence[str], download: bool) -> None:
    """Download ``files`` into ``folder`` from the first mirror that has them, or raise
    :class:`DataNotFoundError` that says what to put where."""
    errors: list[str] = []
    if download:
        for mirror in MIRRORS[dataset]:
            try:
                for name in files:
                    download_file(mirror + name, folder / name)
                    try:
                        verify_official(folder / name, dataset)
                    except ChecksumError:
                        (folder / name).unlink()
                        raise
                return
            except (OSError, ChecksumError) as err:  # URLError and timeouts are OSErrors
                errors.append(f"{mirror}: {err}")
    tried = ("download failed: " + "; ".join(errors)) if download else "download=False"
    where = " or ".join(m + files[0] if len(files) == 1 else m for m in MIRRORS[dataset])
    alternative = (
        f"the extracted {CIFAR_FOLDER}/ folder"
        if dataset == "cifar10"
        else "the same files without .gz"
    )
    raise DataNotFoundError(
        f"{dataset}: missing {', '.join(files)} in folder {folder} ({tried}). "
        f"Put {', '.join(files)} (or {alternative}) into {folder}; get them from {where}. "
        f"To use another place, pass root=... or set $RIGL_DATA_DIR to the folder that "
        f"contains {folder.name}/."
    )
