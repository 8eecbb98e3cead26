"""Datasets in the IDX format (MNIST, Fashion-MNIST, ...) and helpers for training loops.

The loader is deliberately strict: every file is checked against its registered size and
checksum(s) before it is parsed, the IDX header is checked against the payload, and any problem
raises an exception that names the file and what is wrong.  Nothing is ever half loaded and a
user's file that fails verification is never overwritten.

Where the data live (first match wins):

1. the ``data_dir`` argument of :func:`load_dataset`;
2. the environment variable ``DLRT_DATA_DIR``;
3. a per-user cache, ``$XDG_CACHE_HOME/dlrt_jax`` or ``~/.cache/dlrt_jax``.

Inside that directory the files of dataset ``name`` are looked up in ``<dir>/<name>/`` and then
directly in ``<dir>/``; downloads go to ``<dir>/<name>/``.

Example:
    >>> from dlrt_jax.mnist.data import load_dataset, preprocess, batch_iterator
    >>> ds = load_dataset("mnist")  # doctest: +SKIP
    >>> x = preprocess(ds.train_images)  # (60000, 784) float32 in [0, 1]  # doctest: +SKIP
    >>> for xb, yb in batch_iterator(x, ds.train_labels, 128, seed=0, epoch=0):  # doctest: +SKIP
    ...     pass
"""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import hashlib
import http.client
import logging
import operator
import os
import re
import tempfile
import types
import urllib.error
import urllib.parse
import urllib.request
import zlib
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np

__all__ = [
    "DATA_DIR_ENV_VAR",
    "MNIST_MEAN",
    "MNIST_STD",
    "ROLES",
    "CorruptDatasetError",
    "Dataset",
    "DatasetNotFoundError",
    "FileSpec",
    "IDXDataset",
    "batch_iterator",
    "epoch_permutation",
    "get_dataset_spec",
    "list_datasets",
    "load_dataset",
    "num_batches",
    "preprocess",
    "read_idx",
    "register_dataset",
    "resolve_data_dir",
    "unregister_dataset",
]

logger = logging.getLogger(__name__)

#: Environment variable naming the directory that holds ``<name>/`` dataset folders.
DATA_DIR_ENV_VAR = "DLRT_DATA_DIR"

#: Mean and standard deviation of the MNIST training pixels after scaling to [0, 1].
MNIST_MEAN = 0.1307
MNIST_STD = 0.3081

#: The four file roles every :class:`IDXDataset` must define.
ROLES = ("train_images", "train_labels", "test_images", "test_labels")

_DOWNLOAD_TIMEOUT_S = 20.0
_CHUNK = 1 << 20
_ALLOWED_URL_SCHEMES = ("http", "https", "file")
# IDX type codes -> big-endian numpy dtypes (http://yann.lecun.com/exdb/mnist/, "THE IDX FILE
# FORMAT").
_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
# A sanity bound on the payload announced by an IDX header (protects against absurd headers).
_MAX_IDX_PAYLOAD = 1 << 40
_MD5_RE = re.compile(r"^[0-9a-f]{32}$")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


class DatasetNotFoundError(FileNotFoundError):
    """Some files of a dataset are missing and could not be downloaded.

    The message names every missing file, the directory to put them in, the environment
    variable that selects the data directory, and the mirror URLs.  Attributes: ``dataset``
    (name), ``missing`` (list of filenames), ``directory`` (:class:`~pathlib.Path` where the
    files are expected).

    Example:
        >>> try:
        ...     load_dataset("mnist", "/nonexistent", download=False)
        ... except DatasetNotFoundError as e:
        ...     print(e.missing[0])
        train-images-idx3-ubyte.gz
    """

    def __init__(self, message: str, *, dataset: str, missing: Sequence[str], directory: Path):
        super().__init__(message)
        self.dataset = dataset
        self.missing = list(missing)
        self.directory = Path(directory)

    def __str__(self) -> str:
        return str(self.args[0])


class CorruptDatasetError(ValueError):
    """A dataset file exists but is not what it should be.

    Raised for a wrong size or checksum, an unreadable gzip stream, a bad IDX magic number,
    header dimensions that disagree with the payload, a truncated payload, or inconsistent
    image/label counts.  Attributes: ``path`` (the offending file, or ``None`` when several files
    are involved) and ``problem`` (short description).

    Example:
        >>> import pathlib, tempfile
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "bad.idx"
        >>> _ = p.write_bytes(b"not an idx file")
        >>> try:
        ...     read_idx(p)
        ... except CorruptDatasetError as e:
        ...     print("bad magic" in str(e))
        True
    """

    def __init__(self, message: str, *, path: Path | None = None, problem: str = ""):
        super().__init__(message)
        self.path = None if path is None else Path(path)
        self.problem = problem or message


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class FileSpec:
    """One file of a dataset: its name, exact size in bytes and md5 (optionally sha256).

    Example:
        >>> spec = FileSpec("t10k-labels-idx1-ubyte.gz", 4542, "ec29112dd5afa0611ce80d1b7f02629c")
        >>> spec.bytes
        4542
    """

    filename: str
    bytes: int
    md5: str
    sha256: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.filename, str) or not self.filename:
            raise ValueError(f"FileSpec.filename must be a non-empty string, got {self.filename!r}")
        if (
            os.path.basename(self.filename) != self.filename
            or "/" in self.filename
            or "\\" in self.filename
            or self.filename in (".", "..")
        ):
            raise ValueError(
                f"FileSpec.filename must be a plain file name without directories, "
                f"got {self.filename!r}"
            )
        if isinstance(self.bytes, bool) or not isinstance(self.bytes, int) or self.bytes < 0:
            raise ValueError(
                f"FileSpec.bytes must be a non-negative int (the exact file size), "
                f"got {self.bytes!r} for {self.filename}"
            )
        md5 = self.md5.lower() if isinstance(self.md5, str) else self.md5
        if not isinstance(md5, str) or not _MD5_RE.match(md5):
            raise ValueError(
                f"FileSpec.md5 must be 32 hexadecimal digits, got {self.md5!r} for {self.filename}"
            )
        object.__setattr__(self, "md5", md5)
        if self.sha256 is not None:
            sha = self.sha256.lower() if isinstance(self.sha256, str) else self.sha256
            if not isinstance(sha, str) or not _SHA256_RE.match(sha):
                raise ValueError(
                    f"FileSpec.sha256 must be None or 64 hexadecimal digits, got {self.sha256!r} "
                    f"for {self.filename}"
                )
            object.__setattr__(self, "sha256", sha)


@dataclasses.dataclass(frozen=True)
class IDXDataset:
    """Description of an IDX dataset: files per role, download mirrors, split sizes, image shape.

    ``files`` maps each role in :data:`ROLES` to a :class:`FileSpec`; ``mirrors`` are base URLs
    (a file is fetched from ``mirror + filename``); ``shape`` is the shape of one image.  Images
    must be IDX uint8 arrays of shape ``(n, *shape)`` and labels IDX uint8 arrays of shape
    ``(n,)``.

    Example:
        >>> spec = get_dataset_spec("mnist")
        >>> spec.n_train, spec.n_test, spec.shape
        (60000, 10000, (28, 28))
    """

    name: str
    files: Mapping[str, FileSpec]
    mirrors: Sequence[str]
    n_train: int
    n_test: int
    shape: tuple[int, ...] = (28, 28)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME_RE.match(self.name):
            raise ValueError(
                "IDXDataset.name must be a non-empty name of letters, digits, '_', '-', '.' "
                f"(it becomes a directory name), got {self.name!r}"
            )
        if not isinstance(self.files, Mapping):
            raise ValueError(f"IDXDataset.files must be a mapping role -> FileSpec ({self.name})")
        roles = set(self.files)
        if roles != set(ROLES):
            raise ValueError(
                f"IDXDataset.files of {self.name!r} must have exactly the roles {list(ROLES)}; "
                f"missing {sorted(set(ROLES) - roles)}, unexpected {sorted(roles - set(ROLES))}"
            )
        for role in ROLES:
            if not isinstance(self.files[role], FileSpec):
                raise ValueError(
                    f"IDXDataset.files[{role!r}] of {self.name!r} must be a FileSpec, "
                    f"got {type(self.files[role]).__name__}"
                )
        names = [self.files[r].filename for r in ROLES]
        if len(set(names)) != len(names):
            raise ValueError(f"IDXDataset {self.name!r} uses the same filename for two roles")
        object.__setattr__(self, "files", types.MappingProxyType({r: self.files[r] for r in ROLES}))

        if isinstance(self.mirrors, str):
            raise ValueError(
                f"IDXDataset.mirrors of {self.name!r} must be a sequence of base URLs, not a string"
            )
        mirrors = tuple(self.mirrors)
        for m in mirrors:
            scheme = urllib.parse.urlsplit(m).scheme if isinstance(m, str) else None
            if scheme not in _ALLOWED_URL_SCHEMES:
                raise ValueError(
                    f"IDXDataset mirror {m!r} of {self.name!r} must be an "
                    f"{'/'.join(_ALLOWED_URL_SCHEMES)} URL"
                )
        object.__setattr__(self, "mirrors", mirrors)

        for field in ("n_train", "n_test"):
            v = getattr(self, field)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"IDXDataset.{field} must be a non-negative int, got {v!r}")
        try:
            shape = tuple(operator.index(d) for d in self.shape)
        except TypeError:
            raise ValueError(
                f"IDXDataset.shape must be a tuple of ints, got {self.shape!r}"
            ) from None
        if any(d < 1 for d in shape):
            raise ValueError(f"IDXDataset.shape must have positive entries, got {shape}")
        object.__setattr__(self, "shape", shape)


def _mnist_like(
    name: str,
    mirrors: Sequence[str],
    sizes: Mapping[str, int],
    md5s: Mapping[str, str],
    sha256s: Mapping[str, str] | None = None,
) -> IDXDataset:
    filenames = {
        "train_images": "train-images-idx3-ubyte.gz",
        "train_labels": "train-labels-idx1-ubyte.gz",
        "test_images": "t10k-images-idx3-ubyte.gz",
        "test_labels": "t10k-labels-idx1-ubyte.gz",
    }
    files = {
        role: FileSpec(fn, sizes[role], md5s[role], None if sha256s is None else sha256s[role])
        for role, fn in filenames.items()
    }
    return IDXDataset(name, files, tuple(mirrors), 60000, 10000, (28, 28))


# MNIST: sizes, md5 and sha256 as listed in shared/data/README.md.  The md5 values are the
# canonical ones checked by torchvision (torchvision/datasets/mnist.py, MNIST.resources); the
# sha256 values are the ones TFDS and Keras publish.  Mirrors: the two base URLs torchvision's
# MNIST.mirrors lists.  The S3 mirror comes first because yann.lecun.com often refuses
# unauthenticated downloads nowadays.
_MNIST = _mnist_like(
    "mnist",
    mirrors=(
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
        "http://yann.lecun.com/exdb/mnist/",
    ),
    sizes={
        "train_images": 9912422,
        "train_labels": 28881,
        "test_images": 1648877,
        "test_labels": 4542,
    },
    md5s={
        "train_images": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
        "train_labels": "d53e105ee54ea40749a09fcbcd1e9432",
        "test_images": "9fb629c4189551a2d022fa330f9573f3",
        "test_labels": "ec29112dd5afa0611ce80d1b7f02629c",
    },
    sha256s={
        "train_images": "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
        "train_labels": "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
        "test_images": "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
        "test_labels": "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
    },
)

# Fashion-MNIST: md5 values from the "Get the Data" table of the Zalando README
# (https://github.com/zalandoresearch/fashion-mnist#get-the-data), identical to
# torchvision/datasets/mnist.py (FashionMNIST.resources).  Mirror: the Zalando S3 website that
# both list.  Exact byte sizes as reported when Keras/torchvision download these files (the
# README rounds them to 26 MB / 29 KB / 4.3 MB / 5.1 KB).
_FASHION_MNIST = _mnist_like(
    "fashion_mnist",
    mirrors=("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
    sizes={
        "train_images": 26421880,
        "train_labels": 29515,
        "test_images": 4422102,
        "test_labels": 5148,
    },
    md5s={
        "train_images": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
        "train_labels": "25c81989df183df01b3e8a0aad5dffbe",
        "test_images": "bef4ecab320f06d8554ea6380940ec79",
        "test_labels": "bb300cfdad3c16e7a12a480ee83cd310",
    },
)

_REGISTRY: dict[str, IDXDataset] = {d.name: d for d in (_MNIST, _FASHION_MNIST)}
_BUILTIN = frozenset(_REGISTRY)


def register_dataset(spec: IDXDataset, *, overwrite: bool = False) -> IDXDataset:
    """Add an :class:`IDXDataset` to the registry so that ``load_dataset(spec.name)`` finds it.

    Raises ``ValueError`` if the name is taken (pass ``overwrite=True`` to replace a
    user-registered dataset; the built-in ``mnist`` and ``fashion_mnist`` cannot be replaced).

    Example:
        >>> files = {r: FileSpec(f"{r}.gz", 100, "0" * 32) for r in ROLES}
        >>> spec = register_dataset(IDXDataset("my_digits", files, [], 60, 10, (8, 8)))
        >>> "my_digits" in list_datasets()
        True
        >>> unregister_dataset("my_digits")
    """
    if not isinstance(spec, IDXDataset):
        raise TypeError(f"register_dataset expects an IDXDataset, got {type(spec).__name__}")
    if spec.name in _BUILTIN:
        raise ValueError(f"the built-in dataset {spec.name!r} cannot be replaced")
    if spec.name in _REGISTRY and not overwrite:
        raise ValueError(
            f"a dataset named {spec.name!r} is already registered; "
            "pass overwrite=True to replace it"
        )
    _REGISTRY[spec.name] = spec
    return spec


def unregister_dataset(name: str) -> None:
    """Remove a user-registered dataset from the registry (built-in ones cannot be removed).

    Example:
        >>> files = {r: FileSpec(f"{r}.gz", 1, "0" * 32) for r in ROLES}
        >>> _ = register_dataset(IDXDataset("tmp_ds", files, [], 1, 1, (2, 2)))
        >>> unregister_dataset("tmp_ds")
        >>> "tmp_ds" in list_datasets()
        False
    """
    if name in _BUILTIN:
        raise ValueError(f"the built-in dataset {name!r} cannot be unregistered")
    if name not in _REGISTRY:
        raise KeyError(f"no dataset named {name!r} is registered; known: {list_datasets()}")
    del _REGISTRY[name]


def list_datasets() -> list[str]:
    """Names of all registered datasets, sorted.

    Example:
        >>> {"mnist", "fashion_mnist"} <= set(list_datasets())
        True
    """
    return sorted(_REGISTRY)


def get_dataset_spec(name: str) -> IDXDataset:
    """Return the registered :class:`IDXDataset` called ``name``.

    Example:
        >>> get_dataset_spec("mnist").files["test_labels"].md5
        'ec29112dd5afa0611ce80d1b7f02629c'
    """
    if not isinstance(name, str):
        raise TypeError(f"dataset name must be a str, got {type(name).__name__}")
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"unknown dataset {name!r}; registered datasets: {list_datasets()} "
            "(add one with register_dataset)"
        ) from None


# --------------------------------------------------------------------------------------------
# Directory resolution
# --------------------------------------------------------------------------------------------


def _default_cache_dir() -> Path:
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    if xdg and os.path.isabs(xdg):
        return Path(xdg) / "dlrt_jax"
    return Path.home() / ".cache" / "dlrt_jax"


def _resolve_data_dir(data_dir: str | os.PathLike[str] | None) -> tuple[Path, str]:
    if data_dir is not None:
        return Path(data_dir).expanduser(), "the data_dir argument"
    env = os.environ.get(DATA_DIR_ENV_VAR, "")
    if env:
        return Path(env).expanduser(), f"the {DATA_DIR_ENV_VAR} environment variable"
    return _default_cache_dir(), "the default cache directory"


def resolve_data_dir(data_dir: str | os.PathLike[str] | None = None) -> Path:
    """The data directory: ``data_dir`` if given, else ``$DLRT_DATA_DIR``, else the user cache.

    The user cache is ``$XDG_CACHE_HOME/dlrt_jax`` (if that variable holds an absolute path) or
    ``~/.cache/dlrt_jax``.  The directory is not created.

    Example:
        >>> resolve_data_dir("/data")
        PosixPath('/data')
    """
    return _resolve_data_dir(data_dir)[0]


# --------------------------------------------------------------------------------------------
# IDX parsing
# --------------------------------------------------------------------------------------------


def _read_up_to(f, n: int) -> bytearray:
    """Read at most ``n`` bytes in chunks (never allocates more than what is really there)."""
    buf = bytearray()
    while len(buf) < n:
        chunk = f.read(min(_CHUNK * 16, n - len(buf)))
        if not chunk:
            break
        buf += chunk
    return buf


def _describe_magic(code: int, ndim: int) -> str:
    dt = _IDX_DTYPES.get(code)
    return f"{code << 8 | ndim} (0x{code << 8 | ndim:08X}: {dt.name if dt else '?'}, {ndim} dims)"


def _parse_idx(
    path: Path, *, expect_code: int | None = None, expect_ndim: int | None = None
) -> np.ndarray:
    path = Path(path)
    try:
        with open(path, "rb") as raw:
            is_gzip = raw.read(2) == b"\x1f\x8b"
    except FileNotFoundError:
        raise
    except OSError as e:
        raise CorruptDatasetError(f"{path}: cannot read file: {e}", path=path) from e

    try:
        with contextlib.ExitStack() as stack:
            f = stack.enter_context(gzip.open(path, "rb") if is_gzip else open(path, "rb"))
            what = "decompressed content" if is_gzip else "file"
            head = _read_up_to(f, 4)
            if len(head) < 4:
                raise CorruptDatasetError(
                    f"{path}: {what} is only {len(head)} bytes long, too short for an IDX header "
                    "(truncated or empty file)",
                    path=path,
                    problem="truncated header",
                )
            zero, code, ndim = int.from_bytes(head[:2], "big"), head[2], head[3]
            magic = int.from_bytes(head, "big")
            if zero != 0 or code not in _IDX_DTYPES or ndim == 0:
                raise CorruptDatasetError(
                    f"{path}: bad magic number {magic} (0x{magic:08X}); an IDX file starts with "
                    "two zero bytes, a type code (0x08, 0x09, 0x0B, 0x0C, 0x0D or 0x0E) and a "
                    "non-zero number of dimensions",
                    path=path,
                    problem="bad magic",
                )
            if (expect_code is not None and code != expect_code) or (
                expect_ndim is not None and ndim != expect_ndim
            ):
                raise CorruptDatasetError(
                    f"{path}: bad magic number {_describe_magic(code, ndim)}, expected "
                    f"{_describe_magic(expect_code or code, expect_ndim or ndim)}",
                    path=path,
                    problem="bad magic",
                )
            dims_raw = _read_up_to(f, 4 * ndim)
            if len(dims_raw) < 4 * ndim:
                raise CorruptDatasetError(
                    f"{path}: truncated IDX header: {ndim} dimensions announced but only "
                    f"{len(dims_raw)} of {4 * ndim} header bytes present",
                    path=path,
                    problem="truncated header",
                )
            dims = tuple(int.from_bytes(dims_raw[4 * i : 4 * i + 4], "big") for i in range(ndim))
            dtype = _IDX_DTYPES[code]
            count = 1
            for d in dims:
                count *= d
            expected = count * dtype.itemsize
            if expected > _MAX_IDX_PAYLOAD:
                raise CorruptDatasetError(
                    f"{path}: IDX header dims {dims} announce {expected} payload bytes, which is "
                    "implausibly large",
                    path=path,
                    problem="header dims",
                )
            payload = _read_up_to(f, expected)
            if len(payload) < expected:
                raise CorruptDatasetError(
                    f"{path}: truncated payload: header dims {dims} ({dtype.name}) need "
                    f"{expected} bytes after the {4 + 4 * ndim}-byte header, but the {what} has "
                    f"only {len(payload)}",
                    path=path,
                    problem="truncated payload",
                )
            extra = len(_read_up_to(f, _CHUNK))  # also runs the gzip CRC/length check
            if extra:
                raise CorruptDatasetError(
                    f"{path}: header dims {dims} ({dtype.name}) disagree with the payload length: "
                    f"{'at least ' if extra == _CHUNK else ''}{extra} bytes follow the "
                    f"{expected}-byte payload",
                    path=path,
                    problem="header dims",
                )
    except CorruptDatasetError:
        raise
    except (EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise CorruptDatasetError(
            f"{path}: bad gzip stream ({type(e).__name__}: {e}); the file is corrupt or truncated",
            path=path,
            problem="bad gzip",
        ) from e
    except OSError as e:
        raise CorruptDatasetError(f"{path}: cannot read file: {e}", path=path) from e

    arr = np.frombuffer(payload, dtype=dtype).reshape(dims)
    if dtype.itemsize > 1:
        arr = arr.astype(dtype.newbyteorder("="))
    return arr


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Parse an IDX file (gzip-compressed or raw, detected from the content) into a numpy array.

    Supports the type codes 0x08 (uint8), 0x09 (int8), 0x0B (int16), 0x0C (int32), 0x0D (float32)
    and 0x0E (float64); the result has native byte order and the shape given in the header.
    Raises :class:`CorruptDatasetError` for a bad magic number, a bad gzip stream, a truncated
    header or payload, or trailing bytes beyond what the header dimensions announce, and
    ``FileNotFoundError`` if the file does not exist.

    Example:
        >>> labels = read_idx("data/mnist/t10k-labels-idx1-ubyte.gz")  # doctest: +SKIP
        >>> labels.shape, labels.dtype  # doctest: +SKIP
        ((10000,), dtype('uint8'))
    """
    return _parse_idx(Path(path))


# --------------------------------------------------------------------------------------------
# Verification and download
# --------------------------------------------------------------------------------------------


def _hashes(path: Path) -> tuple[str, str]:
    md5, sha = hashlib.md5(), hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            md5.update(chunk)
            sha.update(chunk)
    return md5.hexdigest(), sha.hexdigest()


def _check_file(path: Path, spec: FileSpec) -> str | None:
    """Return None if ``path`` matches ``spec`` (size, md5, sha256), else what is wrong."""
    try:
        size = path.stat().st_size
    except OSError as e:
        return f"cannot stat file: {e}"
    if size != spec.bytes:
        return f"size is {size} bytes, expected {spec.bytes}"
    try:
        md5, sha = _hashes(path)
    except OSError as e:
        return f"cannot read file: {e}"
    if md5 != spec.md5:
        return f"md5 is {md5}, expected {spec.md5}"
    if spec.sha256 is not None and sha != spec.sha256:
        return f"sha256 is {sha}, expected {spec.sha256}"
    return None


def _url_for(mirror: str, filename: str) -> str:
    return mirror + filename if mirror.endswith("/") else f"{mirror}/{filename}"


def _download_one(url: str, target: Path, spec: FileSpec) -> None:
    """Download ``url`` to ``target`` atomically after verifying it; raise OSError on failure."""
    scheme = urllib.parse.urlsplit(url).scheme
    if scheme not in _ALLOWED_URL_SCHEMES:
        raise OSError(f"refusing to download from a {scheme or 'scheme-less'} URL")
    fd, tmp_name = tempfile.mkstemp(prefix=f".{spec.filename}.", suffix=".part", dir=target.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            # A fresh opener per call so that the proxy environment at call time is honoured.
            opener = urllib.request.build_opener()
            request = urllib.request.Request(url, headers={"User-Agent": "dlrt_jax"})
            with opener.open(request, timeout=_DOWNLOAD_TIMEOUT_S) as resp:
                length = resp.headers.get("Content-Length") if hasattr(resp, "headers") else None
                if length is not None and length.isdigit() and int(length) != spec.bytes:
                    raise OSError(
                        f"server announces {length} bytes, expected {spec.bytes} "
                        "(wrong or corrupt file on this mirror)"
                    )
                received = 0
                while chunk := resp.read(_CHUNK):
                    received += len(chunk)
                    if received > spec.bytes:
                        raise OSError(
                            f"server sent more than the expected {spec.bytes} bytes "
                            "(wrong or corrupt file on this mirror)"
                        )
                    out.write(chunk)
        problem = _check_file(tmp, spec)
        if problem is not None:
            raise OSError(f"downloaded file failed verification: {problem}")
        os.replace(tmp, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def _fetch(spec: FileSpec, mirrors: Sequence[str], target: Path) -> list[str]:
    """Try every mirror in order; return [] on success, else one error line per attempt."""
    errors = []
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        return [f"cannot create directory {target.parent}: {e}"]
    for mirror in mirrors:
        url = _url_for(mirror, spec.filename)
        logger.info("downloading %s -> %s", url, target)
        try:
            _download_one(url, target, spec)
        except (OSError, ValueError, http.client.HTTPException) as e:
            reason = getattr(e, "reason", None) if isinstance(e, urllib.error.URLError) else None
            detail = f"{type(e).__name__}: {reason if reason is not None else e}"
            logger.warning("download of %s failed (%s); trying the next mirror", url, detail)
            errors.append(f"{url}: {detail}")
            continue
        return []
    if not mirrors:
        errors.append("no download mirrors are registered for this dataset")
    return errors


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


class Dataset(NamedTuple):
    """Train and test split of an image-classification dataset as numpy arrays.

    Images are uint8 of shape ``(N, *shape)`` (``(N, 28, 28)`` for MNIST), labels uint8 ``(N,)``.

    Example:
        >>> ds = load_dataset("mnist")  # doctest: +SKIP
        >>> ds.train_images.shape, ds.test_labels.shape  # doctest: +SKIP
        ((60000, 28, 28), (10000,))
    """

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray


def _delete_advice(path: Path) -> str:
    return (
        f"It was NOT re-downloaded or overwritten. Delete it (rm '{path}') and run again to "
        "download a fresh copy, or replace it with a verified copy."
    )


def load_dataset(
    name: str | IDXDataset = "mnist",
    data_dir: str | os.PathLike[str] | None = None,
    *,
    download: bool = True,
    verify: bool = True,
) -> Dataset:
    """Load a registered IDX dataset (default MNIST) as a :class:`Dataset` of numpy arrays.

    The data directory is ``data_dir``, else ``$DLRT_DATA_DIR``, else the user cache (see
    :func:`resolve_data_dir`); each file is looked up in ``<dir>/<name>/`` and then in ``<dir>/``.
    With ``verify=True`` every file's size and md5 (and sha256 when registered) are checked
    before parsing.  Missing files are downloaded into ``<dir>/<name>/`` when ``download=True``
    (mirrors tried in order, each file verified before it is atomically moved into place).

    Raises:
        DatasetNotFoundError: files are missing and could not be downloaded.
        CorruptDatasetError: a file fails verification or parsing (it is never overwritten).
        ValueError: unknown dataset name.

    Example:
        >>> ds = load_dataset("mnist", "/work/shared/data", download=False)  # doctest: +SKIP
        >>> ds.train_images.shape, ds.train_images.dtype  # doctest: +SKIP
        ((60000, 28, 28), dtype('uint8'))
    """
    spec = name if isinstance(name, IDXDataset) else get_dataset_spec(name)
    root, source = _resolve_data_dir(data_dir)
    home = root / spec.name

    # 1. Locate the files.
    paths: dict[str, Path] = {}
    missing: list[str] = []
    for role in ROLES:
        fs = spec.files[role]
        for candidate in (home / fs.filename, root / fs.filename):
            if candidate.is_file():
                paths[role] = candidate
                break
        else:
            missing.append(role)

    # 2. Verify what is there before touching the network, so a bad local file is reported as
    #    such (and never silently replaced by a download).
    if verify:
        problems = []
        for role, path in paths.items():
            problem = _check_file(path, spec.files[role])
            if problem is not None:
                problems.append((path, problem))
        if problems:
            lines = [f"  {p}: {what}" for p, what in problems]
            first = problems[0][0]
            raise CorruptDatasetError(
                f"dataset {spec.name!r}: {len(problems)} file(s) failed verification:\n"
                + "\n".join(lines)
                + "\n"
                + (
                    _delete_advice(first)
                    if len(problems) == 1
                    else "They were NOT re-downloaded or overwritten. Delete them and run again "
                    "to download fresh copies, or replace them with verified copies."
                ),
                path=first if len(problems) == 1 else None,
                problem="; ".join(f"{p.name}: {what}" for p, what in problems),
            )

    # 3. Download what is missing.
    if missing:
        attempts: dict[str, list[str]] = {}
        still_missing = []
        for role in missing:
            fs = spec.files[role]
            if download:
                errors = _fetch(fs, spec.mirrors, home / fs.filename)
                if not errors:
                    paths[role] = home / fs.filename
                    continue
                attempts[role] = errors
            still_missing.append(role)
        if still_missing:
            raise DatasetNotFoundError(
                _not_found_message(spec, still_missing, root, home, source, download, attempts),
                dataset=spec.name,
                missing=[spec.files[r].filename for r in still_missing],
                directory=home,
            )

    # 4. Parse and cross-check.  Arrays are only returned once everything is consistent.
    arrays: dict[str, np.ndarray] = {}
    for role in ROLES:
        is_images = role.endswith("images")
        arrays[role] = _parse_idx(
            paths[role], expect_code=0x08, expect_ndim=1 + len(spec.shape) if is_images else 1
        )
    for split, n in (("train", spec.n_train), ("test", spec.n_test)):
        img, lab = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        img_path, lab_path = paths[f"{split}_images"], paths[f"{split}_labels"]
        if img.shape[1:] != spec.shape:
            raise CorruptDatasetError(
                f"{img_path}: images have shape {img.shape[1:]}, expected {spec.shape} for "
                f"dataset {spec.name!r}",
                path=img_path,
                problem="image shape",
            )
        if lab.shape[0] != img.shape[0]:
            raise CorruptDatasetError(
                f"dataset {spec.name!r} ({split}): label count {lab.shape[0]} in {lab_path} "
                f"!= image count {img.shape[0]} in {img_path}",
                path=lab_path,
                problem="label count != image count",
            )
        if img.shape[0] != n:
            raise CorruptDatasetError(
                f"{img_path}: {img.shape[0]} {split} examples, expected {n} for dataset "
                f"{spec.name!r}",
                path=img_path,
                problem="example count",
            )
    return Dataset(
        arrays["train_images"], arrays["train_labels"], arrays["test_images"], arrays["test_labels"]
    )


def _not_found_message(
    spec: IDXDataset,
    roles: Sequence[str],
    root: Path,
    home: Path,
    source: str,
    download: bool,
    attempts: Mapping[str, Sequence[str]],
) -> str:
    lines = [f"dataset {spec.name!r}: {len(roles)} file(s) missing:"]
    for role in roles:
        fs = spec.files[role]
        lines.append(f"  {fs.filename}  ({fs.bytes} bytes, md5 {fs.md5})")
    lines.append(f"Looked in {home} and {root} (data directory taken from {source}).")
    lines.append(f"Put the files in: {home}")
    lines.append(
        f"To use another data directory, set the {DATA_DIR_ENV_VAR} environment variable to a "
        f"directory containing '{spec.name}/', or pass data_dir=."
    )
    if spec.mirrors:
        lines.append("Download mirrors (file URL = mirror + file name):")
        lines.extend(f"  {m}" for m in spec.mirrors)
    else:
        lines.append("No download mirrors are registered for this dataset.")
    if not download:
        lines.append("Downloading was disabled (download=False).")
    else:
        lines.append("Every download attempt failed:")
        for role in roles:
            lines.extend(f"  {err}" for err in attempts.get(role, ()))
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Training helpers
# --------------------------------------------------------------------------------------------


def _check_int(value, name: str, minimum: int) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    try:
        v = operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}") from None
    if v < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {v}")
    return v


def preprocess(
    images: np.ndarray,
    *,
    flatten: bool = True,
    dtype=np.float32,
    normalize: bool = False,
    mean: float = MNIST_MEAN,
    std: float = MNIST_STD,
) -> np.ndarray:
    """Scale uint8 images to [0, 1] floats, optionally standardise, optionally flatten.

    ``images`` has shape ``(N, ...)`` with integer pixel values in [0, 255].  With
    ``normalize=True`` the result is ``(x / 255 - mean) / std`` (MNIST defaults 0.1307, 0.3081).
    With ``flatten=True`` the result has shape ``(N, prod(...))``.

    Example:
        >>> import numpy as np
        >>> x = preprocess(np.full((2, 28, 28), 255, np.uint8))
        >>> x.shape, x.dtype, float(x.max())
        ((2, 784), dtype('float32'), 1.0)
    """
    arr = np.asarray(images)
    if arr.ndim < 2:
        raise ValueError(f"images must have shape (N, ...) with at least 2 dims, got {arr.shape}")
    if arr.dtype.kind not in "ui":
        raise ValueError(
            f"images must be an integer array (uint8 pixels in [0, 255]), got dtype {arr.dtype}"
        )
    if arr.dtype != np.uint8 and arr.size and (arr.min() < 0 or arr.max() > 255):
        raise ValueError(f"pixel values must lie in [0, 255], got range [{arr.min()}, {arr.max()}]")
    dt = np.dtype(dtype)
    if dt.kind != "f":
        raise ValueError(f"dtype must be a floating dtype, got {dt}")
    out = arr.astype(dt) / dt.type(255)
    if normalize:
        if not np.isfinite(std) or std <= 0:
            raise ValueError(f"std must be a positive finite number, got {std}")
        if not np.isfinite(mean):
            raise ValueError(f"mean must be finite, got {mean}")
        out = (out - dt.type(mean)) / dt.type(std)
    if flatten:
        out = out.reshape(arr.shape[0], -1)
    return out.astype(dt, copy=False)


def num_batches(n: int, batch_size: int, drop_last: bool = True) -> int:
    """Number of batches per epoch for ``n`` examples (floor if ``drop_last`` else ceil).

    Example:
        >>> num_batches(10, 3), num_batches(10, 3, drop_last=False)
        (3, 4)
    """
    n = _check_int(n, "n", 0)
    batch_size = _check_int(batch_size, "batch_size", 1)
    return n // batch_size if drop_last else -(-n // batch_size)


def epoch_permutation(n: int, *, seed: int, epoch: int) -> np.ndarray:
    """The example order of one epoch: a permutation of ``range(n)`` fixed by ``(seed, epoch)``.

    Uses ``np.random.default_rng(np.random.SeedSequence((seed, epoch)))``, so the order is
    reproducible across runs and processes and can be recomputed when resuming.

    Example:
        >>> p = epoch_permutation(5, seed=0, epoch=3)
        >>> sorted(p.tolist()) == [0, 1, 2, 3, 4]
        True
        >>> bool((p == epoch_permutation(5, seed=0, epoch=3)).all())
        True
    """
    n = _check_int(n, "n", 0)
    seed = _check_int(seed, "seed", 0)
    epoch = _check_int(epoch, "epoch", 0)
    rng = np.random.default_rng(np.random.SeedSequence((seed, epoch)))
    return rng.permutation(n)


def batch_iterator(
    x: np.ndarray,
    y: np.ndarray,
    batch_size: int,
    *,
    seed: int,
    epoch: int,
    shuffle: bool = True,
    drop_last: bool = True,
    start_batch: int = 0,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield ``(x_batch, y_batch)`` minibatches for one epoch, resumable at ``start_batch``.

    With ``shuffle=True`` the order is :func:`epoch_permutation` ``(len(x), seed, epoch)``, a
    deterministic function of ``(seed, epoch)``; batch ``k`` therefore holds the same examples
    whether the epoch is iterated from the start or resumed with ``start_batch=k``.  With
    ``drop_last=True`` a final incomplete batch is dropped; otherwise it is yielded (smaller).
    ``start_batch`` may equal :func:`num_batches` (nothing left to yield).  Arguments are
    validated eagerly, when the function is called.

    Example:
        >>> import numpy as np
        >>> x, y = np.arange(10), np.arange(10)
        >>> full = list(batch_iterator(x, y, 3, seed=0, epoch=1))
        >>> tail = list(batch_iterator(x, y, 3, seed=0, epoch=1, start_batch=1))
        >>> len(full), all((a[0] == b[0]).all() for a, b in zip(full[1:], tail))
        (3, True)
    """
    x = np.asarray(x)
    y = np.asarray(y)
    if x.ndim < 1 or y.ndim < 1:
        raise ValueError(f"x and y must have a leading batch axis, got shapes {x.shape}, {y.shape}")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x and y must have the same length, got {x.shape[0]} and {y.shape[0]}")
    batch_size = _check_int(batch_size, "batch_size", 1)
    seed = _check_int(seed, "seed", 0)
    epoch = _check_int(epoch, "epoch", 0)
    start_batch = _check_int(start_batch, "start_batch", 0)
    n = x.shape[0]
    total = num_batches(n, batch_size, drop_last)
    if start_batch > total:
        raise ValueError(
            f"start_batch={start_batch} is past the end of the epoch ({total} batches of "
            f"{batch_size} from {n} examples, drop_last={drop_last})"
        )
    order = epoch_permutation(n, seed=seed, epoch=epoch) if shuffle else None
    return _batches(x, y, order, batch_size, start_batch, total)


def _batches(x, y, order, batch_size, start_batch, total):
    n = x.shape[0]
    for b in range(start_batch, total):
        lo, hi = b * batch_size, min((b + 1) * batch_size, n)
        if order is None:
            yield x[lo:hi], y[lo:hi]
        else:
            idx = order[lo:hi]
            yield x[idx], y[idx]
