"""Tiny CIFAR-10/100 and CIFAR-10-C files, written in exactly the released formats: python-2
pickles (8-bit strings, numpy.core globals) or protocol-2 pickles with bytes keys, the tar.gz
archive or its extracted folder, and the stacked-severity .npy files."""
from __future__ import annotations

import hashlib
import io
import pickle
import struct
import tarfile

import numpy as np


def _pickled(obj) -> bytes:
    # Protocol 2 with bytes keys, as a python 3 writer would produce it.
    return pickle.dumps(obj, protocol=2)


def _short_string(b: bytes) -> bytes:
    return b"U" + bytes([len(b)]) + b


def python2_batch_pickle(data: np.ndarray, labels) -> bytes:
    """The opcodes python 2's cPickle wrote for {'data': uint8 (n, 3072) array, 'labels': [...]}:
    8-bit strings (SHORT_BINSTRING/BINSTRING), numpy.core globals, a dtype state with '|'."""
    n, d = data.shape
    raw = data.tobytes()
    return b"".join([
        b"\x80\x02}q\x00(", _short_string(b"data"),
        b"cnumpy.core.multiarray\n_reconstruct\nq\x01cnumpy\nndarray\nq\x02K\x00\x85", _short_string(b"b"), b"\x87R",
        b"(K\x01M" + struct.pack("<H", n) + b"M" + struct.pack("<H", d) + b"\x86",
        b"cnumpy\ndtype\nq\x03", _short_string(b"u1"), b"K\x00K\x01\x87Rq\x04",
        b"(K\x03", _short_string(b"|"), b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb",
        b"\x89T" + struct.pack("<I", len(raw)) + raw, b"tb",
        _short_string(b"labels"), b"](" + b"".join(b"K" + bytes([int(v)]) for v in labels) + b"e",
        b"u.",
    ])


def _cifar_files(name: str, rng: np.random.Generator) -> dict[str, bytes]:
    """Member name -> bytes, for a tiny CIFAR-10 (3 images per train batch, 4 test; python-2
    pickles) or CIFAR-100 (python-3 protocol-2 pickles: both kinds must load)."""
    files = {}
    if name == "cifar10":
        for member, n in [(f"data_batch_{i}", 3) for i in range(1, 6)] + [("test_batch", 4)]:
            files[member] = python2_batch_pickle(rng.integers(0, 256, (n, 3072), dtype=np.uint8), rng.integers(0, 10, n))
        files["batches.meta"] = _pickled({b"label_names": [f"class{i}".encode() for i in range(10)],
                                          b"num_cases_per_batch": 3, b"num_vis": 3072})
    else:
        for member, n in (("train", 6), ("test", 5)):
            files[member] = _pickled({
                b"filenames": [b"x"] * n, b"batch_label": member.encode(),
                b"fine_labels": rng.integers(0, 100, n).tolist(), b"coarse_labels": rng.integers(0, 20, n).tolist(),
                b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            })
        files["meta"] = _pickled({b"fine_label_names": [f"f{i}".encode() for i in range(100)],
                                  b"coarse_label_names": [f"c{i}".encode() for i in range(20)]})
    return files


FOLDERS = {"cifar10": ("cifar-10-batches-py", "cifar-10-python.tar.gz"), "cifar100": ("cifar-100-python", "cifar-100-python.tar.gz")}


def md5_hex(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def write_cifar(root, name, *, archive: bool, rng=None):
    """Writes the tiny dataset under root; returns (member bytes, md5 table for load_cifar)."""
    files = _cifar_files(name, rng or np.random.default_rng(0))
    folder, tar_name = FOLDERS[name]
    if archive:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w:gz") as tar:
            for member, data in files.items():
                info = tarfile.TarInfo(f"{folder}/{member}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        (root / tar_name).write_bytes(buf.getvalue())
        md5 = {tar_name: md5_hex(buf.getvalue())}
    else:
        (root / folder).mkdir()
        for member, data in files.items():
            (root / folder / member).write_bytes(data)
        md5 = {f"{folder}/{m}": md5_hex(d) for m, d in files.items()}
    return files, md5


def write_cifar_c(folder, corruptions=("gaussian_noise", "fog"), n=4, rng=None):
    """CIFAR-10-C's layout in ``folder``: labels.npy and, per corruption, uint8 (5n, 32, 32, 3)
    with severities 1-5 stacked in blocks of n. Returns ({corruption: array}, labels)."""
    rng = rng or np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    labels = np.tile(rng.integers(0, 10, n).astype(np.uint8), 5)
    np.save(folder / "labels.npy", labels)
    arrays = {}
    for c in corruptions:
        arrays[c] = rng.integers(0, 256, (5 * n, 32, 32, 3), dtype=np.uint8)
        np.save(folder / f"{c}.npy", arrays[c])
    return arrays, labels
