"""The documentation site builds with no warning, and its API reference covers the public names."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import statestore

ROOT = Path(__file__).resolve().parent.parent


def test_the_api_reference_lists_every_public_name() -> None:
    page = (ROOT / "docs" / "api.md").read_text(encoding="utf-8")
    listed = set(re.findall(r"^::: statestore\.(\w+)$", page, re.M))
    assert listed == set(statestore.__all__) | {"testing"}


def test_every_page_is_in_the_nav() -> None:
    config = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    in_nav = set(re.findall(r"^  - [^:]+: (\S+\.md)$", config, re.M))
    assert in_nav == {p.name for p in (ROOT / "docs").glob("*.md")}


@pytest.mark.timeout(180)
def test_mkdocs_build_strict(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert done.returncode == 0, done.stderr
    assert "WARNING" not in done.stderr, done.stderr
    api = (tmp_path / "api" / "index.html").read_text(encoding="utf-8")
    for name in statestore.__all__:
        assert f'id="statestore.{name}"' in api, name
    assert ":meth:" not in api and ":class:" not in api  # roles shown as plain code
