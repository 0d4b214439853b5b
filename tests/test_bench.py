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


def test_targets_report_met_and_not_met_with_the_bound_beside(capsys):
    # two decode points at 90% and 100% of their weight stream; cuBLAS FP16 60 and 50 µs, ours 20 and 10
    decode = [bench.Point("o_proj", 8192, 8192, 16, "g128", "k", 20.0, {"fp16": 60.0}, 1, 0.5, 0.1, stream_us=18.0),
              bench.Point("down_proj", 8192, 28672, 1, "g128", "k", 10.0, {"fp16": 50.0}, 1, 0.5, 0.1, stream_us=10.0)]
    prefill = [_point(4096, "channel", 100.0, fp8_tensor=120.0, fp8_row=130.0, fp16=250.0),
               bench.Point("o_proj", 8192, 8192, 4096, "g128", "k", 200.0, {"fp8_tensor": 150.0, "fp16": 180.0}, 1,
                           0.05, 0.3, stream_us=18.0)]  # a bound recorded on a prefill point is not its bound
    bench_cli._print_targets(decode + prefill)
    out = capsys.readouterr().out
    # geomean(0.9, 1.0) = 0.949; the stream runs geomean(60/18, 50/10) = 4.08x FP16, the op geomean(3, 5) = 3.87x
    assert ("M<=16: W4A4 op vs the pure 4-bit weight stream: 0.95x (>= 0.95x: NOT met); "
            "bound: the weight stream runs 4.08x cuBLAS FP16, the op 3.87x") in out
    assert "M=4096 channel vs cuBLAS FP8: 1.20x (>= 1.1x: met); the op at 10% of the tensor-core peak" in out
    assert "M=4096 g128 vs cuBLAS FP8 per-tensor: 0.75x (>= 0.8x: NOT met); the op at 30% of the tensor-core peak" in out
    assert "every M, g128: never slower than cuBLAS FP16 (worst point): 0.90x (>= 1.0x: NOT met); " \
           "worst: o_proj at M=4096" in out
    assert "every M, channel: never slower than cuBLAS FP16 (worst point): 2.50x (>= 1.0x: met)" in out


def test_a_point_without_its_bound_leaves_the_stream_target_out(capsys):
    bench_cli._print_targets([_point(1, "g128", 20.0, fp16=60.0)])
    out = capsys.readouterr().out
    assert "weight stream" not in out and "g128: never slower" in out


def test_bad_ms_is_one_line(tmp_path):
    from apex4gen.cli import cli
    result = CliRunner().invoke(cli, ["bench", str(tmp_path), "--ms", "1,x"])
    assert result.exit_code == 2 and "--ms takes comma-separated integers" in result.output


def test_breakdown_columns_show_the_halves_or_a_dash(capsys):
    split = bench.Point("o_proj", 8192, 8192, 4096, "channel", "k", 450.0, {"fp16": 800.0},
                        bench.w4a4_bytes(4096, 8192, 8192, 8192), 0.1, 0.7, quantize_us=41.0, gemm_us=407.5)
    fused = bench.Point("o_proj", 8192, 8192, 1, "g128", "k", 17.7, {"fp16": 47.4}, 1, 0.5, 0.1, stream_us=15.0)
    bench_cli._print_table([split, fused], ("fp16",), "H100", 3e12, breakdown=True)
    out = capsys.readouterr().out
    assert "quant µs" in out and "GEMM µs" in out
    assert "41.0" in out and "407.5" in out
    row = next(line for line in out.splitlines() if " 17.7 " in line)
    assert row.count(" - ") == 3 and " 85 " in row  # the halves, no prediction; 15.0 / 17.7 of the stream bound


def _fused_points():
    """llama2-70b's four GEMMs at M = 4096 per-channel: the plain ops, and the fused-producer times where fusable."""
    points = []
    for name, plain, fused, fp8 in (("qkv_proj", 300.0, 250.0, 300.0), ("o_proj", 200.0, None, 190.0),
                                     ("gate_up_proj", 1000.0, 880.0, 1050.0), ("down_proj", 500.0, 440.0, 520.0)):
        points.append(bench.Point(name, 8192, 8192, 4096, "channel", "k", plain,
                                  {"fp8_tensor": fp8, "fp8_row": fp8 * 1.1, "fp16": 3 * fp8}, 1, 0.1, 0.7,
                                  gemm_us=0.8 * plain, fused_us=fused))
    return points


def test_fused_producer_ratios_columns_json_and_target(tmp_path, capsys):
    """fused_us against the faster FP8 in the table and the JSON; the item-3 target on the fused times (o_proj, with
    no producer to fuse, at its plain op), printed only when they were measured."""
    import json

    points = _fused_points()
    under_gemm = bench.Point("down_proj", 8192, 28672, 4096, "channel", "k", 1500.0, {"fp8_tensor": 1400.0}, 1, 0.1,
                             0.7, gemm_us=1350.0, fused_us=970.0)  # PyTorch's two-kernel silu*mul subtracted
    assert under_gemm.fused_cost_us == 1350.0 and under_gemm.fused_speedup("fp8_tensor") == 1400.0 / 1350.0
    assert points[0].fused_speedup("fp8") == 300.0 / 250.0 and points[1].fused_speedup("fp8") is None
    bench_cli._print_table(points, ("fp8_tensor",), "H100", 3e12, fused_producer=True)
    out = capsys.readouterr().out
    assert "fused µs" in out and "fused xfp8" in out
    row = next(line for line in out.splitlines() if "qkv_proj" in line)
    assert " 250.0 " in row and " 1.20 " in row
    assert next(line for line in out.splitlines() if "o_proj" in line).rstrip(" │").endswith("-")
    bench_cli._print_targets(points, (*bench_cli.TARGETS, bench_cli.FUSED_TARGET))
    out = capsys.readouterr().out
    # geomean(300/250, 190/200, 1050/880, 520/440) = 1.126; the plain ops: geomean(1, 0.95, 1.05, 1.04) = 1.009
    assert ("M=4096 channel vs cuBLAS FP8, quantizer fused into its producer (o_proj unfused): 1.13x "
            "(>= 1.1x: met)") in out
    assert "M=4096 channel vs cuBLAS FP8: 1.01x (>= 1.1x: NOT met)" in out
    bench_cli._print_targets(points)
    assert "quantizer fused" not in capsys.readouterr().out
    bench.write_json(tmp_path / "b.json", points, {})
    records = json.loads((tmp_path / "b.json").read_text())["points"]
    assert records[0]["fused_us"] == 250.0 and records[0]["fused_speedups"]["fp8"] == 1.2
    assert records[0]["fused_cost_us"] == 250.0
    assert "fused_speedups" not in records[1] and records[1]["fused_us"] is None


def test_producers_come_from_the_model_graph():
    """qkv and gate_up read RMSNorm's output, down_proj SiLU * up's, o_proj attention's (nothing to fuse); the
    unfused plan's q/k/v and gate/up likewise."""
    from types import SimpleNamespace

    from apex4gen.graph import layer_graph, linear_layers
    from apex4gen.specs import load_model

    for fused in (True, False):
        layers = [SimpleNamespace(name=lin.name, activation=lin.activation)
                  for lin in linear_layers(layer_graph(load_model("llama2-70b"), fused))]
        plan = SimpleNamespace(model="llama2-70b", fused=fused, layers=layers)
        producers = bench_cli._producers(plan)
        assert producers["down_proj"] == "silu_mul" and "o_proj" not in producers
        norm_fed = {"qkv_proj", "gate_up_proj"} if fused else {"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"}
        assert {name for name, op in producers.items() if op == "rmsnorm"} == norm_fed


def test_each_point_is_predicted_with_its_kernel_and_the_plan_constants():
    from apex4gen.costmodel import w4a4_time
    from apex4gen.planner import make_plan
    from apex4gen.specs import load_gpu

    plan, gpu = make_plan("h100-sxm", "llama2-70b"), load_gpu("h100-sxm")
    gemm = next(g for g in plan.gemms if "o_proj" in g.layers)
    for m in (1, 4096):
        cfg = gemm.bucket_for(m).kernel
        point = bench.Point("o_proj", gemm.n, gemm.k, m, gemm.granularity.name, cfg.procedural_name(), 500.0, {},
                            1, 0.5, 0.1)
        (predicted,) = bench_cli._with_predictions([point], plan, gpu)
        expected = w4a4_time(gpu, m, gemm.n, gemm.k, cfg.granularity, cfg.path, cfg, plan.cost_constants).us
        assert predicted.predicted_us == expected and predicted.prediction_ratio == expected / 500.0


def test_prediction_line_counts_points_within_25_percent_against_the_gemm_alone(capsys):
    # the op (quantizer included) 450 µs, the GEMM alone 400: a prediction of 360 is 0.90x of what it models
    split = bench.Point("o_proj", 8192, 8192, 4096, "channel", "k", 450.0, {}, 1, 0.1, 0.7, quantize_us=41.0,
                        gemm_us=400.0, predicted_us=360.0)
    decode = [bench.Point("down_proj", 8192, 28672, 1, "g128", "k", 50.0, {}, 1, 0.5, 0.1, predicted_us=p)
              for p in (55.0, 70.0)]
    assert split.modelled_us == 400.0 and split.prediction_ratio == 0.9
    bench_cli._print_predictions([split, decode[0]])
    assert "2 of 2 points (every point: met)" in capsys.readouterr().out
    bench_cli._print_predictions([split, *decode])
    assert ("2 of 3 points (every point: NOT met); worst: down_proj g128 at M=1, predicted 70.0 µs for 50.0"
            in capsys.readouterr().out)
