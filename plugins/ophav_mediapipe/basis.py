"""The expression basis of a ``mediapipe`` tracking.

Layout (E rows of (468, 3) head-space offsets per unit coefficient):

* rows 0-3: the named expressions ``smile``, ``mouth_open``, ``blink``, ``brows_up`` at intensity 1, scaled
  to the person's face width, so coefficient k of a tracking reads as that expression's intensity and a
  scripted expression always has a direction to drive;
* then, for a tracked video: principal components of its head-space residuals with the named directions
  projected out, scaled to unit variance over the video (a person- and video-specific fit of what the face
  really did);
* then, when there are fewer frames than rows to fill (a portrait): generic, person-independent modes (the
  smoothest Dirichlet modes of the mesh around the mouth, then around each eye and brow, then over the whole
  face inside its outline), one per axis, orthonormalised and scaled so the most mobile vertex moves 3% of the
  face width per unit coefficient.

Trackings made with ``reference=`` keep the reference's basis unchanged.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np

from ophav_mediapipe import fit
from ophav_mediapipe.blendshapes import NAMES, named_offsets
from ophav_mediapipe.mesh import SEMANTIC, face_width, load_canonical_mesh

# Generic modes: (region centre groups, radius in cm, scalar modes) in priority order.
# Chosen on the shared driving videos: tracked talking/nodding offsets are captured at 92% / 84% of their energy
# by a portrait's basis (named + these), against 79% / 61% for whole-face harmonics alone.
_REGIONS = (
    (("lips_outer",), 6.5, 4),  # mouth, lips, chin and lower cheeks
    (("left_eye_contour", "left_brow"), 3.5, 1),
    (("right_eye_contour", "right_brow"), 3.5, 1),
    (None, 0.0, 80),  # then the whole face inside its (fixed) outline, smoothest first
)
_GENERIC_PEAK = 0.03  # face widths moved by the most mobile vertex at coefficient 1


@lru_cache(maxsize=1)
def generic_modes() -> np.ndarray:
    """Person-independent displacement fields (K, 468 * 3) on the canonical mesh, in priority order."""
    vertices, faces, _ = load_canonical_mesh()
    L = fit.graph_laplacian(faces, len(vertices))
    fields = []
    for groups, radius, count in _REGIONS:
        if groups is None:
            region = np.ones(len(vertices), bool)
            region[SEMANTIC["face_oval"]] = False
        else:
            centre_idx = np.concatenate([SEMANTIC[g] for g in groups])
            region = np.linalg.norm(vertices[:, None] - vertices[centre_idx][None], axis=-1).min(1) < radius
        for scalar in fit.region_modes(L, region, count):
            for axis in range(3):
                field = np.zeros_like(vertices, dtype=np.float64)
                field[:, axis] = scalar
                fields.append(field.reshape(-1))
    return np.asarray(fields)


def named_rows(canonical: np.ndarray) -> np.ndarray:
    """The named expressions (4, V * 3) scaled from the canonical mesh to this face's width."""
    scale = face_width(canonical) / face_width(load_canonical_mesh()[0])
    return np.stack([named_offsets()[k] for k in NAMES]).reshape(len(NAMES), -1).astype(np.float64) * scale


def build_basis(canonical: np.ndarray, residuals: np.ndarray, count: int) -> np.ndarray:
    """Expression basis (count, V, 3) float32 for a person with neutral mesh ``canonical`` (V, 3), learning
    from head-space ``residuals`` (N, V, 3) (frames minus neutral); see the module docstring."""
    width = face_width(canonical)
    named = named_rows(canonical)
    rows = [named]
    pca = fit.pca_components(residuals.reshape(len(residuals), -1), count - len(named), named)
    if len(pca):
        # Directions whose spread is below MediaPipe's noise (0.1% of the face width) carry nothing.
        peak = np.linalg.norm(pca.reshape(len(pca), -1, 3), axis=-1).max(axis=1)
        pca = pca[peak > 1e-3 * width]
    rows.append(pca)
    missing = count - len(named) - len(pca)
    if missing > 0:
        rows.append(_generic_rows(np.concatenate(rows), missing, width))
    basis = np.concatenate(rows)[:count]
    return basis.reshape(count, -1, 3).astype(np.float32)


def _generic_rows(existing: np.ndarray, count: int, width: float) -> np.ndarray:
    candidates = fit.orthogonal_complement(generic_modes(), existing)
    chosen: list[np.ndarray] = []
    for field in candidates:  # Gram-Schmidt in priority order, skipping what is already spanned
        for other in chosen:
            field = field - (field @ other) * other
        norm = np.linalg.norm(field)
        if norm > 1e-6:
            chosen.append(field / norm)
        if len(chosen) == count:
            break
    if len(chosen) < count:
        raise RuntimeError(f"the generic expression modes span only {len(chosen)} of the {count} needed rows; "
                           f"use fewer num_expressions")
    rows = np.asarray(chosen)
    peak = np.linalg.norm(rows.reshape(len(rows), -1, 3), axis=-1).max(axis=1)
    return rows * (_GENERIC_PEAK * width / peak)[:, None]


def project_onto_basis(offsets: np.ndarray, basis: np.ndarray) -> np.ndarray:
    """Least-squares coefficients (N, E) of head-space offsets (N, V, 3) in ``basis`` (E, V, 3)."""
    B = basis.reshape(len(basis), -1).astype(np.float64)
    coeffs, *_ = np.linalg.lstsq(B.T, offsets.reshape(len(offsets), -1).T.astype(np.float64), rcond=None)
    return coeffs.T
