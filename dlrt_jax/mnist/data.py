"""Datasets in the IDX format (MNIST, Fashion-MNIST, ...) and helpers for training loops.

Every file is checked against its registered size and checksum(s) before it is parsed, the IDX
header is checked against the payload, and any problem raises an exception that names the file
and what is wrong. A file that fails verification is never overwritten.

Where the data live (first match wins): the ``data_dir`` argument of :func:`load_dataset`, the
environment variable ``DLRT_DATA_DIR``, a per-user cache (``$XDG_CACHE_HOME/dlrt_jax`` or
``~/.cache/dlrt_jax``). The files of dataset ``name`` are looked up in ``<dir>/<name>/``, then in
``<dir>/``. Missing files are downloaded into ``<dir>/<name>/`` with `pooch
<https://www.fatiando.org/pooch/>`_ (the ``[mnist]`` extra), which writes to a temporary file and
moves it into place only once its checksum matches: a failed download leaves nothing behind.
Files already on disk are read without pooch and without the network.

Examples:
    >>> from dlrt_jax.mnist.data import load_dataset, preprocess, batch_iterator
    >>> ds = load_dataset("mnist")  # doctest: +SKIP
    >>> x = preprocess(ds.train_images)  # (60000, 784) float32 in [0, 1]  # doctest: +SKIP
    >>> for xb, yb in batch_iterator(x, ds.train_labels, 128, seed=0, epoch=0):  # doctest: +SKIP
    ...     pass
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import logging
import math
import operator
import os
import re
import shutil
import types
import urllib.parse
import urllib.request
import zlib
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np

from dlrt_jax._factors import _check_int  # the core's one integer check

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

# IDX type codes -> big-endian dtypes ("THE IDX FILE FORMAT", http://yann.lecun.com/exdb/mnist/).
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_URL_SCHEMES = ("http", "https", "file")


class DatasetNotFoundError(FileNotFoundError):
    """Some files of a dataset are missing and could not be downloaded.

    The message names every missing file, the directory to put them in, the environment
    variable and the ``data_dir=`` argument that select the data directory, and the mirrors.
    Attributes: ``dataset`` (name), ``missing`` (file names), ``directory`` (where they belong).

    Examples:
        >>> try:
        ...     load_dataset("mnist", "/nonexistent", download=False)
        ... except DatasetNotFoundError as e:
        ...     print(e.missing[0])
        train-images-idx3-ubyte.gz
    """

    def __init__(self, message: str, *, dataset: str, missing: Sequence[str], directory: Path):
        super().__init__(message)
        self.dataset, self.missing, self.directory = dataset, list(missing), Path(directory)

    def __str__(self) -> str:
        return str(self.args[0])


class CorruptDatasetError(ValueError):
    """A dataset file exists but is not what it should be (size, checksum, gzip, IDX header).

    Attributes: ``path`` (the offending file, or ``None`` when several are involved) and
    ``problem`` (a short description).

    Examples:
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


# ---- registry --------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class FileSpec:
    """One file of a dataset: its name, exact size in bytes and md5 (optionally sha256).

    Examples:
        >>> spec = FileSpec("t10k-labels-idx1-ubyte.gz", 4542, "ec29112dd5afa0611ce80d1b7f02629c")
        >>> spec.bytes, spec.known_hash[:4]
        (4542, 'md5:')
    """

    filename: str
    bytes: int
    md5: str
    sha256: str | None = None

    def __post_init__(self) -> None:
        name, size = self.filename, self.bytes
        if not isinstance(name, str) or name in ("", "..") or Path(name).name != name:
            raise ValueError(f"FileSpec.filename must be a plain file name, got {name!r}")
        if type(size) is not int or size < 0:
            raise ValueError(f"FileSpec.bytes must be an int >= 0 (the exact size), got {size!r}")
        for field, digits in (("md5", 32), ("sha256", 64)):
            value = getattr(self, field)
            if value is not None or field == "md5":
                if not re.fullmatch(f"[0-9a-fA-F]{{{digits}}}", str(value)):
                    raise ValueError(f"FileSpec.{field} of {name} must be {digits} hex digits")
                object.__setattr__(self, field, value.lower())

    @property
    def known_hash(self) -> str:
        """The strongest registered checksum in pooch's ``"alg:hex"`` form."""
        return f"sha256:{self.sha256}" if self.sha256 else f"md5:{self.md5}"


@dataclasses.dataclass(frozen=True)
class IDXDataset:
    """An IDX dataset: a :class:`FileSpec` per role, download mirrors, split sizes, image shape.

    ``mirrors`` are base URLs (``http``, ``https`` or ``file``); a file is fetched from
    ``mirror + filename``. Images are uint8 ``(n, *shape)``, labels uint8 ``(n,)``.

    Examples:
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
        name, files, mirrors = self.name, self.files, self.mirrors
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][\w.\-]*", name):
            raise ValueError(f"IDXDataset.name must be a plain directory name, got {name!r}")
        if not isinstance(files, Mapping) or set(files) != set(ROLES):
            raise ValueError(f"IDXDataset.files of {name!r} must map the roles {ROLES}")
        if not all(isinstance(f, FileSpec) for f in files.values()):
            raise ValueError(f"IDXDataset.files of {name!r} must hold FileSpecs")
        if len({f.filename for f in files.values()}) != len(ROLES):
            raise ValueError(f"IDXDataset {name!r} uses the same filename for two roles")
        if isinstance(mirrors, str) or not all(
            isinstance(m, str) and urllib.parse.urlsplit(m).scheme in _URL_SCHEMES for m in mirrors
        ):
            raise ValueError(f"IDXDataset.mirrors of {name!r} must be http(s) or file URLs")
        try:
            shape = tuple(operator.index(d) for d in self.shape)
        except TypeError:
            shape = ()
        sizes = (self.n_train, self.n_test)
        if not shape or min(shape) < 1 or any(type(v) is not int or v < 0 for v in sizes):
            raise ValueError(f"IDXDataset {name!r}: bad sizes {sizes} or image shape {self.shape}")
        object.__setattr__(self, "files", types.MappingProxyType({r: files[r] for r in ROLES}))
        object.__setattr__(self, "mirrors", tuple(mirrors))
        object.__setattr__(self, "shape", shape)


_MNIST_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz")
_MNIST_FILES += ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")


def _mnist_like(name, mirrors, sizes, md5s, sha256s=(None,) * 4) -> IDXDataset:
    files = {r: FileSpec(*spec) for r, spec in zip(ROLES, zip(_MNIST_FILES, sizes, md5s, sha256s))}
    return IDXDataset(name, files, mirrors, 60000, 10000, (28, 28))


# MNIST: sizes, md5 and sha256 as in shared/data/README.md (md5: the values torchvision checks;
# sha256: the values TFDS and Keras publish). Mirrors as torchvision's MNIST.mirrors, S3 first
# because yann.lecun.com often refuses unauthenticated downloads nowadays.
_MNIST = _mnist_like(
    "mnist",
    ("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/"),
    (9912422, 28881, 1648877, 4542),
    (
        "f68b3c2dcbeaaa9fbdd348bbdeb94873",
        "d53e105ee54ea40749a09fcbcd1e9432",
        "9fb629c4189551a2d022fa330f9573f3",
        "ec29112dd5afa0611ce80d1b7f02629c",
    ),
    (
        "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
        "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
        "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
        "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
    ),
)
# Fashion-MNIST: md5 from the Zalando README's "Get the Data" table (the same torchvision
# checks); exact byte sizes as downloaded; the Zalando S3 website as mirror.
_FASHION_MNIST = _mnist_like(
    "fashion_mnist",
    ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
    (26421880, 29515, 4422102, 5148),
    (
        "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
        "25c81989df183df01b3e8a0aad5dffbe",
        "bef4ecab320f06d8554ea6380940ec79",
        "bb300cfdad3c16e7a12a480ee83cd310",
    ),
)
_REGISTRY: dict[str, IDXDataset] = {d.name: d for d in (_MNIST, _FASHION_MNIST)}
_BUILTIN = frozenset(_REGISTRY)


def register_dataset(spec: IDXDataset, *, overwrite: bool = False) -> IDXDataset:
    """Add an :class:`IDXDataset` to the registry so that ``load_dataset(spec.name)`` finds it.

    Pass ``overwrite=True`` to replace a user-registered dataset; the built-in ``mnist`` and
    ``fashion_mnist`` cannot be replaced.

    Examples:
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
        raise ValueError(f"{spec.name!r} is already registered; pass overwrite=True to replace it")
    _REGISTRY[spec.name] = spec
    return spec


def unregister_dataset(name: str) -> None:
    """Remove a user-registered dataset from the registry (built-in ones cannot be removed).

    Examples:
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

    Examples:
        >>> {"mnist", "fashion_mnist"} <= set(list_datasets())
        True
    """
    return sorted(_REGISTRY)


def get_dataset_spec(name: str) -> IDXDataset:
    """Return the registered :class:`IDXDataset` called ``name``.

    Examples:
        >>> get_dataset_spec("mnist").files["test_labels"].md5
        'ec29112dd5afa0611ce80d1b7f02629c'
    """
    if name not in _REGISTRY:
        raise ValueError(
            f"unknown dataset {name!r}; registered datasets: {list_datasets()} "
            "(add one with register_dataset)"
        )
    return _REGISTRY[name]


# ---- files: location, verification, download, IDX parsing --------------------------------------


_DEFAULT_SOURCE = "the default cache directory"


def _resolve_data_dir(data_dir: str | os.PathLike[str] | None) -> tuple[Path, str]:
    if data_dir is not None:
        return Path(data_dir).expanduser(), "the data_dir argument"
    if os.environ.get(DATA_DIR_ENV_VAR):
        return Path(os.environ[DATA_DIR_ENV_VAR]).expanduser(), f"${DATA_DIR_ENV_VAR}"
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    cache = Path(xdg) if os.path.isabs(xdg) else Path.home() / ".cache"
    return cache / "dlrt_jax", _DEFAULT_SOURCE


def resolve_data_dir(data_dir: str | os.PathLike[str] | None = None) -> Path:
    """The data directory: ``data_dir`` if given, else ``$DLRT_DATA_DIR``, else the user cache.

    The user cache is ``$XDG_CACHE_HOME/dlrt_jax`` (if that variable holds an absolute path) or
    ``~/.cache/dlrt_jax``. The directory is not created.

    Examples:
        >>> resolve_data_dir("/data")
        PosixPath('/data')
    """
    return _resolve_data_dir(data_dir)[0]


def _check_file(path: Path, spec: FileSpec) -> str | None:
    """``None`` if ``path`` has the registered size and checksums, else what is wrong."""
    size = path.stat().st_size
    if size != spec.bytes:
        return f"size is {size} bytes, expected {spec.bytes}"
    with open(path, "rb") as f:
        md5, sha = hashlib.file_digest(f, "md5").hexdigest(), None
        if spec.sha256 is not None:
            f.seek(0)
            sha = hashlib.file_digest(f, "sha256").hexdigest()
    if md5 != spec.md5:
        return f"md5 is {md5}, expected {spec.md5}"
    if sha != spec.sha256:
        return f"sha256 is {sha}, expected {spec.sha256}"
    return None


def _copy_from_file_url(url: str, output_file: str, pooch: object = None) -> None:
    """A pooch downloader for ``file://`` mirrors (pooch itself only speaks http, ftp, doi)."""
    shutil.copyfile(urllib.request.url2pathname(urllib.parse.urlsplit(url).path), output_file)


def _download(spec: FileSpec, mirrors: Sequence[str], directory: Path) -> list[str]:
    """Fetch ``spec`` into ``directory`` from the first mirror that serves it intact.

    Returns ``[]`` on success, else one line per failed attempt. pooch downloads into a
    temporary file next to the target and moves it into place only if its checksum matches.
    """
    try:
        import pooch
    except ImportError as e:
        raise ImportError(
            f'downloading {spec.filename} needs pooch: pip install "dlrt-jax[mnist]" (or put the '
            f"verified file into {directory} yourself)"
        ) from e
    errors = []
    for mirror in mirrors:
        url = mirror + spec.filename if mirror.endswith("/") else f"{mirror}/{spec.filename}"
        logger.info("downloading %s -> %s", url, directory)
        try:
            pooch.retrieve(
                url,
                spec.known_hash,
                fname=spec.filename,
                path=directory,
                downloader=_copy_from_file_url if url.startswith("file:") else None,
            )
            return []
        except OSError as e:  # unreachable, HTTP error (requests' errors are OSErrors), no dir
            errors.append(f"{url}: {type(e).__name__}: {e}")
        except ValueError as e:  # pooch: checksum mismatch, download deleted
            errors.append(f"{url}: failed verification: {e}")
        logger.warning("download failed: %s", errors[-1])
    return errors or ["no download mirrors are registered for this dataset"]


def _parse_idx(path: Path) -> tuple[np.ndarray, int]:
    """The array in an IDX file (gzip or raw) and its magic number."""
    data = path.read_bytes()
    if data[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(data)
        except (EOFError, OSError, zlib.error) as e:
            raise CorruptDatasetError(
                f"{path}: bad gzip stream ({type(e).__name__}: {e}); the file is corrupt or "
                "truncated",
                path=path,
                problem="bad gzip",
            ) from e

    def corrupt(problem: str, detail: str) -> CorruptDatasetError:
        return CorruptDatasetError(f"{path}: {problem}: {detail}", path=path, problem=problem)

    if len(data) < 4:
        raise corrupt("too short", f"{len(data)} bytes, too short for an IDX header (truncated?)")
    magic, code, ndim = int.from_bytes(data[:4], "big"), data[2], data[3]
    if data[:2] != b"\0\0" or code not in _IDX_DTYPES or ndim == 0:
        raise corrupt(
            "bad magic",
            f"number {magic} (0x{magic:08X}); an IDX file starts with two zero bytes, a type code "
            "(0x08, 0x09, 0x0B, 0x0C, 0x0D or 0x0E) and a non-zero number of dimensions",
        )
    start = 4 + 4 * ndim
    if len(data) < start:
        raise corrupt("truncated IDX header", f"{ndim} dims need {start} header bytes")
    dims = tuple(int.from_bytes(data[4 * i + 4 : 4 * i + 8], "big") for i in range(ndim))
    dtype = np.dtype(_IDX_DTYPES[code])
    need, have = math.prod(dims) * dtype.itemsize, len(data) - start
    if have < need:
        raise corrupt(
            "truncated payload", f"header dims {dims} need {need} bytes, only {have} present"
        )
    if have > need:
        raise corrupt(
            "header dims",
            f"dims {dims} disagree with the payload length ({have - need} bytes follow the "
            f"{need}-byte payload)",
        )
    arr = np.frombuffer(data, dtype, offset=start, count=need // dtype.itemsize)
    return arr.reshape(dims).astype(dtype.newbyteorder("=")), magic


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Parse an IDX file (gzip-compressed or raw, told apart by its content) into numpy.

    Supports the type codes 0x08 (uint8), 0x09 (int8), 0x0B (int16), 0x0C (int32), 0x0D
    (float32) and 0x0E (float64); the result has native byte order and the header's shape.
    Raises :class:`CorruptDatasetError` for a bad magic number or gzip stream, a truncated header
    or payload, or trailing bytes, and ``FileNotFoundError`` if the file does not exist.

    Examples:
        >>> labels = read_idx("data/mnist/t10k-labels-idx1-ubyte.gz")  # doctest: +SKIP
        >>> labels.shape, labels.dtype  # doctest: +SKIP
        ((10000,), dtype('uint8'))
    """
    return _parse_idx(Path(path))[0]


# ---- loading ---------------------------------------------------------------------------------


class Dataset(NamedTuple):
    """Train and test split as numpy arrays: uint8 images ``(N, *shape)``, uint8 labels ``(N,)``.

    Examples:
        >>> ds = load_dataset("mnist")  # doctest: +SKIP
        >>> ds.train_images.shape, ds.test_labels.shape  # doctest: +SKIP
        ((60000, 28, 28), (10000,))
    """

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray


def load_dataset(
    name: str | IDXDataset = "mnist",
    data_dir: str | os.PathLike[str] | None = None,
    *,
    download: bool = True,
    verify: bool = True,
) -> Dataset:
    """Load a registered IDX dataset (default MNIST) as a :class:`Dataset` of numpy arrays.

    The data directory is ``data_dir``, else ``$DLRT_DATA_DIR``, else the user cache (see
    :func:`resolve_data_dir`); each file is looked up in ``<dir>/<name>/``, then in ``<dir>/``.
    With ``verify=True`` every file's size and checksums are checked before parsing. Missing
    files are downloaded into ``<dir>/<name>/`` when ``download=True`` (mirrors in order; a
    download is moved into place only once its checksum matches). A data directory given by
    ``data_dir`` or ``$DLRT_DATA_DIR`` must exist (only ``<dir>/<name>/`` is created in it); the
    default cache directory is created when needed.

    Raises:
        DatasetNotFoundError: files are missing and could not be downloaded, or a given data
            directory that would receive downloads does not exist.
        CorruptDatasetError: a file fails verification or parsing (it is never overwritten).
        ValueError: unknown dataset name.
        ImportError: a file must be downloaded and pooch is not installed.

    Examples:
        >>> ds = load_dataset("mnist", "/work/shared/data", download=False)  # doctest: +SKIP
        >>> ds.train_images.shape, ds.train_images.dtype  # doctest: +SKIP
        ((60000, 28, 28), dtype('uint8'))
    """
    spec = name if isinstance(name, IDXDataset) else get_dataset_spec(name)
    root, source = _resolve_data_dir(data_dir)
    home = root / spec.name
    paths = {}
    for role, fs in spec.files.items():
        found = [p for p in (home / fs.filename, root / fs.filename) if p.is_file()]
        if found:
            paths[role] = found[0]

    # Verify what is there before any download, so that a bad local file is reported as such.
    bad = [(p, why) for r, p in paths.items() if verify and (why := _check_file(p, spec.files[r]))]
    if bad:
        raise CorruptDatasetError(
            f"dataset {spec.name!r}: {len(bad)} file(s) failed verification:\n"
            + "".join(f"  {p}: {why}\n" for p, why in bad)
            + "They were NOT re-downloaded or overwritten. Delete "
            + ("it" if len(bad) == 1 else "them")
            + " (rm "
            + " ".join(f"'{p}'" for p, _ in bad)
            + ") and run again to download a fresh copy, or replace it with a verified copy.",
            path=bad[0][0] if len(bad) == 1 else None,
            problem="; ".join(f"{p.name}: {why}" for p, why in bad),
        )

    fetch = [r for r in ROLES if r not in paths and download]
    if fetch and source != _DEFAULT_SOURCE and not root.is_dir():  # never create a given dir
        raise DatasetNotFoundError(
            f"dataset {spec.name!r}: the data directory {root} (taken from {source}) does not "
            f"exist; nothing was created or downloaded. Create it (mkdir -p '{root}') to "
            f"download the files into {home}, or give the directory that holds '{spec.name}/'.",
            dataset=spec.name,
            missing=[spec.files[r].filename for r in fetch],
            directory=home,
        )
    attempts: dict[str, list[str]] = {}
    for role in fetch:
        attempts[role] = _download(spec.files[role], spec.mirrors, home)
        if not attempts[role]:
            paths[role] = home / spec.files[role].filename
    missing = [r for r in ROLES if r not in paths]
    if missing:
        raise DatasetNotFoundError(
            _not_found_message(spec, missing, root, home, source, download, attempts),
            dataset=spec.name,
            missing=[spec.files[r].filename for r in missing],
            directory=home,
        )

    def check(role: str, ok: bool, problem: str, detail: str) -> None:
        if not ok:
            msg = f"{paths[role]}: {detail} (dataset {spec.name!r})"
            raise CorruptDatasetError(msg, path=paths[role], problem=problem)

    arrays = {}
    for role in ROLES:
        arrays[role], magic = _parse_idx(paths[role])
        want = 0x0801 if role.endswith("labels") else 0x0801 + len(spec.shape)
        detail = f"bad magic number {magic} (0x{magic:08X}), expected {want} (0x{want:08X})"
        check(role, magic == want, "bad magic", f"{detail}: uint8, {want & 0xFF} dims")
    for split, n in (("train", spec.n_train), ("test", spec.n_test)):
        img, lab = arrays[f"{split}_images"].shape, arrays[f"{split}_labels"].shape
        detail = f"images have shape {img[1:]}, expected {spec.shape}"
        check(f"{split}_images", img[1:] == spec.shape, "image shape", detail)
        detail = (
            f"label count {lab[0]} ({split}) != image count {img[0]} in {paths[f'{split}_images']}"
        )
        check(f"{split}_labels", lab[0] == img[0], "label count != image count", detail)
        detail = f"{img[0]} {split} examples, expected {n}"
        check(f"{split}_images", img[0] == n, "example count", detail)
    return Dataset(*(arrays[r] for r in ROLES))


def _not_found_message(spec, roles, root, home, source, download, attempts) -> str:
    lines = [f"dataset {spec.name!r}: {len(roles)} file(s) missing:"]
    lines += [f"  {spec.files[r].filename}  ({spec.files[r].bytes} bytes)" for r in roles]
    lines += [
        f"Looked in {home} and {root} (data directory taken from {source}).",
        f"Put the files in: {home}",
        f"To use another data directory, set the {DATA_DIR_ENV_VAR} environment variable to a "
        f"directory containing '{spec.name}/', or pass data_dir=.",
        "Download mirrors (file URL = mirror + file name):",
        *(f"  {m}" for m in spec.mirrors or ["(none registered)"]),
    ]
    if not download:
        lines.append("Downloading was disabled (download=False).")
    else:
        lines.append("Every download attempt failed:")
        lines += [f"  {err}" for r in roles for err in attempts.get(r, ())]
    return "\n".join(lines)


# ---- training helpers ------------------------------------------------------------------------


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

    ``images`` has shape ``(N, ...)`` with integer pixel values in [0, 255]. With
    ``normalize=True`` the result is ``(x / 255 - mean) / std`` (MNIST defaults 0.1307, 0.3081).
    With ``flatten=True`` the result has shape ``(N, prod(...))``.

    Examples:
        >>> import numpy as np
        >>> x = preprocess(np.full((2, 28, 28), 255, np.uint8))
        >>> x.shape, x.dtype, float(x.max())
        ((2, 784), dtype('float32'), 1.0)
    """
    arr, dt = np.asarray(images), np.dtype(dtype)
    if arr.ndim < 2:
        raise ValueError(f"images must have shape (N, ...) with at least 2 dims, got {arr.shape}")
    if arr.dtype.kind not in "ui":
        raise ValueError(f"images must be integer pixels in [0, 255], got dtype {arr.dtype}")
    if arr.size and (arr.min() < 0 or arr.max() > 255):
        raise ValueError(f"pixel values must lie in [0, 255], got [{arr.min()}, {arr.max()}]")
    if dt.kind != "f":
        raise ValueError(f"dtype must be a floating dtype, got {dt}")
    out = arr.astype(dt) / dt.type(255)
    if normalize:
        if not (np.isfinite(std) and std > 0 and np.isfinite(mean)):
            raise ValueError(f"std must be positive and finite, mean finite; got {std}, {mean}")
        out = (out - dt.type(mean)) / dt.type(std)
    return out.reshape(arr.shape[0], -1) if flatten else out


def num_batches(n: int, batch_size: int, drop_last: bool = True) -> int:
    """Number of batches per epoch for ``n`` examples (floor if ``drop_last`` else ceil).

    Examples:
        >>> num_batches(10, 3), num_batches(10, 3, drop_last=False)
        (3, 4)
    """
    n, batch_size = _check_int(n, "n", 0), _check_int(batch_size, "batch_size", 1)
    return n // batch_size if drop_last else -(-n // batch_size)


def epoch_permutation(n: int, *, seed: int, epoch: int) -> np.ndarray:
    """The example order of one epoch: a permutation of ``range(n)`` fixed by ``(seed, epoch)``.

    Uses ``np.random.default_rng(np.random.SeedSequence((seed, epoch)))``, so the order is
    reproducible across runs and processes and can be recomputed when resuming.

    Examples:
        >>> p = epoch_permutation(5, seed=0, epoch=3)
        >>> sorted(p.tolist()) == [0, 1, 2, 3, 4]
        True
        >>> bool((p == epoch_permutation(5, seed=0, epoch=3)).all())
        True
    """
    n, seed, epoch = (
        _check_int(n, "n", 0),
        _check_int(seed, "seed", 0),
        _check_int(epoch, "epoch", 0),
    )
    return np.random.default_rng(np.random.SeedSequence((seed, epoch))).permutation(n)


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

    With ``shuffle=True`` the order is :func:`epoch_permutation` ``(len(x), seed, epoch)``, so
    batch ``k`` holds the same examples whether the epoch is iterated from the start or resumed
    with ``start_batch=k``. With ``drop_last=True`` a final incomplete batch is dropped;
    otherwise it is yielded (smaller). ``start_batch`` may equal :func:`num_batches` (nothing
    left). Arguments are validated when the function is called.

    Examples:
        >>> import numpy as np
        >>> x, y = np.arange(10), np.arange(10)
        >>> full = list(batch_iterator(x, y, 3, seed=0, epoch=1))
        >>> tail = list(batch_iterator(x, y, 3, seed=0, epoch=1, start_batch=1))
        >>> len(full), all((a[0] == b[0]).all() for a, b in zip(full[1:], tail))
        (3, True)
    """
    x, y = np.asarray(x), np.asarray(y)
    if x.ndim < 1 or y.ndim < 1 or x.shape[0] != y.shape[0]:
        raise ValueError(f"x and y must have the same length, got shapes {x.shape}, {y.shape}")
    n = x.shape[0]
    total = num_batches(n, batch_size, drop_last)
    start_batch = _check_int(start_batch, "start_batch", 0)
    order = epoch_permutation(n, seed=seed, epoch=epoch) if shuffle else np.arange(n)
    if start_batch > total:
        raise ValueError(
            f"start_batch={start_batch} is past the end of the epoch ({total} batches of "
            f"{batch_size} from {n} examples, drop_last={drop_last})"
        )
    chunks = (order[b * batch_size : (b + 1) * batch_size] for b in range(start_batch, total))
    return ((x[idx], y[idx]) for idx in chunks)
