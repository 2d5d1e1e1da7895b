"""ophav plugin: reference.

The embedded default restorer ``reference``: the portrait itself is the high-quality reference. Through the
mesh tracked in the portrait and in every render, the portrait's fine detail is carried into the renders where
the portrait sees the surface (``restorer.ReferenceRestorer``). Modules: ``correspond``
(render-to-portrait correspondence and visibility, on the core's rasteriser :mod:`ophav_core.media.raster`),
``transfer`` (pyramids, weights, flow refinement), ``metrics`` (sharpness and face-shape distance for
benchmarks), ``options``.
"""
