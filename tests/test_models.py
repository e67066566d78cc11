"""Architectures, the Normalize wrapper and the checkpoint format."""
import pytest
import torch

from attrefine_fast.models import (
    NORMALIZATIONS, Normalize, NormalizedModel, PreActResNet18, SmallCNN, WideResNet, build_model, canonical_arch,
    load_checkpoint, save_checkpoint,
)
from robustness_helpers import one_thread  # noqa: F401


def test_parameter_counts_match_the_usual_definitions():
    # PreAct ResNet-18 with the final BN + ReLU of the adversarial-training literature, and
    # WRN-34-10 as in TRADES / RobustBench (46.16M parameters).
    assert sum(p.numel() for p in build_model("preact_resnet18", 10).parameters()) == 11_172_170
    assert sum(p.numel() for p in build_model("wrn_34_10", 10).parameters()) == 46_160_474


@pytest.mark.parametrize("make,size", [
    (lambda: SmallCNN(7, width=4), 13),
    (lambda: SmallCNN(7, in_channels=1, width=4), 32),
    (lambda: PreActResNet18(7), 32),
    (lambda: WideResNet(7, depth=10, widen=2, drop_rate=0.3), 32),
])
def test_forward_shapes(make, size):
    torch.manual_seed(0)
    model = make().eval()
    c = model.conv1.in_channels if hasattr(model, "conv1") else model.features[0].in_channels
    with torch.no_grad():
        out = model(torch.rand(3, c, size, size))
    assert out.shape == (3, 7) and torch.isfinite(out).all()


def test_wide_resnet_depth_must_be_6n_plus_4():
    with pytest.raises(ValueError, match="6n \\+ 4"):
        WideResNet(10, depth=30)


def test_normalize():
    norm = Normalize([0.5, 0.4, 0.3], [0.2, 0.25, 0.5])
    x = torch.rand(2, 3, 4, 4)
    expected = (x - torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1)) / torch.tensor([0.2, 0.25, 0.5]).view(1, 3, 1, 1)
    assert torch.allclose(norm(x), expected)
    assert norm(x.double()).dtype == torch.float64
    with pytest.raises(ValueError, match="channels"):
        norm(torch.rand(2, 1, 4, 4))
    with pytest.raises(ValueError, match="one value per channel"):
        Normalize([0.5, 0.5], [0.2])
    with pytest.raises(ValueError, match="positive"):
        Normalize([0.5], [0.0])


def test_build_model_names_aliases_and_normalization():
    assert canonical_arch("SmallCNN") == "small_cnn" and canonical_arch("wrn-34-10") == "wrn_34_10"
    model = build_model("smallcnn", 5, normalization="cifar10", width=4)
    assert isinstance(model, NormalizedModel) and isinstance(model.net, SmallCNN)
    assert model.normalize.mean.flatten().tolist() == pytest.approx(NORMALIZATIONS["cifar10"]["mean"])
    x = torch.rand(2, 3, 8, 8)
    model.eval()
    assert torch.allclose(model(x), model.net(model.normalize(x)))
    assert isinstance(build_model("small_cnn", 5, normalization={"mean": [0.1] * 3, "std": [0.3] * 3}), NormalizedModel)
    for args, kwargs, match in [
        (("resnet50", 10), {}, "unknown model"),
        (("small_cnn", 1), {}, "num_classes"),
        (("small_cnn", True), {}, "num_classes"),
        (("small_cnn", 10), {"normalization": "imagenet"}, "unknown normalization"),
        (("small_cnn", 10), {"normalization": {"mean": [0.5]}}, "mean"),
        (("small_cnn", 10), {"in_channels": 0}, "in_channels"),
        (("small_cnn", 10), {"in_channels": 1, "normalization": "cifar10"}, "3 channels but in_channels=1"),
    ]:
        with pytest.raises((ValueError, TypeError), match=match):
            build_model(*args, **kwargs)
    with pytest.raises(TypeError, match="string"):
        build_model(3, 10)


@pytest.mark.parametrize("normalization", [None, "cifar100"])
def test_checkpoint_round_trip(tmp_path, normalization):
    torch.manual_seed(0)
    model = build_model("small_cnn", 6, normalization=normalization, width=4)
    # Non-trivial batch-norm statistics must travel too.
    model.train()
    with torch.no_grad():
        model(torch.rand(16, 3, 8, 8))
    model.eval()
    path = tmp_path / "model.pt"
    save_checkpoint(path, model, "smallcnn", 6, model_kwargs={"width": 4}, epoch=3, metrics={"acc": 0.5})
    loaded, ckpt = load_checkpoint(path)
    assert ckpt["arch"] == "small_cnn" and ckpt["epoch"] == 3 and ckpt["metrics"] == {"acc": 0.5}
    assert isinstance(loaded, NormalizedModel) == (normalization is not None)
    assert not loaded.training
    net = loaded.net if normalization else loaded
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), (model.net if normalization else model).state_dict().values()))
    # rebuilt on the CPU with channels-last weights (models.CPU_CHANNELS_LAST): the same function,
    # through convolution kernels that may round differently
    assert net.features[0].weight.is_contiguous(memory_format=torch.channels_last)
    x = torch.rand(4, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=1e-6)


def test_checkpoint_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "missing.pt")
    torch.save({"state_dict": {}}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="'arch'"):
        load_checkpoint(tmp_path / "other.pt")
    # refine's checkpoint.pt (for --resume) is named as such, with the file to load instead
    torch.save({"model": {}, "optimizer": {}, "scheduler": {}, "epoch": 1}, tmp_path / "checkpoint.pt")
    with pytest.raises(ValueError, match="a training checkpoint of refine .for --resume.*model.pt"):
        load_checkpoint(tmp_path / "checkpoint.pt")
    # a model checkpoint with an optimizer's state beside it (save_checkpoint's extra) still loads
    opt = torch.optim.SGD(SmallCNN(3).parameters(), lr=0.1)
    save_checkpoint(tmp_path / "with_optimizer.pt", SmallCNN(3), "small_cnn", 3, optimizer=opt.state_dict(),
                    scheduler={}, epoch=3)
    assert isinstance(load_checkpoint(tmp_path / "with_optimizer.pt")[0], SmallCNN)
    with pytest.raises(ValueError, match="unknown model"):
        save_checkpoint(tmp_path / "x.pt", SmallCNN(3), "vgg", 3)
    # weights_only loading: a checkpoint holding arbitrary objects cannot run code.
    torch.save({"model": {}, "arch": "small_cnn", "num_classes": 3, "hook": Normalize([0.5], [0.5])}, tmp_path / "obj.pt")
    with pytest.raises(ValueError, match="cannot be read as a checkpoint") as refused:
        load_checkpoint(tmp_path / "obj.pt")
    assert "Unsupported global" in str(refused.value.__cause__) or "eights only" in str(refused.value.__cause__)
    (tmp_path / "text.pt").write_text("not a checkpoint")
    with pytest.raises(ValueError, match="cannot be read as a checkpoint"):
        load_checkpoint(tmp_path / "text.pt")
    # A state dict that does not fit the architecture is an error, not a silent partial load.
    save_checkpoint(tmp_path / "wide.pt", SmallCNN(3, width=8), "small_cnn", 3, model_kwargs={"width": 8})
    ckpt = torch.load(tmp_path / "wide.pt", weights_only=True)
    ckpt["model_kwargs"] = {"width": 4}
    torch.save(ckpt, tmp_path / "wrong.pt")
    with pytest.raises(ValueError, match=r"wrong.pt: its weights do not fit small_cnn\(num_classes=3, \*\*\{'width': 4\}\)"):
        load_checkpoint(tmp_path / "wrong.pt")
    # ... and save_checkpoint refuses to write such files: they could not be loaded back
    for model, arch, classes, kwargs in ((SmallCNN(3, width=8), "small_cnn", 3, None), (SmallCNN(3), "small_cnn", 4, None),
                                         (SmallCNN(3), "preact_resnet18", 3, None)):
        with pytest.raises(ValueError, match="as build_model makes it"):
            save_checkpoint(tmp_path / "bad.pt", model, arch, classes, model_kwargs=kwargs)
    with pytest.raises(TypeError, match=r"extra\['optimizer'\] is a SGD"):
        save_checkpoint(tmp_path / "bad.pt", SmallCNN(3), "small_cnn", 3, optimizer=torch.optim.SGD(SmallCNN(3).parameters(), lr=0.1))
    save_checkpoint(tmp_path / "named.pt", build_model("small_cnn", 3, normalization="cifar10").bfloat16(), "small_cnn", 3,
                    normalization="cifar10")  # the model's own, as its bfloat16 buffers hold them: the exact values saved
    assert torch.load(tmp_path / "named.pt", weights_only=True)["normalization"]["mean"] == [0.4914, 0.4822, 0.4465]
    with pytest.raises(ValueError, match="differs from the model's own"):
        save_checkpoint(tmp_path / "bad.pt", build_model("small_cnn", 3, normalization="cifar10"), "small_cnn", 3,
                        normalization="cifar100")
    assert not (tmp_path / "bad.pt").exists()


def test_wrapped_models_save_as_the_model_inside(tmp_path):
    # a compiled or DataParallel model saved its wrapper's keys (_orig_mod., module.) and no normalization
    model = build_model("small_cnn", 3, normalization="cifar10", width=4)
    for wrapped in (torch.compile(model), torch.nn.DataParallel(model)):
        save_checkpoint(tmp_path / "w.pt", wrapped, "small_cnn", 3, model_kwargs={"width": 4})
        loaded, ckpt = load_checkpoint(tmp_path / "w.pt")
        torch.testing.assert_close(torch.tensor(ckpt["normalization"]["mean"]), torch.tensor([0.4914, 0.4822, 0.4465]))
        x = torch.rand(2, 3, 32, 32)
        torch.testing.assert_close(loaded(x), model.eval()(x))


def test_wide_resnet_takes_the_reference_initialization():
    torch.manual_seed(0)
    net = build_model("wrn_34_10", 10)
    conv = net.block2[1].conv1  # 3x3, 320 -> 320
    assert abs(conv.weight.std().item() - (2 / (9 * 320)) ** 0.5) < 0.002
    assert torch.all(net.fc.bias == 0)
