"""Importing the network definitions of ``gfpgan`` and ``codeformer-pip`` on current torch/torchvision.

* ``gfpgan`` imports ``basicsr``, whose ``data/degradations.py`` does
  ``from torchvision.transforms.functional_tensor import rgb_to_grayscale``; torchvision 0.17 removed that
  module. A stand-in module with that one function (the public ``functional.rgb_to_grayscale``) is registered
  under the old name before the import, and only when the real module is absent.
* ``codeformer-pip`` downloads weights when ``codeformer.app`` is imported: only its architecture module
  ``codeformer.basicsr.archs.codeformer_arch`` is imported, never ``codeformer.app``.
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
import types

from ophav_core.errors import UsageError

_LEGACY_TV = "torchvision.transforms.functional_tensor"
_INSTALL = ("pip install --no-deps gfpgan basicsr facexlib codeformer-pip "
            "(with --no-deps: their pinned dependencies would replace numpy and add a second OpenCV)")


def ensure_torchvision_functional_tensor() -> None:
    """Register the stand-in for ``torchvision.transforms.functional_tensor`` if torchvision lacks it."""
    if _LEGACY_TV in sys.modules:
        return
    try:
        if importlib.util.find_spec(_LEGACY_TV) is not None:
            return
    except (ImportError, ValueError):
        pass
    from torchvision.transforms import functional

    stand_in = types.ModuleType(_LEGACY_TV)
    stand_in.__doc__ = "ophav stand-in for the module torchvision 0.17 removed (only what basicsr imports)."
    stand_in.rgb_to_grayscale = functional.rgb_to_grayscale
    sys.modules[_LEGACY_TV] = stand_in


def _import(module: str, package: str):
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise UsageError(f"{module} cannot be imported ({exc}); install the {package} package: {_INSTALL}, "
                         f"or pip install 'ophav[facerestore]'") from exc


def _quiet_import(module: str, package: str):
    import warnings

    ensure_torchvision_functional_tensor()
    with warnings.catch_warnings():
        # basicsr imports scipy.ndimage.filters and codeformer's vqgan_arch uses torch.jit.script: both
        # deprecated upstream, harmless here, and not the user's business.
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        return _import(module, package)


def gfpgan_clean_arch():
    """``gfpgan.archs.gfpganv1_clean_arch`` (the module holding ``GFPGANv1Clean``)."""
    return _quiet_import("gfpgan.archs.gfpganv1_clean_arch", "gfpgan")


def codeformer_arch():
    """``codeformer.basicsr.archs.codeformer_arch`` (holding ``CodeFormer``); never ``codeformer.app``."""
    return _quiet_import("codeformer.basicsr.archs.codeformer_arch", "codeformer-pip")
