"""Flowgate's compiled build: the modules every proxied request runs through, compiled to C by mypyc.

    FLOWGATE_COMPILE=1 pip install .     # a wheel whose hot-path modules are C extensions (needs a C compiler)
    python hatch_build.py DEST           # a copy of this project with those modules compiled in place

The package is pure Python by default (`pip install -e .` stays editable). The compiled build runs the same source
(typed for `mypy --strict`, which mypyc needs) with less interpreter work per request: see benchmarks/RESULTS.md.
The container image is built this way. `scripts/test` runs the proxy's suites against a compiled copy too, and
the gateway's start-up log line says which build runs. hatchling runs `CompiledBuildHook` for every build (see
pyproject.toml); it compiles only when FLOWGATE_COMPILE=1.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

try:
    from hatchling.builders.hooks.plugin.interface import BuildHookInterface
except ImportError:  # run as a script, outside a build
    BuildHookInterface = object  # type: ignore[assignment,misc]

#: The modules on a proxied request's path, both the express lane's (gateway/relay.py) and the app's. Not here:
#: - server.py: its protocol extends uvicorn's, which mypyc cannot compile against;
#: - stores/redis.py: an async generator, which mypyc cannot compile;
#: - errors.py, stores/base.py: modules left as Python extend their classes (not possible for a compiled class);
#: - policy.py, rules.py: their classes check what callers (and configuration files) pass, and compiled, a value
#:   of the wrong type would get a TypeError instead of the documented error naming the field (routing.py, which
#:   applies the checked rules to each request, is compiled);
#: - the CLI, config and admin code, which no request runs.
COMPILED = (
    "gateway/cycle.py",
    "gateway/deadlines.py",
    "gateway/engine.py",
    "gateway/http.py",
    "gateway/inbox.py",
    "gateway/logs.py",
    "gateway/metrics.py",
    "gateway/proxy.py",
    "gateway/relay.py",
    "gateway/routing.py",
    "gateway/stores/batching.py",
    "gateway/stores/liveness.py",
    "gateway/stores/memory.py",
    "gateway/stores/resp.py",
    "gateway/upstream/lean.py",
    "gateway/upstream/lean_conn.py",
    "gateway/upstream/lean_pool.py",
    "gateway/upstream/lean_response.py",
)
BUILD_REQUIRES = ["mypy>=1.11", "setuptools>=68"]
_SETUP = f"""\
from setuptools import setup
from mypyc.build import mypycify

setup(name="flowgate-compiled", ext_modules=mypycify({list(COMPILED)!r}, opt_level="3"))
"""


def compile_tree(root: Path, dest: Path) -> list[Path]:
    """Copy the `gateway` package of `root` into `dest` and compile `COMPILED` there, in place; return the
    extension files made (one per module, and mypyc's shared runtime, which goes at the top level)."""
    shutil.copytree(root / "gateway", dest / "gateway", ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    (dest / "setup_compiled.py").write_text(_SETUP)
    with tempfile.TemporaryDirectory() as temp:
        done = subprocess.run(
            [sys.executable, "setup_compiled.py", "build_ext", "--inplace", "--build-temp", temp],
            cwd=dest,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
    (dest / "setup_compiled.py").unlink()
    shutil.rmtree(dest / "build", ignore_errors=True)
    shutil.rmtree(dest / ".mypy_cache", ignore_errors=True)
    if done.returncode:
        raise RuntimeError(f"mypyc could not compile Flowgate:\n{done.stdout[-8000:]}")
    return sorted(path for path in dest.rglob("*.so") if path.is_file())


def compiling() -> bool:
    return os.environ.get("FLOWGATE_COMPILE", "") not in ("", "0")


class CompiledBuildHook(BuildHookInterface):  # type: ignore[misc]
    """hatchling's hook: with FLOWGATE_COMPILE=1 a wheel gets the compiled modules and a platform tag."""

    PLUGIN_NAME = "custom"

    def dependencies(self) -> list[str]:
        # mypyc type-checks the modules against the runtime dependencies: without them, the build fails
        return [*BUILD_REQUIRES, *self.metadata.core.dependencies] if compiling() else []

    def initialize(self, version: str, build_data: dict[str, Any]) -> None:
        if self.target_name != "wheel" or not compiling():
            return
        if version == "editable":
            raise RuntimeError(
                "FLOWGATE_COMPILE=1 needs a regular install (`pip install .`): in an editable one, "
                "the compiled modules would hide later changes to the sources"
            )
        self._temp = tempfile.TemporaryDirectory()
        dest = Path(self._temp.name)
        for path in compile_tree(Path(self.root), dest):
            build_data["force_include"][str(path)] = str(path.relative_to(dest))
        build_data["pure_python"] = False
        build_data["infer_tag"] = True

    def finalize(self, version: str, build_data: dict[str, Any], artifact_path: str) -> None:
        temp = getattr(self, "_temp", None)
        if temp is not None:
            temp.cleanup()


def copy_project(root: Path, dest: Path) -> None:
    """Copy the rest of the project (tests, benchmarks, docs, configuration) next to a compiled package."""
    skip = {".git", ".venv", "gateway", "build", "dist"}
    for path in root.iterdir():
        if path.name in skip or path.name.endswith("_cache"):
            continue
        if path.is_dir():
            shutil.copytree(path, dest / path.name, ignore=shutil.ignore_patterns("__pycache__", ".*_cache"))
        else:
            shutil.copy2(path, dest / path.name)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python hatch_build.py DEST")
    root, dest = Path(__file__).resolve().parent, Path(sys.argv[1])
    made = compile_tree(root, dest)
    copy_project(root, dest)
    print(f"compiled {len(made)} extension modules into {dest}")
