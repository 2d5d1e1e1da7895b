"""Stage 5: sharpen the avatar's renders for the iterative dataset update."""
from __future__ import annotations

from abc import abstractmethod

import numpy as np

from ophav_core.stages.base import Component
from ophav_core.stages.data import RestoreInput


class Restorer(Component):
    stage = "restorer"

    @abstractmethod
    def restore(self, batch: RestoreInput) -> np.ndarray:
        """Restored images, uint8 (N, H, W, 3), the same size as ``batch.images``."""
