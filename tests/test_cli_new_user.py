"""What a new user hits first: each malformed input gets its exact exit code and one line naming the problem and
the fix, no traceback, and leaves the user's files as they were."""
from __future__ import annotations

from click.testing import CliRunner

from apex4gen.cli import cli

from _helpers import shipped, write_yaml


def run(*args):
    return CliRunner().invoke(cli, list(args))


def one_line_error(result, exit_code: int, *needles: str) -> str:
    assert result.exit_code == exit_code, (result.exit_code, result.output, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("apex4gen: error: "), result.stderr
    assert "Traceback" not in result.output + result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def test_specs_show_reports_a_gpu_file_against_the_gpu_schema(tmp_path):
    gpu = shipped("gpus", "a40")
    gpu["rho"] = 64
    path = write_yaml(tmp_path / "gpu.yaml", gpu)
    line = one_line_error(run("specs", "show", str(path)), 2, "field 'rho'", "the rates give 16.01",
                          "set rho to 16.01 or delete the rho line")
    assert "points" not in line and "workload" not in line


def test_specs_show_reports_a_model_typo_against_the_model_schema(tmp_path):
    model = shipped("models", "llama2-70b")
    model["hiden_size"] = model.pop("hidden_size")
    path = write_yaml(tmp_path / "model.yaml", model)
    line = one_line_error(run("specs", "show", str(path)), 2, "hiden_size", "hidden_size")
    assert "points" not in line


def test_specs_show_reports_a_workload_against_the_workload_schema(tmp_path):
    path = write_yaml(tmp_path / "w.yaml", {"name": "w", "description": "d", "points": [{"phase": "decod", "batch": 1,
                                                                                        "weight": 1}]})
    one_line_error(run("specs", "show", str(path)), 2, "phase", "decode")


def test_specs_show_refuses_a_file_of_no_kind(tmp_path):
    path = write_yaml(tmp_path / "x.yaml", {"name": "x", "colour": "blue"})
    one_line_error(run("specs", "show", str(path)), 2, "cannot tell whether this is a GPU, model or workload",
                   "tensor_tops", "hidden_size", "points")


def test_specs_show_still_shows_a_valid_user_file(tmp_path):
    path = write_yaml(tmp_path / "model.yaml", shipped("models", "llama2-7b"))
    result = run("specs", "show", str(path))
    assert result.exit_code == 0, result.output
    assert "hidden 4096" in result.output
