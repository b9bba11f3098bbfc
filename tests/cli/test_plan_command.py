import json
import re

import pytest
import torch

from mixprec.cli.main import main
from mixprec.cli.plan_command import load_model, parse_dtype


def _plan_json(capsys, *args):
    assert main(["plan", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def _dtypes(data):
    return {m["name"]: m["dtype"] for m in data["modules"]}


def test_plan_digits_cnn_prints_the_table(capsys):
    assert main(["plan", "digits-cnn"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("plan: Sequential to float16; fp32 kept for norm layers")
    assert "BatchNorm2d  float32" in out and "type _BatchNorm" in out
    assert "parameter bytes 39.2 KiB -> 19.8 KiB" in out and "warnings: none" in out


def test_plan_options_change_the_policy_and_dtype(capsys):
    data = _plan_json(capsys, "tiny-transformer", "--dtype", "bf16", "--keep-fp32", "head")
    assert data["dtype"] == "bfloat16"
    assert _dtypes(data)["head"] == "float32" and _dtypes(data)["ln_f"] == "float32"
    assert _dtypes(data)["blocks.0.attn.qkv"] == "bfloat16"
    data = _plan_json(capsys, "tiny-transformer", "--no-norms", "--keep-fp32-type", "nn.Embedding")
    dtypes = _dtypes(data)
    assert dtypes["ln_f"] == "float16" and dtypes["tok"] == dtypes["pos"] == "float32"
    data = _plan_json(
        capsys, "digits-cnn", "--keep-fp32-type", "torch.nn.modules.conv:Conv2d", "--keep-fp32", "8"
    )
    assert set(_dtypes(data).values()) == {"float32", "float16"}
    assert _dtypes(data)["0"] == _dtypes(data)["8"] == "float32"


def test_a_factory_from_the_current_directory(capsys, tmp_path, monkeypatch):
    (tmp_path / "my_models.py").write_text(
        "import torch.nn as nn\n"
        "def big():\n"
        "    m = nn.Linear(2, 2)\n"
        "    m.weight.data.fill_(1e5)\n"
        "    return m\n"
        "def not_a_model():\n"
        "    return 3\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(__import__("sys").modules, "my_models", raising=False)
    data = _plan_json(capsys, "my_models:big")
    assert data["model"] == "Linear" and "beyond the float16 range" in data["warnings"][0]
    with pytest.raises(ValueError, match=r"my_models.not_a_model\(\) returned int, expected"):
        load_model("my_models:not_a_model")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["resnet"], "unknown model spec 'resnet': expected one of digits-cnn, tiny-transformer"),
        (["no_such_module_xyz:f"], "cannot import 'no_such_module_xyz'"),
        (
            ["mixprec.cli.demo.data:nothing"],
            "module 'mixprec.cli.demo.data' has no attribute 'nothing'",
        ),
        (["mixprec.cli.demo.data:__doc__"], "mixprec.cli.demo.data.__doc__ is not callable"),
        (["digits-cnn", "--dtype", "fp32"], "unsupported dtype 'fp32'; choose from fp16, float16"),
        (
            ["digits-cnn", "--keep-fp32", "head"],
            "'head' match no module or parameter of Sequential .*Fix the --keep-fp32 pattern: "
            "`mixprec plan digits-cnn` without it lists every module's name.$",
        ),
        (["digits-cnn", "--keep-fp32", "a b"], "bad module name pattern 'a b'"),
        (["digits-cnn", "--keep-fp32-type", "Lineer"], "unknown module type 'Lineer'"),
        (["digits-cnn", "--keep-fp32-type", "mixprec:plan"], "unknown module type 'mixprec:plan'"),
    ],
)
def test_bad_specs_and_options_exit_with_a_message(args, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["plan", *args])
    assert exit_info.value.code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert re.match(f"^mixprec plan: error: .*{message}", line), line


def test_parse_dtype():
    assert parse_dtype("BF16") is torch.bfloat16 and parse_dtype("float16") is torch.float16
    with pytest.raises(ValueError, match="unsupported dtype 'int8'"):
        parse_dtype("int8")
