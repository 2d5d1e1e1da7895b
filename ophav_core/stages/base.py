"""What every component shares: its options model and the context it runs in."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict

from ophav_core.profiles import PROFILES, Profile


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
    """

    device: str = "cpu"
    profile: Profile = field(default_factory=lambda: PROFILES["preview"])
    seed: int = 0
    work_dir: Path = field(default_factory=lambda: Path("."))
    quiet: bool = False

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
    ``extra="forbid"`` and get ``self.options`` (validated) and ``self.context``."""

    stage: ClassVar[str] = ""
    Options: ClassVar[type[BaseModel]] = NoOptions

    def __init__(self, options: BaseModel | dict[str, Any] | None = None, context: RunContext | None = None):
        if options is None or isinstance(options, dict):
            options = self.Options(**(options or {}))
        self.options = options
        self.context = context or RunContext()
