"""The REPAIR paper's merge of its MLPs, one layer at a time: the baseline for graphrepair's one pass.

For the paper's MLP (``fixtures.zoo.mlp``: Flatten, L hidden Linear+ReLU layers, a Linear head),
the procedure as the paper describes it, written out here for plain nn.Sequential models:

1. Align, layer by layer. For l = 1 .. L: one pass of A and of B (B already permuted below l)
   over the data, up to layer l's ReLU, streams the float64 sums of A's and B's activations
   there (sum, sum of squares, A^T B); their correlation

       corr_ij = (S_ab / n - m_a m_b^T)_ij / (std_a,i std_b,j)

   gives P_l by one linear assignment (scipy), and B's layer l rows and layer l+1 columns are
   permuted: L partial passes of A and B.
2. Interpolate: theta = (theta_A + theta_B') / 2.
3. Goals: one pass of A and of B' gives each layer's pre-activation mean and std; the goal is
   their average.
4. Reset, layer by layer. For l = 1 .. L: one pass of the merged model (its layers below l already
   reset) up to layer l gives the mean mu and std s of that layer's output, and the layer is
   reset into its weights, W_l <- W_l g_s / s (per row), b_l <- (b_l - mu) g_s / s + g_mu:
   L partial passes of the merged model.

The passes stop at the layer they measure (a fair baseline: no work past what it needs). What
graphrepair does instead (one joint pass of A and B for every layer, one pass of the merged model
for every reset) is timed against this in ``bench_merge``.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from graphrepair.merging.assign import lap


def _hidden(model: nn.Sequential) -> list[int]:
    """Indices of the hidden Linear layers (each followed by a ReLU)."""
    return [i for i, m in enumerate(model) if isinstance(m, nn.Linear) and i + 1 < len(model)
            and isinstance(model[i + 1], nn.ReLU)]


@torch.no_grad()
def _moments(parts, x, batch_size):
    """Streamed float64 (n, sums, sums of squares, cross sums) of the outputs of ``parts`` (one or
    two truncated models) over ``x``."""
    n, s, sq, cross = 0, None, None, None
    for i in range(0, len(x), batch_size):
        hs = [p(x[i:i + batch_size]) for p in parts]
        hs = [h.reshape(h.shape[0], -1) for h in hs]
        bs = [h.sum(0).double() for h in hs]
        bq = [h.square().sum(0).double() for h in hs]
        s = bs if s is None else [a + b for a, b in zip(s, bs)]
        sq = bq if sq is None else [a + b for a, b in zip(sq, bq)]
        if len(hs) == 2:
            c = (hs[0].T @ hs[1]).double()
            cross = c if cross is None else cross + c
        n += hs[0].shape[0]
    return n, s, sq, cross


@torch.no_grad()
def _layer_stats(model, hidden, x, batch_size):
    """{layer: (mean, std)} of every hidden layer's output, from one pass of ``model``."""
    sums = {li: [0, 0.0, 0.0] for li in hidden}

    def hook(li):
        def record(_module, _inputs, out):
            t = sums[li]
            t[0] += out.shape[0]
            t[1] = t[1] + out.sum(0).double()
            t[2] = t[2] + out.square().sum(0).double()
        return record

    handles = [model[li].register_forward_hook(hook(li)) for li in hidden]
    try:
        for i in range(0, len(x), batch_size):
            model(x[i:i + batch_size])
    finally:
        for h in handles:
            h.remove()
    return {li: _mean_std(*sums[li]) for li in hidden}


def _mean_std(n, s, sq):
    mean = s / n
    return mean, (sq / n - mean * mean).clamp_min(0).sqrt()


@torch.no_grad()
def paper_merge(model_a: nn.Sequential, model_b: nn.Sequential, x: torch.Tensor, batch_size: int = 500,
                eps: float = 1e-5) -> nn.Sequential:
    """The merged model (REPAIRed) by the paper's layer-by-layer procedure (module doc)."""
    a, b = model_a.eval(), copy.deepcopy(model_b).eval()
    hidden = _hidden(a)
    for li in hidden:  # 1. align, one pass of A and B per layer
        n, s, sq, cross = _moments([a[:li + 2], b[:li + 2]], x, batch_size)
        (ma, sa), (mb, sb) = _mean_std(n, s[0], sq[0]), _mean_std(n, s[1], sq[1])
        cov = cross / n - torch.outer(ma, mb)
        corr = cov / (sa[:, None] * sb[None, :]).clamp_min(1e-12)
        p = lap(corr)
        b[li].weight.copy_(b[li].weight[p])
        b[li].bias.copy_(b[li].bias[p])
        nxt = next(j for j in range(li + 1, len(b)) if isinstance(b[j], nn.Linear))
        b[nxt].weight.copy_(b[nxt].weight[:, p])
    merged = copy.deepcopy(a)  # 2. interpolate
    for pm, pa, pb in zip(merged.parameters(), a.parameters(), b.parameters()):
        pm.copy_((pa + pb) / 2)
    ga, gb = _layer_stats(a, hidden, x, batch_size), _layer_stats(b, hidden, x, batch_size)  # 3. goals
    goals = {li: ((ga[li][0] + gb[li][0]) / 2, (ga[li][1] + gb[li][1]) / 2) for li in hidden}
    for li in hidden:  # 4. reset, one pass of the merged model per layer
        n, s, sq, _ = _moments([merged[:li + 1]], x, batch_size)
        mu, sd = _mean_std(n, s[0], sq[0])
        g_mu, g_sd = goals[li]
        scale = g_sd / (sd * sd + eps).sqrt()
        layer = merged[li]
        layer.weight.copy_((layer.weight.double() * scale[:, None]).float())
        layer.bias.copy_(((layer.bias.double() - mu) * scale + g_mu).float())
    return merged
