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


def _tree(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_build_refuses_a_model_that_conflicts_with_the_plan(tmp_path):
    plan = tmp_path / "a40.plan.yaml"
    assert run("plan", "--gpu", "a40", "--model", "llama2-70b", "-o", str(plan)).exit_code == 0
    out = tmp_path / "out"
    one_line_error(run("build", "--gpu", "a40", "--model", "llama3-8b", "--plan", str(plan), "--out", str(out),
                       "--emit-only"), 2, "--model llama3-8b conflicts with --plan", "llama2-70b", "drop --model")
    one_line_error(run("build", "--gpu", "a40", "--budget", "x.yaml", "--plan", str(plan), "--out", str(out),
                       "--emit-only"), 2, "--budget", "drop it")
    assert not out.exists()
    result = run("build", "--gpu", "a40", "--model", "llama2-70b", "--plan", str(plan), "--out", str(out),
                 "--emit-only")
    assert result.exit_code == 0, result.output


def test_build_never_replaces_a_build_of_other_inputs_without_force(tmp_path):
    """A user's model YAML reusing a shipped name lands in the same default folder: refused, files untouched."""
    out = tmp_path / "generated" / "a40-llama2-70b"
    assert run("build", "--gpu", "a40", "--model", "llama2-70b", "--out", str(out), "--emit-only").exit_code == 0
    before = _tree(out)
    mine = shipped("models", "llama2-70b")
    mine["num_layers"] = 40
    spec = write_yaml(tmp_path / "mine.yaml", mine)
    one_line_error(run("build", "--gpu", "a40", "--model", str(spec), "--out", str(out), "--emit-only"), 2,
                   "holds a build made from other inputs", "model_spec_sha256", "--force")
    assert _tree(out) == before
    result = run("build", "--gpu", "a40", "--model", str(spec), "--out", str(out), "--emit-only", "--force")
    assert result.exit_code == 0, result.output


def test_emit_only_into_an_old_build_leaves_nothing_loadable(tmp_path):
    """Re-rendering other sources into a built folder removes the library with the manifest (neither matches)."""
    out = tmp_path / "b"
    assert run("build", "--gpu", "a40", "--model", "llama2-70b", "--out", str(out), "--emit-only").exit_code == 0
    lib = out / "lib" / "libapex4gen.so"
    lib.parent.mkdir()
    lib.write_bytes(b"stale")          # as a compiled build leaves it
    (out / "manifest.json").write_text("{}")
    (out / "src" / "dispatch.cu").write_text("// edited\n")  # the sources no longer match the library
    assert run("build", "--gpu", "a40", "--model", "llama2-70b", "--out", str(out), "--emit-only").exit_code == 0
    assert not lib.exists() and not (out / "manifest.json").exists()


def _model(tmp_path, name, **sizes):
    data = shipped("models", "llama2-7b")
    data.update(name=name, **sizes)
    return write_yaml(tmp_path / f"{name}.yaml", data)


def test_a_plan_no_kernel_serves_is_refused_with_the_rule_and_the_fix(tmp_path):
    """hidden 4100 with 41 heads: every size a multiple of 4, none of the kernels' alignment."""
    spec = _model(tmp_path, "odd", hidden_size=4100, num_attention_heads=41, num_key_value_heads=41,
                  intermediate_size=11000)
    out = tmp_path / "odd.plan.yaml"
    one_line_error(run("plan", "--gpu", "a40", "--model", str(spec), "-o", str(out)), 2,
                   "no kernel serves any GEMM", "qkv_proj", "N=12300 K=4100", "every M", "not a multiple of",
                   "size rules")
    assert not out.exists()
    build_dir = tmp_path / "b"
    one_line_error(run("build", "--gpu", "a40", "--model", str(spec), "--out", str(build_dir), "--emit-only",
                       "--allow-partial"), 2, "would serve nothing", "down_proj")
    assert not build_dir.exists()


def test_a_partly_served_plan_says_what_is_missing_and_counts_it_at_fp16(tmp_path):
    spec = _model(tmp_path, "oddffn", intermediate_size=11000)   # K = 11000: down_proj has no kernel
    out = tmp_path / "p.yaml"
    result = run("plan", "--gpu", "a40", "--model", str(spec), "-o", str(out))
    assert result.exit_code == 0, result.output
    assert "down_proj (N=4096 K=11000) at every M" in result.stderr and "--allow-partial" in result.stderr
    from apex4gen.plan import Plan
    plan = Plan.load(out)
    down = plan.layer("down_proj")
    assert all(p.w4a4_us == p.fp16_us and p.speedup == 1.0 for p in down.predictions)
    build_dir = tmp_path / "b"
    one_line_error(run("build", "--gpu", "a40", "--plan", str(out), "--out", str(build_dir), "--emit-only"), 2,
                   "GEMMs without a kernel", "down_proj", "--allow-partial")
    assert not build_dir.exists()
    result = run("build", "--gpu", "a40", "--plan", str(out), "--out", str(build_dir), "--emit-only",
                 "--allow-partial")
    assert result.exit_code == 0, result.output


def test_the_rebuild_command_an_old_build_is_told_runs_as_written(tmp_path):
    """A build from an older apex4gen (its manifest has no symbol prefix) is refused with the command that rebuilds
    it; that command must carry --gpu, which `apex4gen build` requires even with --plan."""
    old = tmp_path / "old-build"
    old.mkdir()
    assert run("plan", "--gpu", "a40", "--model", "llama2-7b", "-o", str(old / "plan.yaml")).exit_code == 0
    (old / "manifest.json").write_text('{"gpu": "a40", "arch": "sm_86", "library": "lib/libapex4gen.so"}')
    for command in ("export", "inspect"):
        args = [str(old)] + (["-o", str(tmp_path / "pkg")] if command == "export" else [])
        line = one_line_error(run(command, *args), 2, "lacks", "prefix", "--gpu a40")
    rebuild = line.split("`")[1].split()
    assert rebuild[:2] == ["apex4gen", "build"]
    result = run(*rebuild[1:], "--emit-only")
    assert result.exit_code == 0, result.output


def test_build_refuses_a_file_that_is_no_plan_with_the_command_that_makes_one(tmp_path):
    """--plan given a model spec or an empty file: one line saying it is not a plan and how to make one, not a
    schema complaint about its first field."""
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    model_spec = write_yaml(tmp_path / "llama.yaml", shipped("models", "llama2-7b"))
    for path in (empty, model_spec):
        one_line_error(run("build", "--gpu", "a40", "--plan", str(path), "--emit-only", "--out", str(tmp_path / "b")),
                       2, f"{path} is not an apex4gen plan file", "apex4gen plan --gpu")
        assert not (tmp_path / "b").exists()


def test_generate_names_a_missing_checkpoint_folder_as_such(tmp_path):
    """A checkpoint path that does not exist is neither read as a model spec file nor as a model name."""
    missing = tmp_path / "l3-w4a4"
    one_line_error(run("generate", str(missing), "--prompt", "hi"), 2, f"{missing} does not exist",
                   "apex4gen quantize", "checkpoint")


def test_e2e_bench_refuses_a_json_path_it_could_not_write_before_measuring(tmp_path):
    """The JSON is written after minutes of measuring: a missing folder is refused first, before the build is
    even opened (here: a folder that is no build, which would otherwise be the error)."""
    (tmp_path / "build").mkdir()
    out = tmp_path / "no-such-folder" / "e2e.json"
    one_line_error(run("e2e-bench", "llama2-7b", "--build", str(tmp_path / "build"), "--json", str(out)), 2,
                   f"--json {out}", "does not exist")


def test_option_errors_caught_by_click_are_one_line_too(tmp_path):
    """A missing option, a value out of range, a file where a folder is expected: one line naming it and the help
    to read, exit 2 (click's own form is a usage block of three lines)."""
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    cases = ((("generate", "llama2-7b", "--prompt", "x", "--layers", "0"), "--layers", "apex4gen generate --help"),
             (("e2e-bench", "llama2-7b"), "Missing option '--build'", "apex4gen e2e-bench --help"),
             (("export", str(a_file), "-o", str(tmp_path / "pkg")), "is a file", "apex4gen export --help"),
             (("no-such-command",), "no-such-command", "apex4gen --help"))
    for args, *needles in cases:
        one_line_error(run(*args), 2, *needles)
    assert not (tmp_path / "pkg").exists()


def test_generate_refuses_a_broken_checkpoint_in_one_line(tmp_path):
    """A checkpoint folder whose config.json or model.safetensors is cut short or hand-edited: one line naming the
    file and `apex4gen quantize`, no traceback."""
    bad_json = tmp_path / "bad-json"
    bad_json.mkdir()
    (bad_json / "config.json").write_text("{not json")
    (bad_json / "model.safetensors").write_bytes(b"")
    bad_tensors = tmp_path / "bad-tensors"
    bad_tensors.mkdir()
    (bad_tensors / "config.json").write_text('{"quantization_config": {"format": "pack-quantized", '
                                             '"config_groups": {}}}')
    (bad_tensors / "model.safetensors").write_bytes(b"cut short")
    for folder, broken in ((bad_json, "config.json is not valid JSON"),
                           (bad_tensors, "model.safetensors is not a readable safetensors file")):
        one_line_error(run("generate", str(folder), "--prompt", "hi"), 2, broken, "apex4gen quantize")


def test_bench_refuses_an_unknown_baseline_and_a_json_path_it_could_not_write_before_measuring(tmp_path):
    """Checked before the build is opened (here: a folder that is no build, which would otherwise be the error):
    a misspelt baseline would be left out of the table silently, and the JSON is written after the run."""
    (tmp_path / "build").mkdir()
    build = str(tmp_path / "build")
    one_line_error(run("bench", build, "--baselines", "fp16,fp61"), 2, "--baselines: unknown fp61", "int8")
    out = tmp_path / "no-such-folder" / "bench.json"
    one_line_error(run("bench", build, "--json", str(out)), 2, f"--json {out}", "does not exist")


def test_quantize_never_writes_into_a_folder_of_other_files(tmp_path):
    """`-o` the model's own folder: refused before the model is loaded, its config.json untouched; an earlier
    checkpoint of `apex4gen quantize` (its quantization_config has the apex4gen entry) may be written again."""
    from apex4gen.cli.quantize import _check_output

    model = tmp_path / "my-model"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "llama"}')
    one_line_error(run("quantize", "--model-path", str(model), "--granularity", "g128", "-o", str(model)), 2,
                   f"{model} holds files `apex4gen quantize` did not write", "choose an empty or new -o")
    assert (model / "config.json").read_text() == '{"model_type": "llama"}'
    earlier = tmp_path / "ckpt"
    earlier.mkdir()
    (earlier / "config.json").write_text('{"quantization_config": {"format": "pack-quantized", "apex4gen": {}}}')
    _check_output(earlier)
