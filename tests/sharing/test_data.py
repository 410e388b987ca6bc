"""The DP-CVAE pipeline's building blocks (docs/dpcvae.md): patch-classification datasets, frozen
embedding extractors and the linear classifiers on embeddings (local, FedAvg / FedProx, λ-mixing)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torch.utils.data import Dataset, Subset

from privfl.data import DataError, ImageFolderPatches, PatchClassification, SyntheticHistology
from privfl.models import build_model
from privfl.sharing.classifiers import (
    accuracy,
    balanced_accuracy,
    choose_lambda,
    federated_linear,
    mix,
    predict_proba,
    train_linear,
)
from privfl.sharing.embeddings import dhunet_encoder, extract, timm_encoder

# ---------------------------------------------------------------------------------- datasets


class _Masks(Dataset):
    """A generic (image, mask) dataset without a dominant_class method."""

    num_classes = 3

    def __init__(self, masks: list[np.ndarray]) -> None:
        self.masks = masks

    def __len__(self) -> int:
        return len(self.masks)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        m = torch.as_tensor(self.masks[i])
        return torch.full((3, *m.shape), float(i)), m


class _SomeBlank(SyntheticHistology):
    """SyntheticHistology never draws an all-background patch; this one does for i % 4 == 0."""

    def mask(self, index: int) -> np.ndarray:
        m = super().mask(index)
        return np.zeros_like(m) if index % 4 == 0 else m


def test_patch_classification_labels_are_dominant_classes_and_drop_background():
    data = _SomeBlank(24, size=32, seed=3)
    dominant = [data.dominant_class(i) for i in range(len(data))]
    assert dominant.count(0) == 6 and set(dominant) == {0, 1, 2, 3}

    full = PatchClassification(data, drop_background=False)
    assert full.num_classes == 4 and len(full) == len(data)
    assert full.labels.tolist() == dominant and full.labels.dtype == torch.int64
    assert full.class_counts().tolist() == np.bincount(dominant, minlength=4).tolist()

    kept = PatchClassification(data)
    keep = [i for i, c in enumerate(dominant) if c != 0]
    assert kept.indices.tolist() == keep and kept.labels.tolist() == [dominant[i] for i in keep]
    assert kept.class_counts()[0] == 0 and int(kept.class_counts().sum()) == len(kept)
    image, label = kept[1]
    assert isinstance(label, int) and label == dominant[keep[1]]
    assert torch.equal(image, data[keep[1]][0]) and image.shape == (3, 32, 32)
    assert kept[-1][1] == dominant[keep[-1]]
    with pytest.raises(IndexError):
        kept[len(kept)]

    # through a Subset (what the benchmark does per site): still the dominant class
    sub = PatchClassification(Subset(data, [5, 2, 7]), 4, drop_background=False)
    assert sub.labels.tolist() == [dominant[5], dominant[2], dominant[7]]


def test_patch_classification_of_a_generic_segmentation_dataset():
    a = np.zeros((4, 4), dtype=np.int64)
    b = np.array([[0, 0, 2, 2], [0, 1, 2, 2], [0, 1, 1, 0], [0, 0, 0, 0]])  # 2 beats 1, 0 ignored
    c = np.array([[1, 1, 2, 2], [0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]])  # tie -> smallest class
    ds = PatchClassification(_Masks([a, b, c]))
    assert ds.num_classes == 3 and ds.labels.tolist() == [2, 1] and ds.indices.tolist() == [1, 2]
    assert ds[0][0][0, 0, 0] == 1.0  # the image of base item 1
    assert PatchClassification(_Masks([a, b]), drop_background=False).labels.tolist() == [0, 2]
    with pytest.raises(ValueError, match="outside"):
        PatchClassification(_Masks([b]), num_classes=2)


def _write_png(path, rgb) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(rgb, dtype=np.uint8)).save(path)


def test_image_folder_patches(tmp_path):
    _write_png(tmp_path / "tumour" / "a.png", np.full((6, 6, 3), 255))
    _write_png(tmp_path / "normal" / "b.png", np.zeros((8, 5, 3)))
    _write_png(tmp_path / "normal" / "c.PNG", np.full((4, 4, 3), 128))
    (tmp_path / "normal" / "notes.txt").write_text("not an image")
    (tmp_path / "readme.md").write_text("ignored")
    ds = ImageFolderPatches(tmp_path, size=8)
    assert ds.classes == ["normal", "tumour"] and ds.num_classes == 2 and len(ds) == 3
    assert ds.labels.tolist() == [0, 0, 1] and ds.class_counts().tolist() == [2, 1]
    image, label = ds[2]
    assert label == 1 and image.dtype == torch.float32 and image.shape == (3, 8, 8)
    assert torch.allclose(image, torch.ones_like(image))
    assert float(ds[0][0].max()) == 0.0 and 0.0 <= float(ds[1][0].min()) <= float(ds[1][0].max()) <= 1.0


def test_image_folder_patches_errors(tmp_path):
    with pytest.raises(DataError, match="not found"):
        ImageFolderPatches(tmp_path / "missing")
    with pytest.raises(DataError, match="no class sub-folders"):
        ImageFolderPatches(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no image"):
        ImageFolderPatches(tmp_path)
    (tmp_path / "empty" / "broken.png").write_bytes(b"not a png")
    ds = ImageFolderPatches(tmp_path, size=4)
    with pytest.raises(DataError, match="broken.png"):
        ds[0]


# ---------------------------------------------------------------------------------- extractors


def test_dhunet_encoder_shape_frozen_deterministic():
    enc = dhunet_encoder(size=32, seed=0)
    assert enc.embedding_dim == 256 and not enc.training
    assert all(not p.requires_grad for p in enc.parameters())
    enc.train()
    assert not enc.training  # stays frozen in eval mode
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    z = enc(x)
    assert z.shape == (3, 256) and torch.isfinite(z).all()
    assert torch.equal(z, dhunet_encoder(size=32, seed=0)(x))  # same seed: same features
    assert not torch.allclose(z, dhunet_encoder(size=32, seed=1)(x))
    with pytest.raises(ValueError, match="32, 32"):
        enc(torch.rand(1, 3, 64, 64))

    # a given model: pooled deepest maps of both branches, model left trainable
    model = build_model("dhunet-tiny", img_size=32)
    enc2 = dhunet_encoder(model)
    assert all(p.requires_grad for p in model.parameters())
    model.eval()
    g, loc = model.encode(x)
    expected = torch.cat([g[-1].mean(dim=(2, 3)), loc[-1].mean(dim=(2, 3))], dim=1)
    assert torch.allclose(enc2(x), expected, atol=1e-5)
    with pytest.raises(TypeError, match="DHU-Net"):
        dhunet_encoder(nn.Linear(2, 2))


def test_timm_encoder_from_local_checkpoint(tmp_path):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    src = timm.create_model("test_resnet", pretrained=False)  # with its classifier: ignored on load
    path = tmp_path / "test_resnet.pth"
    torch.save({"state_dict": src.state_dict()}, path)
    enc = timm_encoder("test_resnet", path)
    assert not enc.training and all(not p.requires_grad for p in enc.parameters())
    src.reset_classifier(0)
    src.eval()
    x = torch.rand(2, 3, 32, 32)
    z = enc(x)
    assert z.shape == (2, enc.embedding_dim) and torch.allclose(z, src(x))

    from safetensors.torch import save_file

    save_file(src.state_dict(), str(tmp_path / "w.safetensors"))
    assert torch.allclose(timm_encoder("test_resnet", tmp_path / "w.safetensors")(x), z)
    with pytest.raises(FileNotFoundError, match="never downloads"):
        timm_encoder("test_resnet", tmp_path / "absent.pth")
    torch.save({"weight": torch.zeros(2)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="does not fit"):
        timm_encoder("test_resnet", tmp_path / "other.pth")


def test_extract_shapes_and_order():
    data = PatchClassification(SyntheticHistology(10, size=32, seed=1))
    enc = dhunet_encoder(size=32)
    x, y = extract(data, enc, batch_size=4)
    assert x.shape == (len(data), enc.embedding_dim) and x.dtype == torch.float32 and x.device.type == "cpu"
    assert y.dtype == torch.int64 and torch.equal(y, data.labels)
    assert torch.allclose(x[2], enc(data[2][0][None])[0], atol=1e-5)
    with pytest.raises(TypeError, match="PatchClassification"):
        extract(SyntheticHistology(2, size=32), enc)


# ---------------------------------------------------------------------------------- classifiers


def _toy(n: int = 240, d: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Three well-separated Gaussian blobs in d dimensions."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 3
    centres = 4.0 * torch.eye(3, d)
    return centres[y] + 0.5 * torch.randn(n, d, generator=g), y


def test_train_linear_learns_separable_problem_deterministically():
    x, y = _toy()
    model = train_linear(x, y, 3, epochs=30, lr=1e-2)
    probs = predict_proba(model, x)
    assert probs.shape == (240, 3) and torch.allclose(probs.sum(dim=1), torch.ones(240))
    assert accuracy(probs, y) > 0.95
    again = train_linear(x, y, 3, epochs=30, lr=1e-2)
    assert torch.equal(model.weight, again.weight) and torch.equal(model.bias, again.bias)
    with pytest.raises(ValueError, match="labels"):
        train_linear(x, y, 2)


def test_balanced_accuracy_imbalanced_hand_computed():
    y = torch.tensor([0] * 8 + [1, 1])
    pred = torch.tensor([0] * 8 + [1, 0])  # recall 1.0 on class 0, 0.5 on class 1
    probs = torch.nn.functional.one_hot(pred, 3).float()  # class 2 absent from y: not counted
    assert accuracy(probs, y) == pytest.approx(0.9)
    assert balanced_accuracy(probs, y) == pytest.approx(0.75)
    assert balanced_accuracy(pred, y) == pytest.approx(0.75)


def test_choose_lambda_and_mix():
    y = torch.tensor([0, 1, 2, 1])
    onehot = torch.nn.functional.one_hot
    right = 0.3 + 0.1 * onehot(y, 3).float()  # correct argmax, barely: (0.4, 0.3, 0.3)
    wrong = onehot((y + 1) % 3, 3).float()  # confidently wrong
    assert choose_lambda(right, wrong, y) == 1.0  # only lambda > 10/11 gets every sample right
    assert choose_lambda(wrong, right, y) == 0.0
    assert choose_lambda(right, right, y) == 0.0  # ties: the smallest lambda
    assert choose_lambda(right, wrong, y, grid=[0.2, 0.7]) == 0.2  # both all wrong: a tie
    assert choose_lambda(onehot(y, 3).float(), wrong, y) == 0.6  # one-hot: right from lambda 0.6 on
    assert torch.allclose(mix(right, wrong, 0.3), 0.3 * right + 0.7 * wrong)
    with pytest.raises(ValueError):
        mix(right, wrong, 1.5)


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.detach().flatten(), b.detach().flatten(), dim=0))


def test_federated_linear_matches_centralised_and_fedprox_stays_close():
    x, y = _toy(n=120)
    central = train_linear(x, y, 3, epochs=10, lr=1e-2, batch_size=32)
    fed = federated_linear([(x, y)] * 3, 3, rounds=10, lr=1e-2, batch_size=32)
    assert accuracy(predict_proba(fed, x), y) > 0.95
    init = federated_linear([(x, y)], 3, rounds=0)
    # the same direction of travel from the same initialisation
    assert _cos(fed.weight - init.weight, central.weight - init.weight) > 0.9
    assert torch.equal(
        fed.weight, federated_linear([(x, y)] * 3, 3, rounds=10, lr=1e-2, batch_size=32).weight
    )

    # two different clients, few rounds: FedProx with a large mu moves less from the start
    xa, ya = _toy(n=60, seed=1)
    clients = [(xa[ya != 2], ya[ya != 2]), (xa[ya == 2], ya[ya == 2])]
    start = federated_linear(clients, 3, rounds=0).weight
    avg = federated_linear(clients, 3, rounds=5, lr=1e-2, batch_size=8)
    prox = federated_linear(clients, 3, rounds=5, lr=1e-2, batch_size=8, mu=100.0)
    assert (prox.weight - start).norm() < 0.5 * (avg.weight - start).norm()
