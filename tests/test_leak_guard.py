"""The leak guard of tests/conftest.py fails a test that leaves global state behind, and puts the state back."""

from __future__ import annotations

from tests.support.data import REPO

INNER_TESTS = '''
import os
import torch

THREADS = torch.get_num_threads()


def test_sets_threads_and_does_not_restore():
    torch.set_num_threads(THREADS + 1)


def test_runs_after_the_leak_with_the_threads_restored():
    assert torch.get_num_threads() == THREADS


def test_sets_a_rank_variable():
    os.environ["WORLD_SIZE"] = "2"


def test_cleans_up_after_itself(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    torch.set_num_threads(THREADS + 1)
    torch.set_num_threads(THREADS)
'''


def test_guard_fails_the_leaking_tests_only(pytester):
    pytester.makepyfile(test_inner=INNER_TESTS)
    result = pytester.runpytest_subprocess("-p", "tests.conftest", "-o", f"pythonpath={REPO}", "-p", "no:cacheprovider")
    # Every test body passes; the two leaks fail at teardown, naming what was left behind.
    result.assert_outcomes(passed=4, errors=2)
    output = result.stdout.str()
    assert "ERROR at teardown of test_sets_threads_and_does_not_restore" in output
    assert "ERROR at teardown of test_sets_a_rank_variable" in output
    assert "torch.get_num_threads() is" in output
    assert "environment variable WORLD_SIZE='2', was None" in output
