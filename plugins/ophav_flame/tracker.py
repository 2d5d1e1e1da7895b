"""Tracker ``flame``: FLAME (5023 vertices, full head: scalp, ears, neck) fitted to MediaPipe's face-mesh
landmarks, for users who have the FLAME model (``ophav weights add flame-2020 generic_model.pkl``).

Per call:

1. The run's MediaPipe landmarks: the registry's ``mediapipe`` tracker (through the plugin contract: its
   ``Tracking`` gives the 468 landmarks in pixels, which frames have a face, an initial head pose, and, in its
   topology, MediaPipe's canonical mesh) with this tracker's camera.
2. The landmark embedding (:mod:`ophav_flame.embedding`): derived from the user's model by aligning MediaPipe's
   canonical mesh to FLAME's template, cached beside the model; or a MICA embedding file.
3. The batched fit (:mod:`ophav_flame.fitting`): shared shape, per-frame expression, jaw, neck, rotation and
   translation, Levenberg-Marquardt over all frames at once, temporal smoothness for videos; frames without a
   face are carried by the smoothness (``valid`` False). Videos longer than 256 frames: the shape from 128
   frames spread over the video, then chunks of 256 frames with it fixed.
4. The contract: ``canonical_vertices`` is the person's neutral FLAME head (ophav head space, cm: FLAME's
   origin, x = subject's left, y down, z into the screen); ``expression`` is the ``num_expressions`` FLAME
   expression coefficients followed by ``pose_components`` coefficients that carry the jaw and neck rotation
   (their basis: the principal components of the exact FLAME meshes minus the linear expression part, per
   video); ``vertices`` = R (canonical + basis . expression) + t (the contract exactly; its distance to the
   exact FLAME meshes is in ``last_fit``). With ``reference=``, the fitted FLAME parameters are re-posed on the
   reference's identity (its shape recovered from its canonical mesh) and projected onto its basis.
5. The topology ``flame``: FLAME's triangles, MediaPipe's named groups carried to the nearest FLAME vertex of each
   embedded landmark (``left_eye``... ``face_oval``, ``jaw``, ``lips_inner``...), ``left_eyeball`` and
   ``right_eyeball``, the left/right mirror map (mutual nearest mirrored vertices of the template) and the
   template. FLAME's UVs are a separate file and are not used.
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np

from ophav_core.errors import InvalidData
from ophav_core.stages import FrameSet, MeshTopology, Tracker, Tracking
from ophav_core.stages.motion import Motion
from ophav_flame.options import FlameTrackerOptions

MESH_TYPE = "flame"
_ITERATIONS = {"tiny": 4, "preview": 6}
# Longer videos are fitted in chunks of this many frames (memory: the Jacobians are ~0.5 MB a frame), the shape
# first from at most _SHAPE_FRAMES frames spread over the video, then held fixed.
_CHUNK = 256
_SHAPE_FRAMES = 128


class FlameTracker(Tracker):
    Options = FlameTrackerOptions
    options: FlameTrackerOptions

    def __init__(self, options=None, context=None):
        super().__init__(options, context)
        self._model = None
        self._model_path: Path | None = None
        self._layer = None
        self._embedding = None
        self._mp_topology: MeshTopology | None = None
        self._mediapipe = None
        self.last_fit: dict = {}

    # ------------------------------------------------------------------------------------------ resources

    def model_path(self) -> Path:
        from ophav_core.weights import require
        from ophav_flame.weights import choose

        if self.options.model_path:
            return require(choose(self.options.model if self.options.model != "auto" else "flame-2020"),
                           self.options.model_path)
        return require(choose(self.options.model))

    def model(self):
        if self._model is None:
            from ophav_flame.model import load_model

            self._model_path = self.model_path()
            self._model = load_model(self._model_path)
        return self._model

    def layer(self):
        if self._layer is None:
            from ophav_flame.layer import FlameLayer

            self._layer = FlameLayer(self.model(), self.options.num_shape, self.options.num_expressions)
        return self._layer

    def _device(self) -> str:
        device = self.options.device
        if device == "auto":
            device = getattr(self.context, "device", "cpu") or "cpu"
        if device.startswith("cuda"):
            import torch

            if not torch.cuda.is_available():
                device = "cpu"
        return device

    def _landmark_tracker(self):
        if self._mediapipe is None:
            from ophav_core.plugins import get_host

            spec = get_host().registry.get("tracker", "mediapipe")
            self._mediapipe = spec.create({"focal_scale": self.options.focal_scale,
                                           "focal_length": self.options.focal_length}, self.context)
        return self._mediapipe

    def embedding(self, canonical_cm: np.ndarray):
        if self._embedding is None:
            from ophav_flame import embedding as emb

            model = self.model()
            if self.options.embedding:
                self._embedding = emb.load_mica(self.options.embedding, model)
            else:
                self._embedding = emb.cached(model, self._model_path, canonical_cm)
        return self._embedding

    # ------------------------------------------------------------------------------------------ public

    def track(self, frames: FrameSet, *, single_image: bool = False, reference: Tracking | None = None,
              source: str = "") -> Tracking:
        from ophav_flame import fitting
        from ophav_flame.model import to_head

        start = time.perf_counter()
        if reference is not None and reference.mesh_type != MESH_TYPE:
            raise InvalidData(f"reference tracking has mesh type {reference.mesh_type!r}; the flame tracker "
                              f"needs {MESH_TYPE!r}")
        o = self.options
        model, layer = self.model(), self.layer()
        mp_tracker = self._landmark_tracker()
        if reference is not None:  # the reference's camera model: its focal length relative to the image size
            focal = float(reference.K[0, 0]) / float(max(reference.image_size)) * max(frames.size)
            mp_tracker.options = mp_tracker.options.model_copy(update={"focal_length": focal})
        mp = mp_tracker.track(frames, single_image=single_image, source=source)
        t_detect = time.perf_counter() - start
        self._mp_topology = mp.topology
        emb = self.embedding(mp.template)
        valid = mp.valid if mp.valid is not None else np.ones(len(frames), bool)
        observed = mp.landmarks[:, emb.landmarks].astype(np.float64)
        K = mp.K.astype(np.float64)
        # Initial pose: MediaPipe's, through the embedding's similarity (H ~ s Q p_mp + b).
        Q, b, s = emb.rotation, emb.translation, emb.scale
        R0 = mp.rotation.astype(np.float64) @ Q.T
        t0 = s * mp.translation.astype(np.float64) - np.einsum("nij,j->ni", R0, b)
        weights = np.ones(len(emb.landmarks))
        oval = set(int(i) for i in mp.semantic.get("face_oval", []))
        weights[[k for k, i in enumerate(emb.landmarks) if int(i) in oval]] = 0.3
        profile = getattr(getattr(self.context, "profile", None), "name", "standard")
        settings = fitting.FitSettings(
            iterations=o.iterations or _ITERATIONS.get(profile, 8), shape_prior=o.shape_prior,
            expression_prior=o.expression_prior, pose_prior=o.pose_prior, smooth=o.smooth, threads=o.threads or 1)
        device = self._device()
        video = not single_image and len(frames) > 2
        result = self._fit(emb, observed, valid, K, R0, t0, settings, weights, video, device)
        t_fit = time.perf_counter() - start - t_detect
        meshes = fitting.full_mesh(layer, result.shape, result.expression, result.jaw, result.neck, device=device)
        E = layer.num_expressions
        expr_rows = to_head(np.moveaxis(model.exprdirs[:, :, :E], 2, 0))           # (E, V, 3) cm per unit
        if reference is None:
            canonical = fitting.full_mesh(layer, result.shape, np.zeros((1, E)), np.zeros((1, 3)), np.zeros((1, 3)),
                                          device=device)[0]
            residual = meshes - canonical[None] - np.einsum("ne,evc->nvc", result.expression, expr_rows)
            pose_basis, pose_coeff = _principal(residual, valid, o.pose_components)
            basis = np.concatenate([expr_rows, pose_basis]).astype(np.float32)
            expression = np.concatenate([result.expression, pose_coeff], 1)
            exact = meshes
        else:
            canonical = reference.canonical_vertices.astype(np.float64)
            basis = reference.expression_basis.astype(np.float32)
            identity = self._identity_of(canonical)
            exact = fitting.full_mesh(layer, identity, result.expression, result.jaw, result.neck, device=device)
            flat = basis.reshape(len(basis), -1).astype(np.float64)
            expression = np.linalg.lstsq(flat.T, (exact - canonical[None]).reshape(len(exact), -1).T, rcond=None)[0].T
        expression = expression.astype(np.float32)
        local = canonical[None].astype(np.float32) + np.einsum("ne,evc->nvc", expression, basis)
        R, t = result.rotation.astype(np.float32), result.translation.astype(np.float32)
        vertices = np.einsum("nij,nvj->nvi", R, local) + t[:, None]
        topology = self.topology(mp.topology)
        tracking = Tracking(K=K, image_size=np.array(frames.size), rotation=R, translation=t, expression=expression,
                            vertices=vertices, canonical_vertices=canonical.astype(np.float32),
                            expression_basis=basis, landmarks=mp.landmarks.astype(np.float32), valid=valid.copy(),
                            **topology.tracking_fields())
        truncation = np.linalg.norm(local - exact, axis=-1)
        self.last_fit = {
            "frames": len(frames), "detect_seconds": t_detect, "fit_seconds": t_fit,
            "total_seconds": time.perf_counter() - start, "device": device,
            "reprojection": result.error, "embedding": emb.summary(),
            "basis_error_mm": float(truncation.max() * 10), "shape": result.shape, "jaw": result.jaw,
            "neck": result.neck, "flame_expression": result.expression,
        }
        return tracking

    def _fit(self, emb, observed, valid, K, R0, t0, settings, weights, video, device):
        """All frames at once, or for a long video: the shape from frames spread over it, then chunks."""
        from ophav_flame import fitting

        layer, n = self.layer(), len(observed)
        fit = lambda idx, s, shape=None, vid=video: fitting.fit(  # noqa: E731
            layer, emb.triangles, emb.bary, observed[idx], valid[idx], K, R0[idx], t0[idx], s,
            landmark_weights=weights, shape=shape, video=vid, device=device)
        if n <= _CHUNK:
            return fit(slice(None), settings)
        spread = np.unique(np.linspace(0, n - 1, min(_SHAPE_FRAMES, n)).round().astype(int))
        shape = fit(spread, settings, vid=False).shape
        fixed = dataclasses.replace(settings, fit_shape=False)
        parts = [fit(slice(a, min(a + _CHUNK, n)), fixed, shape) for a in range(0, n, _CHUNK)]
        cat = lambda name: np.concatenate([getattr(p, name) for p in parts])  # noqa: E731
        return fitting.FitResult(shape, cat("expression"), cat("jaw"), cat("neck"), cat("rotation"), cat("translation"),
                                 cat("error"), sum(p.seconds for p in parts), parts[0].iterations)

    def expressions_for(self, motion: Motion, tracking: Tracking) -> np.ndarray:
        """Coefficients (N, E) in ``tracking``'s basis for a motion's named expressions: MediaPipe's named
        expression offsets (the mediapipe tracker's, scaled to this face) on the embedded landmarks, fitted by
        ridge least squares with the basis sampled at the same points; dense offsets of topology ``flame``
        (face-width units) are projected onto the basis."""
        if tracking.mesh_type != MESH_TYPE:
            raise InvalidData(f"tracking has mesh type {tracking.mesh_type!r}; this tracker makes {MESH_TYPE!r}")
        n, rows = len(motion), len(tracking.expression_basis)
        coefficients = np.zeros((n, rows), np.float64)
        basis = tracking.expression_basis.astype(np.float64)
        canonical = tracking.canonical_vertices.astype(np.float64)
        width = float(np.ptp(canonical[:, 0]))
        named = any(np.any(v != 0) for v in motion.expressions.values())
        if named:
            if self._mp_topology is None or self._embedding is None:
                raise NotImplementedError("the flame tracker turns named expressions into coefficients after it has "
                                          "tracked a frame (it needs MediaPipe's mesh and the landmark embedding)")
            emb, faces = self._embedding, tracking.faces
            sample = lambda a: (a[..., faces[emb.triangles], :] * emb.bary[..., None]).sum(-2)  # noqa: E731
            at_lm = sample(canonical)                                   # (L, 3) head cm
            mp_space = (at_lm - emb.translation) @ emb.rotation / emb.scale
            full = np.zeros((468, 3))
            full[emb.landmarks] = mp_space
            mp_tracking = Tracking(
                K=tracking.K, image_size=tracking.image_size, rotation=np.eye(3)[None], translation=[[0.0, 0.0, 60.0]],
                expression=np.zeros((1, 1)), vertices=(full + [0.0, 0.0, 60.0])[None], canonical_vertices=full,
                expression_basis=np.zeros((1, 468, 3)), **self._mp_topology.tracking_fields())
            plain = dataclasses.replace(motion, offsets=None) if motion.offsets is not None else motion
            offsets = self._landmark_tracker().expression_offsets(plain, mp_tracking)[:, emb.landmarks]
            offsets = emb.scale * offsets @ emb.rotation.T
            B = sample(basis).reshape(rows, -1)                         # (rows, L*3)
            lam = 1e-3 * float((B * B).sum()) / rows
            coefficients += np.linalg.solve(B @ B.T + lam * np.eye(rows), B @ offsets.reshape(n, -1).T).T
        if motion.offsets is not None:
            if motion.topology != MESH_TYPE or motion.offsets.shape[1:] != canonical.shape:
                raise InvalidData(f"motion offsets are for topology {motion.topology!r} {motion.offsets.shape[1:]}, "
                                  f"this tracking is {MESH_TYPE!r} {canonical.shape}")
            flat = basis.reshape(rows, -1)
            coefficients += np.linalg.lstsq(flat.T, (motion.offsets * width).reshape(n, -1).T, rcond=None)[0].T
        return coefficients.astype(np.float32)

    # ------------------------------------------------------------------------------------------ pieces

    def _identity_of(self, canonical_cm: np.ndarray) -> np.ndarray:
        """The shape coefficients whose neutral FLAME head is closest to ``canonical_cm`` (least squares)."""
        from ophav_flame.model import to_head

        model, S = self.model(), self.layer().num_shape
        A = to_head(np.moveaxis(model.shapedirs[:, :, :S], 2, 0)).reshape(S, -1)
        rhs = (canonical_cm - to_head(model.v_template)).reshape(-1)
        return np.linalg.solve(A @ A.T + 1e-6 * np.eye(S), A @ rhs)

    def topology(self, mediapipe: MeshTopology) -> MeshTopology:
        """The ``flame`` topology (see the module docstring), its groups carried from ``mediapipe``'s."""
        from ophav_flame.embedding import symmetry
        from ophav_flame.model import connected_components, to_head

        model = self.model()
        emb = self.embedding(mediapipe.template)
        nearest = dict(zip(emb.landmarks.tolist(), emb.vertex_of(model.faces).tolist()))
        groups: dict[str, np.ndarray] = {}
        for name, members in mediapipe.groups.items():
            mapped = [nearest[int(i)] for i in members if int(i) in nearest]
            dedup = [v for k, v in enumerate(mapped) if k == 0 or v != mapped[k - 1]]
            if len(dedup) > 1 and dedup[0] == dedup[-1]:
                dedup = dedup[:-1]
            if dedup:
                groups[name] = np.array(dedup, np.int64)
        template = to_head(model.v_template)
        labels = connected_components(model.faces, len(template))
        values, counts = np.unique(labels, return_counts=True)
        for label in values[np.argsort(counts)[::-1][1:3]]:
            members = np.nonzero(labels == label)[0]
            side = "left" if template[members, 0].mean() > 0 else "right"  # head x = the subject's left
            groups[f"{side}_eyeball"] = members
        missing = [g for g in Tracking.REQUIRED_SEMANTIC if g not in groups]
        if missing:
            raise InvalidData(f"the landmark embedding covers none of MediaPipe's {missing} landmarks")
        return MeshTopology(faces=model.faces, name=MESH_TYPE, groups=groups, symmetry=symmetry(template),
                            template=template.astype(np.float32), num_vertices=len(template))


def _principal(residual: np.ndarray, valid: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
    """(count, V, 3) principal components of the per-frame residual meshes (scaled by their standard deviation,
    zero rows past the rank) and (N, count) coefficients of every frame (exact least squares on them)."""
    n, V = residual.shape[:2]
    basis = np.zeros((count, V, 3))
    if count == 0:
        return basis, np.zeros((n, 0))
    flat = residual.reshape(n, -1)
    rows = flat[valid] if valid.any() else flat
    _, sv, vt = np.linalg.svd(rows, full_matrices=False)
    k = int(min(count, (sv > 1e-9 * max(sv[0] if len(sv) else 0, 1e-12)).sum()))
    scale = sv[:k] / np.sqrt(max(len(rows), 1))
    basis[:k] = (vt[:k] * np.maximum(scale, 1e-6)[:, None]).reshape(k, V, 3)
    flat_basis = basis[:k].reshape(k, -1)
    coeff = np.zeros((n, count))
    if k:
        coeff[:, :k] = np.linalg.solve(flat_basis @ flat_basis.T, flat_basis @ flat.T).T
    return basis, coeff
