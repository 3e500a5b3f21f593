"""The Triton kernels of ``tiedlm.cuda_cell`` (imported only where that module runs them: Triton is a GPU package)."""

import triton
import triton.language as tl


@triton.jit
def _tanh(x):
    return 2.0 * tl.sigmoid(2.0 * x) - 1.0


@triton.jit
def forward_cell(a_ptr, c_prev_ptr, mask_ptr, mask_stride, c_ptr, h_ptr, hm_ptr, size, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    j = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    valid = j < size
    gates = a_ptr + row * 4 * size + j
    i = tl.sigmoid(tl.load(gates, mask=valid))
    f = tl.sigmoid(tl.load(gates + size, mask=valid))
    g = _tanh(tl.load(gates + 2 * size, mask=valid))
    o = tl.sigmoid(tl.load(gates + 3 * size, mask=valid))
    tl.store(gates, i, mask=valid)  # the activated gates replace the pre-activations (saved for backward)
    tl.store(gates + size, f, mask=valid)
    tl.store(gates + 2 * size, g, mask=valid)
    tl.store(gates + 3 * size, o, mask=valid)
    c = f * tl.load(c_prev_ptr + row * size + j, mask=valid) + i * g
    h = o * _tanh(c)
    tl.store(c_ptr + row * size + j, c, mask=valid)
    tl.store(h_ptr + row * size + j, h, mask=valid)
    m = tl.load(mask_ptr + row * mask_stride + j, mask=valid)
    tl.store(hm_ptr + row * size + j, h * m, mask=valid)


@triton.jit
def backward_cell(acts_ptr, c_ptr, c_prev_ptr, dh_ptr, dh_mask_ptr, dh_mask_stride, gout_ptr, dc_ptr,
                  d_gates_ptr, size, BLOCK: tl.constexpr):  # fmt: skip
    row = tl.program_id(0)
    j = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    valid = j < size
    at = row * size + j
    gates = row * 4 * size + j
    i = tl.load(acts_ptr + gates, mask=valid)
    f = tl.load(acts_ptr + gates + size, mask=valid)
    g = tl.load(acts_ptr + gates + 2 * size, mask=valid)
    o = tl.load(acts_ptr + gates + 3 * size, mask=valid)
    dh_mask = tl.load(dh_mask_ptr + row * dh_mask_stride + j, mask=valid)
    dh = tl.load(dh_ptr + at, mask=valid) * dh_mask + tl.load(gout_ptr + at, mask=valid)
    tanh_c = _tanh(tl.load(c_ptr + at, mask=valid))
    dc = tl.load(dc_ptr + at, mask=valid) + dh * o * (1.0 - tanh_c * tanh_c)
    c_prev = tl.load(c_prev_ptr + at, mask=valid)
    tl.store(d_gates_ptr + gates, (dc * g) * (i * (1.0 - i)), mask=valid)
    tl.store(d_gates_ptr + gates + size, (dc * c_prev) * (f * (1.0 - f)), mask=valid)
    tl.store(d_gates_ptr + gates + 2 * size, (dc * i) * (1.0 - g * g), mask=valid)
    tl.store(d_gates_ptr + gates + 3 * size, (dh * tanh_c) * (o * (1.0 - o)), mask=valid)
    tl.store(dc_ptr + at, dc * f, mask=valid)
