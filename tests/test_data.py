"""Dataset loaders: the embedded digits, and CIFAR-10/100 and CIFAR-10/100-C from tiny files built
here in exactly the released formats (python-2 style pickles with bytes keys, tar.gz, .npy)."""
import io
import os
import pickle
import tarfile

import numpy as np
import pytest
import torch

from attrefine_fast.data import (
    CIFAR_C_CORRUPTIONS, ImageDataset, add_spurious_patch, available_cifar_c, load_cifar, load_cifar10, load_cifar100, load_cifar_c,
    load_dataset, load_digits, patch_colours,
)
from attrefine_fast.cifar import read_md5_file
from cifar_files import md5_hex, write_cifar, write_cifar_c


# ----------------------------------------------------------------------------- digits


def test_digits_split_shapes_and_range():
    train, test = load_digits("train"), load_digits("test")
    assert len(train) + len(test) == 1797 and len(test) == 450
    assert train.images.shape[1:] == (3, 32, 32) and train.images.dtype == torch.float32
    assert 0 <= float(test.images.min()) and float(test.images.max()) <= 1 and float(test.images.max()) > 0.9
    assert train.num_classes == test.num_classes == 10
    assert sorted(test.labels.unique().tolist()) == list(range(10))  # stratified
    # The three channels are copies: the digits are grey.
    assert test.images[:, 0].equal(test.images[:, 2])
    # Fixed split: a new call gives the same rows, and train and test share no image.
    assert load_digits("test").images.equal(test.images)
    flat_train = {tuple(r) for r in train.images[:, 0].flatten(1).mul(1e4).round().int().tolist()}
    assert not any(tuple(r) in flat_train for r in test.images[:, 0].flatten(1).mul(1e4).round().int().tolist()[:100])
    small = load_digits("all", size=8)
    assert small.images.shape == (1797, 3, 8, 8)


def test_spurious_patch_colours_the_corner_after_the_class_as_often_as_asked():
    digits = load_digits("test")
    before = digits.images.clone()
    colours = patch_colours(10)
    assert len({tuple(c) for c in colours.tolist()}) == 10 and float(colours.max(dim=1).values.min()) == 1.0
    patched = add_spurious_patch(digits, 1.0, size=5)
    assert torch.equal(digits.images, before) and torch.equal(patched.labels, digits.labels)
    assert torch.equal(patched.images[:, :, :5, :5], colours[digits.labels].view(-1, 3, 1, 1).expand(-1, -1, 5, 5))
    assert torch.equal(patched.images[:, :, 5:], digits.images[:, :, 5:]) and torch.equal(patched.images[:, :, :, 5:], digits.images[:, :, :, 5:])

    def agreement(ds):
        corner = ds.images[:, :, 0, 0]  # (N, 3)
        return float((torch.cdist(corner, colours).argmin(dim=1) == ds.labels).float().mean())

    # 0.9 agree by design, and a tenth of the others by chance: 0.91 expected
    assert abs(agreement(add_spurious_patch(digits, 0.9, seed=3)) - 0.91) < 0.04
    assert abs(agreement(add_spurious_patch(digits, 0.0, seed=3)) - 0.1) < 0.04
    assert torch.equal(add_spurious_patch(digits, 0.5, seed=4).images, add_spurious_patch(digits, 0.5, seed=4).images)
    as_bytes = ImageDataset((digits.images[:20] * 255).round().to(torch.uint8), digits.labels[:20], digits.classes)
    patched = add_spurious_patch(as_bytes, 1.0)
    assert patched.images.dtype == torch.uint8
    assert torch.equal(patched.images[:, :, 0, 0], (colours[as_bytes.labels] * 255).round().to(torch.uint8))
    for kwargs, error, match in [({"correlation": 1.5}, ValueError, r"\[0, 1\]"), ({"correlation": float("nan")}, ValueError, "correlation"),
                                 ({"correlation": 0.5, "size": 33}, ValueError, "at least 33x33"),
                                 ({"correlation": 0.5, "size": 2.5}, TypeError, "size must be an integer")]:
        with pytest.raises(error, match=match):
            add_spurious_patch(digits, **kwargs)
    with pytest.raises(ValueError, match="RGB"):
        add_spurious_patch(ImageDataset(torch.rand(4, 1, 8, 8), torch.arange(4)), 0.5)


def test_image_dataset_api():
    ds = ImageDataset(torch.randint(0, 256, (10, 3, 4, 4), dtype=torch.uint8), torch.arange(10) % 3, name="toy")
    assert ds.num_classes == 3 and len(ds) == 10
    x, y = ds.tensors()
    assert x.dtype == torch.float32 and torch.allclose(x * 255, ds.images.float())
    batches = list(ds.batches(4))
    assert [b[0].shape[0] for b in batches] == [4, 4, 2]
    assert torch.cat([b[0] for b in batches]).equal(x) and torch.cat([b[1] for b in batches]).equal(y)
    img, label = ds[3]
    assert img.equal(x[3]) and int(label) == 0
    sub = ds.subset([1, 5])
    assert sub.images.equal(ds.images[[1, 5]]) and sub.num_classes == 3
    assert len(ds.subset(4)) == 4
    # a boolean mask selects its rows (as tensor indexing does), not rows 0 and 1
    of_class_1 = ds.subset(ds.labels == 1)
    assert of_class_1.labels.tolist() == [1, 1, 1] and of_class_1.images.equal(ds.images[[1, 4, 7]])
    assert ds.subset(torch.tensor([2, 0])).labels.tolist() == [2, 0]
    assert len(ds.subset([])) == len(ds.subset(range(0))) == 0  # no rows selected: an empty dataset
    for bad, error in [(ds.labels[:5] == 1, ValueError), (3.7, TypeError), (torch.tensor([[1, 2]]), TypeError), (-1, ValueError)]:
        with pytest.raises(error):
            ds.subset(bad)
    for bad, match in [((torch.rand(3, 4, 4), torch.zeros(3)), "N, C, H, W"),
                       ((torch.zeros(3, 3, 4, 4, dtype=torch.int32), torch.zeros(3)), "uint8 or float"),
                       ((torch.rand(3, 3, 4, 4), torch.zeros(2)), "labels")]:
        with pytest.raises((ValueError, TypeError), match=match):
            ImageDataset(*bad)
    with pytest.raises(ValueError, match="split"):
        load_digits("val")


# ----------------------------------------------------------------------------- CIFAR archives


def _expected(files, members, label_key=b"labels"):
    batches = [pickle.loads(files[m], encoding="bytes") for m in members]
    x = np.concatenate([b[b"data"] for b in batches]).reshape(-1, 3, 32, 32)
    y = np.concatenate([b[label_key] for b in batches])
    return torch.from_numpy(x), torch.from_numpy(y)


@pytest.mark.parametrize("archive", [True, False], ids=["tarball", "folder"])
def test_cifar10_reads_the_standard_layout(tmp_path, archive):
    files, md5 = write_cifar(tmp_path, "cifar10", archive=archive)
    train = load_cifar10(tmp_path, "train", md5=md5)
    test = load_cifar("cifar10", tmp_path, "test", md5=md5)
    x, y = _expected(files, [f"data_batch_{i}" for i in range(1, 6)])
    assert train.images.dtype == torch.uint8 and train.images.equal(x) and train.labels.equal(y)
    x, y = _expected(files, ["test_batch"])
    assert test.images.equal(x) and test.labels.equal(y)
    assert test.classes == [f"class{i}" for i in range(10)] and test.name == "cifar10/test"
    # Channel planes: the first 1024 bytes of a row are the red plane, row-major.
    row = pickle.loads(files["test_batch"], encoding="bytes")[b"data"][0]
    assert test.images[0, 0, 1, :].numpy().tolist() == row[32:64].tolist()
    via_name = load_dataset("cifar10", "test", tmp_path, md5=md5)
    assert via_name.images.equal(test.images)


@pytest.mark.parametrize("archive", [True, False], ids=["tarball", "folder"])
def test_cifar100_fine_and_coarse(tmp_path, archive):
    files, md5 = write_cifar(tmp_path, "cifar100", archive=archive)
    fine = load_cifar100(tmp_path, "test", md5=md5)
    coarse = load_cifar100(tmp_path, "test", md5=md5, label="coarse")
    x, y = _expected(files, ["test"], b"fine_labels")
    assert fine.images.equal(x) and fine.labels.equal(y) and fine.num_classes == 100
    assert coarse.labels.equal(_expected(files, ["test"], b"coarse_labels")[1]) and coarse.num_classes == 20


def test_cifar_extracted_folder_given_directly(tmp_path):
    _, md5 = write_cifar(tmp_path, "cifar10", archive=False)
    assert len(load_cifar10(tmp_path / "cifar-10-batches-py", "test", md5=md5)) == 4


@pytest.mark.parametrize("archive", [True, False], ids=["tarball", "folder"])
def test_cifar_damaged_or_unknown_files_fail_the_md5_check(tmp_path, archive):
    _, md5 = write_cifar(tmp_path, "cifar10", archive=archive)
    # Our tiny files are not the released ones: the published table rejects them before unpickling.
    with pytest.raises(ValueError, match="MD5"):
        load_cifar10(tmp_path, "test")
    target = tmp_path / ("cifar-10-python.tar.gz" if archive else "cifar-10-batches-py/test_batch")
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="damaged"):
        load_cifar10(tmp_path, "test", md5=md5)


def test_cifar_missing_files_name_the_expected_layout(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"cifar-10-python\.tar\.gz.*cifar-10-batches-py.*data_batch_1"):
        load_cifar10(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"cifar-100-python\.tar\.gz"):
        load_cifar100(tmp_path / "nowhere")
    _, md5 = write_cifar(tmp_path, "cifar10", archive=False)
    os.remove(tmp_path / "cifar-10-batches-py" / "batches.meta")
    with pytest.raises(FileNotFoundError, match="batches.meta"):
        load_cifar10(tmp_path, md5=md5)
    with pytest.raises(ValueError, match="data_dir"):
        load_dataset("cifar10")
    with pytest.raises(ValueError, match="superclasses"):
        load_cifar10(tmp_path, md5=md5, label="coarse")


def test_an_unfinished_extraction_does_not_hide_the_archive_beside_it(tmp_path):
    _, md5 = write_cifar(tmp_path, "cifar10", archive=True)
    (tmp_path / "cifar-10-batches-py").mkdir()
    (tmp_path / "cifar-10-batches-py" / "batches.meta").write_bytes(b"")
    assert len(load_cifar10(tmp_path, "test", md5=md5)) == 4
    os.remove(tmp_path / "cifar-10-python.tar.gz")
    with pytest.raises(FileNotFoundError, match=r"cifar-10-batches-py/test_batch is missing.*cifar-10-python\.tar\.gz"):
        load_cifar10(tmp_path, "test", md5=md5)


def test_tarball_lacking_a_member(tmp_path):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        info = tarfile.TarInfo("cifar-10-batches-py/readme.html")
        info.size = 0
        tar.addfile(info, io.BytesIO(b""))
    (tmp_path / "cifar-10-python.tar.gz").write_bytes(buf.getvalue())
    with pytest.raises(ValueError, match="lacks"):
        load_cifar10(tmp_path, md5={"cifar-10-python.tar.gz": md5_hex(buf.getvalue())})


class _RunsCode:
    def __reduce__(self):
        return (os.getcwd, ())


def test_a_pickle_that_would_run_code_is_refused(tmp_path):
    """Even with a matching checksum (a user's md5 override), only arrays are rebuilt."""
    files, _ = write_cifar(tmp_path, "cifar10", archive=False)
    evil = pickle.dumps({b"data": _RunsCode(), b"labels": []}, protocol=2)
    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(evil)
    md5 = {f"cifar-10-batches-py/{m}": md5_hex(d) for m, d in files.items()}
    md5["cifar-10-batches-py/test_batch"] = md5_hex(evil)
    with pytest.raises(ValueError, match="test_batch is not a readable CIFAR batch file .UnpicklingError: refusing to load"):
        load_cifar10(tmp_path, "test", md5=md5)


def _with_test_batch(tmp_path, blob):
    """A CIFAR-10 folder whose test_batch is ``blob``, and checksums that accept it."""
    files, _ = write_cifar(tmp_path, "cifar10", archive=False)
    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(blob)
    md5 = {f"cifar-10-batches-py/{m}": md5_hex(d) for m, d in files.items()}
    md5["cifar-10-batches-py/test_batch"] = md5_hex(blob)
    return md5


@pytest.mark.parametrize("blob, match", [
    (b"", "not a readable CIFAR batch file .EOFError"),
    (b"\x80\x02}q\x00(", "not a readable CIFAR batch file"),  # cut short
    (b"garbage", "not a readable CIFAR batch file"),
    (pickle.dumps({b"data": np.full((2, 3072), 0.5), b"labels": [0, 1]}, protocol=2), "'data' must be .N, 3072. integers in 0..255 .uint8., got .2, 3072. float64"),
    (pickle.dumps({b"data": np.full((2, 3072), 300), b"labels": [0, 1]}, protocol=2), "integers in 0..255"),  # would wrap
    (pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [[0], [1]]}, protocol=2), "'labels' must be 2 integers"),
])
def test_a_damaged_batch_file_with_its_checksum_given_is_a_clear_error(tmp_path, blob, match):
    # a user's md5 override lets such a file past the checksum; it must not load as wrapped or truncated values
    md5 = _with_test_batch(tmp_path, blob)
    with pytest.raises(ValueError, match=match):
        load_cifar10(tmp_path, "test", md5=md5)


def test_a_cut_archive_with_its_checksum_given_is_a_clear_error(tmp_path):
    write_cifar(tmp_path, "cifar10", archive=True)
    archive = tmp_path / "cifar-10-python.tar.gz"
    cut = archive.read_bytes()[:-200]
    archive.write_bytes(cut)
    with pytest.raises(ValueError, match="cifar-10-python.tar.gz is damaged|lacks"):
        load_cifar10(tmp_path, "test", md5={"cifar-10-python.tar.gz": md5_hex(cut)})


def test_an_md5_file_is_read_or_named(tmp_path):
    good = tmp_path / "md5.json"
    good.write_text('{"cifar-10-python.tar.gz": "0123"}')
    assert read_md5_file(good) == {"cifar-10-python.tar.gz": "0123"}
    (tmp_path / "list.json").write_text("[1]")
    (tmp_path / "bad.json").write_text("{")
    for name, match in (("missing.json", "cannot read the MD5 file"), ("list.json", "JSON object"), ("bad.json", "not JSON")):
        with pytest.raises(ValueError, match=match):
            read_md5_file(tmp_path / name)


def test_bad_arguments():
    with pytest.raises(ValueError, match="cifar10"):
        load_cifar("mnist", ".")
    with pytest.raises(ValueError, match="split"):
        load_cifar10(".", "val")
    with pytest.raises(ValueError, match="unknown dataset"):
        load_dataset("imagenet")


# ----------------------------------------------------------------------------- CIFAR-C


@pytest.mark.parametrize("nested", [True, False])
def test_cifar_c_severity_blocks(tmp_path, nested):
    arrays, labels = write_cifar_c(tmp_path / "CIFAR-10-C" if nested else tmp_path)
    assert available_cifar_c("cifar10", tmp_path) == ["gaussian_noise", "fog"]  # benchmark order
    ds = load_cifar_c("cifar10", tmp_path, "gaussian_noise", 3)
    block = arrays["gaussian_noise"][8:12]
    assert ds.images.equal(torch.from_numpy(block.transpose(0, 3, 1, 2).copy()))
    assert ds.labels.tolist() == labels[8:12].tolist() and ds.num_classes == 10
    assert len(load_cifar_c("cifar10", tmp_path, "fog", 5, num_samples=2)) == 2
    for bad in (-1, 0):  # (a negative count would slice rows of the other severities)
        with pytest.raises(ValueError, match="num_samples"):
            load_cifar_c("cifar10", tmp_path, "fog", 1, num_samples=bad)
    assert "fog" in CIFAR_C_CORRUPTIONS


def test_cifar_c_errors_name_the_layout(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"CIFAR-100-C.*labels\.npy.*severities"):
        load_cifar_c("cifar100", tmp_path, "fog", 1)
    write_cifar_c(tmp_path / "CIFAR-10-C")
    with pytest.raises(FileNotFoundError, match="present"):
        load_cifar_c("cifar10", tmp_path, "snow", 1)
    with pytest.raises(ValueError, match="severity"):
        load_cifar_c("cifar10", tmp_path, "fog", 6)
    np.save(tmp_path / "CIFAR-10-C" / "contrast.npy", np.zeros((7, 32, 32, 3), np.uint8))
    with pytest.raises(ValueError, match="5 blocks"):
        load_cifar_c("cifar10", tmp_path, "contrast", 1)
    (tmp_path / "CIFAR-10-C" / "brightness.npy").write_bytes(b"not an npy file")
    with pytest.raises(ValueError, match="brightness.npy"):
        load_cifar_c("cifar10", tmp_path, "brightness", 1)
    np.save(tmp_path / "CIFAR-10-C" / "pickled.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="pickled.npy"):
        load_cifar_c("cifar10", tmp_path, "pickled", 1)


def test_a_batch_file_of_integers_in_range_loads_as_uint8(tmp_path):
    # a re-pickled copy whose pixels are int64 0..255 (with its checksum given) reads as the release does
    data = np.arange(2 * 3072).reshape(2, 3072) % 256
    md5 = _with_test_batch(tmp_path, pickle.dumps({b"data": data, b"labels": [0, 1]}, protocol=2))
    ds = load_cifar10(tmp_path, "test", md5=md5)
    assert ds.images.dtype == torch.uint8 and torch.equal(ds.images.reshape(2, -1), torch.from_numpy(data).to(torch.uint8))
