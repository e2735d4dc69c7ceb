"""mtssl.utils.deferred_import: wandb, which timm imports whenever it is installed, loads only when used."""

from __future__ import annotations

import subprocess
import sys

import pytest

from mtssl.utils.deferred_import import defer_import

PACKAGE = "mtssl_deferred_probe"


@pytest.fixture
def probe_package(tmp_path, monkeypatch):
    """A package whose code appends to a file each time it runs; removed from sys.modules afterwards."""
    ran = tmp_path / "ran.txt"
    package = tmp_path / PACKAGE
    package.mkdir()
    (package / "__init__.py").write_text(f"open({str(ran)!r}, 'a').write('ran\\n')\nVALUE = 42\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield ran
    sys.modules.pop(PACKAGE, None)


def test_the_code_runs_at_the_first_attribute_access_and_once(probe_package):
    defer_import(PACKAGE)
    module = __import__(PACKAGE)
    assert not probe_package.exists()  # imported, not run
    assert module.__file__.endswith("__init__.py") and not probe_package.exists()  # what inspect.getmodule reads
    assert module.VALUE == 42 and module.VALUE == 42
    assert probe_package.read_text() == "ran\n"
    assert type(module).__name__ == "module"


def test_a_module_already_imported_or_not_installed_is_left_alone(probe_package):
    real = __import__(PACKAGE)
    defer_import(PACKAGE)
    assert sys.modules[PACKAGE] is real and probe_package.read_text() == "ran\n"
    defer_import("mtssl_no_such_package")
    assert "mtssl_no_such_package" not in sys.modules


def test_a_failed_load_leaves_the_module_out_of_sys_modules(probe_package, tmp_path):
    (tmp_path / PACKAGE / "__init__.py").write_text("raise RuntimeError('broken')\n")
    defer_import(PACKAGE)
    module = __import__(PACKAGE)
    with pytest.raises(RuntimeError, match="broken"):
        module.VALUE
    assert PACKAGE not in sys.modules


def test_importing_the_trainer_does_not_load_wandb_and_wandb_still_works():
    pytest.importorskip("wandb")
    code = ("import sys, mtssl.train.trainer, timm; loaded = 'wandb.sdk' in sys.modules; import wandb; "
            "print(loaded, wandb.Settings.__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "Settings"]
