"""The shared fixtures of tests/conftest.py: a test that leaves global torch state changed
fails, and the tests after it run in the state there was before."""

from pathlib import Path

import pytest

CONFTEST = (Path(__file__).parent / "conftest.py").read_text()


@pytest.mark.parametrize(
    ("leak", "named"),
    [
        ("torch.set_autocast_enabled('cpu', True)", "autocast enabled (cpu)"),
        ("torch.set_autocast_dtype('cpu', torch.float16)", "autocast dtype (cpu)"),
        ("torch.set_grad_enabled(False)", "grad enabled"),
        ("torch.set_default_dtype(torch.float64)", "default dtype"),
        ("torch.set_num_threads(2)", "threads"),
    ],
)
def test_a_test_that_leaves_global_torch_state_changed_fails_and_is_undone(pytester, leak, named):
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(
        f"""
        import torch
        from conftest import global_torch_state

        def test_a_leaks():
            {leak}

        def test_b_runs_in_the_state_before():
            assert global_torch_state() == BEFORE

        BEFORE = global_torch_state()
        """
    )
    result = pytester.runpytest_inprocess("-p", "no:randomly", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=2, errors=1)
    result.stdout.fnmatch_lines(
        [
            "*ERROR at teardown of test_a_leaks*",
            f"the test left global torch state changed: {named}:*",
        ]
    )
