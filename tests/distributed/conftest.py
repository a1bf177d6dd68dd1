"""The ``sharded`` fixture: ``_sharded.py`` of this folder, loaded by path (tests run with ``--import-mode=importlib``,
so a sibling module is not importable by name)."""

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest


@pytest.fixture(scope="session")
def sharded() -> ModuleType:
    spec = importlib.util.spec_from_file_location("lossdiag_sharded", Path(__file__).with_name("_sharded.py"))
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
