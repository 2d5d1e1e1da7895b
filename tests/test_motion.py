import numpy as np
import pytest

from ophav_core.errors import UsageError
from ophav_core.stages.motion import (default_script, euler_to_matrix, matrix_to_euler, motion_from_script,
                               relative_motion_from_tracking)
from ophav_core.testing.synthetic import synthetic_tracking


def test_default_script_covers_the_required_ranges():
    m = motion_from_script(default_script(), fps=10, duration=12)
    assert len(m) == 120
    assert m.yaw.max() >= 50 and m.yaw.min() <= -50
    assert m.pitch.max() >= 20 and m.pitch.min() <= -20
    assert m.roll.max() >= 10 and m.roll.min() <= -10
    for name in ("smile", "mouth_open", "blink", "brows_up"):
        assert m.expressions[name].max() > 0.5, name
    # Smooth: the fastest turn (35 to -35 degrees in 0.8 s) moves less than 15 degrees a frame at 10 fps.
    assert np.abs(np.diff(m.yaw)).max() < 15


def test_interpolation_never_overshoots_keyframes():
    script = {"keyframes": [{"t": 0, "yaw": 0}, {"t": 1, "yaw": 30}, {"t": 2, "yaw": 30}, {"t": 3, "yaw": -30}]}
    m = motion_from_script(script, fps=50)
    assert m.yaw.max() <= 30 + 1e-4 and m.yaw.min() >= -30 - 1e-4


def test_script_errors_are_usage_errors():
    with pytest.raises(UsageError, match="unknown keys"):
        motion_from_script({"keyframes": [{"t": 0, "grin": 1}]})
    with pytest.raises(UsageError, match="increase"):
        motion_from_script({"keyframes": [{"t": 1}, {"t": 0}]})
    with pytest.raises(UsageError, match="out of range"):
        motion_from_script({"keyframes": [{"t": 0, "yaw": 200}]})


def test_euler_roundtrip_and_sign_conventions():
    rng = np.random.default_rng(0)
    yaw, pitch, roll = rng.uniform(-60, 60, 20), rng.uniform(-40, 40, 20), rng.uniform(-30, 30, 20)
    R = euler_to_matrix(yaw, pitch, roll)
    y, p, r = matrix_to_euler(R)
    assert np.allclose(y, yaw, atol=1e-3) and np.allclose(p, pitch, atol=1e-3) and np.allclose(r, roll, atol=1e-3)
    forward = np.array([0, 0, -1.0])  # the face looks at the camera
    assert (euler_to_matrix([30], [0], [0])[0] @ forward)[0] > 0  # positive yaw turns towards image right
    assert (euler_to_matrix([0], [30], [0])[0] @ forward)[1] < 0  # positive pitch looks up (y is down)


def test_relative_motion_starts_at_rest():
    t = synthetic_tracking(6, 32)
    m = relative_motion_from_tracking(t, fps=25)
    assert abs(m.yaw[0]) < 1e-3 and np.abs(m.offsets[0]).max() < 1e-6
    assert np.abs(m.offsets[1:]).max() > 0
