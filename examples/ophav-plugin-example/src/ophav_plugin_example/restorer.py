"""The ``unsharp`` restorer: sharpens each render with an unsharp mask, only where the head is.

    restored = image + amount * alpha * (image - gaussian_blur(image, radius))

It is a deliberately simple restorer: it shows the contract (uint8 images in, the same shape out, options
validated by pydantic), not a face prior. This module imports only numpy and pydantic at import time; scipy is
imported when a batch is restored.
"""
from __future__ import annotations

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from ophav_core.stages import RestoreInput, Restorer


class UnsharpOptions(BaseModel):
    """Options of the ``unsharp`` restorer (``--set restorer.amount=1.2``)."""

    model_config = ConfigDict(extra="forbid")

    amount: float = Field(0.8, ge=0.0, le=5.0, description="strength of the sharpening; 0 leaves the renders alone")
    radius: float = Field(1.5, gt=0.0, le=20.0, description="standard deviation of the Gaussian blur in pixels at "
                                                            "512x512 (scaled with the image size)")


class UnsharpRestorer(Restorer):
    Options = UnsharpOptions

    def restore(self, batch: RestoreInput) -> np.ndarray:
        from scipy.ndimage import gaussian_filter

        images = batch.images.astype(np.float32)
        sigma = self.options.radius * images.shape[2] / 512.0
        # Blur within each image only (sigma 0 along the batch and colour axes).
        blurred = gaussian_filter(images, sigma=(0.0, sigma, sigma, 0.0), mode="reflect")
        detail = (images - blurred) * batch.alpha[..., None]
        out = images + self.options.amount * detail
        return np.clip(np.rint(out), 0, 255).astype(np.uint8)
