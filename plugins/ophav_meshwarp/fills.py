"""Content the portrait never showed: the inside of an opening mouth, and closed eyelids.

The mouth interior is procedural, in mouth coordinates (u along the mouth from corner to corner, v from the upper
to the lower inner lip): a dark cavity shading towards the lips' colour at its rim, an upper row of teeth under the
upper lip, a hint of lower teeth and tongue when wide open. It is composited with soft edges inside the inner-lip
polygon, so an opening mouth shows a mouth, never stretched lips.
"""
from __future__ import annotations

import numpy as np


def smoothstep(x: np.ndarray | float) -> np.ndarray:
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3.0 - 2.0 * x)


def mouth_interior(u: np.ndarray, v: np.ndarray, width_px: float, opening_px: float,
                   lip_colour: np.ndarray, teeth_strength: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Colours (P, 3) float32 and edge alpha (P,) of the mouth interior at mouth coordinates ``u``, ``v`` (P,).

    width_px: the mouth's width in the frame; opening_px: its mean inner height; lip_colour: the portrait's
    mean lip colour (RGB), which the cavity's rim takes on."""
    u = np.clip(u, 0.0, 1.0)[:, None]
    v = np.clip(v, 0.0, 1.0)[:, None]
    opening_px = max(opening_px, 1e-3)
    # Distance to the rim in pixels (the corners are narrow, so u counts half).
    rim_px = np.minimum(np.minimum(v, 1 - v) * opening_px, np.minimum(u, 1 - u) * width_px * 0.5)
    depth = smoothstep(rim_px / (0.3 * opening_px + 1.0))
    rim = 0.45 * np.asarray(lip_colour, np.float32)[None]
    cavity = np.array([[30.0, 11.0, 13.0]], np.float32)
    colour = rim + (cavity - rim) * depth

    # Tongue: a low, wide ellipse at the bottom centre, visible when the mouth is well open.
    wide = float(smoothstep((opening_px / width_px - 0.15) / 0.25))
    tongue_shape = 1.0 - ((u - 0.5) / 0.32) ** 2 - ((v - 1.0) / 0.55) ** 2
    tongue = smoothstep(tongue_shape / 0.3) * 0.85 * wide
    tongue_colour = np.array([[140.0, 58.0, 64.0]], np.float32) * (0.55 + 0.45 * np.clip(v, 0.4, 1.0))
    colour = colour + (tongue_colour - colour) * tongue

    # Upper teeth: a band just under the upper lip, about a tenth of the mouth width tall, fading at the sides.
    tooth_h = 0.1 * width_px / opening_px
    lateral = smoothstep((0.36 - np.abs(u - 0.5)) / 0.12)
    band = smoothstep((tooth_h - v) / max(0.25 * tooth_h, 1e-3)) * lateral * teeth_strength
    shade = (1.0 - 0.5 * ((u - 0.5) / 0.36) ** 2) * (0.72 + 0.28 * smoothstep(v / max(0.3 * tooth_h, 1e-3)))
    gaps = 1.0 - 0.18 * np.exp(-(((u - 0.46) % 0.08 - 0.04) / 0.006) ** 2) * smoothstep((opening_px - 6) / 6)
    teeth = np.array([[226.0, 218.0, 203.0]], np.float32) * np.clip(shade * gaps, 0.0, 1.0)
    colour = colour + (teeth - colour) * band

    # Lower teeth: a thinner, darker band above the lower lip when wide open.
    lower_h = 0.06 * width_px / opening_px
    lower = (smoothstep((v - (1 - lower_h)) / max(0.3 * lower_h, 1e-3)) * smoothstep((0.2 - np.abs(u - 0.5)) / 0.1)
             * wide * teeth_strength)
    colour = colour + (teeth * 0.75 - colour) * (lower * 0.8)

    # The portrait's own colourfulness: a black-and-white photo gets a grey mouth.
    saturation = float(np.clip(_chroma(lip_colour) / 60.0, 0.0, 1.0))
    grey = colour.mean(axis=1, keepdims=True)
    colour = grey + saturation * (colour - grey)
    alpha = smoothstep(rim_px[:, 0] / 1.2)
    return colour.astype(np.float32), alpha.astype(np.float32)


def _chroma(rgb: np.ndarray) -> float:
    rgb = np.asarray(rgb, np.float64)
    return float(rgb.max() - rgb.min())
