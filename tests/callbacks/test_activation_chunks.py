"""Activation statistics of large outputs are read in chunks of rows: the same values, bounded temporaries.

On a GPT-like LM on an H200, the statistics of the head's (16, 512, 8192) bf16 logits at a flush step made 512 MiB
of float32 temporaries at once, and LossDiagnostics() added +482 MiB to the fit's peak memory.
"""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from lightning_lossdiag.callbacks import _activation_stats as stats


def _both(monkeypatch, x, unit_dim, bounds):
    whole = stats.call_stats(x, unit_dim, bounds, 0.01)
    monkeypatch.setattr(stats, "CHUNK_VALUES", 1000)  # many chunks, one of them ragged
    chunked = stats.call_stats(x, unit_dim, bounds, 0.01)
    assert len(stats._row_chunks(x)) > 3
    return whole, chunked


@pytest.mark.parametrize(
    ("shape", "unit_dim", "dtype"),
    [((37, 5, 40), -1, torch.float32), ((9, 21, 16, 16), 1, torch.bfloat16), ((300, 64), -1, torch.float16)],
    ids=["btv", "nchw_bf16", "rows_fp16"],
)
def test_chunked_statistics_equal_the_whole_output(monkeypatch, shape, unit_dim, dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g).mul_(3).relu_().clamp_(max=6.0).to(dtype)  # zeros and saturated values
    x.select(unit_dim, 2).zero_()  # one dead unit
    whole, chunked = _both(monkeypatch, x, unit_dim, (0.0, 6.0))
    assert set(whole) == set(chunked)
    for key in ("n", "zeros", "saturated"):
        assert chunked[key].item() == whole[key].item(), key  # counts: exact
    assert torch.equal(chunked["alive"], whole["alive"])
    assert not chunked["alive"][2]
    reference = x.double()
    assert chunked["mean"].item() == pytest.approx(reference.mean().item(), rel=1e-5, abs=1e-6)
    assert chunked["m2"].item() == pytest.approx((reference - reference.mean()).square().sum().item(), rel=1e-5)


def test_units_along_the_first_dim_are_counted_per_row(monkeypatch):
    x = torch.tensor([[0.0, 0.0, 0.0], [1.0, 0.0, 2.0]]).repeat(600, 1)
    whole, chunked = _both(monkeypatch, x, 0, None)
    assert torch.equal(chunked["alive"], whole["alive"])
    assert chunked["alive"].tolist() == [False, True] * 600
    assert chunked["zeros"].item() == 600 * 3 + 600


@pytest.mark.slow
def test_a_large_output_adds_little_peak_memory():
    # peak RSS of a fresh process around call_stats on 67M bf16 values (what one flush reads from an LM head):
    # a float32 copy and the centred values of the whole output add ~580 MiB, the chunks ~40 MiB. A fixed mmap
    # threshold makes glibc hand every freed buffer back, so the peak RSS follows the live bytes.
    script = textwrap.dedent(
        """
        import resource, torch
        from lightning_lossdiag.callbacks._activation_stats import call_stats
        x = torch.ones(16, 512, 8192, dtype=torch.bfloat16)
        x[:, :, :100] = 0
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        s = call_stats(x, -1, (0.0, 6.0), 0.01)
        assert s["zeros"].item() == 16 * 512 * 100
        print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)
        """
    )
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, env=env)
    added_mib = float(out.stdout.strip().splitlines()[-1])
    assert added_mib < 64, f"call_stats added {added_mib:.0f} MiB of peak memory"
