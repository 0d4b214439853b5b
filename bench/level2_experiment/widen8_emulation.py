"""Host check of sm90_prefill_l2.cuh's widen8 / make_table: PTX prmt (default mode) and lop3 emulated in Python,
every int4 value against every r in 1..16 for both table halves. `python3 bench/level2_experiment/widen8_emulation.py`."""
import itertools
import random

MASK = 0xFFFFFFFF


def prmt(a: int, b: int, c: int) -> int:
    src = [(a >> (8 * i)) & 255 for i in range(4)] + [(b >> (8 * i)) & 255 for i in range(4)]
    out = 0
    for j in range(4):
        sel = (c >> (4 * j)) & 15
        byte = src[sel & 7]
        if sel & 8:
            byte = 0xFF if byte & 0x80 else 0
        out |= byte << (8 * j)
    return out


def make_table(r: int) -> tuple[int, int, int, int]:
    return ((r * 0x03020100) & MASK, (r * 0x07060504) & MASK,
            (~(r * 0x05060708) + 0x01010101) & MASK, (~(r * 0x01020304) + 0x01010101) & MASK)


def widen8(src: int, t0, t1) -> list[int]:
    idx = src & 0x77777777
    sel = ((src & 0x88888888) | 0x64206420) >> 1  # lop3 0xea: (a & b) | c
    lo = prmt(prmt(t0[0], t0[1], idx), prmt(t0[2], t0[3], idx), sel)
    hi = prmt(prmt(t1[0], t1[1], idx >> 16), prmt(t1[2], t1[3], idx >> 16), sel >> 16)
    raw = [(lo >> (8 * i)) & 255 for i in range(4)] + [(hi >> (8 * i)) & 255 for i in range(4)]
    return [v - 256 if v > 127 else v for v in raw]


rng = random.Random(0)
for r0, r1 in itertools.product(range(1, 17), repeat=2):
    t0, t1 = make_table(r0), make_table(r1)
    for trial in range(40):
        values = [trial - 8] * 8 if trial < 16 else [rng.randint(-8, 7) for _ in range(8)]
        src = sum((v & 15) << (4 * i) for i, v in enumerate(values))
        assert widen8(src, t0, t1) == [v * r0 for v in values[:4]] + [v * r1 for v in values[4:]], (r0, r1, values)
print("widen8: exact for every int4 value and r in 1..16")
