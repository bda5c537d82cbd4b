"""Which build runs: the pure-Python package, or the compiled one (hatch_build.py, FLOWGATE_COMPILE=1).

`scripts/test` runs the proxy's suites a second time against a compiled copy of the project with
FLOWGATE_EXPECT_BUILD=compiled; this test makes sure that run does test the C extensions (and that an ordinary
run is not shadowed by stale ones left in the source tree).
"""

from __future__ import annotations

import importlib
import importlib.machinery
import os

import gateway
from hatch_build import COMPILED


def test_every_hot_module_is_of_the_expected_build() -> None:
    expected = os.environ.get("FLOWGATE_EXPECT_BUILD", "pure Python")
    assert expected == gateway.BUILD
    compiled = expected == "compiled"
    for path in COMPILED:
        module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
        file = module.__file__ or ""
        is_extension = file.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES))
        assert is_extension == compiled, f"{module.__name__} is loaded from {file}"
