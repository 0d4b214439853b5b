"""``apex4gen plan`` and ``apex4gen specs``: tables, plan files, and one-line errors with a non-zero exit."""
from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
from click.testing import CliRunner

from apex4gen.cli import cli
from apex4gen.plan import Plan

from _helpers import shipped, write_yaml


def run(*args):
    return CliRunner().invoke(cli, list(args))


def assert_one_line_error(result, *needles):
    assert result.exit_code != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("apex4gen: error: "), result.stderr
    assert "Traceback" not in result.output + result.stderr
    for needle in needles:
        assert needle in lines[0]


def test_plan_prints_the_table_and_writes_the_plan(tmp_path):
    out = tmp_path / "plan.yaml"
    result = run("plan", "--gpu", "a40", "--model", "llama2-70b", "-o", str(out))
    assert result.exit_code == 0, result.output
    for column in ("layer", "shape N x K", "granularity", "path", "FP16 µs", "W4A4 µs", "speedup"):
        assert column in result.output
    assert "gate_up_proj" in result.output and "57344 x 8192" in result.output and "end to end" in result.output
    plan = Plan.load(out)
    assert plan.gpu == "a40" and plan.workload.name == "default"
    assert run("plan", "--gpu", "a40", "--model", "llama2-70b", "-o", str(out)).exit_code == 0  # a plan: replaced


def test_plan_accepts_workload_and_budget_names_and_paths(tmp_path):
    workload = write_yaml(tmp_path / "w.yaml", {"name": "mine", "description": "d",
                                                 "points": [{"phase": "decode", "batch": 8, "weight": 1}]})
    budget = write_yaml(tmp_path / "b.yaml", {"coarsest": {"default": "g128"}})
    out = tmp_path / "p.yaml"
    result = run("plan", "--gpu", "a100-80gb", "--model", "llama2-7b", "--workload", str(workload),
                 "--budget", str(budget), "--unfused", "-o", str(out))
    assert result.exit_code == 0, result.output
    plan = Plan.load(out)
    assert plan.workload.name == "mine" and not plan.fused and {lp.granularity.name for lp in plan.layers} == {"g128"}
    again = ("plan", "--gpu", "l40s", "--model", "qwen2.5-7b", "--workload", "decode", "-o", str(out))
    assert_one_line_error(run(*again), "holds another plan")  # another plan replaces this one only when asked
    assert run(*again, "--force").exit_code == 0


def test_plan_refuses_to_overwrite_other_files_without_force(tmp_path):
    precious = tmp_path / "notes.yaml"
    precious.write_text("my: notes\n")
    result = run("plan", "--gpu", "a40", "--model", "llama2-7b", "-o", str(precious))
    assert_one_line_error(result, "is not an apex4gen plan", "--force")
    assert precious.read_text() == "my: notes\n"
    assert run("plan", "--gpu", "a40", "--model", "llama2-7b", "-o", str(precious), "--force").exit_code == 0
    assert Plan.load(precious).model == "llama2-7b"
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_plan_keeps_an_edited_plan_unless_forced(tmp_path):
    out = tmp_path / "p.yaml"
    assert run("plan", "--gpu", "a40", "--model", "llama2-7b", "-o", str(out)).exit_code == 0
    stamp = out.stat().st_mtime_ns
    assert run("plan", "--gpu", "a40", "--model", "llama2-7b", "-o", str(out)).exit_code == 0  # same plan again
    assert out.stat().st_mtime_ns == stamp
    edited = out.read_text().replace("stages: 3", "stages: 4", 1)
    assert edited != out.read_text()
    out.write_text(edited)
    assert_one_line_error(run("plan", "--gpu", "a40", "--model", "llama2-7b", "-o", str(out)),
                          "holds another plan", "--force")
    assert out.read_text() == edited
    assert run("plan", "--gpu", "a40", "--model", "llama2-7b", "-o", str(out), "--force").exit_code == 0
    assert out.read_text() != edited


def test_plan_default_output_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert run("plan", "--gpu", "rtx3090", "--model", "smollm2-135m").exit_code == 0
    assert Plan.load(tmp_path / "rtx3090-smollm2-135m.plan.yaml").gpu == "rtx3090"


def _bad_gpu(tmp_path):
    data = shipped("gpus", "a40")
    data["sm_count"] = {"value": -84, "source": "x"}
    return str(write_yaml(tmp_path / "bad-gpu.yaml", data))


@pytest.mark.parametrize("args, needles", [
    (("--gpu", "a4o", "--model", "llama2-70b"), ("unknown GPU 'a4o'", "did you mean a40")),
    (("--gpu", "a40", "--model", "lama2-70b"), ("unknown model 'lama2-70b'", "did you mean llama2-70b")),
    (("--gpu", "a40", "--model", "llama2-70b", "--workload", "prefil"), ("unknown workload", "prefill-heavy")),
    (("--gpu", "missing/gpu.yaml", "--model", "llama2-70b"), ("gpu spec file missing/gpu.yaml does not exist",)),
    (("--gpu", "a40", "--model", "llama2-70b", "--budget", "nope.yaml"), ("budget file nope.yaml does not exist",)),
])
def test_bad_arguments_give_one_line_errors(tmp_path, args, needles):
    assert_one_line_error(run("plan", *args, "-o", str(tmp_path / "p.yaml")), *needles)


def test_bad_spec_files_give_one_line_errors(tmp_path):
    bad = _bad_gpu(tmp_path)
    assert_one_line_error(run("plan", "--gpu", bad, "--model", "llama2-7b"), bad, "'sm_count.value'", "> 0")
    assert_one_line_error(run("specs", "show", bad), "'sm_count.value'")
    budget = write_yaml(tmp_path / "b.yaml", {"min_gain": "high"})
    assert_one_line_error(run("plan", "--gpu", "a40", "--model", "llama2-7b", "--budget", str(budget)),
                          "'min_gain': must be a number")


def test_missing_required_option_exits_non_zero():
    result = run("plan", "--gpu", "a40")
    assert result.exit_code != 0 and "--model" in result.output + result.stderr


def test_specs_list_and_show():
    listed = run("specs", "list")
    assert listed.exit_code == 0
    for name in ("rtx3090", "h100-sxm", "llama3.1-405b", "smollm2-135m", "prefill-heavy"):
        assert name in listed.output
    gpu = run("specs", "show", "a100-80gb")
    assert gpu.exit_code == 0 and "rho 64.0" in gpu.output and "sources:" in gpu.output
    model = run("specs", "show", "llama2-70b")
    assert model.exit_code == 0 and "10240 x 8192: qkv_proj (x80)" in model.output
    assert "1024 x 8192: k_proj, v_proj (x160)" in model.output
    assert run("specs", "show", "decode").exit_code == 0
    assert_one_line_error(run("specs", "show", "h100sxm"), "unknown spec 'h100sxm'", "did you mean h100-sxm")


def test_the_installed_console_script_reports_errors_in_one_line():
    script = shutil.which("apex4gen")
    command = [script] if script else [sys.executable, "-c", "from apex4gen.cli import main; main()"]
    proc = subprocess.run(command + ["plan", "--gpu", "a4o", "--model", "llama2-70b"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert "did you mean a40" in proc.stderr and "Traceback" not in proc.stderr
