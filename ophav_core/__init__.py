"""ophav: one portrait in, an animatable 3D head avatar out. The core: stages, plugins, config, scheduler."""
from ophav_core.hookspecs import hookimpl, hookspec

__version__ = "0.1.0"
__all__ = ["__version__", "hookimpl", "hookspec"]
