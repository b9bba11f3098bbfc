"""Under torchrun, a collective reached by some ranks only, or a process that never
starts, is a clear error naming the collective and the rank, within a timeout."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from helpers.launch import free_port, run_ranks

HELPERS = Path(__file__).resolve().parents[1] / "helpers"
SRC = Path(__file__).resolve().parents[2] / "src"


def test_a_save_on_rank_0_only_is_an_error_on_both_ranks_not_a_hang(tmp_path):
    outputs = run_ranks([str(HELPERS / "collective_worker.py"), str(tmp_path)], timeout=120)
    (out0, _), (out1, _) = outputs
    assert "rank 0 of 2 is in learn.save() but rank(s) [1] are in another collective" in out0
    assert "rank 1 of 2 is in learn.fit() but rank(s) [0] are in another collective" in out1


def test_world_size_2_with_one_process_fails_within_the_init_timeout():
    script = textwrap.dedent(
        """
        from mixprec.parallel.distributed import CollectiveTimeout, init_distributed
        try:
            init_distributed("gloo")
        except CollectiveTimeout as error:
            print(error)
        """
    )
    env = {
        **os.environ,
        "PYTHONPATH": str(SRC),
        "RANK": "0",
        "WORLD_SIZE": "2",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "MIXPREC_INIT_TIMEOUT": "1",
    }
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60
    )
    assert (
        "rank 0 of 2: joining the process group (init_process_group) did not complete within 1 s"
        in done.stdout
    ), done.stderr
    assert "MIXPREC_INIT_TIMEOUT" in done.stdout
