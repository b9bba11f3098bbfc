"""`mixprec train` on the Learner: JSON output and the plot, and a table row per run as it
ends when stdout is a pipe (one short epoch per run)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import mixprec
from mixprec.cli.main import main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_mixprec_train_prints_json_and_writes_the_plot(tmp_path, capsys):
    plot = tmp_path / "train.png"
    args = ["train", "--epochs", "1", "--precisions", "bf16", "--json", "--plot", str(plot)]
    assert main(args) == 0
    (run,) = json.loads(capsys.readouterr().out)["runs"]
    assert {"precision", "accuracy", "seconds", "skipped_steps", "loss_scale"} <= run.keys()
    assert run["precision"] == "bf16" and run["loss_scale"] > 0
    assert 0.5 < run["accuracy"] <= 1.0  # one epoch on the digits already learns
    assert plot.read_bytes().startswith(PNG_MAGIC)


CHILD = """
import sys
from mixprec.cli.demo import train
from mixprec.cli.main import main

trained = train.train_digits
def marked(precision, *args, **kwargs):  # stderr is unbuffered: marks when each run starts
    print("start", precision, file=sys.stderr, flush=True)
    return trained(precision, *args, **kwargs)
train.train_digits = marked
sys.exit(main(["train", "--epochs", "1", "--precisions", "bf16,fp32"]))
"""


def test_mixprec_train_to_a_pipe_prints_each_run_as_it_ends(tmp_path):
    src = str(Path(mixprec.__file__).resolve().parents[1])  # the mixprec under test
    path = os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")]))
    done = subprocess.run(
        [sys.executable, "-c", CHILD],
        stdout=subprocess.PIPE,  # stdout and the markers into one pipe, in the order written
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONPATH": path},
        cwd=tmp_path,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout
    events = []
    for line in done.stdout.splitlines():
        words = line.split()
        if words[:1] == ["start"] or words[:1] == ["precision"]:
            events.append(" ".join(words[:2]))
        elif words[:1] in (["bf16"], ["fp32"]) and len(words) == 6:
            events.append(f"row {words[0]}")
            assert 0.0 <= float(words[1]) <= 1.0  # the accuracy column
    expected = ["precision accuracy", "start bf16", "row bf16", "start fp32", "row fp32"]
    assert events == expected, done.stdout
