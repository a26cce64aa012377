"""The README's quick start runs as written (in a real subprocess, on the real MiniLM asset)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"


def _block(marker: str) -> str:
    text = README.read_text()
    m = re.search(rf"<!-- {marker} -->\s*```\w*\n(.*?)```", text, re.S)
    assert m, f"README has no block after <!-- {marker} -->"
    return m.group(1)


@pytest.mark.slow
def test_quickstart_runs_as_written(tmp_path):
    code = _block("quickstart")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "trainable params:" in proc.stdout and "frozen now:" in proc.stdout
    assert (tmp_path / "out" / "adapter" / "adapter_model.safetensors").stat().st_size < 300_000


def test_setup_commands_pin_torch_first():
    for marker in ("main-command", "test-command"):
        cmd = _block(marker).strip()
        assert cmd.count("\n") == 0, f"{marker} must be one command"
        assert cmd.index("torch==2.13.0") < cmd.index("pip install -e"), marker


def test_every_relative_link_in_the_readme_resolves():
    text = README.read_text()
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text)
    local = [link for link in links if not re.match(r"[a-z]+://", link)]
    assert local, "the README links to its documentation"
    missing = [link for link in local if not (README.parent / link).exists()]
    assert not missing, missing


def test_readme_is_short():
    assert len(README.read_text().splitlines()) <= 250  # the rest lives in docs/
