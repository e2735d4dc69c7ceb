"""Packaging: sweeps and analysis are installed beside mtssl, each console command runs what its documented
``python ...`` form runs (Hydra finds its config from the installed module), and nothing edits sys.path."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest
import setuptools

tomllib = pytest.importorskip("tomllib")  # Python 3.11+
REPO = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
# Each console command and the module whose entry point it calls (python -m <module>, or the script's path).
COMMANDS = {"mtssl-run": "mtssl.run", "mtssl-eval": "mtssl.eval.__main__", "mtssl-sweep": "sweeps.launch",
            "mtssl-status": "sweeps.status", "mtssl-tables": "analysis.make_tables"}


def test_sweeps_and_analysis_are_packages_with_their_config():
    setup = PYPROJECT["tool"]["setuptools"]
    packages = set(setuptools.find_packages(str(REPO), include=setup["packages"]["find"]["include"]))
    assert {"mtssl", "mtssl.conf", "mtssl.utils", "sweeps", "sweeps.conf", "analysis"} <= packages
    assert not {p for p in packages if p.split(".")[0] in ("tests", "benchmarks")}
    assert all(any(REPO.joinpath(name, "conf").glob(pattern.removeprefix("conf/"))) for name, patterns
               in setup["package-data"].items() for pattern in patterns)
    assert setup["package-data"]["sweeps"] == ["conf/**/*.yaml"]


def test_every_console_command_names_an_entry_point():
    scripts = PYPROJECT["project"]["scripts"]
    assert {name: target.split(":")[0] for name, target in scripts.items()} == COMMANDS
    for name, target in scripts.items():
        module, function = target.split(":")
        assert callable(getattr(__import__(module, fromlist=[function]), function)), name


@pytest.mark.slow
def test_hydra_commands_find_their_config_when_called_as_an_installed_entry_point(tmp_path):
    """A console script imports the module (no __main__), so Hydra looks its config up as a package. Both
    commands run in one process (one torch import), away from the repository root."""
    calls = [("mtssl-run", ["--cfg", "job", "method=simsiam"]), ("mtssl-sweep", ["--help"])]  # --help exits
    code = "import importlib, sys\n"
    for command, args in calls:
        module, function = PYPROJECT["project"]["scripts"][command].split(":")
        code += (f"sys.argv = {[command, *args]!r}\ntry:\n    importlib.import_module({module!r}).{function}()\n"
                 "except SystemExit as done:\n    assert not done.code, done.code\nprint('<end>')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    run_cfg, sweep_help = proc.stdout.split("<end>", 1)
    assert "Usage: python sweeps/launch.py" in sweep_help and "ablation:" in sweep_help, sweep_help
    assert "name: simsiam" in run_cfg, run_cfg


# The GPU acceptance run goes to a borrowed machine where nothing is installed: it finds this checkout, and the
# wheels it unpacks into a temporary folder, by path.
MAY_EDIT_SYS_PATH = {"benchmarks/gpu_acceptance.py"}


def test_no_module_outside_the_tests_edits_sys_path():
    edits = []
    for root in ("mtssl", "sweeps", "analysis", "benchmarks"):
        for path in sorted((REPO / root).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                target = node.func if isinstance(node, ast.Call) else None
                if (isinstance(target, ast.Attribute) and target.attr in ("insert", "append", "extend")
                        and ast.unparse(target.value) == "sys.path"
                        and str(path.relative_to(REPO)) not in MAY_EDIT_SYS_PATH):
                    edits.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert not edits, f"import the installed packages instead: {edits}"
