"""The exact-mask LSTM recurrence on a GPU with one fused Triton kernel per step and direction.

``tiedlm.models.lstm.MaskedLSTMLayer`` runs each step as about 9 small kernels forward and
about 26 backward (the gate activations, the cell update, the gradient terms, one by one). On a
GPU every one of them costs a launch, inside a CUDA graph too (~2-3 µs each), so 35 steps × 2
layers come to ~2,500 launches per window. Here a step is two launches each way:

    forward   a = gates_x[t] + (h_{t-1} ⊙ m)·W_hhᵀ                     (cuBLAS addmm)
              σ/tanh of the gates, c_t, h_t, and h_t ⊙ m for the next step      (one kernel)
    backward  dh = dh_{t+1}·W_hh ⊙ m + ∂/∂h_t, dc, the four gate gradients, dc·f (one kernel)
              dh_t-1 before the mask = d_gates[t]·W_hh                     (cuBLAS mm)

The same mathematics as ``MaskedLSTMLayer`` (whose docstring gives the equations), after the
input projection gates_x = x·W_ihᵀ + b of all steps, in the parameters' dtype (fp32); tanh is
computed as 2σ(2x) − 1. The tests hold it to the equations written out step by step, through
Triton's interpreter on a CPU (``TRITON_INTERPRET=1``); the
GPU self-check of ``scripts/gpu_run.sh`` holds the whole training step to the eager one.

Until it has been measured on a GPU it is opt-in: ``TIEDLM_CUDA_CELL=on`` (read at each call)
turns it on where Triton is installed; unset or ``off`` keeps the torch-ops recurrence.
``scripts/gpu_run.sh`` turns it on for its queue only after its self-check has held the captured
step with the cell to the eager reference.
"""

from __future__ import annotations

import functools
import os

import torch

BLOCK = 128  # hidden units per program: (B, ⌈H/128⌉) programs per step


@functools.cache
def _kernels():
    from tiedlm import _cuda_cell_kernels as kernels  # imports Triton

    return kernels.forward_cell, kernels.backward_cell


def _row_stride(mask: torch.Tensor) -> int:
    return 0 if mask.size(0) == 1 else mask.stride(0)


class FusedMaskedRecurrence(torch.autograd.Function):
    """The masked recurrence after the input projection (gates_x, h0, c0, W_hh, mask); a Triton kernel per step."""

    @staticmethod
    def forward(ctx, gates_x, h0, c0, weight_hh, mask):
        forward_cell, _ = _kernels()
        steps, batch, four_h = gates_x.shape
        size = four_h // 4
        gates_x, h0, c0, mask = (t.contiguous() for t in (gates_x, h0, c0, mask))
        acts = torch.empty_like(gates_x)
        cells = gates_x.new_empty(steps, batch, size)
        outputs = gates_x.new_empty(steps, batch, size)
        inputs = gates_x.new_empty(steps + 1, batch, size)  # h_{t-1} ⊙ m: what W_hh multiplies at step t
        torch.mul(h0, mask, out=inputs[0])
        weight_t = weight_hh.t()
        grid = (batch, (size + BLOCK - 1) // BLOCK)
        c_prev = c0
        for t in range(steps):
            torch.addmm(gates_x[t], inputs[t], weight_t, out=acts[t])
            forward_cell[grid](acts[t], c_prev, mask, _row_stride(mask), cells[t], outputs[t], inputs[t + 1], size,
                               BLOCK=BLOCK)  # fmt: skip
            c_prev = cells[t]
        ctx.save_for_backward(acts, cells, inputs, c0, weight_hh, mask)
        return outputs, outputs[-1].clone(), cells[-1].clone()

    @staticmethod
    def backward(ctx, grad_outputs, grad_h, grad_c):
        _, backward_cell = _kernels()
        acts, cells, inputs, c0, weight_hh, mask = ctx.saved_tensors
        steps, batch, four_h = acts.shape
        size = four_h // 4
        d_gates = torch.empty_like(acts)
        zeros = c0.new_zeros(batch, size)
        dh = grad_h.contiguous() if grad_h is not None else zeros
        dc = grad_c.clone().contiguous() if grad_c is not None else c0.new_zeros(batch, size)
        ones = c0.new_ones(1, size)  # ∂/∂h_T comes in without the mask
        dh_raw = c0.new_empty(batch, size)  # d_gates[t+1]·W_hh, before the mask
        grid = (batch, (size + BLOCK - 1) // BLOCK)
        for t in range(steps - 1, -1, -1):
            last = t == steps - 1
            gout = grad_outputs[t] if grad_outputs is not None else zeros
            backward_cell[grid](acts[t], cells[t], cells[t - 1] if t else c0, dh if last else dh_raw,
                                ones if last else mask, 0 if last else _row_stride(mask), gout.contiguous(), dc,
                                d_gates[t], size, BLOCK=BLOCK)  # fmt: skip
            torch.mm(d_gates[t], weight_hh, out=dh_raw)
        grad_weight = d_gates.flatten(0, 1).t() @ inputs[:steps].flatten(0, 1)
        return d_gates, dh_raw * mask, dc, grad_weight, None


@functools.cache
def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def status(device_type: str) -> str:
    """Which recurrence the exact-mask LSTM runs on ``device_type``, in words."""
    if device_type != "cuda":
        return "torch ops"
    setting = os.environ.get("TIEDLM_CUDA_CELL", "off").strip().lower()
    if setting != "on":
        return f"torch ops (TIEDLM_CUDA_CELL={setting})"
    return "fused Triton cell" if _triton_available() else "torch ops (no Triton)"


def recurrence_for(gates_x: torch.Tensor):
    """``FusedMaskedRecurrence`` for a CUDA tensor where it is enabled and Triton is there, else None."""
    if gates_x.is_cuda and status("cuda") == "fused Triton cell":
        return FusedMaskedRecurrence
    return None
