"""A metric computed with numpy alone: the mean absolute image gradient inside the rendered head, a crude
sharpness that needs no model. ophav hands it the protocol's MetricInputs; it asks for what it needs by name."""
from __future__ import annotations

import numpy as np


def head_gradient(inputs) -> np.ndarray:
    """Per render: mean |dI/dx| + |dI/dy| of the grey image (0..255) over pixels whose alpha is above 0.5; NaN
    where a render shows no head."""
    grey = inputs.pred.astype(np.float64).mean(axis=-1)
    inside = inputs.get("alpha") > 0.5
    dx = np.abs(np.diff(grey, axis=2))[:, :-1, :]
    dy = np.abs(np.diff(grey, axis=1))[:, :, :-1]
    keep = inside[:, :-1, :-1] & inside[:, 1:, :-1] & inside[:, :-1, 1:]
    out = np.full(len(grey), np.nan)
    for i in range(len(grey)):
        if keep[i].any():
            out[i] = float((dx[i] + dy[i])[keep[i]].mean())
    return out
