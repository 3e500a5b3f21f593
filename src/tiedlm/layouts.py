"""Matrix layouts that make a CPU's products and copies fast; the same numbers on every device.

- :func:`weight_grad`: a weight's gradient gradᵀ·inputs, formed as (inputsᵀ·grad)ᵀ on a CPU in fp32,
  which MKL's GEMM runs 1.3-1.5x faster at the shapes of a BPTT window (N = 700 tokens).
- :func:`transposed`: a contiguous copy of a matrix's transpose, in blocks of rows, which keeps the
  strided reads cache-friendly and lets the copy use every thread (a plain ``.t().contiguous()``
  of a (650, 10000) array runs at one thread's speed).

Measured in benchmarks/AVX2.md (fp32, AVX2 and AVX-512).
"""

from __future__ import annotations

import torch

TRANSPOSE_BLOCK = 512  # rows of the result per block: 512 x 650 fp32 is 1.3 MB, about one L2


def transposed(matrix: torch.Tensor) -> torch.Tensor:
    """``matrix.t().contiguous()`` for a 2-D ``matrix``; on a CPU copied in blocks of rows of the result."""
    if matrix.device.type != "cpu" or matrix.size(1) <= TRANSPOSE_BLOCK:
        return matrix.t().contiguous()
    out = matrix.new_empty(matrix.size(1), matrix.size(0))
    for start in range(0, matrix.size(1), TRANSPOSE_BLOCK):
        out[start : start + TRANSPOSE_BLOCK].copy_(matrix[:, start : start + TRANSPOSE_BLOCK].t())
    return out


def weight_grad(grad: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
    """gradᵀ · inputs, (out, in) for grad (N, out) and inputs (N, in): a weight's gradient.

    On a CPU in fp32 MKL's GEMM takes 1.3-1.5x longer for gradᵀ·inputs than for (inputsᵀ·grad)ᵀ;
    oneDNN's bf16 GEMM is the other way round. Both give the same matrix; the first is made
    contiguous (a blocked copy), which is cheaper than letting autograd add a transposed gradient
    into a tied weight's other gradient.
    """
    if grad.device.type == "cpu" and grad.dtype == torch.float32:
        return transposed(inputs.t() @ grad)
    return grad.t() @ inputs
