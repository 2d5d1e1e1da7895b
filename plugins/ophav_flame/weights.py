"""The FLAME model files as weight-store entries (light module: no torch at import).

FLAME cannot be redistributed: the user downloads it (registration required) and adds it with
``ophav weights add flame-2020 generic_model.pkl`` (or ``flame-2023`` / ``flame-2023-open``). The store checks
its structure (keys and shapes, read with the restricted unpickler), since no checksum is published.
"""
from __future__ import annotations

from ophav_core.weights import WeightFile, path_of

FLAME_SITE = "https://flame.is.tue.mpg.de"
_DOWNLOAD = f"{FLAME_SITE}/download.php"
_NOTE = ("FLAME cannot be redistributed: register at https://flame.is.tue.mpg.de, download it yourself and add it "
         "with `ophav weights add`. Read with a restricted unpickler (chumpy objects become plain arrays; any other "
         "Python global is refused), never with pickle.load, and chumpy is not needed.")

FLAME_2020 = WeightFile(
    name="flame-2020", filename="generic_model.pkl", url=_DOWNLOAD,
    license="FLAME licence (non-commercial scientific research only; registration required)", restricted=True,
    needed_by="tracker flame (model=flame-2020)",
    description="FLAME 2020 generic model (FLAME2020.zip: generic_model.pkl; 300 shape + 100 expression). " + _NOTE,
    verify="ophav_flame.model:verify_model")

FLAME_2023 = WeightFile(
    name="flame-2023", filename="flame2023.pkl", url=_DOWNLOAD,
    license="FLAME licence (non-commercial scientific research only; registration required)", restricted=True,
    needed_by="tracker flame (model=flame-2023)",
    description="FLAME 2023 with jaw rotation (FLAME2023.zip: flame2023.pkl; revised eye region). " + _NOTE,
    verify="ophav_flame.model:verify_model")

FLAME_2023_OPEN = WeightFile(
    name="flame-2023-open", filename="flame2023_Open.pkl", url=_DOWNLOAD,
    license="CC-BY-4.0 (FLAME 2023 Open)", restricted=False,
    needed_by="tracker flame (model=flame-2023-open)",
    description="FLAME 2023 Open (FLAME2023Open.zip: flame2023_Open.pkl), the CC-BY-4.0 release. " + _NOTE,
    verify="ophav_flame.model:verify_model")

FLAME_WEIGHTS: dict[str, WeightFile] = {w.name: w for w in (FLAME_2020, FLAME_2023, FLAME_2023_OPEN)}
ALL_WEIGHTS: tuple[WeightFile, ...] = tuple(FLAME_WEIGHTS.values())


def present() -> list[str]:
    """The names of the FLAME entries whose file is in the store (a cheap file check, no verification)."""
    return [name for name, weight in FLAME_WEIGHTS.items() if path_of(weight).is_file()]


def choose(model: str = "auto") -> WeightFile:
    """The entry the tracker uses: ``model`` by name, or for ``auto`` the first present of 2020, 2023, 2023 Open
    (2020 when none is, so the missing-file message names it)."""
    if model != "auto":
        return FLAME_WEIGHTS[model]
    found = present()
    return FLAME_WEIGHTS[found[0]] if found else FLAME_2020


REQUIREMENT = (f"Needs FLAME, which you download yourself: generic_model.pkl (FLAME 2020), flame2023.pkl or "
               f"flame2023_Open.pkl (FLAME 2023 Open, CC-BY-4.0) from {FLAME_SITE} (registration required; not "
               f"redistributable), then `ophav weights add flame-2020 /path/to/generic_model.pkl`")
"""One line for ``ophav plugins`` and the docs (static: the docs are generated from it)."""
