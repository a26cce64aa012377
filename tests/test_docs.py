"""The documentation site builds with ``mkdocs build --strict`` (every link, anchor, snippet and API
object resolves) and every Python block of its pages runs.

A page's Python blocks run in order, as one script, in a fresh folder (a later block may use what an
earlier one defined), in a real subprocess. A block preceded by ``<!-- no-run: why -->`` is a
fragment or a listing; the reason must be given. Blocks included from README.md (the quick start)
run in tests/test_readme.py.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
# Pages written for the site (the benchmark reports and the changelog are linked in from elsewhere).
PAGES = sorted(p for p in DOCS.rglob("*.md") if not p.is_symlink() and "benchmarks" not in p.relative_to(DOCS).parts)
_BLOCK = re.compile(r"(<!-- no-run:(?P<why>[^>]*)-->\s*\n)?```python\n(?P<code>.*?)```", re.S)


def _mkdocs(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    exe = shutil.which("mkdocs", path=str(Path(sys.executable).parent)) or shutil.which("mkdocs")
    assert exe, "mkdocs is not installed: pip install -e '.[test]' (or '.[docs]')"
    return subprocess.run([exe, "build", "--strict", *args], cwd=cwd, capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "NO_MKDOCS_2_WARNING": "1"})


def _blocks(page: Path) -> tuple[list[str], list[str]]:
    run, skipped = [], []
    for m in _BLOCK.finditer(page.read_text()):
        if m.group(1):
            assert m.group("why").strip(), f"{page}: a no-run block must say why"
            skipped.append(m.group("code"))
        else:
            run.append(m.group("code"))
    return run, skipped


def test_site_builds_strictly(tmp_path):
    proc = _mkdocs("--site-dir", str(tmp_path / "site"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    api = (tmp_path / "site" / "api" / "index.html").read_text()
    for name in ("VectorFitConfig", "hotswap_adapter", "AVFCallback", "local_decomposition", "SVDCache"):
        assert name in api, name  # mkdocstrings rendered the objects, not just their headings


def test_a_broken_link_fails_the_build(tmp_path):
    # The check above is only worth something if strict mode really refuses a dead link.
    copy = tmp_path / "repo"
    shutil.copytree(ROOT / "docs", copy / "docs", symlinks=False)
    shutil.copy(ROOT / "mkdocs.yml", copy / "mkdocs.yml")
    shutil.copy(ROOT / "README.md", copy / "README.md")
    shutil.copytree(ROOT / "src", copy / "src")
    page = copy / "docs" / "guides" / "trainer.md"
    page.write_text(page.read_text() + "\nSee [nothing](no-such-page.md).\n")
    proc = _mkdocs("--site-dir", str(tmp_path / "site"), cwd=copy)
    assert proc.returncode != 0 and "no-such-page.md" in proc.stdout + proc.stderr


def test_every_page_is_in_the_navigation():
    nav = (ROOT / "mkdocs.yml").read_text()
    for page in PAGES:
        assert str(page.relative_to(DOCS)) in nav, page


@pytest.mark.slow
@pytest.mark.parametrize("page", [p for p in PAGES if _blocks(p)[0]], ids=lambda p: str(p.relative_to(DOCS)))
def test_python_blocks_of_the_page_run(page, tmp_path):
    code = "\n".join(_blocks(page)[0])
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
