"""Offline byte-level corpora for ``benchmarks/transformer.py``: text that ships with Python.

* **code** (pretraining): the source of 58 standard-library modules, ``<stdlib>/NAME.py`` or
  ``<stdlib>/NAME/__init__.py`` for the names in :data:`CODE_MODULES` (modules that exist in
  Python 3.11 to 3.13; ``zipfile`` and ``pathlib`` became packages on the way, hence the two forms),
  in that (sorted) order. About 2.0 MB with Python 3.11.7.
* **docs** (fine-tuning): the English text of Python's documentation topics that ``help()``
  shows, ``pydoc_data.topics.topics`` (the dict in ``<stdlib>/pydoc_data/topics.py``), its values
  joined in sorted key order and encoded as UTF-8. About 0.47 MB with Python 3.11.7.

``<stdlib>`` is ``sysconfig.get_paths()["stdlib"]``. Each document is split at 90 % of its bytes:
the head goes to the training stream, the tail to the validation stream, so validation text is
unseen but from every document. Tokens are bytes (vocabulary 256).

The files differ between Python releases, so :data:`PINNED` holds the size and SHA-256 of every
file per exact Python version the README's tables were made with. :func:`load` checks them: for a
pinned version any difference is an error (``CorpusMismatch``, listing the files); for another
version it records the checksums (in the results JSON) and says that the text is not the pinned
one. ``python benchmarks/_corpus.py`` prints the manifest of this interpreter.
"""

from __future__ import annotations

import hashlib
import json
import platform
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np

CODE_MODULES = (
    "abc argparse ast base64 bisect calendar collections colorsys configparser contextlib copy "
    "csv dataclasses datetime difflib email enum fnmatch fractions functools glob gzip heapq "
    "hmac inspect ipaddress json logging numbers operator pathlib pprint queue random sched "
    "secrets selectors shlex shutil signal statistics string struct tarfile tempfile textwrap "
    "threading timeit tokenize trace traceback types typing uuid warnings weakref zipapp zipfile"
).split()

DOCS_FILE = "pydoc_data/topics.py"
VAL_FRACTION = 0.1

# size and SHA-256 of every source file, per exact Python version (python benchmarks/_corpus.py)
PINNED: dict[str, dict[str, dict[str, list]]] = {
    "3.11.7": {
        "code": {
            "abc.py": [6538, "e558702a95cdce3febd289da021715d2b92bc43995b8a1bc58dfa1c3d8010287"],
            "argparse.py": [
                99661,
                "dc1eba8adfdf615986421f981337458ba1072d3e718a0f76e3224940fd74118b",
            ],
            "ast.py": [61444, "c513073798bdbf3cdef09327d0d2d381a53213a13a4ba3f02729695327539406"],
            "base64.py": [
                21028,
                "7de2ffc30db7b791f482ee8e6cba30a7b69452324d466231f29395be00154b4b",
            ],
            "bisect.py": [3135, "e5b2ff166f48a06e70ae831d8c9b47283fcd0c254306eee12d3dae9c55e11526"],
            "calendar.py": [
                24740,
                "b3b140864fd122a575ffcc9342b824fbe4f8a38fdf3f4fcd964f26e52725358f",
            ],
            "collections/__init__.py": [
                52018,
                "303701de55e434c0fbcc478ae8a79a28537d9ebe83b3150508438ffd6e3e14c7",
            ],
            "colorsys.py": [
                4062,
                "d9800f8e81d46e63ca6f2e7d6ac5f344d85afb92c3cf6d103b5f977f1ad66ac2",
            ],
            "configparser.py": [
                55254,
                "4a70cecccb55031a413b79e6ced2e63ca031f770cd25a4882980ecdeab67f6ff",
            ],
            "contextlib.py": [
                27414,
                "d732c045bc7450997f97b2f79cfdb1546b68d2655e89ab3170f3b19b3930d83c",
            ],
            "copy.py": [8681, "27dcfc53a4b9d4fbc3d90c74e549eb6eca9301524d6d2fbff9a6589cf51b6fd5"],
            "csv.py": [16030, "6c68a5186e3b85e6e267a7ef96479327a45ae2b40bf5e9f2017e4b2282b3f5b1"],
            "dataclasses.py": [
                58299,
                "4b7e1c99ebea53b546317d218a0261895a1769f83a6b95dc0136f13578066a7f",
            ],
            "datetime.py": [
                91832,
                "cc9bcb0f1c2f44e1a6cd51882979e113e973c2e65ed84b9aaedabb48d47aa356",
            ],
            "difflib.py": [
                83308,
                "0c6afc23568d55b3e9ac914f9c5361e3033e778aa5b58d3cc82835fc5c638679",
            ],
            "email/__init__.py": [
                1764,
                "e4f46e3414c4602c9abb8b404a45e84412fc49dbe38a3d163f9575132dc7c93e",
            ],
            "enum.py": [78966, "84fc683aa71da233cf0f6a1bd59ffedc2bc7adb3a40f9339052141176071b6d6"],
            "fnmatch.py": [
                5999,
                "6683da36e47af523f3f41e18ad244d837783e19e98911cc0b7415dea81494ebc",
            ],
            "fractions.py": [
                28667,
                "b11e850e354808b882d13a70a911c29accd1dbdd41757566704e3b7206c74edb",
            ],
            "functools.py": [
                38413,
                "6d80018a3fa9fed44c5b78f881987ee3ab3fb1238b077b4e6dcb4b76da7db73b",
            ],
            "glob.py": [8681, "fa579f8a50a66313d34d339f10be0821c9b4fed6207e8ba8e29ed1c5e119f740"],
            "gzip.py": [24074, "8e0a7f850ef481fea41e0de9b52b4a014573b58e500ae83b92e5888d7a061008"],
            "heapq.py": [23024, "6d43277e5c76fc0f073cd388fcff852d14d068f6bb6d4886c340f8b75a1229a9"],
            "hmac.py": [7717, "a4790b3cfd1b58875879621dbe8f4c0a30fb50a8582045b0d5c1a712afc8c36b"],
            "inspect.py": [
                124246,
                "d55ac82f84e5c93953e9f5852ec255957e6c12f47d5cc0ea456447319da0f5af",
            ],
            "ipaddress.py": [
                75075,
                "b157f2f318650698ac4cb81f41ece82a7a860f264c24cfc8dcc538977709ced3",
            ],
            "json/__init__.py": [
                14020,
                "d5d41e2c29049515d295d81a6d40b4890fbec8d8482cfb401630f8ef2f77e4d5",
            ],
            "logging/__init__.py": [
                80823,
                "bcd33f1595a7fe3858e99cdfe336071200ea5b64cdc95005b311acb2f61d1ad5",
            ],
            "numbers.py": [
                10348,
                "6d70991643a109e9c99e94d6ea2734a995fa8e89114a70ea09737413fa9ae292",
            ],
            "operator.py": [
                10965,
                "b2af20f67667203c1730e686cc5d0427becc94db4c97f1d3efe3ed2158473f6a",
            ],
            "pathlib.py": [
                48566,
                "3b21ac188fd9ac20bacc8ccd976fabd5d8ccf5000f8e157d3dfff005b228fb3d",
            ],
            "pprint.py": [
                24489,
                "0b67dbc8af449d8ced3acd9df902e98c2dbc56c8f2a7a181c51cc72768db621f",
            ],
            "queue.py": [11496, "f6c37fc37cd7440979f7d22d40ee818fa3b714c573610c08fa52911d541193f0"],
            "random.py": [
                32162,
                "b931a2d452db89ab9e1f79d59b66ce194dbd6748049cfe44699726da52b9c956",
            ],
            "sched.py": [6351, "edfb309483d7cb05e06ad86d1fdeb819629f71402dc6710a1bec36c7afcaac50"],
            "secrets.py": [
                2028,
                "86893f2e4d33e8d02f8cc1d1de7a436d395ae9c9d48ff3dc0225a9cca1601759",
            ],
            "selectors.py": [
                19671,
                "1eeb102373e18c96311203f30c516e785bd8642275aa0bd66e43a284c9692385",
            ],
            "shlex.py": [13501, "42ab6060f316e121e374e6621d8c1c98b8db323903c3df289a810c45a8ae46a7"],
            "shutil.py": [
                55284,
                "d0dbfcd96ba06684aaf5d55e941aaaf36bb3a22cf537ea9d46317b363bcc5792",
            ],
            "signal.py": [2438, "6ae9e49fe09b607bc161fc80067de9763aa48f523567a34992f00be06057f00a"],
            "statistics.py": [
                47705,
                "889a066f1b8063e73387ceb84018efc507a89b365b56c6afb9cc15b2ed25c2d9",
            ],
            "string.py": [
                11786,
                "24aeae1f0526250f442022022bf98df9a823b1cb330543ee79e70e44907462e9",
            ],
            "struct.py": [257, "9c231f9497caf513a22dee8f790b07f969b0e45854a0bdd6dd84b492e08c2856"],
            "tarfile.py": [
                106231,
                "d6957647c11b6592e58e37d4e9f02f6cf9ee695cb0653b1072b542b8afac700d",
            ],
            "tempfile.py": [
                30109,
                "c9169b0ef905999b5d347544cfaa73c4f295777ac07a948aec1e4fdf3ce98a3b",
            ],
            "textwrap.py": [
                19718,
                "62867e40cdea6669b361f72af4d7daf0359f207c92cbeddfc7c7506397c1f31c",
            ],
            "threading.py": [
                57988,
                "2c4c1db159e1178896eca324082ae98d627c8d7017d0c7135b832f4fb3117210",
            ],
            "timeit.py": [
                13519,
                "e6414bbc158ad2007fc17f892ec49cca67cbb6d4f90920f4267ddeb19f032a03",
            ],
            "tokenize.py": [
                26336,
                "79aa94ebe1761811ea9b2da2ada409a8cb9abd7c6eac241d0c181a36684bb609",
            ],
            "trace.py": [29215, "e18581573c2b0e989a66c537cf16500dcb25e60d2ab8d8b22b6723c4c1c3c70a"],
            "traceback.py": [
                40378,
                "22c8a9a4b34668acf8100613e0bd8cdc997e617e0ad69493b7e00a9b2e1e3f17",
            ],
            "types.py": [10067, "0c08fbb650c37535a7d8361fc12029e3f4c72a418cf564e8779dae14b979e5ba"],
            "typing.py": [
                120077,
                "115d96e966bf35cf97126f98dd1fa854a00dd832733fc01ede58cfd4fa490660",
            ],
            "uuid.py": [27597, "e936b632e7b14cbdad7da077edf59d1de77f5a4c8507a5e7d0028b1d336d9883"],
            "warnings.py": [
                21025,
                "3c36ff80a66718e3fc8449f06730e9d7bcef87d1e7f91b626b42ca4d1f30eab0",
            ],
            "weakref.py": [
                21513,
                "56f8d313fb74019e53eb9287400702fbce788b7fe30e097b0b6e06296f3f080c",
            ],
            "zipapp.py": [7535, "776078e89fd7dadbce41678f8bacd3b493135e6d610911c867489415420de383"],
            "zipfile.py": [
                92608,
                "2de79ca464499be92e607a59552b4cb9cf8a9f6e000622b3673a98471c976a57",
            ],
        },
        "docs": {
            "pydoc_data/topics.py": [
                757011,
                "abaa56a64551d8eead1b19cbae3c6db443f99f0cab81df07bed3cb75c0db9346",
            ],
        },
    },
}


class CorpusMismatch(RuntimeError):
    """The corpus files differ from the ones pinned for this Python version."""


@dataclass(frozen=True)
class Corpus:
    """A byte corpus: training and validation streams (uint8) and the files they came from."""

    name: str
    train: np.ndarray
    val: np.ndarray
    files: dict[str, list]  # relative path -> [size in bytes, sha256]
    digest: str  # sha256 of train + val

    def summary(self) -> dict:
        return {
            "name": self.name,
            "train_bytes": int(self.train.size),
            "val_bytes": int(self.val.size),
            "n_files": len(self.files),
            "sha256_streams": self.digest,
            "files": self.files,
        }


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _module_file(root: Path, name: str) -> Path:
    for candidate in (root / f"{name}.py", root / name / "__init__.py"):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"standard-library module {name!r} not found as {name}.py or {name}/__init__.py under "
        f"{root}; this Python does not ship the corpus (see benchmarks/_corpus.py)."
    )


def _record(root: Path, path: Path) -> tuple[str, list]:
    data = path.read_bytes()
    return path.relative_to(root).as_posix(), [len(data), hashlib.sha256(data).hexdigest()]


def source_files() -> dict[str, dict[str, list]]:
    """``{'code': {relpath: [size, sha256]}, 'docs': {...}}`` for this interpreter."""
    root = stdlib_dir()
    code = dict(_record(root, _module_file(root, name)) for name in CODE_MODULES)
    docs = dict([_record(root, root / DOCS_FILE)])
    return {"code": code, "docs": docs}


def _split(docs: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
    train, val = [], []
    for d in docs:
        cut = int(len(d) * (1 - VAL_FRACTION))
        train.append(d[:cut])
        val.append(d[cut:])
    as_array = lambda parts: np.frombuffer(b"".join(parts), dtype=np.uint8).copy()  # noqa: E731
    return as_array(train), as_array(val)


def check(files: dict[str, dict[str, list]], version: str | None = None) -> str:
    """Compare ``files`` with :data:`PINNED`; return a status line, raise on a mismatch."""
    version = version or platform.python_version()
    pinned = PINNED.get(version)
    if not pinned:
        return (
            f"corpus: no checksums pinned for Python {version} (pinned: {sorted(PINNED)}); "
            "recording them: these results use other text than the README's tables."
        )
    bad = []
    for kind in ("code", "docs"):
        for rel, (size, sha) in pinned[kind].items():
            got = files[kind].get(rel)
            if got is None:
                bad.append(f"{rel}: missing")
            elif got != [size, sha]:
                bad.append(
                    f"{rel}: {got[0]} bytes sha256 {got[1][:12]}.. (pinned {size} {sha[:12]}..)"
                )
        bad += [f"{rel}: not pinned" for rel in files[kind] if rel not in pinned[kind]]
    if bad:
        raise CorpusMismatch(
            f"the corpus files of Python {version} under {stdlib_dir()} differ from the checksums "
            f"pinned in benchmarks/_corpus.py ({len(bad)} file(s)):\n  " + "\n  ".join(bad) + "\n"
            "Results would not be comparable with the README's tables. Run with "
            "--corpus-check record to use (and record) these files anyway."
        )
    n = sum(len(v) for v in pinned.values())
    return f"corpus: all {n} files match the checksums pinned for Python {version}."


def load(verify: bool = True) -> tuple[Corpus, Corpus, str]:
    """``(code, docs, status)``; ``verify=False`` records the checksums without comparing."""
    files = source_files()
    status = (
        check(files)
        if verify
        else "corpus: checksums recorded, not compared (--corpus-check record)."
    )
    root = stdlib_dir()
    code_docs = [_module_file(root, name).read_bytes() for name in CODE_MODULES]
    from pydoc_data.topics import topics  # the dict in <stdlib>/pydoc_data/topics.py

    doc_docs = [topics[k].encode("utf-8") for k in sorted(topics)]
    out = []
    for name, docs, kind in (("code", code_docs, "code"), ("docs", doc_docs, "docs")):
        train, val = _split(docs)
        digest = hashlib.sha256(train.tobytes() + val.tobytes()).hexdigest()
        out.append(Corpus(name, train, val, files[kind], digest))
    return out[0], out[1], status


if __name__ == "__main__":
    print(json.dumps({platform.python_version(): source_files()}, indent=1))
