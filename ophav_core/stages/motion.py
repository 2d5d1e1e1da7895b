"""Driving signals: what makes the coarse video (and a rendered avatar) move.

A :class:`Motion` is a per-frame head pose relative to the subject's own rest pose (yaw/pitch/roll in degrees)
plus per-frame expression: named intensities (``smile``, ``mouth_open``, ``blink``, ``brows_up``) from a motion
script, and/or dense vertex offsets in canonical head space from a tracked driving video (relative to the
driver's first frame, as FOMM's relative mode). Pure numpy and YAML: no model is needed to read or write one.

A motion script is YAML or JSON::

    fps: 25            # optional; the run profile decides otherwise
    duration: 12       # seconds; keyframes are stretched to fit when given
    keyframes:
      - {t: 0,   yaw: 0, pitch: 0, roll: 0}
      - {t: 1.5, yaw: 35, smile: 0.8}
      - {t: 3,   yaw: -35, mouth_open: 0.6, blink: 1}

Keys not given at a keyframe keep their value from the previous keyframe (0 at the start). Values are
interpolated with a smooth (C1, monotone) curve, so no overshoot beyond the keyframes.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ophav_core.errors import UsageError
from ophav_core.stages.data import FrameSet, Tracking

POSE_KEYS = ("yaw", "pitch", "roll")
EXPRESSIONS = ("smile", "mouth_open", "blink", "brows_up")
_LIMITS = {"yaw": 90.0, "pitch": 60.0, "roll": 45.0}


@dataclass
class Motion:
    """yaw, pitch, roll: float32 (N,) degrees (yaw > 0 turns the face towards the subject's left, i.e. image
    right; pitch > 0 looks up; roll > 0 tilts the head clockwise in the image).
    expressions: name -> float32 (N,) intensities in [0, 1] (names from :data:`EXPRESSIONS`).
    offsets: float32 (N, V, 3) optional dense expression offsets in canonical head space, relative to a
        neutral face, in units of face width (so they transfer between people); ``topology`` names the mesh.
    video: the driving video itself, for image2video networks that take frames (FOMM).
    """

    fps: float
    yaw: np.ndarray
    pitch: np.ndarray
    roll: np.ndarray
    expressions: dict[str, np.ndarray] = field(default_factory=dict)
    offsets: np.ndarray | None = None
    topology: str = ""
    video: FrameSet | None = None

    def __post_init__(self) -> None:
        n = len(self.yaw)
        for key in POSE_KEYS:
            value = np.asarray(getattr(self, key), np.float32).reshape(-1)
            if len(value) != n or not np.isfinite(value).all():
                raise UsageError(f"motion: {key} must have {n} finite values")
            setattr(self, key, value)
        for name, value in list(self.expressions.items()):
            if name not in EXPRESSIONS:
                raise UsageError(f"motion: unknown expression {name!r}; known: {', '.join(EXPRESSIONS)}")
            value = np.asarray(value, np.float32).reshape(-1)
            if len(value) != n:
                raise UsageError(f"motion: expression {name!r} has {len(value)} values for {n} frames")
            self.expressions[name] = np.clip(value, 0.0, 1.0)
        if self.offsets is not None and self.offsets.shape[0] != n:
            raise UsageError(f"motion: offsets have {self.offsets.shape[0]} frames for {n}")
        if n == 0:
            raise UsageError("motion: no frames")

    def __len__(self) -> int:
        return len(self.yaw)

    def rotations(self) -> np.ndarray:
        """(N, 3, 3) head rotations in the camera frame (x right, y down, z forward) for the relative pose."""
        return euler_to_matrix(self.yaw, self.pitch, self.roll)

    def driving_arrays(self) -> dict[str, np.ndarray]:
        out = {k: getattr(self, k) for k in POSE_KEYS}
        out.update({f"expr_{k}": v for k, v in self.expressions.items()})
        return out

    def resampled(self, num_frames: int) -> "Motion":
        """The same motion with ``num_frames`` frames (linear resampling in time)."""
        src = np.linspace(0.0, 1.0, len(self))
        dst = np.linspace(0.0, 1.0, num_frames)
        lerp = lambda a: np.interp(dst, src, a).astype(np.float32)  # noqa: E731
        offsets = None
        if self.offsets is not None:
            idx = np.clip(np.rint(dst * (len(self) - 1)).astype(int), 0, len(self) - 1)
            offsets = self.offsets[idx]
        return Motion(self.fps * num_frames / len(self), lerp(self.yaw), lerp(self.pitch), lerp(self.roll),
                      {k: lerp(v) for k, v in self.expressions.items()}, offsets, self.topology, None)


def euler_to_matrix(yaw_deg: np.ndarray, pitch_deg: np.ndarray, roll_deg: np.ndarray) -> np.ndarray:
    """Rotation matrices (N, 3, 3), R = R_roll(z) @ R_yaw(y) @ R_pitch(x), camera axes x right, y down, z forward.

    Positive yaw turns the face towards image right; positive pitch raises the chin (looks up); positive roll
    rotates clockwise in the image."""
    y, p, r = (np.deg2rad(np.asarray(a, np.float64)).reshape(-1) for a in (yaw_deg, pitch_deg, roll_deg))
    n = len(y)
    cy, sy, cp, sp, cr, sr = np.cos(y), np.sin(y), np.cos(p), np.sin(p), np.cos(r), np.sin(r)
    zeros, ones = np.zeros(n), np.ones(n)
    # The face looks along -z (towards the camera); turning it to image right (+x) is a rotation about +y by -yaw.
    Ry = np.stack([np.stack([cy, zeros, -sy], -1), np.stack([zeros, ones, zeros], -1), np.stack([sy, zeros, cy], -1)], 1)
    # Chin up: the face's forward (-z) tilts towards -y (up in the image).
    Rx = np.stack([np.stack([ones, zeros, zeros], -1), np.stack([zeros, cp, sp], -1), np.stack([zeros, -sp, cp], -1)], 1)
    Rz = np.stack([np.stack([cr, -sr, zeros], -1), np.stack([sr, cr, zeros], -1), np.stack([zeros, zeros, ones], -1)], 1)
    return (Rz @ Ry @ Rx).astype(np.float32)


def matrix_to_euler(R: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Inverse of :func:`euler_to_matrix`: (yaw, pitch, roll) in degrees for rotations (N, 3, 3)."""
    R = np.asarray(R, np.float64).reshape(-1, 3, 3)
    # R = Rz Ry Rx; R[2,0] = sy, R[2,1] = cy*sp... derived from the explicit product.
    yaw = np.arcsin(np.clip(R[:, 2, 0], -1.0, 1.0))
    pitch = np.arctan2(-R[:, 2, 1], R[:, 2, 2])
    roll = np.arctan2(R[:, 1, 0], R[:, 0, 0])
    return np.rad2deg(yaw), np.rad2deg(pitch), np.rad2deg(roll)


def rotation_angle(R: np.ndarray) -> np.ndarray:
    """The angle in degrees of each rotation (..., 3, 3) about its own axis."""
    cosine = (np.trace(np.asarray(R, np.float64), axis1=-2, axis2=-1) - 1.0) / 2.0
    return np.degrees(np.arccos(np.clip(cosine, -1.0, 1.0)))


# ---------------------------------------------------------------------------------------------- scripts


def _smooth_curve(times: np.ndarray, values: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Monotone cubic Hermite (Fritsch-Carlson) interpolation: smooth and never overshoots the keyframes."""
    if len(times) == 1:
        return np.full_like(t, values[0], dtype=np.float64)
    h = np.diff(times)
    delta = np.diff(values) / h
    m = np.zeros_like(values, dtype=np.float64)
    m[1:-1] = np.where(delta[:-1] * delta[1:] > 0, (delta[:-1] + delta[1:]) / 2, 0.0)
    for k in range(len(delta)):
        if delta[k] == 0:
            m[k] = m[k + 1] = 0.0
        else:
            a, b = m[k] / delta[k], m[k + 1] / delta[k]
            s = a * a + b * b
            if s > 9:
                tau = 3 / np.sqrt(s)
                m[k], m[k + 1] = tau * a * delta[k], tau * b * delta[k]
    t = np.clip(t, times[0], times[-1])
    k = np.clip(np.searchsorted(times, t, side="right") - 1, 0, len(h) - 1)
    s = (t - times[k]) / h[k]
    h00, h10, h01, h11 = 2 * s**3 - 3 * s**2 + 1, s**3 - 2 * s**2 + s, -2 * s**3 + 3 * s**2, s**3 - s**2
    return h00 * values[k] + h10 * h[k] * m[k] + h01 * values[k + 1] + h11 * h[k] * m[k + 1]


def motion_from_script(script: dict[str, Any], fps: float | None = None, duration: float | None = None,
                       source: str = "motion script") -> Motion:
    """Build a :class:`Motion` from a parsed script; ``fps``/``duration`` override the script's."""
    if not isinstance(script, dict) or not isinstance(script.get("keyframes"), list) or not script["keyframes"]:
        raise UsageError(f"{source}: expected a mapping with a non-empty 'keyframes' list")
    fps = float(fps or script.get("fps", 25))
    keys = list(POSE_KEYS) + list(EXPRESSIONS)
    times, rows, current = [], [], {k: 0.0 for k in keys}
    for i, frame in enumerate(script["keyframes"]):
        if not isinstance(frame, dict) or "t" not in frame:
            raise UsageError(f"{source}: keyframe {i} needs a time 't'")
        unknown = set(frame) - set(keys) - {"t"}
        if unknown:
            raise UsageError(f"{source}: keyframe {i} has unknown keys {sorted(unknown)}; known: t, {', '.join(keys)}")
        for k in keys:
            if k in frame:
                value = float(frame[k])
                limit = _LIMITS.get(k, 1.0)
                if not -limit <= value <= limit or (k in EXPRESSIONS and value < 0):
                    raise UsageError(f"{source}: keyframe {i}: {k}={value} is out of range")
                current[k] = value
        times.append(float(frame["t"]))
        rows.append([current[k] for k in keys])
    times_arr = np.asarray(times)
    if (np.diff(times_arr) <= 0).any():
        raise UsageError(f"{source}: keyframe times must increase")
    span = times_arr[-1] - times_arr[0]
    duration = float(duration or script.get("duration") or span or 1.0)
    if span > 0:
        times_arr = (times_arr - times_arr[0]) * (duration / span)
    n = max(1, int(round(duration * fps)))
    t = np.arange(n) / fps
    values = np.asarray(rows)
    curves = {k: _smooth_curve(times_arr, values[:, j], t).astype(np.float32) for j, k in enumerate(keys)}
    return Motion(fps, curves["yaw"], curves["pitch"], curves["roll"], {k: curves[k] for k in EXPRESSIONS})


def load_motion_script(path: str | Path, fps: float | None = None, duration: float | None = None) -> Motion:
    import yaml

    path = Path(path)
    try:
        script = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise UsageError(f"cannot read motion script {path}: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise UsageError(f"motion script {path} is not valid YAML/JSON: {exc}") from exc
    return motion_from_script(script, fps, duration, source=str(path))


def default_script() -> dict[str, Any]:
    """The built-in driving script: a head tour (yaw +-52, pitch +-20, roll +-10) with talking, smiles,
    blinks and raised brows, one 12-second cycle that is stretched to the run's duration.

    The coarse video is all the avatar sees, and the novel views it is asked for go to +-60 degrees: with the
    turn at +-40 (before 2026-12) a preview avatar's views past 45 degrees were fragments; at +-52 its identity
    distance within +-45 degrees fell on each of three portraits (benchmarks/RESULTS.md, "wider coarse turn")."""
    k = [
        {"t": 0.0, "yaw": 0, "pitch": 0, "roll": 0},
        {"t": 0.6, "blink": 1.0},
        {"t": 0.9, "blink": 0.0},
        {"t": 1.6, "yaw": 52, "smile": 0.9},
        {"t": 2.4, "yaw": 20, "mouth_open": 0.6, "smile": 0.3},
        {"t": 2.8, "mouth_open": 0.1},
        {"t": 3.2, "yaw": 0, "mouth_open": 0.7, "smile": 0.0},
        {"t": 3.6, "mouth_open": 0.0, "blink": 1.0},
        {"t": 3.9, "blink": 0.0},
        {"t": 4.8, "yaw": -52, "smile": 1.0},
        {"t": 5.6, "yaw": -20, "pitch": 20, "smile": 0.2, "brows_up": 1.0},
        {"t": 6.4, "yaw": 0, "pitch": -20, "brows_up": 0.0, "mouth_open": 0.5},
        {"t": 6.8, "mouth_open": 0.0},
        {"t": 7.2, "mouth_open": 0.8, "roll": 10},
        {"t": 7.6, "mouth_open": 0.1, "blink": 1.0},
        {"t": 7.9, "blink": 0.0},
        {"t": 8.6, "pitch": 0, "roll": -10, "yaw": 35, "smile": 0.7, "mouth_open": 0.0},
        {"t": 9.4, "yaw": -35, "pitch": 10, "roll": 0, "mouth_open": 0.6, "smile": 0.0},
        {"t": 9.8, "mouth_open": 0.0},
        {"t": 10.4, "yaw": 0, "pitch": 0, "brows_up": 0.8, "smile": 0.5},
        {"t": 11.2, "brows_up": 0.0, "smile": 0.0, "blink": 1.0},
        {"t": 11.5, "blink": 0.0},
        {"t": 12.0, "yaw": 0, "pitch": 0, "roll": 0},
    ]
    return {"fps": 25, "duration": 12, "keyframes": k}


def turntable(num_frames: int, fps: float = 25.0, max_yaw: float = 45.0) -> Motion:
    """Yaw from -max to +max and back, neutral expression: a novel-view sweep."""
    phase = np.linspace(0, 2 * np.pi, num_frames, endpoint=False)
    yaw = -max_yaw * np.cos(phase)
    zeros = np.zeros(num_frames, np.float32)
    return Motion(fps, yaw.astype(np.float32), zeros, zeros, {})


def expression_sweep(num_frames: int, fps: float = 25.0) -> Motion:
    """Frontal head going through each named expression in turn (up and down)."""
    per = max(2, num_frames // len(EXPRESSIONS))
    zeros = np.zeros(num_frames, np.float32)
    expr = {}
    for i, name in enumerate(EXPRESSIONS):
        curve = zeros.copy()
        seg = np.sin(np.linspace(0, np.pi, per)).astype(np.float32)
        end = min(num_frames, (i + 1) * per)
        curve[i * per:end] = seg[: end - i * per]
        expr[name] = curve
    return Motion(fps, zeros, zeros, zeros, expr)


def relative_motion_from_tracking(tracking: Tracking, fps: float, video: FrameSet | None = None) -> Motion:
    """Head motion and expression of a tracked driving video relative to its first frame.

    Pose: R_i @ R_0^T expressed as yaw/pitch/roll. Expression: canonical-space vertex offsets of each frame's
    expression relative to frame 0, divided by the driver's face width so they transfer to another face."""
    rel = tracking.rotation @ np.transpose(tracking.rotation[:1], (0, 2, 1))
    yaw, pitch, roll = matrix_to_euler(rel)
    local = np.einsum("ne,evc->nvc", tracking.expression, tracking.expression_basis)
    offsets = local - local[:1]
    width = float(np.ptp(tracking.canonical_vertices[:, 0])) or 1.0
    return Motion(fps, yaw, pitch, roll, {}, (offsets / width).astype(np.float32), tracking.mesh_type, video)
