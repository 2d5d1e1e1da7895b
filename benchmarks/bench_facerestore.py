"""Throughput of the face restorers (gfpgan, codeformer, gpen) with random weights at 512x512.

Each network is randomly initialised, saved in its public checkpoint format and loaded back through the
plugin's strict loader, then timed two ways:

* ``network``: ``restore_aligned`` on 512x512 aligned crops (the network plus tensor conversion);
* ``pipeline``: ``restore`` on 512x512 synthetic renders (alignment, warp, network, inverse warp, soft paste).

Runs on CUDA when present (else CPU). Usage::

    python benchmarks/bench_facerestore.py [--batch 1 8] [--precision fp32 fp16 bf16] [--iters 10]
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
import time
from pathlib import Path

NAMES = ("gfpgan", "codeformer", "gpen")


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--networks", nargs="+", default=list(NAMES), choices=NAMES)
    parser.add_argument("--batch", nargs="+", type=int, default=[1, 8], help="faces per network call")
    parser.add_argument("--precision", nargs="+", default=["fp32", "fp16"], choices=["fp32", "fp16", "bf16"],
                        help="autocast precision on CUDA (CPU runs fp32 only)")
    parser.add_argument("--iters", type=int, default=10, help="timed calls per setting")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="auto", help="auto, cuda or cpu")
    parser.add_argument("--no-pipeline", action="store_true", help="time only the network on aligned crops")
    return parser.parse_args()


def _components():
    from ophav_facerestore import networks, weightfiles
    from ophav_facerestore.codeformer import CodeFormerRestorer
    from ophav_facerestore.gfpgan import GFPGANRestorer
    from ophav_facerestore.gpen import GPENRestorer

    return {
        "gfpgan": (GFPGANRestorer, networks.GFPGAN_FORMAT, weightfiles.GFPGAN_V14, "gfpgan"),
        "codeformer": (CodeFormerRestorer, networks.CODEFORMER_FORMAT, weightfiles.CODEFORMER, "codeformer"),
        "gpen": (GPENRestorer, networks.GPEN_FORMAT, weightfiles.GPEN_BFR_512, None),
    }


def _random_checkpoint(fmt, filename: str, folder: Path) -> Path:
    import torch

    torch.manual_seed(0)
    state = fmt.build().state_dict()
    path = folder / filename
    torch.save(state if fmt.wrapper is None else {fmt.wrapper: state}, path)
    return path


def _timed(fn, iters: int, warmup: int, device: str) -> float:
    """Seconds per call."""
    import torch

    for _ in range(warmup):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / iters


def main() -> int:
    import numpy as np
    import torch

    from ophav_core.testing.contracts import tiny_context
    from ophav_core.testing.synthetic import synthetic_restore_input

    args = _parse()
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    card = torch.cuda.get_device_name(0) if device == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    precisions = args.precision if device == "cuda" else ["fp32"]
    print(f"device: {card}; torch {torch.__version__}; 512x512 faces; {args.iters} timed calls after "
          f"{args.warmup} warm-up", flush=True)
    rows = []
    components = _components()
    renders = synthetic_restore_input(max(args.batch), 512)
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory(prefix="bench-facerestore-") as tmp:
        for name in args.networks:
            cls, fmt, weight, package = components[name]
            if package and importlib.util.find_spec(package) is None:
                print(f"{name}: skipped ({package} is not installed)", flush=True)
                continue
            path = _random_checkpoint(fmt, weight.filename, Path(tmp))
            for precision in precisions:
                for batch in args.batch:
                    context = tiny_context(Path(tmp), device=device)
                    component = cls({"checkpoint": str(path), "batch_size": batch, "precision": precision}, context)
                    component.network()  # load outside the timing
                    if device == "cuda":
                        torch.cuda.reset_peak_memory_stats()
                    crops = rng.integers(0, 256, size=(batch, 512, 512, 3), dtype=np.uint8)
                    per_call = _timed(lambda: component.restore_aligned(crops), args.iters, args.warmup, device)
                    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
                    new = [(name, "network", precision, batch, per_call * 1e3, batch / per_call, peak)]
                    if not args.no_pipeline:
                        subset = _take(renders, batch)
                        per_call = _timed(lambda: component.restore(subset), max(1, args.iters // 2), 1, device)
                        new.append((name, "pipeline", precision, batch, per_call * 1e3, batch / per_call, peak))
                    for row in new:
                        print(_format(row), flush=True)
                    rows += new
                    del component
                    if device == "cuda":
                        torch.cuda.empty_cache()
            path.unlink()
    print()
    print(f"{'network':<11} {'what':<9} {'prec':<5} {'batch':>5} {'ms/call':>9} {'images/s':>9} {'peak GiB':>8}")
    for row in rows:
        print(_format(row))
    return 0


def _take(batch, n: int):
    from ophav_core.stages.data import RestoreInput

    return RestoreInput(images=batch.images[:n], alpha=batch.alpha[:n], landmarks5=batch.landmarks5[:n],
                        vertices2d=batch.vertices2d[:n], vertex_depth=batch.vertex_depth[:n], portrait=batch.portrait,
                        portrait_vertices2d=batch.portrait_vertices2d,
                        portrait_vertex_depth=batch.portrait_vertex_depth, faces=batch.faces)


def _format(row) -> str:
    name, what, precision, batch, ms, ips, peak = row
    return f"{name:<11} {what:<9} {precision:<5} {batch:>5} {ms:>9.1f} {ips:>9.2f} {peak:>8.2f}"


if __name__ == "__main__":
    sys.exit(main())
