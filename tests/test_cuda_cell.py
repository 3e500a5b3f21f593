"""The fused Triton LSTM cell (tiedlm.cuda_cell) equals the LSTM equations, run through Triton's CPU interpreter."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from tiedlm import cuda_cell

CHECK = r"""
import json, torch
from tiedlm.cuda_cell import FusedMaskedRecurrence


class Written:  # docs/method.md §1 step by step; autograd differentiates it
    @staticmethod
    def apply(gates_x, h, c, weight, mask):
        outputs = []
        for t in range(gates_x.size(0)):
            i, f, g, o = (gates_x[t] + (h * mask) @ weight.t()).chunk(4, 1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
            outputs.append(h)
        return torch.stack(outputs), h, c

torch.manual_seed(0)
report = {}
for name, (steps, batch, size, mask_rows) in {"exact": (5, 3, 150, 3), "fast": (4, 2, 37, 1)}.items():
    gates_x = torch.randn(steps, batch, 4 * size, dtype=torch.float64)
    h0, c0 = torch.randn(batch, size, dtype=torch.float64), torch.randn(batch, size, dtype=torch.float64)
    weight = torch.randn(4 * size, size, dtype=torch.float64) * 0.2
    mask = (torch.rand(mask_rows, size) > 0.4).double() / 0.6
    upstream = [torch.randn(steps, batch, size, dtype=torch.float64), torch.randn(batch, size, dtype=torch.float64),
                torch.randn(batch, size, dtype=torch.float64)]
    results = []
    for function in (Written, FusedMaskedRecurrence):
        inputs = [t.clone().requires_grad_() for t in (gates_x, h0, c0, weight)]
        outs = function.apply(*inputs, mask)
        grads = torch.autograd.grad(sum((o * u).sum() for o, u in zip(outs, upstream)), inputs)
        results.append([o.detach() for o in outs] + list(grads))
    report[name] = max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(*results))
    report[name + "_grad_h0_norm"] = results[0][4].norm().item()
print(json.dumps(report))
"""


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed (it is on the GPU)")
def test_fused_cell_equals_the_lstm_equations_in_triton_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-c", CHECK], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["exact"] < 1e-12 and report["fast"] < 1e-12, report  # outputs and all four gradients
    assert report["exact_grad_h0_norm"] > 0  # a gradient reached the start state


def test_the_fused_cell_is_used_on_cuda_only_where_turned_on(monkeypatch):
    assert cuda_cell.status("cpu") == "torch ops"
    monkeypatch.delenv("TIEDLM_CUDA_CELL", raising=False)
    assert cuda_cell.status("cuda") == "torch ops (TIEDLM_CUDA_CELL=off)"  # opt-in until measured on a GPU
    monkeypatch.setenv("TIEDLM_CUDA_CELL", "off")
    assert cuda_cell.status("cuda") == "torch ops (TIEDLM_CUDA_CELL=off)"
    monkeypatch.setenv("TIEDLM_CUDA_CELL", "on")
    expected = "fused Triton cell" if cuda_cell._triton_available() else "torch ops (no Triton)"
    assert cuda_cell.status("cuda") == expected
    import torch

    assert cuda_cell.recurrence_for(torch.zeros(1)) is None  # a CPU tensor keeps MaskedLSTMLayer
