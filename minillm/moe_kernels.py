"""The CUDA path of MoE dispatch and combine: `cuda/moe.cu` (package data, so installed
wheels carry it), compiled by CuPy and wrapped as
autograd Functions with the semantics of `minillm.moe.dispatch` / `combine` (slots -1 dropped;
entries outside the buffer are left to the reference path).

Tensors go to the kernels zero-copy through DLPack (detached: torch refuses to export a tensor that
requires grad), and kernels run on the tensor's device, on PyTorch's current stream there. The
module is compiled and loaded once per process (and cached on disk by CuPy). `available()` is
False without CuPy or a GPU, and also when compiling or loading the kernels fails (e.g. a driver
older than CuPy's CUDA); minillm.moe then uses its PyTorch reference, and one log line says why.

Host synchronisations: none in dispatch / combine themselves. Building the plan's CSR index for
combine sorts entries by token on the device; the buffer size C is known before (capacity rule).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.resources
import logging
import os
from pathlib import Path

import torch



def _source() -> Path:
    """moe.cu: inside the installed package (setup.cfg ships the top-level cuda/ folder as
    minillm/cuda in a wheel), or, in a source checkout (an editable install), the top-level cuda/
    beside minillm/. cuda/ holds no __init__.py: a top-level package named `cuda` would shadow
    NVIDIA's `cuda` namespace package that CuPy imports."""
    installed = importlib.resources.files("minillm") / "cuda" / "moe.cu"
    if installed.is_file():
        return Path(str(installed))
    return Path(__file__).resolve().parents[1] / "cuda" / "moe.cu"


SOURCE = _source()
KERNELS = ("moe_slots", "moe_dispatch_f32", "moe_dispatch_bf16", "moe_combine_f32",
           "moe_combine_bf16", "moe_weight_grad_f32", "moe_weight_grad_bf16")
THREADS = 256
log = logging.getLogger(__name__)


def cuda_include_dir() -> str | None:
    """Where cuda_bf16.h lives: $CUDA_HOME or $CUDA_PATH, else the standard install location."""
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if root and (Path(root) / "include" / "cuda_bf16.h").is_file():
            return str(Path(root) / "include")
    return None


@functools.lru_cache(maxsize=1)
def available() -> bool:
    """True when the kernels compiled and loaded on the GPU; else False, with one log line."""
    if not torch.cuda.is_available():
        return _fall_back("no CUDA GPU")
    try:
        import cupy  # noqa: F401
    except ImportError:
        return _fall_back("CuPy is not installed (pip install -e .[cuda13])")
    try:
        for name in KERNELS:  # compiles, then loads the module onto the current device
            _kernel(name)
    except Exception as e:  # a compile error, a driver / toolkit mismatch, a missing header
        return _fall_back(f"the CUDA kernels did not build or load ({type(e).__name__}: "
                          f"{str(e).strip().splitlines()[0] if str(e).strip() else ''})")
    return True


# Whether minillm.moe uses the kernels when they are available. The switch for a measured loss to
# the PyTorch reference on a GPU (scripts/bench/moe_dispatch.py prints the verdict): set this to
# False to make the reference the default; MINILLM_MOE_KERNELS=1 / 0 overrides it either way.
KERNELS_BY_DEFAULT = True


def enabled() -> bool:
    """Use the kernels: opted in (KERNELS_BY_DEFAULT or MINILLM_MOE_KERNELS=1) and available()."""
    choice = os.environ.get("MINILLM_MOE_KERNELS", "").strip()
    wanted = KERNELS_BY_DEFAULT if choice == "" else choice not in ("0", "false", "no", "off")
    return wanted and available()


def _fall_back(reason: str) -> bool:
    log.warning("minillm MoE: %s; using the PyTorch reference dispatch and combine", reason)
    return False


@functools.lru_cache(maxsize=1)
def _module():
    import cupy

    include = cuda_include_dir()
    options = ("--std=c++17",) + ((f"-I{include}",) if include else ())
    return cupy.RawModule(code=SOURCE.read_text(), options=options, name_expressions=None)


def _kernel(name: str):
    return _module().get_function(name)


def to_array(t: torch.Tensor, from_dlpack):
    """A zero-copy array view of `t` for `from_dlpack` (cupy.from_dlpack for the kernels). The
    tensor is detached first: torch refuses to export one that requires grad, also inside an
    autograd Function's forward. bf16 goes as int16 bits: the kernels only need the pointer, and
    CuPy's DLPack import of bf16 needs an extra package (ml_dtypes)."""
    t = t.detach().contiguous()
    return from_dlpack(t.view(torch.int16) if t.dtype == torch.bfloat16 else t)


def _cp(t: torch.Tensor):
    import cupy
    return to_array(t, cupy.from_dlpack)


@contextlib.contextmanager
def _on_device(t: torch.Tensor):
    """Launch on `t`'s device (not the current one), on PyTorch's current stream there."""
    import cupy
    with torch.cuda.device(t.device), cupy.cuda.Device(t.device.index):
        with cupy.cuda.ExternalStream(torch.cuda.current_stream(t.device).cuda_stream):
            yield


def _vectorizable(*tensors: torch.Tensor) -> bool:
    """16-byte vector loads are safe: rows a multiple of 16 bytes, base pointers 16-byte aligned."""
    row_bytes = tensors[0].shape[-1] * tensors[0].element_size()
    return row_bytes % 16 == 0 and all(t.data_ptr() % 16 == 0 for t in tensors)


def _suffix(t: torch.Tensor) -> str:
    if t.dtype == torch.float32:
        return "f32"
    if t.dtype == torch.bfloat16:
        return "bf16"
    raise TypeError(f"MoE kernels take float32 or bfloat16, got {t.dtype}")


def slots(order_N: torch.Tensor, expert_N: torch.Tensor, token_N: torch.Tensor, num_experts: int,
          capacity: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(slot_N, row_token of the (E * C) buffer rows, count_E), as minillm.moe.assign_slots."""
    import numpy as np

    n = len(expert_N)
    slot_N = torch.full((n,), -1, dtype=torch.long, device=expert_N.device)
    row_token = torch.full((num_experts * capacity,), -1, dtype=torch.long, device=expert_N.device)
    count_E = torch.zeros(num_experts, dtype=torch.long, device=expert_N.device)
    with _on_device(expert_N):
        _kernel("moe_slots")((num_experts,), (THREADS,),
                             (_cp(order_N.long()), _cp(expert_N.long()), _cp(token_N.long()),
                              _cp(slot_N), _cp(row_token), _cp(count_E), np.int32(n),
                              np.int32(capacity)))
    return slot_N, row_token, count_E


def _dispatch(x_Td: torch.Tensor, row_token: torch.Tensor, row_scale: torch.Tensor | None,
              rows: int) -> torch.Tensor:
    import numpy as np

    x_Td = x_Td.contiguous()
    d = x_Td.shape[-1]
    buf = torch.empty(rows, d, dtype=x_Td.dtype, device=x_Td.device)
    scale = row_scale if row_scale is not None else torch.empty(1, device=x_Td.device)
    with _on_device(x_Td):
        _kernel(f"moe_dispatch_{_suffix(x_Td)}")(
            (rows,), (THREADS,),
            (_cp(x_Td), _cp(row_token), _cp(scale.float()), _cp(buf), np.int32(d),
             np.int32(row_scale is not None), np.int32(_vectorizable(x_Td, buf))))
    return buf


def _combine(out_Rd: torch.Tensor, rows_M: torch.Tensor, weight_M: torch.Tensor,
             offsets: torch.Tensor, num_tokens: int) -> torch.Tensor:
    import numpy as np

    out_Rd = out_Rd.contiguous()
    d = out_Rd.shape[-1]
    y = torch.empty(num_tokens, d, dtype=out_Rd.dtype, device=out_Rd.device)
    with _on_device(out_Rd):
        _kernel(f"moe_combine_{_suffix(out_Rd)}")(
            (num_tokens,), (THREADS,),
            (_cp(out_Rd), _cp(rows_M), _cp(weight_M.float()), _cp(offsets), _cp(y), np.int32(d),
             np.int32(_vectorizable(out_Rd, y))))
    return y


def csr_by_token(token_M: torch.Tensor, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(entry order sorted by token, offsets[T + 1]) for the combine kernel's inverse index."""
    order = torch.argsort(token_M, stable=True)
    counts = torch.bincount(token_M, minlength=num_tokens)
    offsets = torch.zeros(num_tokens + 1, dtype=torch.long, device=token_M.device)
    offsets[1:] = torch.cumsum(counts, 0)
    return order, offsets


class Dispatch(torch.autograd.Function):
    """(T, d) tokens -> (E * C, d) buffer rows; backward sums each token's rows (combine, w = 1)."""

    @staticmethod
    def forward(ctx, x_Td, row_token, kept_rows_sorted, kept_offsets):
        ctx.save_for_backward(kept_rows_sorted, kept_offsets)
        ctx.num_tokens = x_Td.shape[0]
        return _dispatch(x_Td, row_token, None, len(row_token))

    @staticmethod
    def backward(ctx, grad_buf):
        rows, offsets = ctx.saved_tensors
        ones = torch.ones(len(rows), device=grad_buf.device)
        return _combine(grad_buf.contiguous(), rows, ones, offsets, ctx.num_tokens), None, None, None


class Combine(torch.autograd.Function):
    """(E * C, d) expert outputs -> (T, d): y_t = sum_j w_j out[row_j] over t's kept entries."""

    @staticmethod
    def forward(ctx, out_Rd, weight_M, rows_M, tokens_M, order, offsets, row_entry):
        w_sorted = weight_M[order]
        ctx.save_for_backward(out_Rd, weight_M, rows_M, tokens_M, row_entry)
        return _combine(out_Rd.contiguous(), rows_M[order], w_sorted, offsets, len(offsets) - 1)

    @staticmethod
    def backward(ctx, grad_y):
        import numpy as np

        out_Rd, weight_M, rows_M, tokens_M, row_entry = ctx.saved_tensors
        grad_y = grad_y.contiguous()
        # d out[row] = w_entry * grad_y[token]: dispatch of grad_y with a scale per row
        row_token = torch.where(row_entry >= 0, tokens_M[row_entry.clamp(min=0)], row_entry)
        row_scale = torch.where(row_entry >= 0, weight_M[row_entry.clamp(min=0)].float(),
                                torch.zeros_like(row_entry, dtype=torch.float32))
        grad_out = _dispatch(grad_y, row_token, row_scale, out_Rd.shape[0])
        grad_w = torch.empty(len(rows_M), dtype=torch.float32, device=grad_y.device)
        with _on_device(grad_y):
            _kernel(f"moe_weight_grad_{_suffix(out_Rd)}")(
                (len(rows_M),), (THREADS,),
                (_cp(out_Rd.contiguous()), _cp(grad_y), _cp(rows_M), _cp(tokens_M), _cp(grad_w),
                 np.int32(out_Rd.shape[-1])))
        return grad_out, grad_w.to(weight_M.dtype), None, None, None, None, None


SUPPORTED = (torch.float32, torch.bfloat16)


def dispatch_combine_fns(plan, num_tokens: int):
    """Closures (dispatch(x) -> (E, C, d), combine(out) -> (T, d)) on the kernels for the kept
    entries of `plan`, equal to minillm.moe.dispatch / combine on them, for tensors of a
    `SUPPORTED` dtype (minillm.moe sends other dtypes to its reference path)."""
    kept = plan.kept
    E, C = plan.num_experts, plan.capacity
    tokens = plan.token[kept]
    rows = plan.expert[kept] * C + plan.slot[kept]
    row_token = torch.full((E * C,), -1, dtype=torch.long, device=rows.device)
    row_token[rows] = tokens
    row_entry = torch.full((E * C,), -1, dtype=torch.long, device=rows.device)
    row_entry[rows] = torch.arange(len(rows), device=rows.device)
    order, offsets = csr_by_token(tokens, num_tokens)

    def dispatch(x_Td):
        return Dispatch.apply(x_Td, row_token, rows[order], offsets).view(E, C, -1)

    def combine(out_ECd):
        return Combine.apply(out_ECd.reshape(E * C, -1), plan.weight[kept], rows, tokens, order,
                             offsets, row_entry)
    return dispatch, combine


def compile_report(arch: str = "sm_90") -> dict[str, dict[str, int]]:
    """Compile every kernel with NVRTC for `arch` (no GPU needed); per kernel, ptxas' registers and
    spill bytes. Raises with the compiler log if compilation fails."""
    import re

    from cupy_backends.cuda.libs import nvrtc

    include = cuda_include_dir()
    if include is None:
        raise FileNotFoundError("cuda_bf16.h not found: set CUDA_HOME to a CUDA toolkit")
    prog = nvrtc.createProgram(SOURCE.read_text(), "moe.cu", [], [])
    options = [f"--gpu-architecture={arch}", f"-I{include}", "--std=c++17", "--ptxas-options=-v"]
    try:
        nvrtc.compileProgram(prog, options)
    except Exception as e:
        raise RuntimeError(f"{SOURCE} failed to compile:\n{nvrtc.getProgramLog(prog)}") from e
    nvrtc.getCUBIN(prog)
    report: dict[str, dict[str, int]] = {}
    for block in nvrtc.getProgramLog(prog).split("Compiling entry function '")[1:]:
        name = block.split("'", 1)[0]
        spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", block)
        registers = re.search(r"Used (\d+) registers", block)
        report[name] = {"registers": int(registers.group(1)) if registers else -1,
                        "spill_stores": int(spills.group(1)) if spills else -1,
                        "spill_loads": int(spills.group(2)) if spills else -1}
    return report
