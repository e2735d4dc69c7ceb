"""The SLURM tests of one cluster share one xdist worker under ``--dist loadgroup`` (tests/conftest.py).

xdist reads a test's ``xdist_group`` into its id in its own ``pytest_collection_modifyitems``; a group added after
that hook ran is silently ignored, and the SLURM tests then run on both workers at once (two sweeps on one 2-CPU
node, and each worker building the module's finished sweep again). This runs the real hook under xdist.
"""

from __future__ import annotations

from tests.support.data import REPO


def test_slurm_tests_run_in_the_slurm_group_on_one_worker(pytester, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    pytester.makeconftest("from tests.conftest import pytest_collection_modifyitems  # noqa: F401\n")
    pytester.makeini("[pytest]\nmarkers =\n    slurm: needs the local SLURM cluster\n")
    tests = "\n".join(f"@pytest.mark.slurm\ndef test_{i}():\n    pass\n" for i in range(4))
    pytester.makepyfile(test_cluster="import pytest\n\n" + tests + "\ndef test_plain():\n    pass\n")
    result = pytester.runpytest_subprocess("-n", "2", "--dist", "loadgroup", "-v", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=5)
    lines = [line for line in result.outlines if "PASSED" in line and "@slurm" in line]
    assert len(lines) == 4, result.outlines
    assert len({line.split()[0] for line in lines}) == 1, lines  # one worker ([gw0] or [gw1]) ran them all
    assert not any("test_plain@" in line for line in result.outlines)


def test_a_test_marked_first_is_collected_first(pytester, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    pytester.makeconftest("from tests.conftest import pytest_collection_modifyitems  # noqa: F401\n")
    pytester.makeini("[pytest]\nmarkers =\n    slurm: needs the local SLURM cluster\n    first: started early\n")
    pytester.makepyfile(test_order="import pytest\n\ndef test_a():\n    pass\n\n"
                                   "@pytest.mark.first\ndef test_b():\n    pass\n\ndef test_c():\n    pass\n")
    result = pytester.runpytest("--collect-only", "-q", "-p", "no:cacheprovider")
    assert [line.split("::")[-1] for line in result.outlines if "::" in line] == ["test_b", "test_a", "test_c"]
