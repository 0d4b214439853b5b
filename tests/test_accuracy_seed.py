"""One seed drives every random choice of a quantization run (calibration windows, Hadamard signs): a reduced
run repeats bit for bit with the same seed; another seed calibrates on other windows. Also the eval's noise
estimate (bootstrap over windows)."""
import random

import pytest
import torch

from apex4gen.accuracy import QuantConfig
from apex4gen.accuracy.evaluation import bootstrap_ratio, perplexity, sample_windows
from apex4gen.accuracy.options import calibration_ids, quantize_loaded
from apex4gen.accuracy.pipeline import quantized_digest
from apex4gen.errors import SpecError
from apex4gen.granularity import Granularity
from tiny_llama import VOCAB, tiny_llama, token_batch

SEQ = 32


class CharTokenizer:
    """Enough of a transformers tokenizer for the calibration path: one id per character."""

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict:
        return {"input_ids": [ord(c) % VOCAB for c in text]}


@pytest.fixture
def calib_text(tmp_path):
    rng = random.Random(5)
    words = ["".join(rng.choice("abcdefghij") for _ in range(rng.randint(2, 8))) for _ in range(400)]
    path = tmp_path / "calib.txt"
    path.write_text(" ".join(words))  # ~2000 characters: ~60 windows of 32
    return str(path)


def _reduced_run(calib_text: str, seed: int) -> tuple[float, str]:
    cfg = QuantConfig.uniform(Granularity.parse("g16"), rotate=True, gptq=True, act_order=True, clip_weights=True,
                              clip_acts=True, seed=seed)
    model = quantize_loaded(tiny_llama(seed=7), CharTokenizer(), cfg, calib_text, 4, SEQ)
    return perplexity(model, token_batch(4, SEQ, seed=8).reshape(-1), SEQ), quantized_digest(model)


def test_a_seed_picks_its_calibration_windows(calib_text):
    tok = CharTokenizer()
    first, again = (calibration_ids(tok, calib_text, 4, SEQ, seed=1) for _ in range(2))
    other = calibration_ids(tok, calib_text, 4, SEQ, seed=2)
    assert first.shape == (4, SEQ) and torch.equal(first, again)
    assert {tuple(r) for r in first.tolist()} != {tuple(r) for r in other.tolist()}
    # draw order: more windows with the same seed start with the fewer ones
    assert torch.equal(calibration_ids(tok, calib_text, 8, SEQ, seed=1)[:4], first)


def test_a_reduced_run_repeats_with_its_seed_and_moves_with_another(calib_text):
    ppl, digest = _reduced_run(calib_text, seed=1)
    ppl_again, digest_again = _reduced_run(calib_text, seed=1)
    ppl_other, digest_other = _reduced_run(calib_text, seed=2)
    assert (ppl_again, digest_again) == (ppl, digest)
    assert ppl_other != ppl and digest_other != digest


def test_too_few_windows_is_one_clear_error(calib_text):
    with pytest.raises(ValueError, match="fewer than the 1000 asked for"):
        sample_windows(torch.arange(100), 1000, SEQ, seed=0)
    with pytest.raises(SpecError, match="calibration text"):
        calibration_ids(CharTokenizer(), calib_text, 1000, SEQ, seed=0)


def test_bootstrap_interval_holds_the_ratio_and_narrows_with_agreeing_windows():
    fp = torch.tensor([3.0, 3.2, 2.9, 3.1, 3.3, 3.0, 2.8, 3.1], dtype=torch.float64)
    noisy = fp + torch.tensor([0.30, 0.45, 0.25, 0.40, 0.50, 0.20, 0.35, 0.30], dtype=torch.float64)
    steady = fp + 0.35
    low, high = bootstrap_ratio(fp, noisy)
    point = float(torch.exp((noisy - fp).mean()))
    assert low < point < high
    assert bootstrap_ratio(fp, steady) == pytest.approx((float(torch.exp(torch.tensor(0.35))),) * 2)
    assert bootstrap_ratio(fp, noisy) == (low, high)  # seeded
