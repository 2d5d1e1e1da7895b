"""Run configuration: one component per stage by name, each with its own validated options.

Sources, later ones winning: the defaults below < a YAML file (``--config``) < CLI flags (``--restorer gfpgan``)
< ``--set KEY=VALUE`` (``restorer.w=0.7`` sets an option of the restorer; ``rounds=3`` a top-level field).
Validation happens before any work starts: an unknown component fails with a did-you-mean and the installed
alternatives, a bad option with pydantic's message pointing at the field.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ophav_core.errors import UsageError
from ophav_core.profiles import Profile, get_profile
from ophav_core.registry import STAGE_KEYS, ComponentSpec, Registry

DEFAULT_COMPONENTS = {
    "image2video": "meshwarp",
    "segmenter": "mediapipe",
    "tracker": "mediapipe",
    "field": "gaussians",
    "restorer": "reference",
}


class StageChoice(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    options: dict[str, Any] = Field(default_factory=dict)


class RunConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    profile: str = Field("preview", description="run profile: tiny, preview, standard or paper")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    seed: int = 0
    rounds: int | None = Field(None, ge=0, description="rounds of the iterative dataset update (profile's if unset)")
    driver: str | None = Field(None, description="driving video or motion script (YAML/JSON); default: built-in script")
    generated_pose: bool = Field(True, description=(
        "fit the coarse video's tracked head poses onto the mesh the image2video drew each frame with, where it "
        "gives one (meshwarp does), instead of keeping the tracker's own estimate"))
    mirror_views: bool = Field(True, description=(
        "in each restore round, draw a view the avatar cannot render (the run's tracker does not find the face "
        "there) from its mirror view, flipped, and let the views reach as far to each side as the coarse video "
        "reaches to either: the symmetry prior for the side of the head the portrait did not show"))
    mirror_frames: bool = Field(False, description=(
        "train on the coarse video plus its frames turned further than it reaches on the other side, mirrored "
        "left to right (a portrait turned to one side gives a video that reaches further that way): the "
        "symmetry prior for the side of the head the portrait did not show. Off by default: on a preview it gave "
        "the far side a face instead of fog but lowered the face-detection rate within 45 degrees "
        "(benchmarks/RESULTS.md, eighth session)"))
    image2video: StageChoice = Field(default_factory=lambda: StageChoice(name=DEFAULT_COMPONENTS["image2video"]))
    segmenter: StageChoice = Field(default_factory=lambda: StageChoice(name=DEFAULT_COMPONENTS["segmenter"]))
    tracker: StageChoice = Field(default_factory=lambda: StageChoice(name=DEFAULT_COMPONENTS["tracker"]))
    field: StageChoice = Field(default_factory=lambda: StageChoice(name=DEFAULT_COMPONENTS["field"]))
    restorer: StageChoice = Field(default_factory=lambda: StageChoice(name=DEFAULT_COMPONENTS["restorer"]))

    def choice(self, stage: str) -> StageChoice:
        return getattr(self, stage)


def parse_value(text: str) -> Any:
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def format_validation(error: ValidationError, where: str) -> str:
    parts = []
    for item in error.errors():
        loc = ".".join(str(p) for p in item["loc"]) or "(value)"
        parts.append(f"{loc}: {item['msg']}")
    return f"{where}: " + "; ".join(parts)


def load_yaml_mapping(path: str | Path, what: str = "config") -> dict[str, Any]:
    """A YAML (or JSON) file whose top level is a mapping; UsageError naming ``what`` and the file otherwise."""
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except OSError as exc:
        raise UsageError(f"cannot read {what} {path}: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise UsageError(f"{what} {path} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise UsageError(f"{what} {path} must be a mapping at the top level")
    return data


def load_config_file(path: str | Path) -> dict[str, Any]:
    return load_yaml_mapping(path, "config")


def build_config(file: str | Path | None = None, flags: dict[str, Any] | None = None,
                 sets: list[str] | None = None) -> RunConfig:
    """Merge the sources into a RunConfig (component names and options are checked later by :func:`resolve`)."""
    data: dict[str, Any] = load_config_file(file) if file else {}
    for stage in STAGE_KEYS:  # "restorer: gfpgan" is short for "restorer: {name: gfpgan}"
        if isinstance(data.get(stage), str):
            data[stage] = {"name": data[stage]}
    for key, value in (flags or {}).items():
        if value is None:
            continue
        if key in STAGE_KEYS:
            old = data.get(key) or {}
            # A different component keeps no options meant for the previous one.
            data[key] = {"name": value, "options": old.get("options", {}) if old.get("name") == value else {}}
        else:
            data[key] = value
    for item in sets or []:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise UsageError(f"--set {item!r}: expected KEY=VALUE, e.g. restorer.w=0.7 or rounds=3")
        value = parse_value(raw)
        head, _, rest = key.partition(".")
        if head in STAGE_KEYS and rest:
            stage = data.setdefault(head, {"name": DEFAULT_COMPONENTS[head]})
            if rest == "name":
                stage["name"] = value
            else:
                stage.setdefault("options", {})[rest] = value
        elif not rest:
            data[head] = value
        else:
            raise UsageError(f"--set {item!r}: {head!r} is not a stage; stages: {', '.join(STAGE_KEYS)}")
    try:
        return RunConfig(**data)
    except ValidationError as exc:
        raise UsageError(format_validation(exc, "config")) from None


@dataclass
class ResolvedStage:
    spec: ComponentSpec
    options: BaseModel


@dataclass
class ResolvedConfig:
    config: RunConfig
    profile: Profile
    stages: dict[str, ResolvedStage]

    @property
    def rounds(self) -> int:
        return self.profile.rounds if self.config.rounds is None else self.config.rounds

    def to_dict(self) -> dict[str, Any]:
        """The resolved config with every option's value (defaults included) and the component versions."""
        out = self.config.model_dump(mode="json")
        out["rounds"] = self.rounds
        for stage, resolved in self.stages.items():
            out[stage] = {"name": resolved.spec.name, "options": resolved.options.model_dump(mode="json"),
                          "package": resolved.spec.package, "version": resolved.spec.version}
        return out

    def fingerprint(self) -> str:
        """Identifies what the run computes (versions left out, so an upgrade does not block --resume)."""
        data = self.to_dict()
        for stage in STAGE_KEYS:
            data[stage] = {k: v for k, v in data[stage].items() if k in ("name", "options")}
        data.pop("device", None)
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def resolve_stage(registry: Registry, stage: str, choice: StageChoice) -> ResolvedStage:
    spec = registry.get(stage, choice.name)
    try:
        options = spec.options_model()(**choice.options)
    except ValidationError as exc:
        raise UsageError(format_validation(exc, f"{stage} {choice.name!r} options")) from None
    return ResolvedStage(spec, options)


def resolve(config: RunConfig, registry: Registry, stages: tuple[str, ...] = STAGE_KEYS) -> ResolvedConfig:
    profile = get_profile(config.profile)
    return ResolvedConfig(config, profile, {s: resolve_stage(registry, s, config.choice(s)) for s in stages})
