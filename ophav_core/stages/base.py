"""What every component shares: its options model and the context it runs in."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar

from pydantic import BaseModel, ConfigDict

from ophav_core.errors import UsageError
from ophav_core.profiles import PROFILES, Profile

ComponentSource = Callable[[str, "RunContext"], "Component"]
"""``(stage, asking context) -> component``: how a context finds the component of another stage."""


class NoOptions(BaseModel):
    """For components without options; any option given is an error."""

    model_config = ConfigDict(extra="forbid")


@dataclass
class RunContext:
    """Where and how a component runs.

    device: ``"cpu"`` or ``"cuda"`` (resolved; never ``"auto"``).
    profile: the run profile; components use it for every option left unset.
    seed: for every random choice, so a resumed run gives the same result.
    work_dir: a scratch folder of this step (kept between attempts, so a component may resume inside it).
    components: where :meth:`component` finds another stage's component. The scheduler gives the run's
        configured ones; :func:`ophav_core.components.registry_components` the registry's defaults (what
        ``ophav_core.api`` and the test contexts use outside a run). The stages sit below the plugin host, so
        the source is handed in, never imported here.
    """

    device: str = "cpu"
    profile: Profile = field(default_factory=lambda: PROFILES["preview"])
    seed: int = 0
    work_dir: Path = field(default_factory=lambda: Path("."))
    quiet: bool = False
    components: ComponentSource | None = field(default=None, repr=False, compare=False)

    def component(self, stage: str) -> "Component":
        """The component of ``stage`` this run uses (e.g. the tracker, for an image2video that tracks the
        portrait): ``ophav run --tracker NAME`` reaches every component that asks for the tracker."""
        if self.components is None:
            raise UsageError(f"this component needs the run's {stage}, but its RunContext has no component source; "
                             f"create it through a run or ophav_core.api, or pass "
                             f"RunContext(components=ophav_core.components.registry_components())")
        return self.components(stage, self)

    def rng(self, salt: str = ""):
        """A numpy generator for one purpose (``salt``), the same in every process for the same seed."""
        import numpy as np

        return np.random.default_rng([self.seed, hash_str(salt)])

    def progress(self, total: int | None, description: str):
        from ophav_core.progress import progress_bar

        return progress_bar(total, description, disable=self.quiet)


def hash_str(text: str) -> int:
    """A stable (process-independent) 32-bit hash; Python's ``hash`` is salted per process."""
    import zlib

    return zlib.crc32(text.encode())


class Component:
    """Base of every stage implementation. Subclasses set ``Options`` to a pydantic model with
    ``extra="forbid"`` and get ``self.options`` (validated) and ``self.context``.

    ``draws_on`` names the other stages whose run components this one uses (through :meth:`stage_component`),
    so that a run's step keys include them: a coarse video made with another tracker is another video."""

    stage: ClassVar[str] = ""
    Options: ClassVar[type[BaseModel]] = NoOptions
    draws_on: ClassVar[tuple[str, ...]] = ()

    def __init__(self, options: BaseModel | dict[str, Any] | None = None, context: RunContext | None = None):
        if options is None or isinstance(options, dict):
            options = self.Options(**(options or {}))
        self.options = options
        self.context = context or RunContext()

    def stage_component(self, stage: str) -> "Component":
        """The run's component of ``stage``, which this class must declare in ``draws_on``."""
        if stage not in self.draws_on:
            raise UsageError(f"{type(self).__name__} asks for the run's {stage} without declaring it in draws_on "
                             f"(the run's step keys would miss it)")
        return self.context.component(stage)
