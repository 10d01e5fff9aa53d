"""The offline writers moved from repa_fast.data to repa_fast.tools; the old names keep users' commands and imports
working (docs/compatibility.md)."""

import importlib
import os
import subprocess
import sys

import pytest

TOOLS = ("preprocess", "pack", "cache_targets")


@pytest.mark.parametrize("name", TOOLS)
def test_old_import_path_is_the_tool_module(name):
    old = importlib.import_module(f"repa_fast.data.{name}")
    new = importlib.import_module(f"repa_fast.tools.{name}")
    assert old is new
    assert callable(old.main)


@pytest.mark.parametrize("name", TOOLS)
def test_old_command_runs_the_tool(name):
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    old = subprocess.run(
        [sys.executable, "-m", f"repa_fast.data.{name}", "--help"], capture_output=True, text=True, env=env
    )
    new = subprocess.run(
        [sys.executable, "-m", f"repa_fast.tools.{name}", "--help"], capture_output=True, text=True, env=env
    )
    assert old.returncode == 0, old.stderr[-2000:]
    assert old.stdout == new.stdout
    assert f"repa_fast.tools.{name}" in old.stdout  # the help names the tool's new home


def test_readers_do_not_import_the_writers():
    code = (
        "import sys, repa_fast.data, repa_fast.data.cached_targets;"
        "print(any(m.startswith('repa_fast.tools') for m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
