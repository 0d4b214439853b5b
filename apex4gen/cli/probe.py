"""``apex4gen probe``: measure this GPU's tensor-core, CUDA-core and memory rates and write a GPU spec."""
from __future__ import annotations

from pathlib import Path

import click

from ..errors import Apex4genError
from ..probe import record, spec


def _say(line: str) -> None:
    click.echo(line, err=True)


def _rho_lines(m: record.Measurements) -> list[str]:
    i2f = m.rate("i2f")
    lines = [f"rho per tensor instruction: its rate over FP32 {m.fp32_tflops:.1f} TFLOPS (2 x FFMA), and over "
             f"I2F {i2f.value:.1f} T/s (the promotion rho)"]
    for rate in m.rates:
        if rate.unit == "tensor":
            rho, promotion = m.rho(rate)
            lines.append(f"  {rate.name:<14} {rate.path:<5} {rate.value:>8.1f} TOPS   rho {rho:>6.1f}   "
                         f"promotion rho {promotion:>6.1f}")
    lines.append(f"promotion of one group partial, in FP32 instructions: int32 {m.dequant_ops('promote_int'):.2f}, "
                 f"float {m.dequant_ops('promote_float'):.2f}; magic-number convert "
                 f"{m.rate('magic_convert').value:.1f} T/s")
    lines.append(f"DRAM: copy {m.copy_gbs:,.0f} GB/s, pure 4-bit weight stream {m.stream_gbs:,.0f} GB/s")
    return lines


@click.command("probe")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
              help="write a GPU spec (YAML) that plan/build/bench take as --gpu FILE")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path),
              help="write every measurement (rates, samples, grids, device, driver, date) as JSON")
@click.option("--name", help="the spec's name (default: the device name in lower case, e.g. nvidia-h100-80gb-hbm3)")
@click.option("--from-json", "from_json", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="write the spec from a recorded --json file instead of measuring (no GPU needed)")
@click.option("--force", is_flag=True, help="replace existing output files")
def probe_cmd(output: Path | None, json_path: Path | None, name: str | None, from_json: Path | None,
              force: bool) -> None:
    """Microbenchmark the current GPU (tensor-core rate per type and instruction, FFMA / I2F / promotion rates,
    copy bandwidth, the pure 4-bit weight stream), print rho per path, write a GPU spec."""
    if from_json is not None and json_path is not None:
        raise Apex4genError("--json records new measurements and --from-json reuses recorded ones; give one of them")
    for path in (output, json_path):
        spec.check_writable(path, force)
    if from_json is not None:
        measurements = record.Measurements.load(from_json)
    else:
        from ..probe import measure
        measurements = measure.run(_say)
    text, gpu = spec.spec_text(measurements, name)
    for line in _rho_lines(measurements):
        click.echo(line)
    if json_path is not None:
        spec.write(json_path, measurements.to_json())
        _say(f"probe: measurements written to {json_path}")
    if output is not None:
        spec.write(output, text)
        _say(f"probe: GPU spec {gpu.name} written to {output} (use it as --gpu {output})")


COMMANDS = (probe_cmd,)
