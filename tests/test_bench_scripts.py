"""The benchmark scripts still start: they are run by hand, so nothing else notices when a
helper they import moves (bench_many once imported a corpus function from its old module)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
SCRIPTS = sorted(p.name for p in TESTS.glob("bench_*.py") if p.name != "bench_corpus.py")  # bench_corpus is a library


def test_every_benchmark_script_is_covered():
    assert {"bench_imap.py", "bench_idle.py", "bench_many.py", "bench_verify.py", "bench_history.py"} <= set(SCRIPTS)


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_benchmark_script_imports_its_helpers_and_parses_its_options(script):
    done = subprocess.run([sys.executable, str(TESTS / script), "--help"], capture_output=True, text=True, timeout=60, cwd=TESTS.parent)
    assert done.returncode == 0, done.stderr
    assert "usage:" in done.stdout
