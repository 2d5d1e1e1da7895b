"""A restricted unpickler for FLAME's ``generic_model.pkl`` (and ``flame2023*.pkl``), without chumpy.

The published FLAME files are Python 2 pickles of a dict whose values are numpy arrays, a
``scipy.sparse.csc_matrix`` (``J_regressor``) and chumpy objects (``chumpy.ch.Ch`` holding an array, and
possibly chumpy's reordering nodes over one). A plain :func:`pickle.load` would import and call whatever globals
the file names; this unpickler allows only:

* chumpy classes (any ``chumpy.*`` name), mapped to inert stand-ins that record the pickled state, which is
  then evaluated to a plain array: ``Ch`` holds its value in ``state['x']``; ``Select`` is
  ``a.ravel()[idxs].reshape(preferred_shape)``, ``transpose`` is ``np.transpose(a, axes)``, ``Reshape`` is
  ``a.reshape(newshape)``, ``rollaxis`` and ``swapaxes`` likewise (chumpy's ``__getstate__`` is the
  instance ``__dict__`` without its caches; see mattloper/chumpy ``ch.py`` and ``reordering.py``);
* scipy.sparse's csc/csr/coo matrix classes, mapped to a stand-in that rebuilds a dense array from the pickled
  ``data``/``indices``/``indptr`` (or ``row``/``col``) and shape, so scipy is not needed;
* numpy's array reconstruction (``_reconstruct`` for ``ndarray`` only, ``dtype``, ``scalar``) and the builtins
  ``set``, ``frozenset``, ``object``, ``copyreg._reconstructor`` (replaced by a version that only builds the
  stand-ins above) and ``_codecs.encode`` (only str -> latin1 bytes: how Python 3 writes bytes in protocol 2).

Every other global is refused with :class:`FlamePickleError` before it is imported, so nothing in the file runs.
Read with ``encoding='latin1'`` (Python 2 byte strings of numpy arrays).
"""
from __future__ import annotations

import io
import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np


class FlamePickleError(pickle.UnpicklingError):
    """The file is not a FLAME model this reader accepts (a refused global, an unknown chumpy node...)."""


class ChumpyStandIn:
    """An inert stand-in for a chumpy class: records the pickled state, evaluates to a plain array."""

    chumpy_name = "chumpy.ch.Ch"

    def __init__(self, *args: Any, **kwargs: Any) -> None:  # NEWOBJ passes chumpy's (empty) args
        self.state: dict[str, Any] = {}

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2:  # (dict, slots) form
            state = {**(state[0] or {}), **(state[1] or {})}
        if not isinstance(state, dict):
            raise FlamePickleError(f"{self.chumpy_name}: unexpected pickled state of type {type(state).__name__}")
        self.state = state

    def value(self) -> np.ndarray:
        return _evaluate(self)


class SparseStandIn:
    """An inert stand-in for a pickled scipy.sparse matrix; :meth:`value` is the dense array."""

    sparse_name = "scipy.sparse.csc_matrix"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.state: dict[str, Any] = {}

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, dict):
            raise FlamePickleError(f"{self.sparse_name}: unexpected pickled state of type {type(state).__name__}")
        self.state = state

    def value(self) -> np.ndarray:
        s = self.state
        shape = s.get("_shape", s.get("shape"))
        if shape is None:
            raise FlamePickleError(f"{self.sparse_name}: no shape in the pickled state")
        rows, cols = (int(v) for v in shape)
        dense = np.zeros((rows, cols), np.float64)
        kind = self.sparse_name.rsplit(".", 1)[-1][:3]
        data = np.asarray(s["data"], np.float64)
        if kind == "coo":
            np.add.at(dense, (np.asarray(s["row"], np.int64), np.asarray(s["col"], np.int64)), data)
            return dense
        indices, indptr = np.asarray(s["indices"], np.int64), np.asarray(s["indptr"], np.int64)
        major = np.repeat(np.arange(len(indptr) - 1), np.diff(indptr))
        if kind == "csc":
            np.add.at(dense, (indices, major), data)
        elif kind == "csr":
            np.add.at(dense, (major, indices), data)
        else:
            raise FlamePickleError(f"unsupported sparse matrix class {self.sparse_name}")
        return dense


_CHUMPY_CLASSES: dict[str, type] = {}
_SPARSE_CLASSES: dict[str, type] = {}


def _chumpy_class(name: str) -> type:
    if name not in _CHUMPY_CLASSES:
        _CHUMPY_CLASSES[name] = type(name.rsplit(".", 1)[-1], (ChumpyStandIn,), {"chumpy_name": name})
    return _CHUMPY_CLASSES[name]


def _sparse_class(name: str) -> type:
    if name not in _SPARSE_CLASSES:
        _SPARSE_CLASSES[name] = type(name.rsplit(".", 1)[-1], (SparseStandIn,), {"sparse_name": name})
    return _SPARSE_CLASSES[name]


def _array(value: Any) -> np.ndarray:
    if isinstance(value, (ChumpyStandIn, SparseStandIn)):
        return value.value()
    return np.asarray(value)


def _evaluate(node: ChumpyStandIn, depth: int = 0) -> np.ndarray:
    if depth > 64:
        raise FlamePickleError("chumpy graph nested too deeply")
    s, kind = node.state, node.chumpy_name.rsplit(".", 1)[-1]
    inner = lambda: _array(s["a"]) if not isinstance(s.get("a"), ChumpyStandIn) else _evaluate(s["a"], depth + 1)  # noqa: E731
    try:
        if kind not in _REORDERING and "x" in s:  # Ch and its plain-value subclasses
            return _array(s["x"])
        if kind == "Select":
            out = inner().ravel()[np.asarray(s["idxs"], np.int64).ravel()]
            return out.reshape(s["preferred_shape"]) if "preferred_shape" in s else out
        if kind == "transpose":
            return np.ascontiguousarray(np.transpose(inner(), axes=s.get("axes")))
        if kind == "Reshape":
            return inner().reshape(s["newshape"])
        if kind == "rollaxis":
            return np.rollaxis(inner(), axis=s["axis"], start=s.get("start", 0))
        if kind == "swapaxes":
            return np.swapaxes(inner(), s["axis1"], s["axis2"])
    except KeyError as exc:
        raise FlamePickleError(f"{node.chumpy_name}: pickled state lacks {exc}") from None
    raise FlamePickleError(f"unsupported chumpy node {node.chumpy_name} (state keys: {sorted(s)[:8]}); a FLAME "
                           f"model holds arrays, not chumpy expressions")


_REORDERING = ("Select", "transpose", "Reshape", "rollaxis", "swapaxes")


def _np_reconstruct(subtype: Any, shape: Any, dtype: Any) -> np.ndarray:
    if subtype is not np.ndarray:
        raise FlamePickleError(f"refused numpy array subclass {subtype!r}")
    return np.ndarray.__new__(np.ndarray, shape, dtype)


def _np_scalar(dtype: Any, data: Any = None) -> Any:
    if not isinstance(dtype, np.dtype) or dtype.hasobject:
        raise FlamePickleError(f"refused numpy scalar of dtype {dtype!r}")
    if isinstance(data, str):
        data = data.encode("latin1")
    return np.frombuffer(data, dtype=dtype, count=1)[0]


def _np_dtype(spec: Any, align: bool = False, copy: bool = False) -> np.dtype:
    dtype = np.dtype(spec, align=align, copy=copy) if not isinstance(spec, np.dtype) else spec
    if dtype.hasobject:
        raise FlamePickleError("refused numpy dtype holding Python objects")
    return dtype


def _reconstructor(cls: Any, base: Any, state: Any) -> Any:
    """copyreg._reconstructor (protocols 0 and 1) for the stand-ins only."""
    if not (isinstance(cls, type) and issubclass(cls, (ChumpyStandIn, SparseStandIn))) or base is not object \
            or state is not None:
        raise FlamePickleError(f"refused copyreg._reconstructor({cls!r}, {base!r}, ...)")
    return cls()


def _latin1_bytes(text: Any, encoding: str = "latin1") -> bytes:
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise FlamePickleError("refused _codecs.encode beyond str -> latin1 bytes")
    return text.encode("latin1")


_NUMPY_MODULES = ("numpy.core.multiarray", "numpy._core.multiarray", "numpy")
_SPARSE_MODULES = ("scipy.sparse.csc", "scipy.sparse._csc", "scipy.sparse.csr", "scipy.sparse._csr",
                   "scipy.sparse.coo", "scipy.sparse._coo", "scipy.sparse")
_SPARSE_NAMES = ("csc_matrix", "csr_matrix", "coo_matrix")


class RestrictedUnpickler(pickle.Unpickler):
    """See the module docstring. ``source`` names the file in errors."""

    def __init__(self, file: Any, source: str = "the pickle") -> None:
        super().__init__(file, encoding="latin1")
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        full = f"{module}.{name}"
        if module == "chumpy" or module.startswith("chumpy."):
            return _chumpy_class(full)
        if module in _SPARSE_MODULES and name in _SPARSE_NAMES:
            return _sparse_class(f"scipy.sparse.{name}")
        if module in _NUMPY_MODULES:
            if name == "_reconstruct":
                return _np_reconstruct
            if name == "scalar":
                return _np_scalar
            if name == "ndarray":
                return np.ndarray
            if name == "dtype":
                return _np_dtype
        if module == "_codecs" and name == "encode":  # how Python 3 writes bytes in protocol 2
            return _latin1_bytes
        if module in ("copy_reg", "copyreg") and name == "_reconstructor":
            return _reconstructor
        if module in ("__builtin__", "builtins") and name in ("set", "frozenset", "object"):
            return {"set": set, "frozenset": frozenset, "object": object}[name]
        raise FlamePickleError(f"{self.source} names the Python global {full}, which a FLAME model does not need; "
                               f"refused (nothing in the file was run)")


def load_pickle(path: str | os.PathLike) -> dict[str, Any]:
    """The FLAME pickle at ``path`` as a dict of plain numpy arrays (chumpy and sparse values evaluated; other
    values, e.g. the ``bs_style`` strings, as they are). Raises :class:`FlamePickleError` on anything else."""
    path = Path(path)
    data = path.read_bytes()
    try:
        content = RestrictedUnpickler(io.BytesIO(data), source=str(path)).load()
    except FlamePickleError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError) as exc:
        raise FlamePickleError(f"{path} is not a readable pickle ({type(exc).__name__}: {exc})") from None
    if not isinstance(content, dict):
        raise FlamePickleError(f"{path} holds a {type(content).__name__}, not the dict of a FLAME model")
    out: dict[str, Any] = {}
    for key, value in content.items():
        key = key.decode("latin1") if isinstance(key, bytes) else str(key)
        out[key] = _array(value) if isinstance(value, (ChumpyStandIn, SparseStandIn, np.ndarray)) else value
    return out
