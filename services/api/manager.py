"""The job manager: every job the service runs gets a driver outside the service's process, and
the catalog stays true about it.

A driver is `curate run --spec-file <job_dir>/spec.json`: a child process in a session of its own
(stdout and stderr to `<job_dir>/driver.log`), or, with CURATE_RAY_ADDRESS set, the same command
submitted to the cluster through Ray's job submission API. The catalog records which driver runs
a job (`job_drivers`); job state lives there only, so a restarted service finds running and
finished jobs as they are. A driver that is gone while its job still reads running shows as
failed with the reason (cancelled when a cancel was asked for), checked whenever a job is read
and when the service starts, and its job can be resumed.

Cancel marks the job `cancelling` and sends SIGTERM to the driver process alone: the driver turns
it into a clean stop that records `cancelled` (pipelines/job.py). Its local Ray shares its
process group and keeps running until the driver shuts it down; what is left of the group is
killed once the driver has exited, and the whole group if the driver outlives the grace period.
"""

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from curate.catalog import Catalog
from curate.catalog_cache import CatalogCache
from curate.catalog_service import ACTIVE
from curate.core import storage
from curate.core.atomic import write_text
from curate.settings import Settings
from curate.stages.ingest.confine import check_location
from schemas.api import InvalidField
from schemas.errors import InternalError, NotFoundError
from schemas.job import JobSpec, new_job_id
from services.api.settings import ServiceSettings

LOG_NAME = "driver.log"
SPEC_NAME = "spec.json"
# A driver recorded but never started (the service stopped in between) counts as gone after this.
_START_GRACE_S = 120.0
_LAST_WORDS_BYTES = 4096
# How far behind the catalog a status poll (GET /v1/jobs/{id}, the event stream) may be while a
# job commits parts faster than a loaded machine reads them (JobManager.detail).
POLL_STALE_S = 0.5


def request_sha256(body: Any) -> str:
    """The identity of a request body for idempotency: its canonical JSON."""
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()


def driver_env(settings: Settings, ray: bool = False) -> dict[str, str]:
    """The machine settings as CURATE_* variables for a driver, whatever they were read from."""
    env: dict[str, str] = {}
    values = settings.model_dump(mode="json", exclude={"progress"})
    store = settings.store
    values["data_root"] = store.uri if store.remote else str(store.root.resolve())
    if settings.catalog_path is not None:
        values["catalog_path"] = str(Path(settings.catalog_path).resolve())
    for name, value in values.items():
        if value is None:
            continue
        if isinstance(value, dict | list):
            env[f"CURATE_{name.upper()}"] = json.dumps(value)
        elif isinstance(value, bool):
            env[f"CURATE_{name.upper()}"] = "true" if value else "false"
        else:
            env[f"CURATE_{name.upper()}"] = str(value)
    env["CURATE_PROGRESS"] = "false"
    if ray:
        # A Ray job's entrypoint joins the cluster it runs on.
        env["CURATE_RAY_ADDRESS"] = "auto"
    return env


def _start_ticks(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (None if it is gone or a zombie):
    with the pid, it names one process even after the pid is reused."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after its last ')'.
    fields = stat[stat.rindex(")") + 2 :].split()
    return None if fields[0] in ("Z", "X") else fields[19]


def _last_words(log_path: str | None) -> str:
    """The driver's own last error line (`curate: ...`), if its log has one."""
    if not log_path:
        return ""
    try:
        with open(log_path, "rb") as log:
            log.seek(max(0, os.path.getsize(log_path) - _LAST_WORDS_BYTES))
            tail = log.read().decode(errors="replace")
    except OSError:
        return ""
    lines = [line for line in tail.splitlines() if line.startswith("curate:")]
    return f": {lines[-1].removeprefix('curate:').strip()}" if lines else ""


def _exit(code: int) -> str:
    if code < 0:
        return f"killed by {signal.Signals(-code).name}"
    return f"exit {code}"


class JobManager:
    def __init__(self, settings: Settings, service: ServiceSettings, catalog: Catalog) -> None:
        self.settings = settings
        self.service = service
        self.catalog = catalog
        self.host = socket.gethostname()
        self._lock = threading.Lock()
        self._children: dict[str, subprocess.Popen] = {}
        self._ray_client: Any = None
        # Job details, read again only when the catalog changed: every client watching a job
        # polls its status, and one read of the catalog costs ~40 ms of CPU and the lock the
        # job's driver needs to commit.
        self._details: CatalogCache[dict[str, Any]] = CatalogCache(catalog)

    # -- requests ---------------------------------------------------------------------------

    def check_request(self, spec: JobSpec, prefix: str = "body") -> None:
        """What the service refuses before recording a job: local paths outside the roots the
        operator allows, and seed or evaluation sets nobody registered."""
        check_location(spec.source, self.service.source_roots, field=f"{prefix}.source")
        source = Path(spec.source)
        if not any(ch in spec.source for ch in "*?[") and not source.exists():
            raise InvalidField(f"source {spec.source!r} does not exist", field=f"{prefix}.source")
        for field, names, registered in (
            ("seeds", spec.seeds, self.catalog.seed_sets()),
            ("eval_sets", spec.eval_sets, self.catalog.eval_sets()),
        ):
            missing = [name for name in names if name not in registered]
            if missing:
                raise InvalidField(
                    f"{field}: {', '.join(missing)} not registered; registered: "
                    f"{', '.join(registered) or 'none'}",
                    field=f"{prefix}.{field}",
                    code="set_not_registered",
                )

    def submit(
        self, spec: JobSpec, idempotency_key: str | None, body_sha256: str, scope: str = ""
    ) -> tuple[str, bool]:
        """Record the job and start its driver; returns (job_id, created). An idempotency key
        the same caller (`scope`: its token's id, '' with auth off) used before returns the
        job its first request created."""
        spec = spec.model_copy(update={"job_id": spec.job_id or new_job_id()})
        job_id, created = self.catalog.create_job(spec, idempotency_key, body_sha256, scope)
        if created or self.catalog.job_driver(job_id) is None:
            # A repeat whose first request never got to start the driver starts it.
            self._launch(job_id)
        return job_id, created

    def resume(self, job_id: str) -> None:
        self.reconcile(job_id)
        self.check_request(self.catalog.job_spec(job_id), prefix="spec")
        self._launch(job_id)

    def cancel(self, job_id: str) -> None:
        self.reconcile(job_id)
        driver = self.catalog.request_cancel(job_id)
        if driver["ref"] is not None:
            self._stop(driver)
        # else: the launch in progress sees `cancelling` once it has a ref (_launch)

    def delete(self, job_id: str) -> None:
        self.reconcile(job_id)
        shards = self.catalog.delete_job(job_id)
        job_dir = self.settings.job_dir(job_id)
        for shard in shards:
            if job_dir.resolve() not in shard.resolve().parents:
                storage.remove(shard)
        with self._lock:
            self._children.pop(job_id, None)
        try:
            storage.remove_tree(job_dir, missing_ok=False)
        except FileNotFoundError:
            pass
        except OSError as error:  # the catalog has forgotten the job: say what is left
            raise InternalError(f"job {job_id} deleted, but not its folder: {error}") from error

    def detail(self, job_id: str, max_stale_s: float = 0.0) -> dict[str, Any]:
        """The job's catalog detail, after making sure a dead driver does not read running.
        Shared between requests (cached until the catalog changes): read it, never change it.
        `max_stale_s` (status polls, POLL_STALE_S): it may be the catalog's state of up to
        that long ago while another request reads the latest (curate/catalog_cache.py);
        without it, the state after everything written before this call."""
        detail = self._details.get(
            job_id, lambda: self.catalog.job_detail(job_id), max_stale_s=max_stale_s
        )
        driver = detail.get("driver")
        if driver and detail["status"] in ACTIVE and self._gone(driver):
            self.reconcile(job_id)  # a change of the catalog: the next read is a fresh one
            detail = self._details.get(job_id, lambda: self.catalog.job_detail(job_id))
        return detail

    def log(self, job_id: str, offset: int, max_bytes: int = 1 << 20) -> tuple[bytes, int]:
        """Up to max_bytes of the driver's log from `offset`, and the offset after them."""
        driver = self.catalog.job_driver(job_id)
        if driver is None:
            self.catalog.job_spec(job_id)  # an unknown job is a 404 of its own
            raise NotFoundError(
                f"job {job_id!r} was not started by the service: its log is where its "
                "`curate run` printed",
                code="log_not_found",
            )
        if driver["kind"] == "ray":
            text = self._ray().get_job_logs(driver["ref"]).encode() if driver["ref"] else b""
            chunk = text[offset : offset + max_bytes]
            return chunk, offset + len(chunk)
        try:
            with open(driver["log_path"], "rb") as log:
                log.seek(offset)
                chunk = log.read(max_bytes)
        except FileNotFoundError:
            chunk = b""
        return chunk, offset + len(chunk)

    # -- drivers ----------------------------------------------------------------------------

    def _ray(self) -> Any:
        if self._ray_client is None:
            from ray.job_submission import JobSubmissionClient

            self._ray_client = JobSubmissionClient(self.settings.ray_address)
        return self._ray_client

    def _launch(self, job_id: str) -> None:
        spec = self.catalog.job_spec(job_id)
        job_dir = self.settings.job_dir(job_id).resolve()
        job_dir.mkdir(parents=True, exist_ok=True)
        spec_file = job_dir / SPEC_NAME
        write_text(spec_file, spec.model_dump_json(indent=2))
        ray = bool(self.settings.ray_address)
        log_path = None if ray else str(job_dir / LOG_NAME)
        host = self.settings.ray_address if ray else self.host
        driver_id = self.catalog.claim_job(job_id, "ray" if ray else "process", host, log_path)
        command = [sys.executable, "-m", "services.cli.main", "run", "--spec-file", str(spec_file)]
        try:
            if ray:
                ref = self._ray().submit_job(
                    entrypoint=" ".join(["python", *command[1:]]),
                    submission_id=f"curate-{job_id}-{driver_id}",
                    runtime_env={
                        "env_vars": {
                            **driver_env(self.settings, ray=True),
                            # Ray's default 3 s between SIGTERM and SIGKILL is too short for a
                            # clean stop that records what was committed.
                            "RAY_JOB_STOP_SIGNAL_TIMEOUT_S": str(int(self.service.cancel_grace_s)),
                        }
                    },
                )
                child = None
            else:
                with open(log_path, "ab") as log:
                    child = subprocess.Popen(
                        command,
                        env={**os.environ, **driver_env(self.settings)},
                        stdin=subprocess.DEVNULL,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                    )
                ref = f"{child.pid}:{_start_ticks(child.pid)}"
        except Exception as error:
            self.catalog.driver_stopped(
                job_id, driver_id, f"the job's driver did not start: {error}"
            )
            raise InternalError(f"could not start the driver of job {job_id}: {error}") from error
        self.catalog.set_driver_ref(job_id, driver_id, ref)
        if child is not None:
            with self._lock:
                self._children[job_id] = child
            threading.Thread(
                target=self._reap, args=(job_id, driver_id, child, log_path), daemon=True
            ).start()
        driver = self.catalog.job_driver(job_id)
        if driver and driver["status"] == "cancelling" and driver["driver_id"] == driver_id:
            self._stop(driver)  # cancelled while it was starting

    def _reap(self, job_id: str, driver_id: str, child: subprocess.Popen, log_path: str) -> None:
        """Wait for a child driver; then end what is left of its process group (its local Ray)
        and, if it did not record how the job ended, record it."""
        # Waited for without reaping: the pid (and so the group id) cannot be reused meanwhile.
        os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)
        try:
            os.killpg(child.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        code = child.wait()
        self.catalog.driver_stopped(
            job_id, driver_id, f"the job's driver stopped ({_exit(code)}){_last_words(log_path)}"
        )
        with self._lock:
            if self._children.get(job_id) is child:
                del self._children[job_id]

    def _stop(self, driver: dict[str, Any]) -> None:
        """Ask the driver to stop cleanly; kill its group if it is still there after the grace."""
        if driver["kind"] == "ray":
            self._ray().stop_job(driver["ref"])
            return
        pid = int(driver["ref"].split(":")[0])
        if self._gone(driver):
            return
        os.kill(pid, signal.SIGTERM)
        timer = threading.Timer(self.service.cancel_grace_s, self._kill, args=(driver,))
        timer.daemon = True
        timer.start()

    def _kill(self, driver: dict[str, Any]) -> None:
        if not self._gone(driver):
            try:
                os.killpg(int(driver["ref"].split(":")[0]), signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass

    def _gone(self, driver: dict[str, Any]) -> bool:
        """Whether the driver is known to have ended (False when it cannot be told)."""
        if driver["ref"] is None:
            started = driver["started_at"].replace(tzinfo=UTC)
            return (datetime.now(UTC) - started).total_seconds() > _START_GRACE_S
        if driver["kind"] == "ray":
            try:
                return self._ray().get_job_status(driver["ref"]).is_terminal()
            except Exception:  # the cluster cannot be asked: nothing can be concluded
                return False
        if driver["host"] != self.host:
            return False  # another machine's process: only that machine can tell
        pid, ticks = driver["ref"].split(":")
        return _start_ticks(int(pid)) != ticks

    def reconcile(self, job_id: str | None = None) -> None:
        """Record as ended the active jobs (one, or all) whose driver is gone. A child of this
        service is left to its reaper, which knows its exit status."""
        if job_id is None:
            drivers = self.catalog.active_drivers()
        else:
            driver = self.catalog.job_driver(job_id)
            drivers = [driver] if driver and driver["status"] in ACTIVE else []
        for driver in drivers:
            with self._lock:
                child = self._children.get(driver["job_id"])
            if child is not None or not self._gone(driver):
                continue
            what = "pid " + driver["ref"].split(":")[0] if driver["ref"] else "it never started"
            if driver["kind"] == "ray":
                what = f"Ray job {driver['ref']}"
            self.catalog.driver_stopped(
                driver["job_id"],
                driver["driver_id"],
                f"the job's driver stopped ({what} is gone){_last_words(driver['log_path'])}",
            )
