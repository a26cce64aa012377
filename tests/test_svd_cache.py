"""The SVD cache's guarantees: size cap with LRU eviction, owned (unmapped) factors, entries checked
against their weight, and ``vectorfit cache info|prune|clear``. Real files and matrices throughout."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from conftest import assert_close_rel, example_inputs, logits_of, make_tiny_bert
from vectorfit import ConfigError, VectorFitConfig, VectorFitWarning, get_vectorfit_model
from vectorfit import cache as vc
from vectorfit.cache import SVDCache, check_factors, fingerprint, parse_size
from vectorfit_recipes.cli import main

RTOL = 1e-5
N_BERT_TARGETS = 12
QUERY = "bert.encoder.layer.0.attention.self.query"


@pytest.fixture(autouse=True)
def _no_cap_env(monkeypatch):
    monkeypatch.delenv(vc.MAX_BYTES_ENV, raising=False)
    monkeypatch.delenv("VECTORFIT_SVD_CACHE", raising=False)


def _matrix(seed: int, shape=(24, 16)) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _entries(root: Path) -> list[Path]:
    return sorted(p for p in Path(root).iterdir() if vc._ENTRY_RE.match(p.name))


def _plant(path: Path, U, S, Vh) -> None:
    """An entry with the current format and a valid CRC, holding whatever factors it is given."""
    U, S, Vh = U.contiguous(), S.contiguous(), Vh.contiguous()
    save_file({"U": U, "S": S, "Vh": Vh}, str(path), metadata={"format": vc._FORMAT, "crc32": vc._payload_digest(U, S, Vh)})


def _is_svd_of(W, U, S, Vh) -> bool:
    return check_factors(W, U, S, Vh, tol=1e-5) is None


# ------------------------------------------------------------------------------------------ sizes
@pytest.mark.parametrize("text,expected", [("0", 0), ("2147483648", 2**31), ("5GB", 5 * 10**9), ("5g", 5 * 10**9),
                                           ("2GiB", 2 * 2**30), ("1.5G", 1_500_000_000), ("500 MB", 5 * 10**8),
                                           (" 10KiB ", 10240), ("3B", 3)])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["5 gigs", "-1", "1e9", "GiB", "", "5iB"])
def test_parse_size_errors_name_the_value_and_the_forms(text):
    with pytest.raises(ConfigError) as e:
        parse_size(text)
    msg = str(e.value)
    assert vc.MAX_BYTES_ENV in msg and repr(text) in msg and "500MB" in msg and "0 for no limit" in msg


def test_cap_default_and_environment(monkeypatch, tmp_path):
    assert SVDCache(tmp_path).max_bytes == vc.DEFAULT_MAX_BYTES == 2 * 2**30
    monkeypatch.setenv(vc.MAX_BYTES_ENV, "5GB")
    assert SVDCache(tmp_path).max_bytes == 5 * 10**9
    monkeypatch.setenv(vc.MAX_BYTES_ENV, "0")
    assert SVDCache(tmp_path).max_bytes == 0


def test_malformed_cap_fails_at_wrapping_unless_the_cache_is_off(monkeypatch, tmp_path):
    monkeypatch.setenv(vc.MAX_BYTES_ENV, "5 gigs")
    with pytest.raises(ConfigError, match=r"VECTORFIT_CACHE_MAX_BYTES='5 gigs' is not a size"):
        get_vectorfit_model(make_tiny_bert(0), VectorFitConfig(variant="no_avf", cache_dir=str(tmp_path)))
    get_vectorfit_model(make_tiny_bert(0), VectorFitConfig(variant="no_avf", svd_cache=False))  # no cap needed


# ------------------------------------------------------------------------------------------ cap and LRU
def test_hit_marks_the_entry_used(tmp_path):
    W = _matrix(0)
    SVDCache(tmp_path).get_or_compute(W)
    (entry,) = _entries(tmp_path)
    os.utime(entry, (1000, 1000))
    cache = SVDCache(tmp_path)
    cache.get_or_compute(W)
    assert cache.hits == 1 and entry.stat().st_mtime > time.time() - 600


def test_cap_evicts_least_recently_used_never_the_entry_just_written(tmp_path):
    mats = [_matrix(i) for i in range(6)]
    SVDCache(tmp_path, max_bytes=0).get_or_compute(mats[0])
    size = _entries(tmp_path)[0].stat().st_size  # all entries of one shape have one size
    cache = SVDCache(tmp_path, max_bytes=int(3.5 * size))
    paths = []
    for i in range(1, 4):  # entries 0..3: four, one more than the cap holds
        cache.get_or_compute(mats[i])
        paths.append(cache.path_for(fingerprint(mats[i])))
    paths.insert(0, cache.path_for(fingerprint(mats[0])))
    present = set(_entries(tmp_path))
    assert len(present) == 3 and paths[3] in present and paths[0] not in present, "the oldest one goes first"
    for t, p in zip((1000, 2000, 3000), paths[1:]):  # distinct ages, independent of the clock's resolution
        os.utime(p, (t, t))
    assert SVDCache(tmp_path).get_or_compute(mats[1]) is not None  # a hit: entry 1 is now the newest used
    cache.get_or_compute(mats[4])
    assert set(_entries(tmp_path)) == {paths[1], paths[3], cache.path_for(fingerprint(mats[4]))}, \
        "entry 2 (least recently used) should have gone, not entry 1 (read since)"
    assert sum(p.stat().st_size for p in _entries(tmp_path)) <= cache.max_bytes

    tiny = SVDCache(tmp_path, max_bytes=size // 2)  # a cap below one entry: only the new one is kept
    tiny.get_or_compute(mats[5])
    assert _entries(tmp_path) == [tiny.path_for(fingerprint(mats[5]))]


def test_model_runs_under_a_small_cap(tmp_path, monkeypatch):
    monkeypatch.setenv(vc.MAX_BYTES_ENV, "20KiB")
    base = make_tiny_bert(0)
    inputs = example_inputs(base)
    ref = logits_of(base, inputs)
    vf = get_vectorfit_model(base, VectorFitConfig(variant="no_avf", cache_dir=str(tmp_path)))
    assert_close_rel(logits_of(vf, inputs), ref, RTOL)
    files = _entries(tmp_path)
    assert 0 < len(files) < N_BERT_TARGETS and sum(p.stat().st_size for p in files) <= 20 * 1024


_WORKER = textwrap.dedent("""
    import sys, torch
    from vectorfit.cache import SVDCache, check_factors
    torch.set_num_threads(1)
    cache = SVDCache(sys.argv[1])
    for rnd in range(3):
        for i in range(24):  # the same matrices in both processes: they read, write and evict each other's entries
            W = torch.randn(20, 12, generator=torch.Generator().manual_seed(i))
            assert check_factors(W, *cache.get_or_compute(W), tol=1e-5) is None
    print(cache.hits, cache.misses)
""")


def test_two_processes_share_a_capped_folder(tmp_path):
    SVDCache(tmp_path, max_bytes=0).get_or_compute(_matrix(0, (20, 12)))
    size = _entries(tmp_path)[0].stat().st_size
    env = {**os.environ, vc.MAX_BYTES_ENV: str(6 * size), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-W", "error::UserWarning", "-c", _WORKER, str(tmp_path)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
        assert "unreadable" not in err and "failed verification" not in err, err
    assert sum(p.stat().st_size for p in _entries(tmp_path)) <= 12 * size  # each process keeps its view under the cap
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary files left behind"


# ------------------------------------------------------------------------------------------ owned factors
def _maps_listing(folder: Path) -> list[str]:
    with open("/proc/self/maps") as f:
        return [line for line in f if str(folder) in line]


def test_read_factors_are_owned_copies_not_a_file_map(tmp_path):
    W = _matrix(1, (64, 48))
    U0, S0, Vh0 = (t.clone() for t in SVDCache(tmp_path).get_or_compute(W))
    cache = SVDCache(tmp_path)
    U, S, Vh = cache.get_or_compute(W)
    assert cache.hits == 1
    (entry,) = _entries(tmp_path)
    with open(entry, "r+b") as f:  # in place: a MAP_PRIVATE view of the file would show these bytes
        f.seek(200)
        f.write(b"\xff" * (entry.stat().st_size - 200))
    assert torch.equal(U, U0) and torch.equal(S, S0) and torch.equal(Vh, Vh0)
    if os.path.exists("/proc/self/maps"):
        assert _maps_listing(tmp_path) == []


def test_wrapped_model_keeps_no_cache_file_mapped(tmp_path):
    root = tmp_path / "c"
    get_vectorfit_model(make_tiny_bert(0), VectorFitConfig(variant="no_avf", cache_dir=str(root)))
    base = make_tiny_bert(0)
    inputs = example_inputs(base)
    ref = logits_of(base, inputs)
    vf = get_vectorfit_model(base, VectorFitConfig(variant="no_avf", cache_dir=str(root)))
    assert vf.svd_cache.hits == N_BERT_TARGETS
    if os.path.exists("/proc/self/maps"):
        assert _maps_listing(root) == [], "cache files are still mapped after wrapping"
    for p in _entries(root):
        with open(p, "r+b") as f:
            f.seek(100)
            f.write(bytes(p.stat().st_size - 100))
    assert_close_rel(logits_of(vf, inputs), ref, RTOL, "outputs after the cache files were overwritten")


# ------------------------------------------------------------------------------------------ checked content
@pytest.mark.parametrize("shape,dtype", [((24, 16), torch.float32), ((16, 40), torch.float32), ((48, 48), torch.float16),
                                         ((32, 20), torch.bfloat16)])
def test_real_svds_pass_the_check_and_the_rng_is_untouched(shape, dtype):
    W = _matrix(3, shape).to(dtype)
    low = (_matrix(4, (shape[0], 2)) @ _matrix(5, (2, shape[1]))).to(dtype)  # rank 2: many zero singular values
    state = torch.get_rng_state()
    for M in (W, low, torch.zeros(shape, dtype=dtype)):
        assert check_factors(M, *vc.svd_fp32(M)) is None
    assert torch.equal(torch.get_rng_state(), state)


def _forgeries(W):
    U, S, Vh = vc.svd_fp32(W)
    flip = torch.ones_like(S)
    flip[0] = -1
    return {
        "other matrix": (vc.svd_fp32(torch.randn_like(W)), "is not this weight"),
        "rescaled factors": ((U * 2, S / 2, Vh), "U is not orthonormal"),  # U diag(S) Vh is still W
        "rescaled Vh": ((U, S / 3, Vh * 3), "Vh is not orthonormal"),
        "negative S": ((U * flip, S * flip, Vh), "not finite, non-negative and sorted"),
        "unsorted S": ((U.flip(1), S.flip(0), Vh.flip(0)), "not finite, non-negative and sorted"),
        "NaN": ((U, S, Vh * float("nan")), "is not this weight"),
    }


@pytest.mark.parametrize("kind", list(_forgeries(_matrix(0))))
def test_forged_entry_with_valid_crc_is_rejected_recomputed_and_overwritten(tmp_path, kind):
    W = _matrix(7, (24, 16))
    (factors, reason) = _forgeries(W)[kind]
    cache = SVDCache(tmp_path)
    path = cache.path_for(fingerprint(W))
    _plant(path, *factors)
    with pytest.warns(VectorFitWarning, match=reason) as rec:
        U, S, Vh = cache.get_or_compute(W, name="layer.7.q")
    msg = str(rec[0].message)
    assert str(path) in msg and "'layer.7.q'" in msg and "VECTORFIT_CACHE" in msg
    assert (cache.hits, cache.misses, cache.rejected) == (0, 1, 1)
    assert _is_svd_of(W, U, S, Vh)
    again = SVDCache(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error", VectorFitWarning)
        assert _is_svd_of(W, *again.get_or_compute(W))
    assert again.hits == 1, "the entry was not overwritten with the right factors"


def test_planted_entry_in_a_model_cache_leaves_the_model_exact(tmp_path):
    root = tmp_path / "shared"
    base = make_tiny_bert(0)
    key = fingerprint(base.get_submodule(QUERY).weight)
    get_vectorfit_model(make_tiny_bert(0), VectorFitConfig(variant="no_avf", cache_dir=str(root)))
    other = base.get_submodule("bert.encoder.layer.1.attention.self.query").weight.detach()
    _plant(root / f"{key}.safetensors", *vc.svd_fp32(other))  # same shape, valid CRC, another layer's factors

    inputs = example_inputs(base)
    ref = logits_of(base, inputs)
    with pytest.warns(VectorFitWarning, match=QUERY.replace(".", r"\.")):
        vf = get_vectorfit_model(base, VectorFitConfig(variant="no_avf", cache_dir=str(root)))
    assert (vf.svd_cache.misses, vf.svd_cache.hits, vf.svd_cache.rejected) == (1, N_BERT_TARGETS - 1, 1)
    assert_close_rel(logits_of(vf, inputs), ref, RTOL, "outputs with a planted cache entry")


def test_many_planted_entries_warn_once(tmp_path):
    root = tmp_path / "shared"
    get_vectorfit_model(make_tiny_bert(0), VectorFitConfig(variant="no_avf", cache_dir=str(root)))
    for p in _entries(root):  # every entry replaced by a consistent-looking forgery
        with safe_open(str(p), framework="pt") as f:
            U, S, Vh = (f.get_tensor(k).clone() for k in ("U", "S", "Vh"))
        _plant(p, U * 2, S / 2, Vh)
    base = make_tiny_bert(0)
    inputs = example_inputs(base)
    ref = logits_of(base, inputs)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        vf = get_vectorfit_model(base, VectorFitConfig(variant="no_avf", cache_dir=str(root)))
    mine = [w for w in rec if issubclass(w.category, VectorFitWarning)]
    assert len(mine) == 1 and "further such entries" in str(mine[0].message)
    assert vf.svd_cache.rejected == N_BERT_TARGETS
    assert_close_rel(logits_of(vf, inputs), ref, RTOL)


# ------------------------------------------------------------------------------------------ CLI
T0 = 1e9  # September 2001


def _fill(root: Path, n: int) -> list[Path]:
    """``n`` entries, used at times T0, T0 + 1000, ... (oldest first)."""
    cache = SVDCache(root, max_bytes=0)
    paths = []
    for i in range(n):
        W = _matrix(100 + i)
        cache.get_or_compute(W)
        paths.append(cache.path_for(fingerprint(W)))
        os.utime(paths[-1], (T0 + 1000.0 * i,) * 2)
    return paths


def test_cli_info(tmp_path, capsys, monkeypatch):
    paths = _fill(tmp_path, 3)
    monkeypatch.setenv(vc.MAX_BYTES_ENV, "5GB")
    assert main(["cache", "info", "--dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    total = sum(p.stat().st_size for p in paths)
    assert str(tmp_path) in out and "entries: 3," in out and vc.format_size(total) in out
    assert "5000000000 bytes" in out and "VECTORFIT_CACHE_MAX_BYTES=5GB" in out
    day = time.strftime("%Y-%m-%d %H:%M", time.localtime(T0))
    assert f"oldest {day}" in out and "days ago" in out
    assert f"newest {time.strftime('%Y-%m-%d %H:%M', time.localtime(T0 + 2000))}" in out


def test_cli_info_rejects_a_malformed_cap(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv(vc.MAX_BYTES_ENV, "lots")
    assert main(["cache", "info", "--dir", str(tmp_path)]) == 2
    assert "VECTORFIT_CACHE_MAX_BYTES='lots' is not a size" in capsys.readouterr().err


def test_cli_prune_to_a_size_keeps_the_most_recently_used(tmp_path, capsys):
    paths = _fill(tmp_path, 5)
    size = paths[0].stat().st_size
    assert main(["cache", "prune", "--dir", str(tmp_path), "--max-size", str(2 * size), "--dry-run"]) == 0
    assert "would free" in capsys.readouterr().out and len(_entries(tmp_path)) == 5
    assert main(["cache", "prune", "--dir", str(tmp_path), "--max-size", str(2 * size)]) == 0
    out = capsys.readouterr().out
    assert _entries(tmp_path) == sorted(paths[3:])
    assert f"freed {vc.format_size(3 * size)} (3 least recently used entries)" in out and "2 entries" in out


def test_cli_prune_to_the_cap_from_the_environment(tmp_path, capsys, monkeypatch):
    paths = _fill(tmp_path, 4)
    monkeypatch.setenv(vc.MAX_BYTES_ENV, str(paths[0].stat().st_size))
    assert main(["cache", "prune", "--dir", str(tmp_path)]) == 0
    assert _entries(tmp_path) == [paths[-1]]


def test_cli_prune_bad_size_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["cache", "prune", "--dir", str(tmp_path), "--max-size", "big"])
    assert e.value.code == 2 and "--max-size='big' is not a size" in capsys.readouterr().err


def test_cli_clear_removes_only_the_cache_files(tmp_path, capsys):
    paths = _fill(tmp_path, 3)
    name = paths[0].name
    stale, fresh = tmp_path / f".{name}.abc123.tmp", tmp_path / f".{name}.xyz789.tmp"
    foreign = [tmp_path / "notes.txt", tmp_path / "model.safetensors", tmp_path / ("A" * 64 + ".safetensors"),
               tmp_path / f"{name}.bak"]
    for p in [stale, fresh, *foreign]:
        p.write_bytes(b"x")
    os.utime(stale, (1000, 1000))
    (tmp_path / ("b" * 64 + ".safetensors")).mkdir()  # a folder named like an entry is not an entry
    assert main(["cache", "clear", "--dir", str(tmp_path), "--dry-run"]) == 0
    assert len(_entries(tmp_path)) == 4 and stale.exists()
    assert main(["cache", "clear", "--dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "(3 entries)" in out.splitlines()[-2] and "1 stale temporary" in out
    assert [p.name for p in _entries(tmp_path)] == ["b" * 64 + ".safetensors"]
    assert not stale.exists() and fresh.exists(), "a write in progress elsewhere must be left to finish"
    assert all(p.read_bytes() == b"x" for p in foreign) and tmp_path.is_dir()


def test_cli_help_explains(capsys):
    with pytest.raises(SystemExit):
        main(["cache", "--help"])
    out = capsys.readouterr().out
    assert "VECTORFIT_CACHE_MAX_BYTES" in out and "least recently used" in out
    for action in ("info", "prune", "clear"):
        assert action in out
