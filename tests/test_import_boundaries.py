"""The architecture's import rules, checked on the source so that a new import cannot blur them.

- The supervisor never imports Flask, waitress or gpt4all: it must stay small, start fast and
  survive whatever the model does.
- Only the engine imports gpt4all; the wire formats never import the engine (they speak to the
  generation service, which speaks to api/inference.py's contract).
- The worker side (`api/`) never imports the supervisor.

Every import counts, also one inside a function, so a lazy import cannot dodge a rule.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PRODUCT = ("api", "supervisor", "install", "bench")
ENGINE = "api/engine.py"
WIRE_MODULES = [f"api.wire.{path.stem}" for path in sorted((ROOT / "api" / "wire").glob("*.py")) if path.stem != "__init__"]


def imported_modules(path: Path) -> set[str]:
    """Every module an import statement in this file names, with each of its parent packages."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {".".join(name.split(".")[:depth]) for name in names for depth in range(1, name.count(".") + 2)}


def sources(*folders: str) -> list[Path]:
    return sorted(path for folder in folders for path in (ROOT / folder).rglob("*.py"))


def offenders(files: list[Path], forbidden: set[str]) -> dict[str, set[str]]:
    found = {str(path.relative_to(ROOT)): imported_modules(path) & forbidden for path in files}
    return {name: modules for name, modules in found.items() if modules}


def test_the_import_scan_sees_every_kind_of_import(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text("import flask\nfrom gpt4all import GPT4All\ndef f():\n    from api import engine\n")
    assert {"flask", "gpt4all", "gpt4all.GPT4All", "api", "api.engine"} <= imported_modules(sample)


def test_the_supervisor_imports_no_web_framework_and_no_engine() -> None:
    files = [*sources("supervisor"), ROOT / "watchdog_main.py"]
    assert offenders(files, {"flask", "werkzeug", "waitress", "gpt4all", "api.engine", "api.worker"}) == {}


def test_only_the_engine_imports_gpt4all() -> None:
    files = [path for path in sources(*PRODUCT) if path.relative_to(ROOT).as_posix() != ENGINE]
    assert offenders(files, {"gpt4all"}) == {}


def test_no_wire_format_imports_the_engine_or_the_layers_above_it() -> None:
    """A wire format speaks to the generation service; the app and the document builder sit above it."""
    assert offenders(sources("api/wire"), {"api.engine", "gpt4all", "api.app", "api.openapi", "api.worker"}) == {}


def test_the_worker_lifecycle_depends_only_on_the_protocol() -> None:
    """api/worker/lifecycle.py is the worker's state machine: testable without waitress or gpt4all."""
    imported = imported_modules(ROOT / "api/worker/lifecycle.py")
    assert {name for name in imported if name.startswith("api.")} <= {"api.protocol"} | {
        name for name in imported if name.startswith("api.protocol.")}
    assert not imported & {"waitress", "flask", "gpt4all", "werkzeug"}


def test_the_worker_side_never_imports_the_supervisor() -> None:
    assert offenders(sources("api"), {"supervisor"}) == {}


@pytest.mark.parametrize(("modules", "absent"), [
    (["api.app", "api.worker.cli", *WIRE_MODULES], ["gpt4all", "requests"]),  # requests: only once a download starts
    (["supervisor.main"], ["gpt4all", "flask", "waitress", "pydantic", "jinja2", "requests"]),
], ids=["worker-side", "supervisor"])
def test_importing_loads_no_heavier_layer(modules: list[str], absent: list[str]) -> None:
    """Also at run time: a fresh interpreter that imports these has not loaded those."""
    code = (f"import importlib, sys\nfor m in {modules!r}: importlib.import_module(m)\n"
            f"print(sorted({{m.split('.')[0] for m in sys.modules}} & {set(absent)!r}))")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60,
                            check=True)
    assert result.stdout.strip() == "[]"
