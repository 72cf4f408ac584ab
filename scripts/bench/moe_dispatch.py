"""Benchmark: MoE routing metadata, dispatch and combine (forward and backward), CUDA kernels vs.
the PyTorch reference, beside the card's copy bandwidth measured in the same run.

    python scripts/bench/moe_dispatch.py                 # GPU: T=65536, d=2048, E=64, top-2, bf16
    python scripts/bench/moe_dispatch.py --tokens 512 --dim 64 --experts 8   # CPU: reference only

Fair to both paths: the routing metadata (the plan's slots; for the kernels also the row index and
the CSR index) is built inside the timed dispatch, as the layer does every forward; combine reuses
it, as the layer does. Bytes are counted by one definition for both (`traffic` below). Before
timing, the kernels are checked against the reference (exact for dispatch, to rounding for
combine). The last line is the verdict: if the kernels lose to the reference, make the reference
the default (`minillm.moe_kernels.KERNELS_BY_DEFAULT = False`; MINILLM_MOE_KERNELS=1 opts in).
"""

import os
import time

import torch

from minillm.cli import ArgumentParser
from minillm import moe_kernels
from minillm.moe import MoEConfig, assign_slots, combine, dispatch, plan_from_probs

INDEX = 8  # bytes per int64 index


def traffic(T: int, d: int, E: int, C: int, kept: int, k: int, element: int) -> dict[str, int]:
    """Bytes moved, one definition for kernel and reference. dispatch: each kept entry's token row
    read, the whole (E, C, d) buffer written (padding included), index traffic (expert, token,
    slot per entry, token per buffer row). combine: each kept entry's output row read, (T, d)
    written, index traffic (row and weight per kept entry, T + 1 offsets). backward: combine's
    backward is a dispatch of the output gradient (plus reading the output rows again for the
    weight gradient), dispatch's backward a combine with weights 1."""
    n = T * k
    dispatch_b = kept * d * element + E * C * d * element + 3 * n * INDEX + E * C * INDEX
    combine_b = kept * d * element + T * d * element + kept * (INDEX + 4) + (T + 1) * INDEX
    backward_b = dispatch_b + kept * d * element + combine_b
    return {"dispatch": dispatch_b, "combine": combine_b, "backward": backward_b}


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


def use_kernels(on: bool) -> None:
    """minillm.moe takes the kernels (slots, dispatch, combine) or the reference."""
    os.environ["MINILLM_MOE_KERNELS"] = "1" if on else "0"


def path_fns(probs, cfg, T, kernel: bool):
    """(dispatch incl. metadata: x -> (buffer, state), combine: (out, state) -> y) for one path."""
    def dispatch_fn(x):
        use_kernels(kernel)
        plan = plan_from_probs(probs, probs, cfg)  # slots: the kernel when enabled
        if kernel:
            disp, comb = moe_kernels.dispatch_combine_fns(plan, T)  # row and CSR indexes
            return disp(x), comb
        return dispatch(x, plan), (lambda out: combine(out, plan, T))

    def combine_fn(out, comb):
        return comb(out)
    return dispatch_fn, combine_fn


def main(argv=None):
    cuda = torch.cuda.is_available()
    ap = ArgumentParser(description=__doc__)
    ap.add_argument("--tokens", type=int, default=65536 if cuda else 4096)
    ap.add_argument("--dim", type=int, default=2048 if cuda else 256)
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--capacity-factor", type=float, default=1.25)
    ap.add_argument("--dtype", default="bfloat16" if cuda else "float32")
    ap.add_argument("--repeats", type=int, default=20 if cuda else 3)
    args = ap.parse_args(argv)
    device, dtype = ("cuda" if cuda else "cpu"), getattr(torch, args.dtype)
    T, d, E, k = args.tokens, args.dim, args.experts, args.top_k
    torch.manual_seed(0)
    probs = torch.randn(T, E, device=device).softmax(-1)
    cfg = MoEConfig(num_experts=E, top_k=k, capacity_factor=args.capacity_factor)
    use_kernels(False)
    plan = plan_from_probs(probs, probs, cfg)
    C, kept = plan.capacity, int(plan.kept.sum())
    el = torch.tensor([], dtype=dtype).element_size()
    nbytes = traffic(T, d, E, C, kept, k, el)
    x = torch.randn(T, d, device=device, dtype=dtype, requires_grad=True)
    print(f"T={T} d={d} E={E} top-{k} cf={args.capacity_factor} C={C} {args.dtype} on "
          f"{torch.cuda.get_device_name() if cuda else 'CPU'}; dropped {1 - kept / (T * k):.3f}")
    copy_s = timeit(lambda: x.detach().clone(), args.repeats, cuda)
    rows = [("device copy (x.clone)", copy_s, 2 * T * d * el)]
    paths = ["torch reference"] + (["CUDA kernels"] if moe_kernels.available() else [])
    totals = {}
    for name in paths:
        kernel = name == "CUDA kernels"
        dispatch_fn, combine_fn = path_fns(probs, cfg, T, kernel)
        order = torch.arange(T * k, device=device)
        if kernel:  # the kernels against the reference before timing them
            use_kernels(False)
            ref_buf, ref_comb = path_fns(probs, cfg, T, False)[0](x)
            buf, comb = dispatch_fn(x)
            assert torch.equal(buf.view_as(ref_buf), ref_buf), "dispatch kernel differs"
            torch.testing.assert_close(comb(ref_buf * 2), ref_comb(ref_buf * 2), atol=5e-2, rtol=2e-2)
            slots_fn = lambda: moe_kernels.slots(order, plan.expert, plan.token, E, C)  # noqa: E731
        else:
            slots_fn = lambda: assign_slots(plan.expert, order, E, C)  # noqa: E731
        buf, comb = dispatch_fn(x)
        out = buf.detach().mul(2).requires_grad_(True)
        y = combine_fn(out, comb)
        g = torch.randn_like(y)

        def backward():
            return torch.autograd.grad(combine_fn(out, comb), (out,), g)[0], \
                torch.autograd.grad(dispatch_fn(x)[0], (x,), buf.detach())[0]
        with torch.no_grad():
            t_slots = timeit(slots_fn, args.repeats, cuda)
            t_dispatch = timeit(lambda: dispatch_fn(x), args.repeats, cuda)
            t_combine = timeit(lambda: combine_fn(out, comb), args.repeats, cuda)
        # backward: combine's and dispatch's; the forward passes they need are timed above and
        # subtracted
        t_backward = timeit(backward, args.repeats, cuda) - t_dispatch - t_combine
        rows += [(f"slots, {name}", t_slots, 3 * T * k * INDEX),
                 (f"dispatch + metadata, {name}", t_dispatch, nbytes["dispatch"]),
                 (f"combine, {name}", t_combine, nbytes["combine"]),
                 (f"backward (both), {name}", max(t_backward, 1e-9), nbytes["backward"])]
        totals[name] = t_dispatch + t_combine + max(t_backward, 0.0)
    use_kernels(moe_kernels.KERNELS_BY_DEFAULT)
    os.environ.pop("MINILLM_MOE_KERNELS", None)
    copy_bw = rows[0][2] / rows[0][1] / 1e9
    print(f"{'operation':<40}{'ms':>10}{'GB/s':>10}{'% of copy':>11}")
    for name, seconds, n in rows:
        bw = n / seconds / 1e9
        print(f"{name:<40}{seconds * 1e3:>10.3f}{bw:>10.1f}{100 * bw / copy_bw:>10.0f}%")
    if len(totals) == 2:
        faster = min(totals, key=totals.get)
        print(f"VERDICT: {faster} faster, forward + backward {totals['torch reference'] * 1e3:.3f} ms "
              f"(reference) vs {totals['CUDA kernels'] * 1e3:.3f} ms (kernels); "
              + ("keep KERNELS_BY_DEFAULT = True" if faster == "CUDA kernels"
                 else "set minillm.moe_kernels.KERNELS_BY_DEFAULT = False"))
    else:
        print("VERDICT: none (CUDA kernels unavailable here: CuPy and a GPU are needed; reference only)")
    return rows


if __name__ == "__main__":
    main()
