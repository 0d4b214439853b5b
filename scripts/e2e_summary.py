"""One line per `apex4gen e2e-bench --json` file: W4A4 / 16-bit ratios (or, alone, W4A4 tokens/s) and memory.

    python3 scripts/e2e_summary.py OUT/e2e-*.json
"""
import json
import sys
from pathlib import Path

GIB = 2 ** 30


def _line(path: Path) -> str:
    data = json.loads(path.read_text())
    results = data["results"]
    w4a4 = results[-1]
    cells = []
    for kind, key in (("prefill", "prefill_tokens_per_s"), ("decode b", "decode_tokens_per_s")):
        for n, value in w4a4[key].items():
            if len(results) > 1:
                cells.append(f"{kind}{n} {value / results[0][key][n]:.2f}x")
            else:
                cells.append(f"{kind}{n} {value:,.0f} tok/s")
    memory = f"weights {w4a4['decoder_weight_bytes'] / GIB:.1f} GiB"
    if len(results) > 1:
        base = results[0]["decoder_weight_bytes"]
        memory += (f" ({w4a4['decoder_weight_bytes'] / base:.2f}x; one layout a GEMM "
                   f"{w4a4['decoder_weight_bytes_one_layout'] / base:.2f}x)")
    memory += f", peak {w4a4['peak_bytes'] / GIB:.1f} GiB"
    if len(results) > 1:
        memory += f" (16-bit {results[0]['peak_bytes'] / GIB:.1f})"
    missed = [t["label"] for t in data["targets"] if not t["met"]]
    verdict = f"; targets not met: {', '.join(missed)}" if missed else ("; all targets met" if data["targets"] else "")
    return f"{path.stem} ({w4a4['layers']} layers): {', '.join(cells)}; {memory}{verdict}"


def main(paths: list[str]) -> None:
    for p in paths:
        print(_line(Path(p)))


if __name__ == "__main__":
    main(sys.argv[1:])
