"""bench/results: each GPU's results.md shows exactly the tables scripts/bench_table.py makes from the JSON beside it."""
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
RESULTS = ROOT / "bench" / "results"
# records beside the bench JSON that other tests read: the study (test_study re-plots it) and the probe
# (test_specs checks the spec's rate against it)
NOT_BENCH = {"study.json", "probe.json"}


def bench_table():
    spec = importlib.util.spec_from_file_location("bench_table", ROOT / "scripts" / "bench_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("gpu", sorted(p.name for p in RESULTS.iterdir() if p.is_dir()))
def test_results_tables_are_the_json_beside_them(gpu):
    folder = RESULTS / gpu
    jsons = sorted(p for p in folder.glob("*.json") if p.name not in NOT_BENCH)
    assert jsons, f"{folder} has no bench JSON"
    text = (folder / "results.md").read_text()
    module = bench_table()
    for path in jsons:
        assert module.table(module.load(str(path))) in text, f"{path.name}'s table is not in {gpu}/results.md"


def test_the_h100_g128_large_m_row():
    module = bench_table()
    table = module.table(module.load(str(RESULTS / "h100" / "llama2-70b-g128.json")))
    assert "| 4096 | 1.14 | 0.56 | 0.84 | 1.09 (o_proj) | 6 | – |" in table


def test_a_file_that_is_not_bench_json_is_one_line(tmp_path):
    bad = tmp_path / "plan.yaml"
    bad.write_text("gpu: h100-sxm\n")
    with pytest.raises(SystemExit) as exc:
        bench_table().main([str(bad)])
    message = str(exc.value)
    assert "\n" not in message and "apex4gen bench --json" in message
