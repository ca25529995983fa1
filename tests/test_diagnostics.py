"""graphrepair.merging.diagnostics: what a spec and the statistics say a merge can achieve."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import graphrepair as gr
from graphrepair.errors import DataError, NoGroupsError
from graphrepair.merging.diagnostics import check_statistics, corr_summary, require_groups


def _mlp(width: int = 8) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, width), nn.ReLU(), nn.Linear(width, 3)).eval()


def test_require_groups_passes_a_spec_with_groups_through():
    spec = gr.discover(_mlp(), (torch.randn(2, 4),))
    assert require_groups(spec, "mlp") is spec and len(spec.groups) == 1


def test_require_groups_names_the_model_and_where_to_look():
    spec = gr.discover(nn.Linear(4, 3), (torch.randn(2, 4),))  # no hidden channel
    with pytest.raises(NoGroupsError, match=r"no permutation groups in lin: .*see spec\.fixed"):
        require_groups(spec, "lin")
    with pytest.raises(NoGroupsError, match="see `graphrepair inspect --model m:f` for every axis"):
        require_groups(spec, "m:f", see="graphrepair inspect --model m:f")


def test_check_statistics_all_dead_rank_deficient_and_enough():
    spec = gr.discover(_mlp(width=8), (torch.randn(2, 4),))
    with pytest.raises(DataError, match="--data d: no unit of model A varies over the 50 examples .*all 8"):
        check_statistics(8, spec, "--data d", 50)
    (warning,) = check_statistics(3, spec, "--data d", 5)
    assert "only 5 examples for groups of up to 8 channels" in warning
    assert check_statistics(0, spec, "--data d", 8) == []


def test_corr_summary():
    assert corr_summary({}) is None
    assert corr_summary({"a": 0.5, "b": 1.0}) == {"min": 0.5, "mean": 0.75}


def test_merge_result_as_dict_reports_the_merge():
    a, b = _mlp(), _mlp()
    with torch.no_grad():
        for p in b.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x = torch.randn(64, 4)
    res = gr.merge_models([a, b], x, weights=[0.5, 0.5], repair="exact", num_examples=64)
    d = res.as_dict()
    assert d["groups"] == 1 and d["free_channels"] == 8 and d["group_sizes"] == {g.name: 8 for g in res.spec.groups}
    assert d["mean_corr"] == res.mean_corr and d["mean_corr_summary"] == corr_summary(res.mean_corr)
    assert d["resets"] == res.resets and d["folded"] == res.folded and d["kept"] == res.kept
    assert d["merged_class"] == "Sequential" and d["interpolation_weights"] == [0.5, 0.5]
    assert d["examples"] == 64 and d["refit"] is None and d["method"] == "activation" and d["repair"] == "exact"


def _pair(width: int = 8) -> tuple[nn.Module, nn.Module]:
    a, b = _mlp(width), _mlp(width)
    with torch.no_grad():
        for p in b.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return a, b


@pytest.mark.parametrize("repair", ["exact", None])
def test_api_merge_of_a_model_without_groups_raises_no_groups_error(repair):
    a, b = nn.Linear(4, 3), nn.Linear(4, 3)
    with pytest.raises(NoGroupsError, match=r"no permutation groups in Linear: .*see spec\.fixed"):
        gr.merge_models([a, b], torch.randn(32, 4), repair=repair, num_examples=32)
    with pytest.raises(NoGroupsError, match="no permutation groups in lin: .*see `here`"):
        gr.merge_models([a, b], torch.randn(32, 4), repair=repair, num_examples=32, name="lin", see="here")


def test_api_merge_of_all_dead_data_raises_data_error():
    a, b = _pair()
    with torch.no_grad():  # every hidden unit of A constant: a zero first layer
        a[0].weight.zero_()
    with pytest.raises(DataError, match="the data tensor: no unit of model A varies over the 64 examples .*all 8"):
        gr.merge_models([a, b], torch.randn(64, 4), repair="exact", num_examples=64)


def test_api_merge_on_few_examples_warns_and_enough_does_not():
    a, b = _pair(width=8)
    res = gr.merge_models([a, b], torch.randn(5, 4), repair="exact", num_examples=5)
    (warning,) = res.warnings
    assert "statistics from only 5 examples for groups of up to 8 channels" in warning
    assert res.as_dict()["warnings"] == res.warnings
    assert gr.merge_models([a, b], torch.randn(64, 4), repair="exact", num_examples=64).warnings == []
