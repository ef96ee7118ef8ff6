"""Data loaders: embedded digits, CIFAR-10/100 python pickles and MNIST IDX files written here."""
from __future__ import annotations

import gzip
import pickle
import struct

import numpy as np
import pytest
import torch

from models.data import (PAPER_CIFAR_MEAN, PAPER_CIFAR_STD, digits_split, load_dataset,
                         sample_images)


# ----------------------------------------------------------------------------- digits
def test_digits_split_sizes_types_and_range():
    ds = load_dataset("digits")
    assert ds.x_train.shape == (1077, 1, 8, 8) and ds.x_val.shape == (360, 1, 8, 8)
    assert ds.x_test.shape == (360, 1, 8, 8) and ds.input_shape == (1, 8, 8)
    assert ds.x_train.dtype == torch.float32 and ds.y_train.dtype == torch.int64
    assert ds.num_classes == 10 and ds.classes == [str(i) for i in range(10)]
    for x, _ in ds.splits().values():
        assert x.min() >= 0 and x.max() <= 1
    # grey levels are k/16 for integers k in 0..16: exact in float32
    assert torch.equal(ds.x_train * 16, (ds.x_train * 16).round())
    assert ds.x_train.max() == 1.0


def test_digits_split_is_partition_stratified_and_deterministic():
    tr, va, te = digits_split(0)
    allidx = np.concatenate([tr, va, te])
    assert len(allidx) == 1797 and len(np.unique(allidx)) == 1797  # disjoint, covers all
    from sklearn.datasets import load_digits

    y = load_digits().target
    share = np.bincount(y, minlength=10) / len(y)
    for idx in (tr, va, te):  # stratified: each class within one image of its share
        assert np.all(np.abs(np.bincount(y[idx], minlength=10) - share * len(idx)) <= 1)
    a, b = load_dataset("digits"), load_dataset("digits")
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_test, b.y_test)
    tr1, _, _ = digits_split(1)
    assert not np.array_equal(tr, tr1)


def test_digits32_is_upsampled_replicated_digits():
    d8, d32 = load_dataset("digits"), load_dataset("digits32")
    assert d32.x_train.shape == (1077, 3, 32, 32) and d32.input_shape == (3, 32, 32)
    assert torch.equal(d8.y_train, d32.y_train) and torch.equal(d8.y_test, d32.y_test)
    x = d32.x_test
    assert torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 0], x[:, 2])
    assert x.min() >= 0 and x.max() <= 1  # bilinear weights are convex
    # factor-4 bilinear upsampling (align_corners=False) maps output pixel 4i+1 to source
    # coordinate i - 1/8: a convex combination of source pixels i-1 and i (and likewise in
    # the other axis).  Where a source pixel's 3x3 neighbourhood is constant, that output
    # pixel must equal the constant.
    src = d8.x_test[:, 0]
    const = (src[:, 1:-1, 1:-1] == src[:, :-2, 1:-1]) & (src[:, 1:-1, 1:-1] == src[:, 2:, 1:-1])
    const &= (src[:, 1:-1, 1:-1] == src[:, 1:-1, :-2]) & (src[:, 1:-1, 1:-1] == src[:, 1:-1, 2:])
    const &= (src[:, 1:-1, 1:-1] == src[:, :-2, :-2]) & (src[:, 1:-1, 1:-1] == src[:, 2:, 2:])
    const &= (src[:, 1:-1, 1:-1] == src[:, :-2, 2:]) & (src[:, 1:-1, 1:-1] == src[:, 2:, :-2])
    # weights 1/8, 7/8 and values k/16 are exact in float32; 1e-6 only guards against an
    # implementation computing the weights with one rounding
    up = x[:, 0, 4 * 1 + 1::4, 4 * 1 + 1::4][:, :6, :6]
    diff = (up - src[:, 1:-1, 1:-1])[const]
    assert const.sum() > 100 and diff.abs().max() <= 1e-6


def test_normalizations():
    raw = load_dataset("digits32")
    p = load_dataset("digits32", normalize="paper")
    m = torch.tensor(PAPER_CIFAR_MEAN).view(1, 3, 1, 1)
    s = torch.tensor(PAPER_CIFAR_STD).view(1, 3, 1, 1)
    assert torch.equal(p.x_test, (raw.x_test - m) / s) and p.normalize == "paper"
    d = load_dataset("digits", normalize="dataset")
    # training split standardised per channel: mean 0, std 1 up to float32 summation error
    assert abs(d.x_train.mean().item()) < 1e-5 and abs(d.x_train.std().item() - 1) < 1e-5
    i = load_dataset("digits", normalize="instance")
    assert i.x_test.mean(dim=(1, 2, 3)).abs().max() < 1e-5
    assert (i.x_test.std(dim=(1, 2, 3)) - 1).abs().max() < 1e-5
    with pytest.raises(ValueError, match="needs 3 channels"):
        load_dataset("digits", normalize="paper")
    with pytest.raises(ValueError, match="normalize='zca'"):
        load_dataset("digits", normalize="zca")
    with pytest.raises(ValueError, match="name='svhn'"):
        load_dataset("svhn")


def test_sample_images():
    x = sample_images()
    assert x.shape == (2, 3, 32, 32) and x.dtype == torch.float32
    assert x.min() >= 0 and x.max() <= 1
    assert x.std(dim=(1, 2, 3)).min() > 0.05  # real photographs, not blank
    assert sample_images(16).shape == (2, 3, 16, 16)


# ----------------------------------------------------------------------------- CIFAR writers
def _cifar_batch(rng, n, label_key=b"labels", n_classes=10, offset=0):
    data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
    data[:, 0] = np.arange(offset, offset + n)  # unique first pixel: track images through splits
    labels = list(rng.integers(0, n_classes, size=n).tolist())
    return {b"batch_label": b"x", b"data": data, label_key: labels}


def _write_cifar10(root, rng, n=4):
    d = root / "cifar-10-batches-py"
    d.mkdir()
    batches = []
    for i in range(1, 6):
        b = _cifar_batch(rng, n, offset=10 * i)
        batches.append(b)
        with open(d / f"data_batch_{i}", "wb") as fh:
            pickle.dump(b, fh)
    test = _cifar_batch(rng, n, offset=100)
    with open(d / "test_batch", "wb") as fh:
        pickle.dump(test, fh)
    names = [f"class{i}".encode() for i in range(10)]
    with open(d / "batches.meta", "wb") as fh:
        pickle.dump({b"label_names": names, b"num_vis": 3072}, fh)
    return d, batches, test


def _as_images(data):
    return torch.from_numpy(data.reshape(-1, 3, 32, 32).astype(np.float32) / 255.0)


def test_cifar10_roundtrip(tmp_path, rng):
    d, batches, test = _write_cifar10(tmp_path, rng)
    ds = load_dataset("cifar10", tmp_path, val_fraction=0.0)
    want_x = _as_images(np.concatenate([b[b"data"] for b in batches]))
    want_y = torch.tensor(sum((b[b"labels"] for b in batches), []))
    assert torch.equal(ds.x_train, want_x) and torch.equal(ds.y_train, want_y)
    assert torch.equal(ds.x_test, _as_images(test[b"data"]))
    assert ds.classes == [f"class{i}" for i in range(10)] and ds.input_shape == (3, 32, 32)
    # pointing at the batches directory itself works too
    assert torch.equal(load_dataset("cifar10", d, val_fraction=0.0).x_test, ds.x_test)
    # validation split: 25% of 20 = 5 images, disjoint from train, together all of them
    s = load_dataset("cifar10", tmp_path, val_fraction=0.25, seed=3)
    assert s.x_val.shape[0] == 5 and s.x_train.shape[0] == 15
    ids = torch.cat([s.x_train[:, 0, 0, 0], s.x_val[:, 0, 0, 0]]) * 255
    assert sorted(ids.round().long().tolist()) == sorted((want_x[:, 0, 0, 0] * 255)
                                                         .round().long().tolist())
    s2 = load_dataset("cifar10", tmp_path, val_fraction=0.25, seed=3)
    assert torch.equal(s.x_val, s2.x_val)  # seeded split


def test_cifar100_roundtrip(tmp_path, rng):
    d = tmp_path / "cifar-100-python"
    d.mkdir()
    parts = {}
    for name, n, off in (("train", 6, 0), ("test", 3, 50)):
        b = _cifar_batch(rng, n, b"fine_labels", 100, off)
        b[b"coarse_labels"] = list(rng.integers(0, 20, size=n).tolist())
        parts[name] = b
        with open(d / name, "wb") as fh:
            pickle.dump(b, fh)
    with open(d / "meta", "wb") as fh:
        pickle.dump({b"fine_label_names": [f"f{i}".encode() for i in range(100)],
                     b"coarse_label_names": [f"c{i}".encode() for i in range(20)]}, fh)
    ds = load_dataset("cifar100", tmp_path, val_fraction=0.0)
    assert torch.equal(ds.x_train, _as_images(parts["train"][b"data"]))
    assert ds.y_test.tolist() == parts["test"][b"fine_labels"] and ds.num_classes == 100
    c = load_dataset("cifar100", tmp_path, val_fraction=0.0, label_mode="coarse")
    assert c.y_train.tolist() == parts["train"][b"coarse_labels"] and c.classes[3] == "c3"


def test_cifar_errors_name_the_file(tmp_path, rng):
    d, _, _ = _write_cifar10(tmp_path, rng)
    (d / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError, match="data_batch_3"):
        load_dataset("cifar10", tmp_path)
    with open(d / "data_batch_3", "wb") as fh:
        fh.write(b"\x80\x04garbage")  # truncated pickle
    with pytest.raises(ValueError, match=r"data_batch_3.*could not unpickle"):
        load_dataset("cifar10", tmp_path)
    with open(d / "data_batch_3", "wb") as fh:
        pickle.dump({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, fh)
    with pytest.raises(ValueError, match=r"data_batch_3.*\(N, 3072\)"):
        load_dataset("cifar10", tmp_path)
    with open(d / "data_batch_3", "wb") as fh:
        pickle.dump({b"data": np.zeros((2, 3072), np.uint8), b"fine": [0, 1]}, fh)
    with pytest.raises(ValueError, match=r"data_batch_3.*labels"):
        load_dataset("cifar10", tmp_path)
    with open(d / "data_batch_3", "wb") as fh:
        pickle.dump({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]}, fh)
    with pytest.raises(ValueError, match=r"data_batch_3.*expected 0..9"):
        load_dataset("cifar10", tmp_path)
    with pytest.raises(ValueError, match="root=None"):
        load_dataset("cifar10")


# ----------------------------------------------------------------------------- MNIST writers
def _idx_bytes(arr: np.ndarray) -> bytes:
    return struct.pack(">I", 0x0800 + arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape) \
        + arr.astype(np.uint8).tobytes()


def _write_mnist(root, rng, gz: bool, n_train=5, n_test=3):
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28)),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28)),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test),
    }
    for name, arr in arrays.items():
        raw = _idx_bytes(arr)
        if gz:
            with gzip.open(root / (name + ".gz"), "wb") as fh:
                fh.write(raw)
        else:
            (root / name).write_bytes(raw)
    return arrays


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_roundtrip(tmp_path, rng, gz):
    a = _write_mnist(tmp_path, rng, gz)
    ds = load_dataset("mnist", tmp_path, val_fraction=0.0)
    want = torch.from_numpy(a["train-images-idx3-ubyte"].astype(np.float32) / 255).unsqueeze(1)
    assert torch.equal(ds.x_train, want) and ds.input_shape == (1, 28, 28)
    assert ds.y_test.tolist() == a["t10k-labels-idx1-ubyte"].tolist()
    assert ds.x_test.shape == (3, 1, 28, 28) and ds.y_train.dtype == torch.int64


def test_mnist_errors_name_the_file(tmp_path, rng):
    _write_mnist(tmp_path, rng, gz=False)
    f = tmp_path / "t10k-images-idx3-ubyte"
    good = f.read_bytes()
    f.write_bytes(struct.pack(">I", 0x0801) + good[4:])
    with pytest.raises(ValueError, match=r"t10k-images-idx3-ubyte.*magic 0x00000801.*0x00000803"):
        load_dataset("mnist", tmp_path)
    f.write_bytes(good[:-7])  # truncated body
    with pytest.raises(ValueError, match=r"t10k-images-idx3-ubyte.*need exactly 2352"):
        load_dataset("mnist", tmp_path)
    f.write_bytes(good)
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(_idx_bytes(np.zeros(4, np.uint8)))
    with pytest.raises(ValueError, match="3 images but .*t10k-labels-idx1-ubyte has 4 labels"):
        load_dataset("mnist", tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(FileNotFoundError, match="t10k-labels-idx1-ubyte"):
        load_dataset("mnist", tmp_path)
