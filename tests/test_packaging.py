"""`pip install` outside the repository: specs, templates and runtime sources ship as package data."""
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_installed_package_finds_its_data(tmp_path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(REPO)], check=True, capture_output=True)
    code = ("from apex4gen import paths, specs, emit, loader; "
            "assert 'apex4gen/_' in str(paths.specs_dir()), paths.specs_dir(); "
            "assert 'a40' in specs.list_gpus(); "
            "assert (paths.runtime_dir() / 'apex4gen.h').is_file(); "
            "assert (paths.runtime_dir() / 'kernels' / 'sm90_decode.cuh').is_file(); "
            "emit.environment().get_template('dispatch.cu.jinja'); "
            "emit.environment().get_template('sm80_group.cu.jinja'); print('ok')")
    env = {**os.environ, "PYTHONPATH": str(target)}
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
