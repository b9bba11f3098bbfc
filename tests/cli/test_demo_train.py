"""`mixprec train` on the Learner: JSON output and the plot (one short bf16 epoch)."""

import json

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
