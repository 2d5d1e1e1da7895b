"""ophav: one portrait in, an animatable 3D head avatar out.

The library API (:mod:`ophav_core.api`) is importable from here: ``from ophav_core import run, render, evaluate``.
It loads on first use, so ``import ophav_core`` stays light (no torch, OpenCV or plugin is imported).
"""
from ophav_core.hookspecs import hookimpl, hookspec

__version__ = "0.1.0"
_API = ("run", "render", "fit", "preprocess", "evaluate", "ablate", "load_dataset", "resolve_avatar")
__all__ = ["__version__", "hookimpl", "hookspec", *_API]


def __getattr__(name: str):
    if name in _API:
        from ophav_core import api

        return getattr(api, name)
    raise AttributeError(f"module 'ophav_core' has no attribute {name!r}")
