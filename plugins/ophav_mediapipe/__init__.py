"""ophav plugin: mediapipe.

Tracker ``mediapipe`` (:mod:`ophav_mediapipe.tracker`) and segmenter ``mediapipe`` (:mod:`ophav_mediapipe.segmenter`)
on the models inside the ``mediapipe==0.10.21`` wheel. Public helpers for other plugins:
:func:`ophav_mediapipe.mesh.load_canonical_mesh`, :data:`ophav_mediapipe.mesh.SEMANTIC`,
:func:`ophav_mediapipe.blendshapes.named_offsets`. Importing this package imports no heavy library.
"""
