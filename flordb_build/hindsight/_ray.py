"""The Ray backend of the replay executor interface (``replay --executor ray``, ``flordb_build[ray]``).

Ray, not a home-made scheduler, because it assigns GPUs per task (``num_gpus`` sets
``CUDA_VISIBLE_DEVICES``), its forced cancel reaches the task's child processes, and it retries
the tasks of lost workers and nodes (design.md, "Execution backends and scale-out").

    driver (RayExecutor)                         each node
    ------------------------------------         -----------------------------------------------
    submit(payload)
      snapshot tar -> ray.put once per sha ----> object store (fetched by the nodes that need it)
      payload without the tar + ObjectRef   ---> _run_on_worker: payload + tar -> job_function
    progress() <- _ProgressBoard actor     <---- progress(done, total), throttled
    completed() <- ray.wait                <---- the job function's reply (or a failure reply)
    cancel() -> ray.cancel(force, recursive)     the worker and its child processes are killed

The backend never writes the store: the driver ingests each reply. ``ray`` is imported only here,
and only when a :class:`RayExecutor` is made, so ``import flordb_build`` never imports it.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import time
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from ..errors import ReplayError

if TYPE_CHECKING:
    import ray

#: The worker function the lead wires in at merge time (i16-interface.md): the one seam.
DEFAULT_JOB_FUNCTION = "flordb_build.hindsight._executors:run_job"
#: The reply type a failure the job function could not report (lost node, cancel) is made of.
DEFAULT_REPLY_TYPE = "flordb_build.hindsight._executors:JobReply"
#: Object store of a local cluster started here: replay payloads are small (snapshots, slices).
LOCAL_OBJECT_STORE_BYTES = 80 * 2**20
#: How often a job's progress reaches the driver at most (each report is an actor call).
PROGRESS_INTERVAL_SECONDS = 0.2
#: Retries of a job whose worker or node died (not of a job whose script failed: that is a reply).
DEFAULT_MAX_RETRIES = 3


class RayPayload(Protocol):
    """What this backend reads of a job payload (``JobPayload`` of _executors.py has it all).

    A payload is a dataclass: the backend ships it without its snapshot tar
    (``dataclasses.replace``) and puts the tar back on the worker.
    """

    @property
    def key(self) -> str: ...
    @property
    def snapshot_sha(self) -> str: ...
    @property
    def snapshot_tar(self) -> bytes: ...
    @property
    def gpus(self) -> float: ...


class RayReply(Protocol):
    """What this backend reads of a job's reply (``JobReply`` of _executors.py)."""

    @property
    def key(self) -> str: ...
    @property
    def ok(self) -> bool: ...


P = TypeVar("P", bound=RayPayload)
Progress = Callable[[int, int], None]
JobFunction = Callable[..., Any]  # (payload, progress, **worker_setup()) -> reply
#: Runs once per Ray worker process; what it returns goes to every job of that worker as keywords.
WorkerSetup = Callable[[], Mapping[str, Any]]
#: Builds the reply of a job that produced none: (key, exit_code, error) -> reply.
FailureReply = Callable[[str, "int | None", str], Any]


def resolve_import_path(path: str) -> Any:
    """The object ``module:attribute`` names.

    :raises ReplayError: the module or attribute is missing.
    """
    module_name, _, attribute = path.partition(":")
    try:
        return getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as exc:
        raise ReplayError(
            f"Could not load the replay job function '{path}': {exc}. Pass an importable 'module:function'."
        ) from exc


def _default_failure_reply(key: str, exit_code: int | None, error: str) -> Any:
    reply_type = resolve_import_path(DEFAULT_REPLY_TYPE)
    return reply_type(key=key, ok=False, exit_code=exit_code, error=error)


def _import_ray() -> Any:
    try:
        import ray
    except ImportError as exc:
        raise ReplayError(
            "'--executor ray' needs Ray, which is not installed. Install it with "
            "pip install 'flordb_build[ray]', or replay with '--executor local'."
        ) from exc
    return ray


class _ProgressBoard:
    """The actor jobs report progress to and the driver polls: key -> (done, total)."""

    def __init__(self) -> None:
        self._progress: dict[str, tuple[int, int]] = {}

    def report(self, key: str, done: int, total: int) -> None:
        self._progress[key] = (done, total)

    def snapshot(self) -> dict[str, tuple[int, int]]:
        return dict(self._progress)

    def drop(self, keys: list[str]) -> None:
        for key in keys:
            self._progress.pop(key, None)


#: Per Ray worker process: what each ``worker_setup`` returned, by its name. A cache on purpose: a
#: worker process runs many jobs one after another, and what the setup made (a warm server pool)
#: lives as long as the worker, whose exit takes its child processes with it.
_WORKER_STATE: dict[str, Mapping[str, Any]] = {}


def _worker_kwargs(setup: WorkerSetup | None) -> Mapping[str, Any]:
    if setup is None:
        return {}
    name = f"{setup.__module__}:{setup.__qualname__}"
    if name not in _WORKER_STATE:
        _WORKER_STATE[name] = setup()
    return _WORKER_STATE[name]


def _with_assigned_gpus(payload: Any) -> Any:
    """The payload with the GPUs Ray gave this task in the environment its child gets.

    Ray sets ``CUDA_VISIBLE_DEVICES`` in the worker's own environment for the task, but the job's
    child is started with the payload's ``env``, made on the driver, which cannot know the
    assignment: without this a ``--device cuda`` replay saw every GPU of its node (or the driver's
    setting) and the jobs of a node all ran on its first GPU. A job that asked for none sees none
    (empty: ``--device auto`` then answers cpu): it kept the driver's or the recorded value, so on a
    node with GPUs it used one nobody reserved, beside the jobs Ray gave it to. The local executor
    does not come here: on one machine a job keeps the user's GPUs.
    """
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    env = getattr(payload, "env", None)
    if env is None:
        return payload
    if payload.gpus <= 0:
        return dataclasses.replace(payload, env={**env, "CUDA_VISIBLE_DEVICES": ""})
    if visible is None:
        return payload
    return dataclasses.replace(payload, env={**env, "CUDA_VISIBLE_DEVICES": visible})


def _run_on_worker(
    job_function: JobFunction, setup: WorkerSetup | None, payload: Any, snapshot_tar: bytes, board: Any
) -> Any:
    """The remote task's body: the payload with its tar back in, run by the job function."""
    kwargs = _worker_kwargs(setup)
    payload = _with_assigned_gpus(dataclasses.replace(payload, snapshot_tar=snapshot_tar))
    key = payload.key
    last = [0.0]

    def progress(done: int, total: int) -> None:
        # One actor call per PROGRESS_INTERVAL_SECONDS at most, and always the last iteration.
        now = time.monotonic()
        if done >= total or now - last[0] >= PROGRESS_INTERVAL_SECONDS:
            last[0] = now
            board.report.remote(key, done, total)

    return job_function(payload, progress, **kwargs)


class RayExecutor:
    """Replay jobs as Ray tasks on a cluster (``address``) or on a local Ray started here.

    :param slots: how many jobs run at once; None: the cluster's CPUs.
    :param address: a running cluster's address (``ray://`` or ``host:port``, as ``ray.init``
        takes it); None starts a local Ray on 127.0.0.1 (no dashboard, usage stats off, a small
        object store) that :meth:`close` stops.
    :param job_function: the worker function, ``(payload, progress) -> reply``, or its import path.
    :param failure_reply: builds the reply of a job that did not produce one (cancelled, node
        lost after the retries, worker crashed): ``(key, exit_code, error) -> reply`` with ok False.
    :param max_retries: retries of a job whose worker or node died.
    :param worker_setup: called once in each Ray worker process (or its import path); the mapping
        it returns is passed to the job function as keyword arguments (e.g. a warm server pool
        that lives as long as the worker).
    :raises ReplayError: Ray is not installed, or the cluster at ``address`` cannot be reached.
    """

    def __init__(
        self,
        slots: int | None = None,
        address: str | None = None,
        *,
        job_function: JobFunction | str = DEFAULT_JOB_FUNCTION,
        failure_reply: FailureReply = _default_failure_reply,
        max_retries: int = DEFAULT_MAX_RETRIES,
        worker_setup: WorkerSetup | str | None = None,
    ) -> None:
        self._ray = _import_ray()
        self._job_function_spec = job_function
        self._job_function: JobFunction | None = None
        self._failure_reply = failure_reply
        self._max_retries = max_retries
        self._worker_setup = resolve_import_path(worker_setup) if isinstance(worker_setup, str) else worker_setup
        self._owns_connection = False
        self._connect(address, slots)
        resources = self._ray.cluster_resources()
        cpus = int(resources.get("CPU", 1))
        #: GPUs the cluster's nodes declare, and the --device auto jobs sent to it (which see none).
        self._declared_gpus = int(resources.get("GPU", 0))
        self._auto_jobs = 0
        self.slots: int = slots if slots is not None else max(1, cpus)
        # num_cpus=0: the board must never take the CPU a job is waiting for; on the driver's node,
        # so losing another node never loses the progress of the jobs still running.
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        here = NodeAffinitySchedulingStrategy(node_id=self._ray.get_runtime_context().get_node_id(), soft=True)
        self._board = self._ray.remote(num_cpus=0, scheduling_strategy=here)(_ProgressBoard).remote()
        self._task = self._ray.remote(_run_on_worker)
        self._blobs: dict[str, ray.ObjectRef] = {}
        #: sha -> how many times its tar was put into the object store (1 each: the tests check it).
        self.blob_puts: dict[str, int] = {}
        self._pending: dict[ray.ObjectRef, str] = {}
        self._cancelled = False

    def _connect(self, address: str | None, slots: int | None) -> None:
        ray = self._ray
        if ray.is_initialized():
            return  # the caller's connection (a test's cluster, a notebook): theirs to shut down
        if address is not None:
            try:
                ray.init(address=address, log_to_driver=False, configure_logging=False)
            except (ConnectionError, RuntimeError, ValueError) as exc:
                raise ReplayError(
                    f"Could not connect to the Ray cluster at '{address}': {exc}. Check the address "
                    "('ray status' on its head node prints it), or omit --address for a local Ray."
                ) from exc
            self._owns_connection = True
            return
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        ray.init(
            num_cpus=slots if slots is not None else os.cpu_count(),
            include_dashboard=False,
            object_store_memory=LOCAL_OBJECT_STORE_BYTES,
            _node_ip_address="127.0.0.1",
            log_to_driver=False,
            configure_logging=False,
        )
        self._owns_connection = True

    def _resolved_job_function(self) -> JobFunction:
        if self._job_function is None:
            spec = self._job_function_spec
            self._job_function = resolve_import_path(spec) if isinstance(spec, str) else spec
        return self._job_function

    def _blob(self, payload: RayPayload) -> ray.ObjectRef:
        # One put per snapshot: every job of that version gets the same ObjectRef, and each node
        # fetches the tar once into its object store however many of its jobs read it.
        ref = self._blobs.get(payload.snapshot_sha)
        if ref is None:
            ref = self._ray.put(payload.snapshot_tar)
            self._blobs[payload.snapshot_sha] = ref
            self.blob_puts[payload.snapshot_sha] = self.blob_puts.get(payload.snapshot_sha, 0) + 1
        return ref

    def submit(self, payload: RayPayload) -> None:
        """Queue one job; Ray runs it when a node has a CPU (and the GPU it asks for) free."""
        if self._cancelled:
            raise ReplayError(f"Cannot submit job '{payload.key}': this executor was cancelled. Make a new one.")
        job_function = self._resolved_job_function()
        blob = self._blob(payload)
        light = dataclasses.replace(payload, snapshot_tar=b"")  # type: ignore[type-var]
        ref = self._task.options(
            num_cpus=1, num_gpus=payload.gpus, max_retries=self._max_retries, retry_exceptions=False,
            name=f"flordb-build replay {payload.key}",
        ).remote(job_function, self._worker_setup, light, blob, self._board)
        self._pending[ref] = payload.key
        if payload.gpus <= 0 and getattr(getattr(payload, "spec", None), "device", None) == "auto":
            self._auto_jobs += 1

    def completed(self) -> Iterator[Any]:
        """Each job's reply as its job ends; ends when every submitted job has replied."""
        ray = self._ray
        while self._pending:
            ready, _ = ray.wait(list(self._pending), num_returns=1)
            for ref in ready:
                key = self._pending.pop(ref)
                reply = self._reply_of(ref, key)
                self._board.drop.remote([key])
                yield reply

    def _reply_of(self, ref: ray.ObjectRef, key: str) -> Any:
        ray = self._ray
        exceptions = ray.exceptions
        try:
            return ray.get(ref)
        except exceptions.TaskCancelledError:
            return self._failure_reply(key, -9, f"job '{key}' was cancelled; its processes were killed")
        except exceptions.OutOfMemoryError as exc:
            return self._failure_reply(key, -9, f"job '{key}' was killed by Ray's memory monitor: {exc}")
        except (exceptions.WorkerCrashedError, exceptions.NodeDiedError, exceptions.ObjectLostError) as exc:
            return self._failure_reply(
                key, None, f"job '{key}' lost its worker or node {self._max_retries + 1} times: {exc}"
            )
        except exceptions.RayTaskError as exc:
            # The job function raised: a flordb_build failure on the worker, not the script's.
            return self._failure_reply(key, None, f"job '{key}' failed on its worker: {exc}")
        except exceptions.RayError as exc:
            return self._failure_reply(key, None, f"job '{key}' failed in Ray: {exc}")

    def progress(self) -> Mapping[str, tuple[int, int]]:
        """key -> (iterations done, total) of the running jobs that reported progress."""
        if not self._pending:
            return {}
        try:
            board = self._ray.get(self._board.snapshot.remote())
        except self._ray.exceptions.RayActorError:
            return {}  # the driver's node lost its board: the jobs still reply, without progress
        running = set(self._pending.values())
        return {key: value for key, value in board.items() if key in running}

    def cancel(self) -> None:
        """Kill every running job and its child processes; drop the queued ones.

        Their replies (ok False, exit code -9) still come out of :meth:`completed`.
        """
        self._cancelled = True
        for ref in list(self._pending):
            # force: the worker process exits, and Ray kills its child processes with it
            # (a replay child, and what that child started); recursive: tasks it submitted.
            self._ray.cancel(ref, force=True, recursive=True)

    def close(self) -> tuple[str, ...]:
        """Release the cluster: stop the local Ray started here, or disconnect; notes for the report."""
        ray = self._ray
        notes: list[str] = []
        if self._pending:
            self.cancel()
            notes.append(f"ray: {len(self._pending)} unfinished job(s) cancelled at close")
            self._pending.clear()
        if self._auto_jobs and self._declared_gpus:
            notes.append(
                f"ray: {self._auto_jobs} --device auto job(s) ran on the CPU though the cluster's nodes declare "
                f"{self._declared_gpus} GPU(s): a job that asks Ray for no GPU sees none; ask for --device cuda "
                "to use them"
            )
        shipped = sum(self.blob_puts.values())
        if shipped:
            notes.append(f"ray: {shipped} snapshot(s) shipped to the cluster's object store")
        if ray.is_initialized():
            ray.kill(self._board)
            if self._owns_connection:
                ray.shutdown()  # stops the local Ray started here; from a cluster: disconnects
        return tuple(notes)
