"""The documentation site builds in strict mode (a broken link, a missing page or an object the
API reference names that no longer exists fails it), and the README stays a README."""

import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.subprocess


def test_the_site_builds_strictly(tmp_path):
    pytest.importorskip("mkdocs")
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir",
                           str(tmp_path / "site")], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    cli = (tmp_path / "site" / "reference" / "cli" / "index.html").read_text()
    assert "--staleness-rule" in cli and "distbelief reproduce" in cli  # generated from --help
    api = (tmp_path / "site" / "reference" / "api" / "index.html").read_text()
    assert "trainer_for" in api and "Raises" in api  # generated from the docstrings


def test_the_readme_starts_with_the_two_commands_and_stays_short():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 200
    start = "\n".join(lines[:6])
    assert "make run" in start and "make test" in start
