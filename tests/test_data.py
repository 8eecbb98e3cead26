"""Tests for dlrt_jax.mnist.data: IDX parsing, verification, download, loading and batching.

No network: downloads (through pooch) are exercised against a local ``http.server`` on
127.0.0.1 and against ``file://`` mirrors that the tests write themselves.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import http.server
import os
import re
import socket
import struct
import sys
import threading
import uuid
from pathlib import Path

import numpy as np
import pytest

from dlrt_jax.mnist.data import (
    DATA_DIR_ENV_VAR,
    MNIST_MEAN,
    MNIST_STD,
    ROLES,
    CorruptDatasetError,
    Dataset,
    DatasetNotFoundError,
    FileSpec,
    IDXDataset,
    batch_iterator,
    epoch_permutation,
    get_dataset_spec,
    list_datasets,
    load_dataset,
    num_batches,
    preprocess,
    read_idx,
    register_dataset,
    resolve_data_dir,
    unregister_dataset,
)

MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]

# --------------------------------------------------------------------------------------------
# Helpers: synthetic IDX files
# --------------------------------------------------------------------------------------------

CODES = {
    np.dtype(np.uint8): 0x08,
    np.dtype(np.int8): 0x09,
    np.dtype(np.int16): 0x0B,
    np.dtype(np.int32): 0x0C,
    np.dtype(np.float32): 0x0D,
    np.dtype(np.float64): 0x0E,
}

FILENAMES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}
N_TRAIN, N_TEST, SHAPE = 6, 4, (4, 3)


def idx_raw(arr: np.ndarray, *, code: int | None = None, dims=None, magic=None) -> bytes:
    """Encode ``arr`` as raw IDX (written by hand, independent of the code under test)."""
    arr = np.asarray(arr)
    code = CODES[arr.dtype] if code is None else code
    dims = arr.shape if dims is None else dims
    head = struct.pack(">I", magic) if magic is not None else bytes([0, 0, code, len(dims)])
    head += struct.pack(f">{len(dims)}I", *dims)
    return head + arr.astype(arr.dtype.newbyteorder(">")).tobytes()


def gz(data: bytes) -> bytes:
    return gzip.compress(data, mtime=0)


def make_arrays(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "train_images": rng.integers(0, 256, (N_TRAIN, *SHAPE), dtype=np.uint8),
        "train_labels": rng.integers(0, 10, N_TRAIN, dtype=np.uint8),
        "test_images": rng.integers(0, 256, (N_TEST, *SHAPE), dtype=np.uint8),
        "test_labels": rng.integers(0, 10, N_TEST, dtype=np.uint8),
    }


def make_blobs(arrays: dict[str, np.ndarray]) -> dict[str, bytes]:
    return {role: gz(idx_raw(a)) for role, a in arrays.items()}


def make_spec(name: str, blobs: dict[str, bytes], mirrors=(), sha256=True) -> IDXDataset:
    files = {
        role: FileSpec(
            FILENAMES[role],
            len(blob),
            hashlib.md5(blob).hexdigest(),
            hashlib.sha256(blob).hexdigest() if sha256 else None,
        )
        for role, blob in blobs.items()
    }
    return IDXDataset(name, files, list(mirrors), N_TRAIN, N_TEST, SHAPE)


def write_blobs(directory: Path, blobs: dict[str, bytes]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for role, blob in blobs.items():
        (directory / FILENAMES[role]).write_bytes(blob)


def flip_byte(blob: bytes, pos: int | None = None) -> bytes:
    pos = len(blob) // 2 if pos is None else pos
    b = bytearray(blob)
    b[pos] ^= 0xFF
    return bytes(b)


@pytest.fixture
def registered():
    """Register test-only datasets under unique names; unregister them afterwards."""
    names = []

    def _register(blobs, mirrors=(), sha256=True):
        spec = make_spec(f"synth_{uuid.uuid4().hex[:10]}", blobs, mirrors, sha256)
        register_dataset(spec)
        names.append(spec.name)
        return spec

    yield _register
    for name in names:
        unregister_dataset(name)


@pytest.fixture
def no_proxy(monkeypatch):
    """Make sure urllib talks to 127.0.0.1 directly, never through a proxy."""
    for var in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")


@pytest.fixture
def http_server(no_proxy):
    """A local HTTP server on 127.0.0.1 (ephemeral port) serving ``routes[path] = bytes``."""
    routes: dict[str, bytes] = {}
    requests: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server API)
            requests.append(self.path)
            body = routes.get(self.path)
            if body is None:
                self.send_error(404)
                return
            announced = len(body)
            if isinstance(body, tuple):  # (announced length, body): the connection drops early
                announced, body = body
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(announced))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    )
    thread.start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield base, routes, requests
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def closed_port_url() -> str:
    """A base URL on 127.0.0.1 whose port nobody listens on (connection refused)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/mnist/"


def all_files(directory: Path) -> list[str]:
    """Every file under ``directory`` (a download leaves no temporary or partial file)."""
    if not directory.exists():
        return []
    return sorted(p.name for p in directory.rglob("*") if p.is_file())


# --------------------------------------------------------------------------------------------
# Real MNIST (from $DLRT_DATA_DIR)
# --------------------------------------------------------------------------------------------

needs_data_dir = pytest.mark.skipif(
    not os.environ.get(DATA_DIR_ENV_VAR),
    reason=f"{DATA_DIR_ENV_VAR} is not set (point it at a directory containing mnist/)",
)


@needs_data_dir
def test_load_real_mnist():
    ds = load_dataset("mnist", download=False)
    assert isinstance(ds, Dataset)
    assert ds.train_images.shape == (60000, 28, 28)
    assert ds.test_images.shape == (10000, 28, 28)
    assert ds.train_labels.shape == (60000,)
    assert ds.test_labels.shape == (10000,)
    for a in ds:
        assert a.dtype == np.uint8
    assert np.bincount(ds.train_labels, minlength=10).tolist() == MNIST_TRAIN_COUNTS
    assert np.bincount(ds.test_labels, minlength=10).tolist() == MNIST_TEST_COUNTS
    for images in (ds.train_images, ds.test_images):
        assert images.min() == 0 and images.max() == 255
    # The published normalisation constants are the statistics of the training pixels.
    x = preprocess(ds.train_images)
    assert x.shape == (60000, 784) and x.dtype == np.float32
    assert abs(float(x.mean()) - MNIST_MEAN) < 1e-3
    assert abs(float(x.std()) - MNIST_STD) < 1e-3


@needs_data_dir
def test_mnist_registry_matches_readme_checksums():
    readme = Path(os.environ[DATA_DIR_ENV_VAR]) / "README.md"
    if not readme.is_file():
        pytest.skip(f"no README.md in {DATA_DIR_ENV_VAR}")
    block = re.search(r"```checksums\n(.*?)```", readme.read_text(), re.S)
    assert block, "README.md has no ```checksums block"
    table = {}
    for line in block.group(1).strip().splitlines():
        path, size, md5, sha, _ = line.split()
        table[path] = (int(size), md5, sha)
    spec = get_dataset_spec("mnist")
    for fs in spec.files.values():
        assert table[f"mnist/{fs.filename}"] == (fs.bytes, fs.md5, fs.sha256)


def test_registry_contents():
    assert {"mnist", "fashion_mnist"} <= set(list_datasets())
    fm = get_dataset_spec("fashion_mnist")
    assert fm.files["train_images"].md5 == "8d4fb7e6c68d591d4c3dfef9ec88bf0d"
    assert fm.files["train_labels"].md5 == "25c81989df183df01b3e8a0aad5dffbe"
    assert fm.files["test_images"].md5 == "bef4ecab320f06d8554ea6380940ec79"
    assert fm.files["test_labels"].md5 == "bb300cfdad3c16e7a12a480ee83cd310"
    assert any("fashion-mnist" in m for m in fm.mirrors)
    mn = get_dataset_spec("mnist")
    assert "https://ossci-datasets.s3.amazonaws.com/mnist/" in mn.mirrors
    assert mn.files["train_images"].filename == "train-images-idx3-ubyte.gz"
    assert (mn.n_train, mn.n_test, mn.shape) == (60000, 10000, (28, 28))


# --------------------------------------------------------------------------------------------
# Registry and argument validation
# --------------------------------------------------------------------------------------------


def test_register_validation(registered):
    blobs = make_blobs(make_arrays())
    spec = registered(blobs)
    with pytest.raises(ValueError, match="already registered"):
        register_dataset(spec)
    register_dataset(spec, overwrite=True)
    with pytest.raises(ValueError, match="built-in"):
        register_dataset(
            IDXDataset("mnist", get_dataset_spec("mnist").files, [], 1, 1), overwrite=True
        )
    with pytest.raises(ValueError, match="unknown dataset 'nope'"):
        load_dataset("nope")
    with pytest.raises(ValueError, match="md5"):
        FileSpec("a.gz", 1, "xyz")
    with pytest.raises(ValueError, match="plain file name"):
        FileSpec("../a.gz", 1, "0" * 32)
    with pytest.raises(ValueError, match="roles"):
        IDXDataset("x", {"train_images": FileSpec("a", 1, "0" * 32)}, [], 1, 1)
    with pytest.raises(ValueError, match="URL"):
        IDXDataset("x", spec.files, ["ftp://example.org/"], 1, 1)
    with pytest.raises(ValueError, match="name"):
        IDXDataset("../x", spec.files, [], 1, 1)


def test_resolve_data_dir(monkeypatch, tmp_path):
    monkeypatch.setenv(DATA_DIR_ENV_VAR, str(tmp_path / "env"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert resolve_data_dir(tmp_path / "arg") == tmp_path / "arg"
    assert resolve_data_dir() == tmp_path / "env"
    monkeypatch.delenv(DATA_DIR_ENV_VAR)
    assert resolve_data_dir() == tmp_path / "xdg" / "dlrt_jax"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert resolve_data_dir() == tmp_path / "home" / ".cache" / "dlrt_jax"


# --------------------------------------------------------------------------------------------
# Loading synthetic datasets: layouts, corruption, missing files
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["subdir", "flat"])
def test_load_synthetic(tmp_path, registered, layout):
    arrays = make_arrays()
    blobs = make_blobs(arrays)
    spec = registered(blobs)
    write_blobs(tmp_path / spec.name if layout == "subdir" else tmp_path, blobs)
    ds = load_dataset(spec.name, tmp_path, download=False)
    for role in ROLES:
        got = getattr(ds, role)
        np.testing.assert_array_equal(got, arrays[role])
        assert got.dtype == np.uint8


def test_load_uses_env_var(tmp_path, registered, monkeypatch):
    arrays = make_arrays()
    blobs = make_blobs(arrays)
    spec = registered(blobs)
    write_blobs(tmp_path / spec.name, blobs)
    monkeypatch.setenv(DATA_DIR_ENV_VAR, str(tmp_path))
    ds = load_dataset(spec.name, download=False)
    np.testing.assert_array_equal(ds.test_labels, arrays["test_labels"])


def test_flipped_byte_is_md5_mismatch_and_file_kept(tmp_path, registered, http_server):
    base, routes, requests = http_server
    blobs = make_blobs(make_arrays())
    for role, blob in blobs.items():
        routes[f"/good/{FILENAMES[role]}"] = blob
    spec = registered(blobs, mirrors=[f"{base}/good/"], sha256=False)  # md5 alone must catch it
    bad = dict(blobs, train_images=flip_byte(blobs["train_images"]))
    write_blobs(tmp_path / spec.name, bad)
    path = tmp_path / spec.name / FILENAMES["train_images"]
    with pytest.raises(CorruptDatasetError) as exc:
        load_dataset(spec.name, tmp_path, download=True)
    msg = str(exc.value)
    assert str(path) in msg and "md5 is" in msg
    assert "NOT re-downloaded" in msg and "Delete it" in msg
    assert exc.value.path == path
    # Never silently re-downloaded over the user's file.
    assert path.read_bytes() == bad["train_images"]
    assert requests == []


def test_sha256_mismatch(tmp_path, registered):
    blobs = make_blobs(make_arrays())
    spec = registered(blobs)
    files = dict(spec.files)
    files["test_labels"] = dataclasses.replace(files["test_labels"], sha256="0" * 64)
    spec = register_dataset(dataclasses.replace(spec, files=files), overwrite=True)
    write_blobs(tmp_path / spec.name, blobs)
    with pytest.raises(CorruptDatasetError, match=r"t10k-labels-idx1-ubyte\.gz: sha256 is"):
        load_dataset(spec.name, tmp_path, download=False)
    load_dataset(spec.name, tmp_path, download=False, verify=False)  # parsing itself is fine


def test_truncated_file(tmp_path, registered):
    blobs = make_blobs(make_arrays())
    spec = registered(blobs)
    bad = dict(blobs, test_images=blobs["test_images"][:-10])
    write_blobs(tmp_path / spec.name, bad)
    with pytest.raises(CorruptDatasetError, match=r"t10k-images-idx3-ubyte\.gz.*size is"):
        load_dataset(spec.name, tmp_path, download=False)
    # Without checksum verification the parser still refuses the truncated stream.
    with pytest.raises(CorruptDatasetError, match=r"t10k-images-idx3-ubyte\.gz.*bad gzip"):
        load_dataset(spec.name, tmp_path, download=False, verify=False)


def _labels_count_mismatch(arrays):
    return dict(arrays, train_labels=arrays["train_labels"][:-1])


# Each case builds files that are wrong in one way; the registered checksums are those of the
# wrong files, so verification passes and the parser must catch the problem by itself.
PARSE_CASES = {
    "bad_magic": (
        lambda a: {
            **make_blobs(a),
            "train_images": gz(idx_raw(a["train_images"], magic=0x12340803)),
        },
        "train_images",
        "bad magic",
    ),
    "labels_with_image_magic": (
        lambda a: {**make_blobs(a), "test_labels": gz(idx_raw(a["test_images"]))},
        "test_labels",
        "bad magic.*expected 2049",
    ),
    "labels_int32": (
        lambda a: {
            **make_blobs(a),
            "train_labels": gz(idx_raw(a["train_labels"].astype(np.int32))),
        },
        "train_labels",
        "bad magic number 3073 .*expected 2049",
    ),
    "header_dims_too_large": (
        lambda a: {
            **make_blobs(a),
            "train_images": gz(idx_raw(a["train_images"], dims=(N_TRAIN + 1, *SHAPE))),
        },
        "train_images",
        "truncated payload",
    ),
    "header_dims_too_small": (
        lambda a: {
            **make_blobs(a),
            "test_images": gz(idx_raw(a["test_images"], dims=(N_TEST - 1, *SHAPE))),
        },
        "test_images",
        "disagree with the payload length",
    ),
    "truncated_payload_raw_in_gzip": (
        lambda a: {**make_blobs(a), "train_labels": gz(idx_raw(a["train_labels"])[:-3])},
        "train_labels",
        "truncated payload",
    ),
    "bad_gzip": (
        lambda a: {**make_blobs(a), "test_labels": b"\x1f\x8b\x08\x00" + bytes(range(60))},
        "test_labels",
        "bad gzip",
    ),
    "bad_gzip_crc": (
        lambda a: {
            **make_blobs(a),
            "train_labels": flip_byte(make_blobs(a)["train_labels"], -6),
        },
        "train_labels",
        "bad gzip",
    ),
    "label_count_mismatch": (
        lambda a: make_blobs(_labels_count_mismatch(a)),
        "train_labels",
        "label count 5 .* != image count 6",
    ),
    "wrong_image_shape": (
        lambda a: {
            **make_blobs(a),
            "test_images": gz(idx_raw(a["test_images"].reshape(N_TEST, 3, 4))),
        },
        "test_images",
        r"shape \(3, 4\), expected \(4, 3\)",
    ),
    "wrong_example_count": (
        lambda a: make_blobs({k: v[:-1] for k, v in a.items()}),
        "train_images",
        "5 train examples, expected 6",
    ),
}


@pytest.mark.parametrize("case", list(PARSE_CASES))
def test_corrupt_content_detected(tmp_path, registered, case):
    build, role, pattern = PARSE_CASES[case]
    blobs = build(make_arrays())
    spec = registered(blobs)
    write_blobs(tmp_path / spec.name, blobs)
    for verify in (True, False):
        with pytest.raises(CorruptDatasetError) as exc:
            load_dataset(spec.name, tmp_path, download=False, verify=verify)
        msg = str(exc.value)
        assert FILENAMES[role] in msg, msg
        assert re.search(pattern, msg), msg


def test_missing_files_download_disabled(tmp_path, registered):
    blobs = make_blobs(make_arrays())
    spec = registered(blobs, mirrors=["https://mirror.invalid/data/"])
    write_blobs(tmp_path / spec.name, {"test_labels": blobs["test_labels"]})
    with pytest.raises(DatasetNotFoundError) as exc:
        load_dataset(spec.name, tmp_path, download=False)
    err = exc.value
    assert isinstance(err, FileNotFoundError)
    msg = str(err)
    for role in ("train_images", "train_labels", "test_images"):
        assert FILENAMES[role] in msg
    assert "t10k-labels" not in msg  # present files are not reported missing
    assert f"Put the files in: {tmp_path / spec.name}" in msg
    assert DATA_DIR_ENV_VAR in msg
    assert "https://mirror.invalid/data/" in msg
    assert "download=False" in msg
    assert err.directory == tmp_path / spec.name
    assert sorted(err.missing) == sorted(FILENAMES[r] for r in ROLES[:3])


def test_missing_files_mirrors_unreachable(tmp_path, registered, no_proxy):
    blobs = make_blobs(make_arrays())
    dead = [closed_port_url(), closed_port_url()]
    spec = registered(blobs, mirrors=dead)
    with pytest.raises(DatasetNotFoundError) as exc:
        load_dataset(spec.name, tmp_path, download=True)
    msg = str(exc.value)
    for role in ROLES:
        assert FILENAMES[role] in msg
        for mirror in dead:
            assert mirror + FILENAMES[role] in msg  # every attempt is reported
    assert f"Put the files in: {tmp_path / spec.name}" in msg
    assert DATA_DIR_ENV_VAR in msg
    assert all_files(tmp_path) == []


# --------------------------------------------------------------------------------------------
# Download from a local HTTP server
# --------------------------------------------------------------------------------------------


def test_download_verifies_and_falls_back(tmp_path, registered, http_server):
    base, routes, requests = http_server
    arrays = make_arrays(seed=3)
    blobs = make_blobs(arrays)
    for role, blob in blobs.items():
        fn = FILENAMES[role]
        routes[f"/good/{fn}"] = blob
        routes[f"/bad/{fn}"] = flip_byte(blob)  # same size, wrong md5
        routes[f"/short/{fn}"] = blob[:-1]  # wrong size
    mirrors = [closed_port_url(), f"{base}/missing/", f"{base}/short/", f"{base}/bad/"]
    mirrors.append(f"{base}/good")  # no trailing slash: still joined correctly
    spec = registered(blobs, mirrors=mirrors)
    ds = load_dataset(spec.name, tmp_path, download=True)
    for role in ROLES:
        np.testing.assert_array_equal(getattr(ds, role), arrays[role])
        assert (tmp_path / spec.name / FILENAMES[role]).read_bytes() == blobs[role]
    # Every file was tried on each live mirror in order before the good one.
    for role in ROLES:
        fn = FILENAMES[role]
        tried = [r for r in requests if r.endswith(fn)]
        assert tried == [f"/missing/{fn}", f"/short/{fn}", f"/bad/{fn}", f"/good/{fn}"]
    assert all_files(tmp_path) == sorted(FILENAMES.values())  # nothing else left behind
    # A second load uses the files on disk, no network.
    n_requests = len(requests)
    load_dataset(spec.name, tmp_path, download=True)
    assert len(requests) == n_requests


def test_download_rejects_corrupt_mirror(tmp_path, registered, http_server):
    base, routes, requests = http_server
    blobs = make_blobs(make_arrays())
    for role, blob in blobs.items():
        routes[f"/bad/{FILENAMES[role]}"] = flip_byte(blob)
    spec = registered(blobs, mirrors=[f"{base}/bad/"])
    with pytest.raises(DatasetNotFoundError) as exc:
        load_dataset(spec.name, tmp_path, download=True)
    msg = str(exc.value)
    assert "failed verification" in msg and "does not match the known hash" in msg
    assert all_files(tmp_path) == []
    assert len(requests) == 4


def test_download_only_missing_files(tmp_path, registered, http_server):
    base, routes, requests = http_server
    arrays = make_arrays()
    blobs = make_blobs(arrays)
    for role, blob in blobs.items():
        routes[f"/m/{FILENAMES[role]}"] = blob
    spec = registered(blobs, mirrors=[f"{base}/m/"])
    write_blobs(tmp_path / spec.name, {k: v for k, v in blobs.items() if k != "test_images"})
    ds = load_dataset(spec.name, tmp_path)
    np.testing.assert_array_equal(ds.test_images, arrays["test_images"])
    assert requests == [f"/m/{FILENAMES['test_images']}"]


def test_interrupted_download_leaves_no_partial_file(tmp_path, registered, http_server):
    base, routes, requests = http_server
    blobs = make_blobs(make_arrays())
    for role, blob in blobs.items():  # half the bytes arrive, then the connection closes
        routes[f"/drop/{FILENAMES[role]}"] = (len(blob), blob[: len(blob) // 2])
    spec = registered(blobs, mirrors=[f"{base}/drop/"])
    with pytest.raises(DatasetNotFoundError) as exc:
        load_dataset(spec.name, tmp_path)
    assert f"{base}/drop/{FILENAMES['train_images']}" in str(exc.value)
    assert len(requests) == 4
    assert all_files(tmp_path) == []


def test_file_url_mirrors(tmp_path, registered, caplog):
    arrays = make_arrays(seed=5)
    blobs = make_blobs(arrays)
    write_blobs(tmp_path / "bad", {r: flip_byte(b) for r, b in blobs.items()})
    write_blobs(tmp_path / "good", blobs)
    mirrors = [(tmp_path / d).as_uri() + "/" for d in ("absent", "bad", "good")]
    spec = registered(blobs, mirrors=mirrors)
    cache = tmp_path / "cache"
    cache.mkdir()
    with caplog.at_level("INFO", logger="dlrt_jax.mnist.data"):
        ds = load_dataset(spec.name, cache)
    for role in ROLES:
        np.testing.assert_array_equal(getattr(ds, role), arrays[role])
    assert all_files(cache) == sorted(FILENAMES.values())
    tried = [r.getMessage() for r in caplog.records if r.getMessage().startswith("downloading")]
    assert len(tried) == 12 and all(
        m.startswith(f"downloading {mirrors[i % 3]}") for i, m in enumerate(tried)
    )


def test_without_pooch(tmp_path, registered, monkeypatch):
    monkeypatch.setitem(sys.modules, "pooch", None)  # `import pooch` now raises ImportError
    arrays = make_arrays()
    blobs = make_blobs(arrays)
    spec = registered(blobs, mirrors=[(tmp_path / "m").as_uri()])
    (tmp_path / "cache").mkdir()
    with pytest.raises(ImportError, match=r'pip install "dlrt-jax\[mnist\]"'):
        load_dataset(spec.name, tmp_path / "cache")
    write_blobs(tmp_path / "cache" / spec.name, blobs)  # files in place: no pooch needed
    ds = load_dataset(spec.name, tmp_path / "cache")
    np.testing.assert_array_equal(ds.train_images, arrays["train_images"])


# --------------------------------------------------------------------------------------------
# read_idx
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", list(CODES), ids=lambda d: d.name)
@pytest.mark.parametrize("compressed", [True, False], ids=["gz", "raw"])
def test_read_idx_dtypes(tmp_path, dtype, compressed):
    rng = np.random.default_rng(1)
    if dtype.kind == "f":
        arr = rng.normal(size=(3, 5, 2)).astype(dtype) * 1e3
        arr.flat[:3] = [np.inf, -0.0, np.finfo(dtype).max]
    else:
        info = np.iinfo(dtype)
        arr = rng.integers(info.min, info.max, size=(3, 5, 2), dtype=dtype, endpoint=True)
        arr.flat[:2] = [info.min, info.max]
    data = idx_raw(arr)
    path = tmp_path / ("a.idx.gz" if compressed else "a.idx")
    path.write_bytes(gz(data) if compressed else data)
    got = read_idx(path)
    assert got.dtype == dtype and got.dtype.isnative
    assert got.shape == arr.shape
    np.testing.assert_array_equal(got, arr)
    assert got.flags.writeable


def test_read_idx_shapes_and_errors(tmp_path):
    p = tmp_path / "x.idx"
    p.write_bytes(idx_raw(np.zeros((0,), np.uint8)))
    assert read_idx(p).shape == (0,)
    arr = np.arange(2 * 3 * 4 * 5, dtype=np.int16).reshape(2, 3, 4, 5)
    p.write_bytes(idx_raw(arr))
    np.testing.assert_array_equal(read_idx(p), arr)

    bad = {
        b"": "too short",
        b"\x00\x00\x0a\x01\x00\x00\x00\x01\x00": "bad magic",  # unknown type code
        b"\x00\x00\x08\x00": "bad magic",  # zero dimensions
        b"\x01\x00\x08\x01\x00\x00\x00\x01\x00": "bad magic",  # non-zero leading bytes
        b"\x00\x00\x08\x02\x00\x00\x00\x01": "truncated IDX header",
        b"\x00\x00\x0c\x01\x00\x00\x00\x02\x00\x00\x00\x01": "truncated payload",
        b"\x00\x00\x08\x01\x00\x00\x00\x01\x07\x08": "disagree with the payload length",
    }
    for content, pattern in bad.items():
        for data in (content, gz(content)):
            p.write_bytes(data)
            with pytest.raises(CorruptDatasetError, match=pattern) as exc:
                read_idx(p)
            assert str(p) in str(exc.value)
    with pytest.raises(FileNotFoundError):
        read_idx(tmp_path / "nope.idx")


# --------------------------------------------------------------------------------------------
# preprocess
# --------------------------------------------------------------------------------------------


def test_preprocess():
    imgs = np.array([[[0, 255], [51, 102]]], dtype=np.uint8)
    x = preprocess(imgs)
    assert x.shape == (1, 4) and x.dtype == np.float32
    np.testing.assert_allclose(x, [[0.0, 1.0, 0.2, 0.4]], rtol=1e-6)
    x = preprocess(imgs, flatten=False, dtype=np.float64)
    assert x.shape == (1, 2, 2) and x.dtype == np.float64
    x = preprocess(imgs, normalize=True)
    np.testing.assert_allclose(
        x, (np.array([[0.0, 1.0, 0.2, 0.4]]) - MNIST_MEAN) / MNIST_STD, rtol=1e-5
    )
    assert x.dtype == np.float32
    with pytest.raises(ValueError, match="integer"):
        preprocess(imgs.astype(np.float32))
    with pytest.raises(ValueError, match="floating"):
        preprocess(imgs, dtype=np.int32)
    with pytest.raises(ValueError, match=r"\[0, 255\]"):
        preprocess(np.array([[300]], dtype=np.int32))
    with pytest.raises(ValueError, match="std"):
        preprocess(imgs, normalize=True, std=0.0)
    with pytest.raises(ValueError, match="at least 2 dims"):
        preprocess(np.zeros(3, np.uint8))


# --------------------------------------------------------------------------------------------
# Batching
# --------------------------------------------------------------------------------------------


def _collect(*args, **kwargs):
    return [(xb.copy(), yb.copy()) for xb, yb in batch_iterator(*args, **kwargs)]


def test_num_batches():
    assert num_batches(10, 3) == 3
    assert num_batches(10, 3, drop_last=False) == 4
    assert num_batches(9, 3, False) == 3
    assert num_batches(0, 4, False) == 0
    with pytest.raises(ValueError, match="batch_size"):
        num_batches(10, 0)
    with pytest.raises(ValueError, match="`n` must be an integer >= 0, got -1"):
        num_batches(-1, 2)


def test_batch_iterator_determinism_and_coverage():
    x = np.arange(103 * 2).reshape(103, 2)
    y = np.arange(103)
    a = _collect(x, y, 10, seed=7, epoch=2)
    b = _collect(x, y, 10, seed=7, epoch=2)
    assert len(a) == 10
    for (xa, ya), (xb, yb) in zip(a, b, strict=True):
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)
        np.testing.assert_array_equal(xa[:, 0] // 2, ya)  # x and y stay aligned
        assert len(ya) == 10
    seen = np.concatenate([yb for _, yb in a])
    assert len(np.unique(seen)) == 100  # no repeats within an epoch
    order = np.concatenate([yb for _, yb in a])
    np.testing.assert_array_equal(order, epoch_permutation(103, seed=7, epoch=2)[:100])
    assert not np.array_equal(order, np.arange(100))  # actually shuffled


def test_batch_iterator_resume_equals_tail():
    x = np.arange(50)
    y = -np.arange(50)
    full = _collect(x, y, 8, seed=1, epoch=4, drop_last=False)
    assert len(full) == 7
    for k in range(len(full) + 1):
        tail = _collect(x, y, 8, seed=1, epoch=4, drop_last=False, start_batch=k)
        assert len(tail) == len(full) - k
        for (xf, yf), (xt, yt) in zip(full[k:], tail, strict=True):
            np.testing.assert_array_equal(xf, xt)
            np.testing.assert_array_equal(yf, yt)
    with pytest.raises(ValueError, match="past the end"):
        batch_iterator(x, y, 8, seed=1, epoch=4, drop_last=False, start_batch=8)


def test_batch_iterator_epochs_and_seeds_differ():
    x = y = np.arange(64)
    orders = {
        (s, e): np.concatenate([yb for _, yb in batch_iterator(x, y, 16, seed=s, epoch=e)])
        for s in (0, 1)
        for e in (0, 1, 2)
    }
    keys = list(orders)
    for i in range(len(keys)):
        for j in range(i + 1, len(keys)):
            assert not np.array_equal(orders[keys[i]], orders[keys[j]]), (keys[i], keys[j])
    for o in orders.values():
        np.testing.assert_array_equal(np.sort(o), x)


def test_batch_iterator_drop_last_and_no_shuffle():
    x = np.arange(10)
    y = np.arange(10) * 10
    kept = _collect(x, y, 4, seed=0, epoch=0, drop_last=True)
    assert [len(xb) for xb, _ in kept] == [4, 4]
    allb = _collect(x, y, 4, seed=0, epoch=0, drop_last=False)
    assert [len(xb) for xb, _ in allb] == [4, 4, 2]
    np.testing.assert_array_equal(np.sort(np.concatenate([xb for xb, _ in allb])), x)
    for (xk, _), (xa, _) in zip(kept, allb[:2], strict=True):
        np.testing.assert_array_equal(xk, xa)  # drop_last only removes the tail
    plain = _collect(x, y, 4, seed=0, epoch=0, shuffle=False, drop_last=False)
    np.testing.assert_array_equal(np.concatenate([xb for xb, _ in plain]), x)
    np.testing.assert_array_equal(np.concatenate([yb for _, yb in plain]), y)
    assert _collect(x[:3], y[:3], 4, seed=0, epoch=0) == []


def test_batch_iterator_validation():
    x = np.arange(10)
    with pytest.raises(ValueError, match="batch_size"):
        batch_iterator(x, x, 0, seed=0, epoch=0)
    with pytest.raises(ValueError, match="batch_size"):
        batch_iterator(x, x, 2.5, seed=0, epoch=0)
    with pytest.raises(ValueError, match="same length"):
        batch_iterator(x, x[:9], 2, seed=0, epoch=0)
    with pytest.raises(ValueError, match="epoch"):
        batch_iterator(x, x, 2, seed=0, epoch=-1)
    with pytest.raises(ValueError, match="seed"):
        batch_iterator(x, x, 2, seed=-3, epoch=0)
    with pytest.raises(ValueError, match="start_batch"):
        batch_iterator(x, x, 2, seed=0, epoch=0, start_batch=-1)


# --------------------------------------------------------------------------------------------
# issue 17, problem 7: small problems
# --------------------------------------------------------------------------------------------


def test_nonexistent_data_dir_fails_before_creating_anything(tmp_path, registered, monkeypatch):
    spec = registered(make_blobs(make_arrays()), mirrors=[(tmp_path / "m").as_uri()])
    missing = tmp_path / "nonexistent"
    with pytest.raises(DatasetNotFoundError, match=r"nonexistent .*does not exist.*mkdir -p"):
        load_dataset(spec.name, missing)
    monkeypatch.setenv(DATA_DIR_ENV_VAR, str(missing))
    with pytest.raises(DatasetNotFoundError, match=rf"\${DATA_DIR_ENV_VAR}\) does not exist"):
        load_dataset(spec.name)
    assert not missing.exists()  # was: <dir>/<name>/ created before the download failed


def test_mnist_package_lists_its_modules():
    import dlrt_jax.mnist

    assert dir(dlrt_jax.mnist) == dlrt_jax.mnist.__all__ == ["data", "models", "train"]
    assert dlrt_jax.mnist.data is sys.modules["dlrt_jax.mnist.data"]
    assert dlrt_jax.mnist.models.init_mlp is sys.modules["dlrt_jax.mnist.models"].init_mlp
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        dlrt_jax.mnist.nope  # noqa: B018


def test_benchmarks_readme_names_no_machines_data_path():
    text = (Path(__file__).resolve().parents[1] / "benchmarks" / "README.md").read_text()
    assert "/work/shared" not in text and "$DLRT_DATA_DIR" in text
