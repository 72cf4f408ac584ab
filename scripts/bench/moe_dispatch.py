"""Benchmark: MoE dispatch and combine, CUDA kernels vs. the PyTorch reference, beside the card's
copy bandwidth measured in the same run.

    python scripts/bench/moe_dispatch.py                 # GPU: T=65536, d=2048, E=64, top-2, bf16
    python scripts/bench/moe_dispatch.py --tokens 4096 --dim 256   # CPU: the reference only

Bytes counted as: dispatch = T*d*2 read + E*C*d*2 written (padding included); combine = T*k*d*2
read + T*d*2 written (bf16). The routing plan is computed once, outside the timings. Before timing,
the kernels are checked against the reference (exact for dispatch, to rounding for combine).
"""

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from minillm import moe_kernels  # noqa: E402
from minillm.moe import MoEConfig, combine, dispatch, plan_from_probs  # noqa: E402


def timeit(fn, repeats: int, cuda: bool) -> float:
    fn()  # warm-up (and compilation)
    if cuda:
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(repeats):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1e3 / repeats
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t0) / repeats


def main():
    cuda = torch.cuda.is_available()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=65536 if cuda else 4096)
    ap.add_argument("--dim", type=int, default=2048 if cuda else 256)
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--capacity-factor", type=float, default=1.25)
    ap.add_argument("--dtype", default="bfloat16" if cuda else "float32")
    ap.add_argument("--repeats", type=int, default=20 if cuda else 3)
    args = ap.parse_args()
    device, dtype = ("cuda" if cuda else "cpu"), getattr(torch, args.dtype)
    T, d, E, k = args.tokens, args.dim, args.experts, args.top_k
    torch.manual_seed(0)
    logits = torch.randn(T, E, device=device)
    plan = plan_from_probs(logits.softmax(-1), logits,
                           MoEConfig(num_experts=E, top_k=k, capacity_factor=args.capacity_factor))
    C = plan.capacity
    x = torch.randn(T, d, device=device, dtype=dtype)
    out = torch.randn(E, C, d, device=device, dtype=dtype)
    el = torch.tensor([], dtype=dtype).element_size()
    dispatch_bytes = (T * d + E * C * d) * el
    combine_bytes = (T * k * d + T * d) * el
    print(f"T={T} d={d} E={E} top-{k} cf={args.capacity_factor} C={C} {args.dtype} on "
          f"{torch.cuda.get_device_name() if cuda else 'CPU'}; dropped {1 - plan.kept.float().mean():.3f}")
    rows = []
    copy_s = timeit(lambda: x.clone(), args.repeats, cuda)
    rows.append(("device copy (x.clone)", copy_s, 2 * T * d * el))
    rows.append(("dispatch, torch reference", timeit(lambda: dispatch(x, plan), args.repeats, cuda),
                 dispatch_bytes))
    rows.append(("combine, torch reference", timeit(lambda: combine(out, plan, T), args.repeats, cuda),
                 combine_bytes))
    if moe_kernels.available():
        disp, comb = moe_kernels.dispatch_combine_fns(plan, T)
        assert torch.equal(disp(x), dispatch(x, plan)), "dispatch kernel differs from the reference"
        torch.testing.assert_close(comb(out), combine(out, plan, T), atol=5e-2, rtol=2e-2)
        rows.append(("dispatch, CUDA kernel", timeit(lambda: disp(x), args.repeats, cuda), dispatch_bytes))
        rows.append(("combine, CUDA kernel", timeit(lambda: comb(out), args.repeats, cuda), combine_bytes))
    else:
        print("(CUDA kernels unavailable here: CuPy and a GPU are needed; timing the reference only)")
    copy_bw = rows[0][2] / rows[0][1] / 1e9
    print(f"{'operation':<30}{'ms':>10}{'GB/s':>10}{'% of copy':>11}")
    for name, seconds, nbytes in rows:
        bw = nbytes / seconds / 1e9
        print(f"{name:<30}{seconds * 1e3:>10.3f}{bw:>10.1f}{100 * bw / copy_bw:>10.0f}%")


if __name__ == "__main__":
    main()
