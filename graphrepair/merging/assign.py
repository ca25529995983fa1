"""The linear assignment problem: the permutation P maximising sum_i score[i, P(i)].

One solver for every matcher (activation matching, weight matching): scipy's
``linear_sum_assignment`` on a float64 copy, NaN and infinities read as 0.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment


def lap(score: torch.Tensor) -> torch.Tensor:
    """The permutation maximising sum_i score[i, P(i)] (rows: A's channels, columns: B's)."""
    s = score.detach().double().cpu().numpy()
    if not np.isfinite(s).all():
        s = np.nan_to_num(s, nan=0.0, posinf=0.0, neginf=0.0)
    _, cols = linear_sum_assignment(s, maximize=True)
    return torch.as_tensor(cols, dtype=torch.long)
