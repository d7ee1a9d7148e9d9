"""The fixed cost of a `curate run` that stops at ingest, piece by piece, in a fresh process:

  interpreter  Python itself, up to the first line of this script
  imports      the command line, pipelines.job and the ingest stage (what `curate run` imports)
  catalog      the DuckDB catalog opened and the job recorded
  ray.init     a local Ray started as a run starts it (pipelines.executor.init_ray)
  first tasks  one task per CPU that imports the ingest stage, as a part's worker does: Ray's
               workers started and our modules loaded in them
  ray.shutdown Ray stopped (a run's driver stops it at exit)

and which heavy modules (torch, timm, faiss) the driver and a worker hold: none, or seconds.

`python bench/startup.py` prints the pieces; bench/ingest.py records them beside its rows.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "torchvision", "timm", "faiss")


def _heavy() -> list[str]:
    return sorted(name for name in HEAVY if name in sys.modules)


def _worker_probe() -> list[str]:
    # What unpickling a part's task imports: its stage and the executor's task function.
    import curate.stages.ingest.stage  # noqa: F401
    import pipelines.executor  # noqa: F401

    return _heavy()


def measure(spawned_at: float, cpus: int) -> dict:
    """The pieces, in this process (which must be fresh: every import counts)."""
    pieces = {"interpreter": time.time() - spawned_at}

    started = time.perf_counter()
    import services.cli.main  # noqa: F401
    import services.cli.run  # noqa: F401
    from curate.catalog import Catalog
    from curate.settings import Settings
    from pipelines.executor import init_ray
    from pipelines.registry import job_stages
    from schemas.job import parse_job_spec

    with tempfile.TemporaryDirectory() as folder:
        source = Path(folder, "urls.txt")
        source.write_text("http://127.0.0.1:9/a.jpg\n")
        spec = parse_job_spec({"source": str(source), "job_id": "startup", "until": "ingest"})
        job_stages(spec)
        pieces["imports"] = time.perf_counter() - started

        started = time.perf_counter()
        settings = Settings(data_root=Path(folder, "data"), num_cpus=cpus, progress=False)
        Catalog(settings.catalog_file, settings.data_root).open_job(spec)
        pieces["catalog"] = time.perf_counter() - started

        import ray

        started = time.perf_counter()
        init_ray(settings)
        pieces["ray.init"] = time.perf_counter() - started

        started = time.perf_counter()
        probe = ray.remote(num_cpus=1)(_worker_probe)
        workers = ray.get([probe.remote() for _ in range(cpus)])
        pieces["first tasks"] = time.perf_counter() - started

        started = time.perf_counter()
        ray.shutdown()
        pieces["ray.shutdown"] = time.perf_counter() - started
    return {
        "pieces_s": pieces,
        "heavy_modules": {"driver": _heavy(), "workers": sorted(set().union(*workers))},
    }


def startup(cpus: int) -> dict:
    """`measure` in a fresh Python process, and that process's whole wall time."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("CURATE_RAY_ADDRESS", None)
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--child", str(time.time()), str(cpus)],
        cwd=REPO,
        env=env,
        check=True,
        capture_output=True,
        text=True,
    )
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["process_wall_s"] = time.perf_counter() - started
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cpus", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(float(args.child[0]), int(args.child[1]))))
        return
    result = startup(args.cpus)
    for name, seconds in result["pieces_s"].items():
        print(f"{name:13s} {seconds:6.2f} s")
    print(f"{'process':13s} {result['process_wall_s']:6.2f} s (wall, exit included)")
    print(f"heavy modules: {result['heavy_modules']}")


if __name__ == "__main__":
    main()
