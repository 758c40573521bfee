"""What `pip install .` installs: every data file the product reads at run time.

The quick start and systemd/install.sh install the package, not the checkout, and the tests
run from the editable checkout, where a file missing from the package data is still found.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Directory in the checkout -> the package it is installed as.
PACKAGES = {"daemon": "commsync/daemon", "config": "commsync/config", "connectors": "commsync/connectors"}


def _tracked_data_files() -> list[str]:
    """Tracked files of the packages that are neither code nor documentation, as installed paths."""
    listed = subprocess.run(["git", "ls-files", *PACKAGES], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    out = []
    for path in listed:
        top, _, rest = path.partition("/")
        if path.endswith((".py", ".md")):
            continue
        out.append(f"{PACKAGES[top]}/{rest}")
    return out


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    # Built from a copy of the tracked files, as a clean clone would be: a build/ left in the
    # checkout by an earlier build would otherwise lend the wheel files the package data misses.
    source = tmp_path_factory.mktemp("source")
    listed = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.splitlines()
    for path in listed:
        if (REPO / path).is_file():
            (source / path).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / path, source / path)
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(source)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (built,) = out.glob("commsync-*.whl")
    with zipfile.ZipFile(built) as zf:
        yield zf


def test_the_wheel_holds_every_data_file_of_the_checkout(wheel):
    data = _tracked_data_files()
    assert "commsync/daemon/demo_data/twilio/calls.json" in data  # the demo's Twilio replay
    assert "commsync/config/example.yaml" in data
    missing = sorted(set(data) - set(wheel.namelist()))
    assert missing == []


def test_the_wheel_holds_every_module(wheel):
    listed = subprocess.run(["git", "ls-files", *PACKAGES], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    modules = {f"{PACKAGES[p.partition('/')[0]]}/{p.partition('/')[2]}" for p in listed if p.endswith(".py")}
    assert modules - set(wheel.namelist()) == set()
