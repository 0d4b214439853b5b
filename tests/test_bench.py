"""The bench's bookkeeping (timing itself needs a GPU): bytes, rotation, ratios, target lines."""
from click.testing import CliRunner

from apex4gen import bench
from apex4gen.cli import bench as bench_cli


def _point(m, gran, ours, **base):
    return bench.Point("o_proj", 8192, 8192, m, gran, "k", ours, base, bench.w4a4_bytes(m, 8192, 8192, 128),
                       0.5, 0.1)


def test_bytes_count_weights_scales_activations_and_output():
    assert bench.w4a4_bytes(1, 8192, 8192, 128) == 8192 * 4096 + 8192 * 64 * 2 + 8192 * 2 + 8192 * 2


def test_enough_copies_to_defeat_l2():
    assert bench.copies_for(32 << 20) * (32 << 20) >= 4 * (50 << 20)
    assert bench.copies_for(1 << 30) == 4


def test_fp8_ratio_uses_the_faster_cublas_variant():
    p = _point(4096, "g128", 100.0, fp8_tensor=120.0, fp8_row=110.0, fp16=300.0)
    assert p.speedup("fp8") == 1.1 and p.speedup("fp16") == 3.0 and p.speedup("int8") is None


def test_geomean():
    assert abs(bench.geomean([1.0, 4.0]) - 2.0) < 1e-12


def test_targets_report_met_and_not_met(capsys):
    points = [_point(16, "g128", 20.0, fp16=60.0), _point(16, "g128", 10.0, fp16=50.0),
              _point(4096, "channel", 100.0, fp8_tensor=120.0, int8=110.0, fp16=250.0)]
    bench_cli._print_targets(points)
    out = capsys.readouterr().out
    assert "M<=16 vs cuBLAS FP16: 3.87x (>= 4.0x: NOT met)" in out
    assert "M=4096 channel vs cuBLAS FP8: 1.20x (>= 1.1x: met)" in out
    assert "M=4096 vs cuBLAS INT8: 1.10x (>= 1.3x: NOT met)" in out
    assert "g128 vs cuBLAS FP8" not in out


def test_bad_ms_is_one_line(tmp_path):
    from apex4gen.cli import cli
    result = CliRunner().invoke(cli, ["bench", str(tmp_path), "--ms", "1,x"])
    assert result.exit_code == 2 and "--ms takes comma-separated integers" in result.output


def test_breakdown_columns_show_the_halves_or_a_dash(capsys):
    split = bench.Point("o_proj", 8192, 8192, 4096, "channel", "k", 450.0, {"fp16": 800.0},
                        bench.w4a4_bytes(4096, 8192, 8192, 8192), 0.1, 0.7, quantize_us=41.0, gemm_us=407.5)
    fused = _point(1, "g128", 17.7, fp16=47.4)
    bench_cli._print_table([split, fused], ("fp16",), "H100", 3e12, breakdown=True)
    out = capsys.readouterr().out
    assert "quant µs" in out and "GEMM µs" in out
    assert "41.0" in out and "407.5" in out
    row = next(line for line in out.splitlines() if " 17.7 " in line)
    assert row.count(" - ") == 2
