"""The ``sharded`` fixture: ``_sharded.py`` of this folder, loaded by path (tests run with ``--import-mode=importlib``,
so a sibling module is not importable by name).

The FSDP scripts are not collected (``--doctest-modules`` would import them): they run as their own processes, where
their folder is on ``sys.path`` and ``import _sharded`` works.
"""

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest

collect_ignore = ["fsdp1_script.py", "fsdp2_script.py"]


@pytest.fixture(scope="session")
def sharded() -> ModuleType:
    spec = importlib.util.spec_from_file_location("lossdiag_sharded", Path(__file__).with_name("_sharded.py"))
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
