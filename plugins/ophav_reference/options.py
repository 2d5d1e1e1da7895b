"""Options of the ``reference`` restorer (light module: pydantic only, imported to validate configs)."""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class ReferenceOptions(BaseModel):
    """How the portrait's detail is carried into the renders."""

    model_config = ConfigDict(extra="forbid")

    strength: float = Field(1.0, ge=0.0, le=3.0,
                            description="scale of the transferred detail: 0 leaves the renders alone, 1 gives the "
                                        "render the portrait's detail amplitude in the bands it lacks")
    levels: int = Field(3, ge=1, le=6,
                        description="Laplacian-pyramid bands considered, finest first (band k spans about 2^(k-1) to "
                                    "2^k pixels); per image a band is taken only as far as the render lacks it")
    consistency: float = Field(0.07, gt=0.0, le=1.0,
                               description="band-passed colour difference (0-1 scale) between render and warped "
                                           "portrait above which the weight starts to fall (zero at twice this); "
                                           "keeps e.g. lips out of an open mouth")
    feather: float = Field(0.05, ge=0.0, le=0.5,
                           description="width of the weight ramp at visibility and mesh boundaries, as a fraction of "
                                       "the face size (square root of the face's pixel area)")
    min_visibility: float = Field(0.35, ge=0.0, le=1.0,
                                  description="smallest relative foreshortening (a triangle's portrait/render area "
                                              "ratio over its median on the face, about cos in the portrait over cos "
                                              "in the render) that still takes detail; full weight from twice this")
    refine: bool = Field(True, description="refine the mesh correspondence with optical flow (DIS) so that detail "
                                           "lands on the render's edges despite small tracking errors")
    max_shift: float = Field(0.08, ge=0.0, le=0.3,
                             description="largest optical-flow correction, as a fraction of the face size")
    alignment_check: bool = Field(True, description="lower the weight where the warped portrait's structures "
                                                    "(2-6 px band) do not line up with the render's (local "
                                                    "correlation), so a residual tracking error gives no double "
                                                    "edges")
    workers: int | None = Field(None, ge=1, le=64, json_schema_extra={"affects_result": False},
                                description="threads restoring images in parallel; None = the number of CPU cores "
                                            "(at most 8)")
