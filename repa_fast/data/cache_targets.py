"""Moved to ``repa_fast.tools.cache_targets``: offline writers live in tools/, readers in data/ (docs/compatibility.md).

The old name keeps users' commands and imports working: ``python -m repa_fast.data.cache_targets ...`` runs the
tool, and ``import repa_fast.data.cache_targets`` gives the tool's module itself (one module object, so patches
and attributes are shared). It is resolved at run time: data/ (the readers) does not import tools/ (the writers).
"""

import importlib
import runpy
import sys

_TARGET = "repa_fast.tools.cache_targets"

if __name__ == "__main__":
    runpy.run_module(_TARGET, run_name="__main__", alter_sys=True)
else:
    sys.modules[__name__] = importlib.import_module(_TARGET)
