"""CIFAR-10 / CIFAR-100 and CIFAR-10-C / CIFAR-100-C from local files; nothing is ever downloaded.

Expected files (``root`` is the folder given as ``data_dir``):

    CIFAR-10   root/cifar-10-python.tar.gz            (the standard python archive, read in place)
               or root/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}
    CIFAR-100  root/cifar-100-python.tar.gz
               or root/cifar-100-python/{train, test, meta}
    CIFAR-10-C root/CIFAR-10-C/{<corruption>.npy, labels.npy}   (also root itself holding the .npy files)
    CIFAR-100-C root/CIFAR-100-C/{...}

Integrity: the python archives are pickles, and unpickling can run code. So every archive or
batch file is MD5-checked against :data:`CIFAR_MD5` (the published checksums, the ones torchvision
also uses) before it is read, and then read with an unpickler that only rebuilds numpy arrays.
Pass ``md5={name: checksum}`` to check other copies (e.g. test fixtures); entries override the
default table. The CIFAR-C ``.npy`` files are read with ``allow_pickle=False`` (no code can run)
and checked for shape, dtype and layout only: their per-file checksums are not published.
"""
from __future__ import annotations

import codecs
import hashlib
import io
import json
import numbers
import os
import pickle
import tarfile
import zlib

import numpy as np
import torch

from .checks import check_int
from .image_dataset import ImageDataset

# The 15 corruptions of the CIFAR-10-C benchmark (Hendrycks & Dietterich, 2019), and its 4 extras.
CIFAR_C_CORRUPTIONS = (
    "gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur", "motion_blur", "zoom_blur",
    "snow", "frost", "fog", "brightness", "contrast", "elastic_transform", "pixelate", "jpeg_compression",
)
CIFAR_C_EXTRA = ("speckle_noise", "gaussian_blur", "spatter", "saturate")

# Published MD5s of the python archives and of their members (relative paths under ``root``).
CIFAR_MD5 = {
    "cifar-10-python.tar.gz": "c58f30108f718f92721af3b95e74349a",
    "cifar-10-batches-py/data_batch_1": "c99cafc152244af753f735de768cd75f",
    "cifar-10-batches-py/data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
    "cifar-10-batches-py/data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
    "cifar-10-batches-py/data_batch_4": "634d18415352ddfa80567beed471001a",
    "cifar-10-batches-py/data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
    "cifar-10-batches-py/test_batch": "40351d587109b95175f43aff81a1287e",
    "cifar-10-batches-py/batches.meta": "5ff9c542aee3614f3951f8cda6e48888",
    "cifar-100-python.tar.gz": "eb9058c3a382ffc7106e4002c42a8d85",
    "cifar-100-python/train": "16019d7e3df5f24257cddd939b257f8d",
    "cifar-100-python/test": "f0ef6b0ae62326f3e7ffdfab6717acfc",
    "cifar-100-python/meta": "7973b15100ade9c7d40fb424638fde48",
}

_CIFAR = {
    "cifar10": {
        "archive": "cifar-10-python.tar.gz",
        "folder": "cifar-10-batches-py",
        "train": [f"data_batch_{i}" for i in range(1, 6)],
        "test": ["test_batch"],
        "meta": "batches.meta",
        "c_folder": "CIFAR-10-C",
        "num_classes": 10,
    },
    "cifar100": {
        "archive": "cifar-100-python.tar.gz",
        "folder": "cifar-100-python",
        "train": ["train"],
        "test": ["test"],
        "meta": "meta",
        "c_folder": "CIFAR-100-C",
        "num_classes": 100,
    },
}


# ----------------------------------------------------------------------------- CIFAR-10 / 100


class _ArraysOnly(pickle.Unpickler):
    """Rebuilds the dicts of lists, bytes and numpy arrays in the CIFAR batches; refuses any other
    global, so a tampered file cannot run code even if its checksum was overridden."""

    _ALLOWED = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("numpy.core.multiarray", "_reconstruct"): np.array(0).__reduce__()[0],
        ("numpy._core.multiarray", "_reconstruct"): np.array(0).__reduce__()[0],
        ("numpy.core.multiarray", "scalar"): np.int64(0).__reduce__()[0],
        ("numpy._core.multiarray", "scalar"): np.int64(0).__reduce__()[0],
        ("numpy.core.numeric", "_frombuffer"): np.zeros(1).__reduce_ex__(5)[0],
        ("numpy._core.numeric", "_frombuffer"): np.zeros(1).__reduce_ex__(5)[0],
        ("_codecs", "encode"): codecs.encode,
    }

    def find_class(self, module, name):
        try:
            return self._ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a dataset file") from None


def _unpickle(data: bytes, where: str) -> dict:
    try:
        obj = _ArraysOnly(io.BytesIO(data), encoding="bytes").load()
    except Exception as e:  # truncated, empty or not a pickle at all; or a global we refuse
        raise ValueError(f"{where} is not a readable CIFAR batch file ({type(e).__name__}: {e})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{where} must hold a dict, as a CIFAR batch file does")
    return {(k.decode() if isinstance(k, bytes) else k): v for k, v in obj.items()}


def md5_of(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def _check_md5(name: str, data: bytes, table: dict, where: str) -> None:
    expected = table.get(name)
    if expected is None:
        raise ValueError(f"no MD5 known for {name}; pass md5={{'{name}': '<checksum>'}} to read it")
    got = md5_of(data)
    if got != expected:
        raise ValueError(
            f"{where} failed its MD5 check (got {got}, expected {expected}): the file is damaged or not the "
            "standard release. Replace it, or pass md5={...} with the checksums of your copy (on the command "
            "line: --cifar-md5 FILE, a JSON file of {file name: md5})."
        )


def read_md5_file(path) -> dict[str, str]:
    """The checksums of a CIFAR copy other than the standard release: a JSON file of
    {file name: md5}, as :func:`load_cifar`'s ``md5`` takes them."""
    try:
        with open(path) as f:
            table = json.load(f)
    except OSError as e:
        raise ValueError(f"cannot read the MD5 file {path}: {e.strerror or e}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"the MD5 file {path} is not JSON ({e})") from None
    if not isinstance(table, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in table.items()):
        raise ValueError(f"the MD5 file {path} must hold a JSON object of {{file name: md5 string}}")
    return table


def expected_layout(name: str, root: str) -> str:
    spec = _CIFAR[name]
    files = spec["train"] + spec["test"] + [spec["meta"]]
    return (
        f"expected either {os.path.join(root, spec['archive'])} (the standard python archive) or the extracted "
        f"folder {os.path.join(root, spec['folder'])}/ with files {', '.join(files)}; nothing is downloaded"
    )


def _read_cifar_members(name: str, root, members: list[str], table: dict) -> dict[str, bytes]:
    """The checked bytes of ``members``, from the extracted folder if it holds them all, else the
    archive (an extraction left unfinished does not hide an archive beside it)."""
    spec = _CIFAR[name]
    root = os.fspath(root)
    candidates = [os.path.join(root, spec["folder"])]
    if os.path.basename(os.path.normpath(root)) == spec["folder"]:
        candidates.append(root)
    incomplete = None
    for folder in candidates:
        if not os.path.isdir(folder):
            continue
        missing = [m for m in members if not os.path.isfile(os.path.join(folder, m))]
        if missing:
            incomplete = incomplete or f"{os.path.join(folder, missing[0])} is missing"
            continue
        out = {}
        for member in members:
            path = os.path.join(folder, member)
            with open(path, "rb") as f:
                out[member] = f.read()
            _check_md5(f"{spec['folder']}/{member}", out[member], table, path)
        return out
    archive = root if root.endswith(spec["archive"]) and os.path.isfile(root) else os.path.join(root, spec["archive"])
    if not os.path.isfile(archive):
        found = incomplete or f"{name} not found under {root!r}"
        raise FileNotFoundError(f"{found}: {expected_layout(name, root)}")
    with open(archive, "rb") as f:
        blob = f.read()
    _check_md5(spec["archive"], blob, table, archive)
    out = {}
    try:
        with tarfile.open(fileobj=io.BytesIO(blob), mode="r:gz") as tar:
            for member in members:
                handle = tar.extractfile(f"{spec['folder']}/{member}")
                if handle is None:
                    raise KeyError(member)
                out[member] = handle.read()
    except (KeyError, tarfile.TarError) as e:
        raise ValueError(f"{archive} lacks {spec['folder']}/{e.args[0] if e.args else '?'} or is unreadable: {expected_layout(name, root)}") from e
    except (EOFError, OSError, zlib.error) as e:  # a cut or damaged gzip stream (with its MD5 overridden)
        raise ValueError(f"{archive} is damaged ({type(e).__name__}: {e})") from None
    return out


def load_cifar(name: str, root, split: str = "test", *, md5: dict | None = None, label: str = "fine", source: str = "files") -> ImageDataset:
    """CIFAR-10 or CIFAR-100 from a local copy of the standard python archive (see the module docstring).

    Args:
        name: "cifar10" or "cifar100".
        root: folder holding the archive or the extracted folder (or the extracted folder itself).
        split: "train" or "test".
        md5: checksums that override / extend :data:`CIFAR_MD5`, keyed by the archive's file name or
            "<extracted folder>/<file>".
        label: CIFAR-100 only: "fine" (100 classes) or "coarse" (20 superclasses).
        source: "files" (our reader) or "torchvision" (``torchvision.datasets``, where it imports;
            it reads the same layout and checks the same MD5s; never downloads here).

    Returns:
        ImageDataset with uint8 images (N, 3, 32, 32).
    """
    if name not in _CIFAR:
        raise ValueError(f"name must be 'cifar10' or 'cifar100', got {name!r}")
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if label not in ("fine", "coarse"):
        raise ValueError(f"label must be 'fine' or 'coarse', got {label!r}")
    if name == "cifar10" and label == "coarse":
        raise ValueError("label='coarse' names CIFAR-100's 20 superclasses; CIFAR-10 has its 10 classes only")
    if source == "torchvision":
        return _cifar_torchvision(name, root, split, label)
    if source != "files":
        raise ValueError(f"source must be 'files' or 'torchvision', got {source!r}")
    table = {**CIFAR_MD5, **(md5 or {})}
    spec = _CIFAR[name]
    files = _read_cifar_members(name, root, spec[split] + [spec["meta"]], table)
    label_key = "labels" if name == "cifar10" else f"{label}_labels"
    names_key = "label_names" if name == "cifar10" else f"{label}_label_names"
    images, labels = [], []
    for member in spec[split]:
        where = f"{spec['folder']}/{member}"
        batch = _unpickle(files[member], where)
        if "data" not in batch or label_key not in batch:
            raise ValueError(f"{where} lacks the keys 'data' and '{label_key}'")
        data = np.asarray(batch["data"])
        in_range = data.dtype.kind in "iu" and (data.size == 0 or (data.min() >= 0 and data.max() <= 255))
        if not in_range or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            raise ValueError(f"{where}: 'data' must be (N, 3072) integers in 0..255 (uint8), got {data.shape} {data.dtype}")
        data = data.astype(np.uint8, copy=False)
        batch_labels = np.asarray(batch[label_key])
        if batch_labels.shape != (len(data),) or batch_labels.dtype.kind not in "iu":
            raise ValueError(f"{where}: '{label_key}' must be {len(data)} integers, got {batch_labels.shape} {batch_labels.dtype}")
        images.append(data.reshape(-1, 3, 32, 32))
        labels.append(batch_labels.astype(np.int64))
    meta = _unpickle(files[spec["meta"]], f"{spec['folder']}/{spec['meta']}")
    classes = [c.decode() if isinstance(c, bytes) else str(c) for c in meta.get(names_key, [])] or None
    x = torch.from_numpy(np.concatenate(images))
    y = torch.from_numpy(np.concatenate(labels))
    return ImageDataset(x, y, classes, f"{name}/{split}")


def _cifar_torchvision(name, root, split, label) -> ImageDataset:
    try:
        from torchvision import datasets
    except Exception as e:  # on CPU-only torch wheels torchvision does not import at all
        raise ImportError(f"torchvision does not import here ({e}); use source='files' (the default)") from e
    if name == "cifar100" and label == "coarse":
        raise ValueError("torchvision's CIFAR100 has fine labels only; use source='files' for coarse labels")
    cls = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
    ds = cls(os.fspath(root), train=split == "train", download=False)
    x = torch.from_numpy(np.ascontiguousarray(ds.data.transpose(0, 3, 1, 2)))
    return ImageDataset(x, torch.as_tensor(ds.targets), list(ds.classes), f"{name}/{split}")


def load_cifar10(root, split: str = "test", **kwargs) -> ImageDataset:
    """CIFAR-10: see :func:`load_cifar`."""
    return load_cifar("cifar10", root, split, **kwargs)


def load_cifar100(root, split: str = "test", **kwargs) -> ImageDataset:
    """CIFAR-100: see :func:`load_cifar`."""
    return load_cifar("cifar100", root, split, **kwargs)


# ----------------------------------------------------------------------------- CIFAR-10-C / 100-C


def cifar_c_folder(name: str, root) -> str:
    """The folder holding the ``.npy`` files: ``root/CIFAR-10-C`` (or -100-C), or ``root`` itself."""
    if name not in _CIFAR:
        raise ValueError(f"name must be 'cifar10' or 'cifar100', got {name!r}")
    root = os.fspath(root)
    sub = os.path.join(root, _CIFAR[name]["c_folder"])
    if os.path.isfile(os.path.join(sub, "labels.npy")):
        return sub
    if os.path.isfile(os.path.join(root, "labels.npy")):
        return root
    raise FileNotFoundError(
        f"{_CIFAR[name]['c_folder']} not found: expected {sub}/ (or {root}/) with labels.npy and one "
        f"<corruption>.npy per corruption, e.g. {CIFAR_C_CORRUPTIONS[0]}.npy: uint8 (5*N, 32, 32, 3), severities "
        "1-5 stacked in blocks of N (N = 10,000); nothing is downloaded"
    )


def available_cifar_c(name: str, root) -> list[str]:
    """The corruptions present in the CIFAR-C folder, the 15 benchmark ones first."""
    folder = cifar_c_folder(name, root)
    present = {f[:-4] for f in os.listdir(folder) if f.endswith(".npy") and f != "labels.npy"}
    ordered = [c for c in CIFAR_C_CORRUPTIONS + CIFAR_C_EXTRA if c in present]
    return ordered + sorted(present - set(ordered))


def _load_npy(path: str) -> np.ndarray:
    """Memory-mapped, so that one severity block is read without the rest; never unpickles."""
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise ValueError(
            f"{path} is damaged or not a plain .npy array ({e}); expected uint8 (5*N, 32, 32, 3) images or (5*N,) labels"
        ) from e


def load_cifar_c(name: str, root, corruption: str, severity: int, *, num_samples: int | None = None) -> ImageDataset:
    """One corruption at one severity of CIFAR-10-C / CIFAR-100-C.

    Args:
        name: "cifar10" or "cifar100".
        root: see :func:`cifar_c_folder`.
        corruption: file stem, e.g. "gaussian_noise".
        severity: 1..5 (block ``severity - 1`` of the file).
        num_samples: the first n images of the block (the test set's order), default all.

    Returns:
        ImageDataset with uint8 images (n, 3, 32, 32); only the requested rows are read.
    """
    if isinstance(severity, bool) or not isinstance(severity, numbers.Integral) or severity not in (1, 2, 3, 4, 5):
        raise ValueError(f"severity must be 1..5, got {severity!r}")
    folder = cifar_c_folder(name, root)
    path = os.path.join(folder, f"{corruption}.npy")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found; present: {available_cifar_c(name, root)}")
    data = _load_npy(path)
    labels = _load_npy(os.path.join(folder, "labels.npy"))
    if data.dtype != np.uint8 or data.ndim != 4 or data.shape[3] != 3 or data.shape[0] % 5 != 0:
        raise ValueError(f"{path}: expected uint8 (5*N, H, W, 3) with severities stacked in 5 blocks, got {data.dtype} {data.shape}")
    if labels.ndim != 1 or labels.shape[0] != data.shape[0]:
        raise ValueError(f"labels.npy must hold one label per row of {corruption}.npy ({data.shape[0]}), got shape {labels.shape}")
    block = data.shape[0] // 5
    n = block if num_samples is None else min(check_int("num_samples", num_samples, 1), block)
    start = (severity - 1) * block
    x = torch.from_numpy(np.ascontiguousarray(data[start : start + n].transpose(0, 3, 1, 2)))
    y = torch.from_numpy(np.array(labels[start : start + n], dtype=np.int64))  # a copy: the map is read-only
    classes = [str(i) for i in range(_CIFAR[name]["num_classes"])]
    return ImageDataset(x, y, classes, f"{name}-c/{corruption}/{severity}")
