"""Running MediaPipe's face mesh (the model inside the ``mediapipe==0.10.21`` wheel) over frames."""
from __future__ import annotations

import importlib
import os
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np

from ophav_mediapipe.mesh import NUM_VERTICES


@dataclass
class Detections:
    """What the face mesh saw.

    landmarks: float64 (N, 468, 3): u, v in pixels of the original frame, and depth in pixels (MediaPipe's
        relative z times the image width; larger = further from the camera, same axis as ophav's z).
    valid: bool (N,) a face was found.
    crowded: indices of frames where more than one face was found (the largest one is kept).
    seconds: time spent inside MediaPipe.
    """

    landmarks: np.ndarray
    valid: np.ndarray
    crowded: list[int] = field(default_factory=list)
    seconds: float = 0.0


# MediaPipe is imported and its graphs started from two threads at once in ``ophav preprocess`` (the segmenter's
# mattes beside the tracker): mediapipe's __init__ breaks when two threads import it together, and two threads
# swapping file descriptor 2 could leave it pointing at /dev/null. One lock serialises the imports; the stderr
# redirection is counted, so it is made by the first thread in and undone by the last one out.
_IMPORT_LOCK = threading.Lock()
_STDERR_LOCK = threading.Lock()
_stderr_state = {"depth": 0, "saved": -1}


def mediapipe_solution(name: str):
    """``mediapipe.python.solutions.<name>``, imported under a lock (safe from several threads)."""
    _quiet_mediapipe_logs()
    with _IMPORT_LOCK:
        return importlib.import_module(f"mediapipe.python.solutions.{name}")


@contextmanager
def native_stderr_silenced():
    """Send file descriptor 2 to /dev/null: MediaPipe's C++ graph logs a screenful of absl lines at start-up
    that no environment variable turns off. Python-level warnings are issued outside this block. Safe to nest
    and to enter from several threads."""
    import sys

    with _STDERR_LOCK:
        if _stderr_state["depth"] == 0:
            sys.stderr.flush()
            _stderr_state["saved"] = os.dup(2)
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 2)
            os.close(devnull)
        _stderr_state["depth"] += 1
    try:
        yield
    finally:
        with _STDERR_LOCK:
            _stderr_state["depth"] -= 1
            if _stderr_state["depth"] == 0:
                os.dup2(_stderr_state["saved"], 2)
                os.close(_stderr_state["saved"])


def _quiet_mediapipe_logs() -> None:
    # MediaPipe's C++ side logs through absl/glog to stderr; these keep the console readable.
    os.environ.setdefault("GLOG_minloglevel", "2")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def make_face_mesh(single_image: bool, min_detection_confidence: float = 0.5, max_faces: int = 2):
    """A MediaPipe FaceMesh: static mode for one photo, tracking mode for a video. Two faces at most, so a
    second person is noticed (and reported) rather than silently swapped in."""
    FaceMesh = mediapipe_solution("face_mesh").FaceMesh
    return FaceMesh(static_image_mode=single_image, max_num_faces=max_faces, refine_landmarks=False,
                    min_detection_confidence=min_detection_confidence, min_tracking_confidence=0.5)


def _upscale_for_detection(frame: np.ndarray, min_size: int) -> np.ndarray:
    """MediaPipe's face detector works on 128x128 inputs but misses faces in small frames; landmarks are
    normalised, so upscaling changes nothing else."""
    h, w = frame.shape[:2]
    if max(h, w) >= min_size:
        return frame
    import cv2

    scale = min_size / max(h, w)
    return cv2.resize(frame, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_CUBIC)


def _to_pixels(face, width: int, height: int) -> np.ndarray:
    pts = np.array([(p.x, p.y, p.z) for p in face.landmark[:NUM_VERTICES]], np.float64)
    # Normalised coordinates span the image edges; ophav puts pixel centres at integers.
    return pts * np.array([width, height, width], np.float64) - np.array([0.5, 0.5, 0.0])


def _largest(faces: list[np.ndarray]) -> np.ndarray:
    area = [np.ptp(f[:, 0]) * np.ptp(f[:, 1]) for f in faces]
    return faces[int(np.argmax(area))]


def _settle(face_mesh, image: np.ndarray, result, width: int, height: int, tolerance_px: float = 0.3, tries: int = 4):
    """A face just (re)detected: its landmarks come from the detector's box and differ visibly from the tracked
    ones that follow (on a still head, a jump of ~1 degree and ~2% in scale, converging over 2-3 frames).
    Processing the same frame again starts from the tracked region; repeat until the landmarks settle."""
    previous = _to_pixels(result.multi_face_landmarks[0], width, height)
    for _ in range(tries):
        again = face_mesh.process(image)
        if not again.multi_face_landmarks:
            return result
        current = _to_pixels(again.multi_face_landmarks[0], width, height)
        result = again
        if np.abs(current[:, :2] - previous[:, :2]).mean() < tolerance_px:
            break
        previous = current
    return result


def _window_origins(length: int, side: int, stride: int) -> list[int]:
    """Window starts covering ``length`` pixels, the last one flush with the end."""
    starts = list(range(0, max(length - side, 0) + 1, stride))
    if starts[-1] + side < length:
        starts.append(length - side)
    return starts


def _distinct(faces: list[np.ndarray]) -> list[np.ndarray]:
    """One face per person: overlapping windows see the same face; keep the largest view of each."""
    kept: list[np.ndarray] = []
    for face in sorted(faces, key=lambda f: -np.ptp(f[:, 0]) * np.ptp(f[:, 1])):
        centre, width = face[:, :2].mean(axis=0), np.ptp(face[:, 0])
        if all(np.linalg.norm(centre - k[:, :2].mean(axis=0)) > 0.5 * max(width, np.ptp(k[:, 0])) for k in kept):
            kept.append(face)
    return kept


def search_small_faces(face_mesh, frame: np.ndarray, min_detection_size: int, smallest_window: int = 128
                       ) -> list[np.ndarray]:
    """Faces too small for the detector in the whole frame (a face of 40 pixels in a 1600x1200 photo is 3
    pixels at the detector's 128x128 input): windows of half the frame's shorter side, then a quarter, ...,
    down to ``smallest_window`` pixels, overlapping by half, each upscaled for detection. Stops at the first
    window size that finds a face. Landmarks are in frame pixels; one (V, 3) array per distinct face."""
    height, width = frame.shape[:2]
    side = min(height, width) // 2
    while side >= smallest_window:
        found = []
        stride = side // 2
        for y0 in _window_origins(height, side, stride):
            for x0 in _window_origins(width, side, stride):
                window = np.ascontiguousarray(_upscale_for_detection(frame[y0:y0 + side, x0:x0 + side],
                                                                     min_detection_size))
                for face in face_mesh.process(window).multi_face_landmarks or []:
                    found.append(_to_pixels(face, side, side) + np.array([x0, y0, 0.0]))
        if found:
            return _distinct(found)
        side //= 2
    return []


def detect_landmarks(frames: np.ndarray, single_image: bool = False, min_detection_confidence: float = 0.5,
                     min_detection_size: int = 256, face_mesh=None) -> Detections:
    """Face-mesh landmarks of every frame (N, H, W, 3) uint8 RGB; frames without a face are marked invalid."""
    import time

    n, height, width = frames.shape[:3]
    landmarks = np.zeros((n, NUM_VERTICES, 3), np.float64)
    valid = np.zeros(n, bool)
    crowded: list[int] = []
    own = face_mesh is None
    spent = 0.0
    with native_stderr_silenced():
        face_mesh = face_mesh or make_face_mesh(single_image, min_detection_confidence)
        if n:  # the graph logs on its first frame too
            first = np.ascontiguousarray(_upscale_for_detection(frames[0], min_detection_size))
            face_mesh.process(first)
    try:
        for i in range(n):
            image = np.ascontiguousarray(_upscale_for_detection(frames[i], min_detection_size))
            start = time.perf_counter()
            result = face_mesh.process(image)
            if not single_image and result.multi_face_landmarks and (i == 0 or not valid[i - 1]):
                result = _settle(face_mesh, image, result, width, height)
            points = [_to_pixels(f, width, height) for f in result.multi_face_landmarks or []]
            if not points and single_image:
                with native_stderr_silenced():  # the graph logs when it first sees a window of a new size
                    points = search_small_faces(face_mesh, frames[i], min_detection_size)
            spent += time.perf_counter() - start
            if not points:
                continue
            if len(points) > 1:
                crowded.append(i)
            landmarks[i] = _largest(points)
            valid[i] = True
    finally:
        if own:
            face_mesh.close()
    return Detections(landmarks, valid, crowded, spent)
