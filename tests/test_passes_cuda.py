"""The passes on a CUDA model: statistics stay on the device, folding and export work there."""

from __future__ import annotations

import os

import pytest
import torch

from passes import (
    CrossMoments,
    ObserverSpec,
    ResetSpec,
    export_onnx,
    fold_affines,
    insert_observers,
    insert_resets,
    observers,
    set_mode,
)
from tests.helpers import ConvBNNet

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
    pytest.mark.filterwarnings("ignore:.*LeafSpec:FutureWarning"),
]


def test_statistics_resets_and_fold_on_cuda():
    torch.manual_seed(0)
    model = ConvBNNet(8).cuda().eval()
    x = torch.randn(4, 3, 8, 8, device="cuda")
    gm = torch.fx.symbolic_trace(model)
    watched = insert_observers(gm, {"conv": ObserverSpec(1, keep=True), "fc": ObserverSpec(-1, keep=True)}).graph_module
    watched(x)
    obs = observers(watched)
    assert obs["conv"].mean.device.type == "cuda" and obs["conv"].mean.dtype == torch.float64
    torch.testing.assert_close(obs["conv"].mean, model.conv(x).double().mean((0, 2, 3)))
    cm = CrossMoments(8, 8, device="cuda")
    cm.update(obs["conv"].last, obs["conv"].last)
    torch.testing.assert_close(torch.diagonal(cm.corr()), torch.ones(8, device="cuda", dtype=torch.float64))

    spec = ResetSpec(1, torch.randn(8), torch.rand(8) + 0.5)
    reset = insert_resets(gm, {"bn": spec}).graph_module
    assert all(b.device.type == "cuda" for b in reset.buffers())
    reset(x)
    set_mode(reset, "apply")
    expected = reset(x)
    result = fold_affines(reset)
    assert result.counts == {"folded": 1, "kept": 0}
    torch.testing.assert_close(result.graph_module(x), expected, rtol=1e-5, atol=1e-5)


def test_export_checks_the_cuda_provider_when_onnxruntime_has_it(tmp_path):
    import onnxruntime as ort

    torch.manual_seed(0)
    model = ConvBNNet(8).cuda().eval()
    report = export_onnx(model, (torch.randn(2, 3, 8, 8, device="cuda"),), tmp_path / "net.onnx", atol=1e-3, rtol=1e-3)
    assert os.path.exists(report.path)
    if "CUDAExecutionProvider" in ort.get_available_providers():
        assert report.providers_checked == ("CPUExecutionProvider", "CUDAExecutionProvider")


@pytest.mark.parametrize("offset", [0.0, 1000.0])
def test_pair_taps_on_cuda_match_the_cpu(offset, monkeypatch):
    """The joint statistics pass on the GPU: the same sums as on the CPU, kept on the device."""
    from passes import PairTap, TapView, pair_graph

    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # compare like with like
    torch.manual_seed(0)
    a, b = ConvBNNet(8).eval(), ConvBNNet(8).eval()
    x = torch.randn(16, 3, 16, 16) + offset
    results = {}
    for device in ("cpu", "cuda"):
        a.to(device), b.to(device)
        gm = torch.fx.symbolic_trace(a)
        taps = {"conv": PairTap([TapView(1, None, True)], "conv"), "fc": PairTap([TapView(-1, None, True)], "fc")}
        pair = pair_graph(gm, a, b, taps, outputs=False).graph_module
        with torch.no_grad():
            for chunk in x.to(device).split(4):
                pair(chunk)
        results[device] = {k: (t.moments(0)[0].mean, t.moments(0)[1].var, t.cov(0)) for k, t in taps.items()}
    for k in results["cpu"]:
        for cpu, cuda in zip(results["cpu"][k], results["cuda"][k]):
            assert cuda.device.type == "cuda" and cuda.dtype == torch.float64
            torch.testing.assert_close(cuda.cpu(), cpu, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_reset_collect_on_cuda_matches_the_data(dtype):
    """On CUDA a reset takes each batch's statistics from BatchNorm's fused kernel (mean and
    inverse std): the accumulated running statistics are the data's, and every batch comes out
    with the goal statistics, in float32 and float16."""
    from passes import Reset

    torch.manual_seed(0)
    goal_mean, goal_std = torch.randn(5), torch.rand(5) + 0.5
    reset = Reset(5, dim=1, goal_mean=goal_mean, goal_std=goal_std).cuda()
    batches = [(torch.randn(6, 5, 4, 4) * 2 + 50.0).to(dtype) for _ in range(3)] + [torch.randn(2, 5, 4, 4).to(dtype)]
    for b in batches:
        y = reset(b.cuda())
        assert y.dtype == dtype and y.device.type == "cuda"
        tol = 1e-3 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(y.float().mean((0, 2, 3)).cpu(), goal_mean, rtol=tol, atol=tol)
        torch.testing.assert_close(y.float().std((0, 2, 3), correction=0).cpu(), goal_std, rtol=tol, atol=tol)
    data = torch.cat(batches).double()
    assert reset.running_mean.device.type == "cuda"
    torch.testing.assert_close(reset.running_mean.double().cpu(), data.mean((0, 2, 3)), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(reset.running_var.double().cpu(), data.var((0, 2, 3), correction=0),
                               rtol=1e-4, atol=1e-4)
