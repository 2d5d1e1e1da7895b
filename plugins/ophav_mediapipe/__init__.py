"""ophav plugin: mediapipe.

Tracker ``mediapipe`` (:mod:`ophav_mediapipe.tracker`) and segmenter ``mediapipe`` (:mod:`ophav_mediapipe.segmenter`)
on the models inside the ``mediapipe==0.10.21`` wheel. Other components need nothing of this package: the mesh's
topology (:func:`ophav_mediapipe.mesh.topology`: triangles, UVs, vertex groups, mirror map, canonical template)
travels in every tracking, and named expressions come through :meth:`MediapipeTracker.expression_offsets`.
Importing this package imports no heavy library.
"""
