"""``ophav preprocess``, ``ophav fit`` and ``ophav render``: a user's own video to a dataset, a dataset to an
avatar, and an avatar to videos. Thin wrappers over :mod:`ophav_core.api`."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from ophav_core.cli.root import _component_option, _echo, app
from ophav_core.errors import UsageError


@app.command()
def preprocess(
    source: Path = typer.Argument(..., help="a video file or a folder of images"),
    out: Path = typer.Option(..., "--out", "-o", help="dataset folder to write"),
    segmenter: Optional[str] = _component_option("segmenter"),
    tracker: Optional[str] = _component_option("tracker"),
    size: int = typer.Option(512, "--size", min=16, help="square frame size (centre crop, then resize)"),
    max_frames: Optional[int] = typer.Option(None, "--max-frames", min=1, help="read at most this many frames"),
    set_: List[str] = typer.Option([], "--set", help="STAGE.OPTION=VALUE for the tracker or segmenter"),
    device: Optional[str] = typer.Option(None, "--device", help="auto, cpu or cuda"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bars"),
    format_: str = typer.Option("ophav", "--format", help="ophav (frames.npz, masks.npz, tracking.npz) or insta "
                                                          "(INSTA's transforms_*.json, images/, meshes/, flame/exp/)"),
    test_frames: Optional[int] = typer.Option(None, "--test-frames", min=0, help="--format insta: the last N frames "
                                              "form the test split (default a tenth)"),
) -> None:
    """Turn your own video (or image folder) into a dataset: frames, head masks, tracking, contact sheets."""
    from ophav_core import api

    api.preprocess(source, out, segmenter=segmenter, tracker=tracker, size=size, max_frames=max_frames, sets=set_,
                   device=device, quiet=quiet, log=_echo, format=format_, test_frames=test_frames)
    _echo(f"dataset written to {out} (see pose.png, mesh.png and overlay.png)")


@app.command()
def fit(
    dataset: Path = typer.Argument(..., help="a dataset folder made by `ophav preprocess`, or one in INSTA's format "
                                             "(its train split)"),
    out: Path = typer.Option(..., "--out", "-o", help="the avatar checkpoint to write"),
    field: Optional[str] = _component_option("field"),
    profile: str = typer.Option("standard", "--profile", help="sizes the training (tiny, preview, standard, paper)"),
    iterations: Optional[int] = typer.Option(None, "--iterations", min=0, help="training iterations (the profile's if unset)"),
    holdout: int = typer.Option(0, "--holdout", min=0, help="hold out every Nth frame (0: none)"),
    set_: List[str] = typer.Option([], "--set", help="field.OPTION=VALUE"),
    device: Optional[str] = typer.Option(None, "--device", help="auto, cpu or cuda"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bars"),
) -> None:
    """Train an avatar directly on a dataset (your own video)."""
    from ophav_core import api

    api.fit(dataset, out, field=field, profile=profile, iterations=iterations, holdout=holdout, sets=set_,
            device=device, quiet=quiet)
    _echo(f"avatar written to {out}")


@app.command()
def render(
    avatar: Path = typer.Argument(..., help="an avatar checkpoint (e.g. runs/NAME/avatar/avatar.ckpt) or a run "
                                            "directory"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="mp4 to write"),
    driver: Optional[Path] = typer.Option(None, "--driver", help="a driving video (cross-identity reenactment)"),
    script: Optional[Path] = typer.Option(None, "--script", help="a motion script (YAML/JSON)"),
    views: Optional[str] = typer.Option(None, "--views", help="turntable or expressions"),
    frames_dir: Optional[Path] = typer.Option(None, "--frames", help="also write PNG frames to this folder"),
    size: Optional[int] = typer.Option(None, "--size", min=16, help="output resolution (square)"),
    side_by_side: bool = typer.Option(False, "--side-by-side", help="put the driver beside the avatar"),
    fps: float = typer.Option(25.0, "--fps", min=1.0),
    seconds: float = typer.Option(4.0, "--seconds", min=0.2, help="length of --views / --script output"),
    field: Optional[str] = _component_option("field"),
    tracker: Optional[str] = _component_option("tracker"),
    device: Optional[str] = typer.Option(None, "--device", help="auto, cpu or cuda"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bars"),
) -> None:
    """Render an avatar: driven by a video, by a motion script, or turning for novel views."""
    from ophav_core import api
    from ophav_core.media import save_png, write_video

    if out is None and frames_dir is None:
        raise UsageError("give --out OUT.mp4 and/or --frames DIR")
    rendered = api.render(avatar, driver=driver, script=script, views=views, size=size, fps=fps, seconds=seconds,
                          field=field, tracker=tracker, device=device, quiet=quiet)
    images = rendered.side_by_side() if side_by_side else rendered.rgb
    if frames_dir is not None:
        for i, image in enumerate(images):
            save_png(frames_dir / f"{i:05d}.png", image)
    if out is not None:
        write_video(out, images, rendered.fps)
        _echo(f"wrote {out} ({len(images)} frames)")
