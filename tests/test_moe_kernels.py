"""The CUDA MoE kernels: compiled on the CPU (NVRTC) in every run; held to the PyTorch reference on
a GPU (marker `gpu`)."""

import pytest
import torch

from minillm import moe_kernels
from minillm.moe import MoEConfig, assign_slots, combine, dispatch, plan_from_probs


def test_every_kernel_compiles_for_sm90_without_spills():
    pytest.importorskip("cupy")
    report = moe_kernels.compile_report("sm_90")
    assert set(report) == set(moe_kernels.KERNELS)
    for name, info in report.items():
        print(f"{name}: {info['registers']} registers, {info['spill_stores']} B spill stores")
        assert info["spill_stores"] == 0 and info["spill_loads"] == 0, name
        assert 0 < info["registers"] <= 64, name


def gpu_plan(T, E, k, cf, seed=0, priority="score"):
    g = torch.Generator(device="cuda").manual_seed(seed)
    logits = torch.randn(T, E, device="cuda", generator=g)
    cfg = MoEConfig(num_experts=E, top_k=k, capacity_factor=cf, min_capacity=1, priority=priority)
    return plan_from_probs(logits.softmax(-1), logits, cfg)


CASES = [  # (T, E, k, cf): random; uneven T; every token to one expert (E = 4 below); capacity 1
    # smaller than k = 2; E = 1; many experts, some receiving nothing
    (1000, 8, 2, 1.25), (777, 16, 2, 1.0), (64, 4, 1, 0.25), (16, 8, 2, 0.25), (33, 1, 1, 1.0),
    (513, 64, 2, 0.1),
]


@pytest.mark.gpu
@pytest.mark.parametrize("T,E,k,cf", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("d", [136, 135])  # 16-byte vectorised rows, and the scalar fallback
def test_kernels_equal_reference(T, E, k, cf, dtype, d):
    assert moe_kernels.available()
    plan = gpu_plan(T, E, k, cf)
    if E == 4:  # every token to expert 0; experts 1-3 receive nothing
        plan.expert = torch.zeros_like(plan.expert)
        plan.slot = assign_slots(plan.expert, torch.arange(len(plan.expert), device="cuda"), E,
                                 plan.capacity)
    order = torch.argsort(torch.arange(len(plan.expert), device="cuda"))
    slot, row_token, count = moe_kernels.slots(order, plan.expert, plan.token, E, plan.capacity)
    # the reference on the CPU (on the GPU, assign_slots itself calls the kernel)
    reference = assign_slots(plan.expert.cpu(), torch.arange(len(plan.expert)), E, plan.capacity)
    assert torch.equal(slot.cpu(), reference)
    assert torch.equal(count, torch.bincount(plan.expert, minlength=E))
    x = torch.randn(T, d, device="cuda", dtype=dtype, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    w = plan.weight.clone().requires_grad_(True)
    plan.weight = w
    disp, comb = moe_kernels.dispatch_combine_fns(plan, T)
    buf = disp(x)
    assert torch.equal(buf, dispatch(x_ref, plan))  # the permutation is exact
    out = buf * 2 + 1
    y = comb(out)
    y_ref = combine(dispatch(x_ref, plan) * 2 + 1, plan, T)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(y, y_ref, **tol)
    g = torch.randn_like(y)
    (y * g).sum().backward()
    gx, gw = x.grad.clone(), w.grad.clone()
    x.grad = None
    w.grad = None
    (y_ref * g).sum().backward()
    torch.testing.assert_close(gx, x_ref.grad, **tol)
    torch.testing.assert_close(gw, w.grad, **tol)


@pytest.mark.gpu
def test_rectified_moe_on_gpu_equals_cpu():
    from minillm.moe import MoE
    from minillm.methods.rectify_router import FillInRectification, IntraGPURectification

    torch.manual_seed(0)
    cfg = MoEConfig(num_experts=8, top_k=2, expert_hidden=32, capacity_factor=1.0, min_capacity=1)
    cpu = MoE(64, cfg, plan_transforms=[IntraGPURectification(4), FillInRectification()])
    with torch.no_grad():
        cpu.router.gate.weight[0] += 1.0  # overflow expert 0, pad the others
    gpu = MoE(64, cfg, plan_transforms=cpu.plan_transforms).cuda()
    gpu.load_state_dict(cpu.state_dict())
    x = torch.randn(2, 100, 64)
    y_cpu, _ = cpu(x)
    y_gpu, _ = gpu(x.cuda())
    torch.testing.assert_close(y_gpu.cpu(), y_cpu, atol=1e-4, rtol=1e-4)


# --- the loader on the CPU: DLPack boundary, fallback, package data -------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_conversion_detaches_a_tensor_that_requires_grad(dtype):
    """Issue 10, bug 1: fp32 training handed tensors that require grad to DLPack, which torch
    refuses. numpy's from_dlpack stands in for CuPy's on the CPU."""
    import numpy as np

    x = torch.randn(3, 8, dtype=dtype, requires_grad=True)
    with pytest.raises((BufferError, RuntimeError)):
        np.from_dlpack(x)  # what the old boundary did
    a = moe_kernels.to_array(x, np.from_dlpack)
    assert a.ctypes.data == x.data_ptr()  # zero copy
    bits = x.detach().view(torch.int16) if dtype == torch.bfloat16 else x.detach()
    assert np.array_equal(a, bits.numpy())


def test_available_falls_back_with_one_log_line_when_the_kernels_do_not_load(monkeypatch, caplog):
    """Issue 10, bug 5: CuPy importing is not enough; a compile or driver failure means the
    reference, said once."""
    pytest.importorskip("cupy")

    def broken(name):
        raise RuntimeError("cudaErrorInsufficientDriver: CUDA driver version is insufficient")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(moe_kernels, "_kernel", broken)
    moe_kernels.available.cache_clear()
    try:
        with caplog.at_level("WARNING", logger="minillm.moe_kernels"):
            assert moe_kernels.available() is False
            assert moe_kernels.enabled() is False
            assert moe_kernels.available() is False
        lines = [r.getMessage() for r in caplog.records]
        assert len(lines) == 1 and "cudaErrorInsufficientDriver" in lines[0], lines
    finally:
        moe_kernels.available.cache_clear()


def test_kernel_switch(monkeypatch):
    monkeypatch.setattr(moe_kernels, "available", lambda: True)
    for env, default, expected in (("", True, True), ("", False, False), ("1", False, True),
                                   ("0", True, False)):
        monkeypatch.setenv("MINILLM_MOE_KERNELS", env)
        monkeypatch.setattr(moe_kernels, "KERNELS_BY_DEFAULT", default)
        assert moe_kernels.enabled() is expected


@pytest.mark.slow
def test_an_installed_wheel_carries_the_cuda_source(tmp_path):
    """Issue 10, bug 4: build a wheel from a copy of the project, unpack it as pip would install
    it, and find the source from there."""
    import shutil
    import subprocess
    import sys
    import zipfile
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    src = tmp_path / "src"
    src.mkdir()
    for name in ("setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy(repo / name, src / name)
    for folder in ("minillm", "cuda"):  # the top-level cuda/ ships inside as minillm/cuda
        shutil.copytree(repo / folder, src / folder,
                        ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(tmp_path / "wheel"), str(src)], check=True, timeout=300)
    wheel = next((tmp_path / "wheel").glob("minillm-*.whl"))
    with zipfile.ZipFile(wheel) as z:
        assert "minillm/cuda/moe.cu" in z.namelist()
        assert "minillm/methods/wanjuan_cc/pipeline.py" in z.namelist()
        z.extractall(tmp_path / "site")
    out = subprocess.run(
        [sys.executable, "-c", "from minillm import moe_kernels as m; print(m.SOURCE); "
         "assert m.SOURCE.is_file() and 'moe_combine_bf16' in m.SOURCE.read_text()"],
        cwd=tmp_path, env={"PYTHONPATH": str(tmp_path / "site"), "PATH": ""}, capture_output=True,
        text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert Path(out.stdout.strip()).is_relative_to(tmp_path / "site")


def test_dispatch_benchmark_runs_the_reference_on_the_cpu(capsys):
    """scripts/bench/moe_dispatch.py at a tiny size (the kernels need a GPU: reference only)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "bench" / "moe_dispatch.py"
    spec = importlib.util.spec_from_file_location("moe_dispatch_bench", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    # one definition of bytes: T=4, d=2, E=2, C=3, 6 kept of 8 entries (k=2), fp32
    assert bench.traffic(4, 2, 2, 3, 6, 2, 4) == {
        "dispatch": 6 * 8 + 6 * 8 + 3 * 8 * 8 + 6 * 8, "combine": 6 * 8 + 4 * 8 + 6 * 12 + 5 * 8,
        "backward": 6 * 8 + 6 * 8 + 3 * 8 * 8 + 6 * 8 + 6 * 8 + 6 * 8 + 4 * 8 + 6 * 12 + 5 * 8}
    rows = bench.main(["--tokens", "256", "--dim", "32", "--experts", "8", "--repeats", "2"])
    names = [r[0] for r in rows]
    for op in ("slots", "dispatch + metadata", "combine", "backward (both)"):
        assert f"{op}, torch reference" in names
    assert all(seconds > 0 for _, seconds, _ in rows)
    if not moe_kernels.available():
        assert "VERDICT: none" in capsys.readouterr().out
