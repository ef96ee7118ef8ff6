"""Where a study's independent tasks run: in this process, or on a Dask cluster.

A study (verification: one task per (image, dtype)) hands :meth:`Executor.run` a task
function, one *shared* object (the network and the settings, identical for every task), the
tasks, and a callback.  The executor calls ``fn(shared, *task.args)`` for every task and
passes each result to the callback **in the driver process, as it arrives** — so the driver
alone writes result files (atomically, :mod:`linop.studies.store`) and no shared file system
is needed.

* :class:`SerialExecutor` — in-process, in order (the default; exactly the old behaviour).
* :class:`DaskExecutor` — ``dask.distributed`` (optional extra ``linop-cnn[distributed]``):

  - ``scheduler="local"`` starts a ``LocalCluster`` of ``workers`` single-threaded worker
    processes (``threads_per_worker=1``, ``processes=True``, :data:`LOCAL_CLUSTER_CONFIG`:
    glibc's own allocator thresholds, no statistical profiler, a slower event-loop tick — so a
    worker computes as fast as a plain process) and closes it afterwards;
  - an address (``tcp://host:8786``) connects to a running scheduler (short connect timeout;
    unreachable → :class:`ConnectionError`);
  - a ``distributed.Client`` is used as given (and left open).

  The shared object is sent once to every worker (``client.scatter(..., broadcast=True)``
  under a key derived from its content hash); each task is submitted under its own
  content-derived key with ``pure=True`` and ``retries``, so identical tasks are computed once;
  a task calls ``torch.set_num_threads(1)`` (one image per single-threaded process is the
  fastest layout measured, and makes results independent of the worker's core count).
  A task whose worker died ``distributed.scheduler.allowed-failures`` times
  (``KilledWorker``) ends the run with :class:`WorkerLost` naming it — after every other
  task's result was handed to the callback, so nothing finished is lost.
"""
from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "CONNECT_TIMEOUT",
    "INSTALL_HINT",
    "LOCAL_CLUSTER_CONFIG",
    "DaskExecutor",
    "Executor",
    "SerialExecutor",
    "Task",
    "WorkerLost",
    "make_executor",
    "run_tasks",
]

INSTALL_HINT = "distributed execution needs Dask: install linop-cnn[distributed] (pip install dask distributed)"

#: seconds to wait for a scheduler at an address before giving up
CONNECT_TIMEOUT = 5.0

#: Dask settings of a LocalCluster this module starts (``DaskExecutor.local``), so that a worker
#: computes an image as fast as a plain single-threaded process (measured on VGG7 float32, CPU
#: time of a worker per image: 1.75 s with Dask's defaults, 1.40 s with these; in-process 1.38 s):
#:
#: * ``pre-spawn-environ.MALLOC_TRIM_THRESHOLD_`` unset (Dask sets 65536 to hand freed memory
#:   back to the OS at once).  Setting any glibc malloc threshold switches off glibc's dynamic
#:   mmap threshold, so every allocation ≥ 128 KiB — the sweep's tangent batches, freed and
#:   reallocated layer after layer — becomes a fresh ``mmap`` whose pages fault in and are
#:   zeroed again: 277 k instead of 165–188 k minor page faults and +0.2 s system time per
#:   VGG7 image.  A value the user exported in the driver's environment is still inherited.
#: * ``worker.profile.enabled`` off: Dask's statistical profiler samples the running task's
#:   stack every 10 ms under the GIL (≈ +0.1 s user time per VGG7 image); the dashboard's
#:   profile page stays empty.
#: * ``admin.tick.interval`` 500 ms (Dask: 20 ms): the event-loop health check of every server
#:   (scheduler, nannies, workers); an idle 2-worker cluster's driver process went from 4.0 % to
#:   1.6 % of a core, each worker from 1.7 % to 0.65 %.  Blocked-loop warnings still come after
#:   ``admin.tick.limit`` (3 s).
#: * ``worker.memory.monitor-interval`` 1 s (Dask: 100 ms): each nanny — an object in the
#:   driver's process — and each worker read the worker's memory with psutil ten times a second;
#:   with 1 s an idle 2-worker cluster's driver went from 1.8 % to 1.0 % of a core and each
#:   worker from 0.75 % to 0.35 %; with ``admin.system-monitor.interval`` 2 s as well (Dask:
#:   500 ms), from 1.3 % to 0.7 % and 0.6 % to 0.25 % in a second measurement (the CPU a study's
#:   driver takes from the workers on a machine with one core per worker).
#:   A worker past the memory limit is still stopped, within a second.
#:
#: A cluster the user runs (an address, a Client) keeps its own configuration.
LOCAL_CLUSTER_CONFIG: dict[str, Any] = {
    "distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None,
    "distributed.worker.profile.enabled": False,
    "distributed.admin.tick.interval": "500ms",
    "distributed.worker.memory.monitor-interval": "1s",
    "distributed.admin.system-monitor.interval": "2s",
}


class WorkerLost(RuntimeError):
    """A task's worker died repeatedly (Dask's ``KilledWorker``); results that finished are kept."""


@dataclass(frozen=True)
class Task:
    """One unit of work: ``key`` (content-derived, unique per distinct computation),
    ``label`` (how errors name it, e.g. ``"image 17 (float32)"``) and ``args`` passed to the
    task function after the shared object."""

    key: str
    label: str
    args: tuple = field(default_factory=tuple)


def _in_worker(fn: Callable, shared: Any, *args: Any) -> Any:
    """Run one task single-threaded (the worker side of :class:`DaskExecutor`)."""
    import torch

    torch.set_num_threads(1)
    return fn(shared, *args)


class Executor:
    """Runs tasks and hands each result to ``on_result(task, result)`` in the caller's process."""

    name = "executor"

    def run(self, fn: Callable[..., Any], shared: Any, shared_key: str, tasks: Sequence[Task],
            on_result: Callable[[Task, Any], None], progress: bool = False, desc: str = "tasks") -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Release what the executor started (a local cluster)."""

    def __enter__(self) -> Executor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @staticmethod
    def _bar(n: int, progress: bool, desc: str):
        from tqdm.auto import tqdm

        return tqdm(total=n, desc=desc, unit="task", disable=not progress, file=sys.stderr)


class SerialExecutor(Executor):
    """Every task in this process, in order (torch's thread setting left as it is)."""

    name = "serial"

    def run(self, fn, shared, shared_key, tasks, on_result, progress=False, desc="tasks"):
        with self._bar(len(tasks), progress, desc) as bar:
            for t in tasks:
                on_result(t, fn(shared, *t.args))
                bar.update(1)

    def describe(self) -> str:
        return "serial (in-process)"


class DaskExecutor(Executor):
    """Tasks on a Dask cluster (see the module docstring); results gathered as they complete."""

    name = "dask"

    def __init__(self, client: Any, cluster: Any = None, retries: int = 2):
        self.client, self.cluster, self.retries = client, cluster, int(retries)
        self.n_local = 0  # > 0: a LocalCluster of that many workers, started on first use
        self._owns_client = False  # a client we connected (closed by close()), not a user's
        self._address: str | None = None

    # ------------------------------------------------------------------ construction
    @classmethod
    def local(cls, workers: int, retries: int = 2, environ: dict[str, Any] | None = None) -> DaskExecutor:
        """A ``LocalCluster`` of ``workers`` single-threaded worker processes, started when
        the first task is submitted (a rerun with nothing missing starts none).  ``environ``:
        extra environment variables set before the workers spawn (``None`` unsets one), e.g.
        :func:`linop.studies.heap.worker_environ`."""
        ex = cls(None, None, retries)
        ex.n_local = int(workers)
        ex.environ = dict(environ or {})
        return ex

    def start(self) -> Any:
        """Start the ``LocalCluster`` of :meth:`local` now (no-op otherwise); return the client."""
        if self.client is None and self.n_local:
            self._start_local()
        return self.client

    def _start_local(self) -> None:
        import dask
        from distributed import Client, LocalCluster

        environ = getattr(self, "environ", {})
        config = dict(LOCAL_CLUSTER_CONFIG)
        config.update({f"distributed.nanny.pre-spawn-environ.{k}": v for k, v in environ.items()})
        # a nanny exports its pre-spawn environment into *this* process before it spawns; put the
        # driver's own values back once the workers run (a restarted worker gets them again)
        before = {k: os.environ.get(k) for k in set(environ) | {"MALLOC_TRIM_THRESHOLD_"}}
        # Dask lets this process's environment override pre-spawn-environ (and an earlier
        # cluster's nanny may have exported its own values here): set the ones asked for
        os.environ.update({k: str(v) for k, v in environ.items() if v is not None})
        try:
            with dask.config.set(config):  # read by the nannies, handed to their workers
                cluster = LocalCluster(n_workers=self.n_local, threads_per_worker=1, processes=True,
                                       dashboard_address=":0", silence_logs=40)
        finally:
            for k, v in before.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        try:
            self.client = Client(cluster, set_as_default=False)
        except BaseException:
            cluster.close()
            raise
        self.cluster = cluster

    @classmethod
    def connect(cls, address: str, retries: int = 2, timeout: float | None = None) -> DaskExecutor:
        """A client of the running scheduler at ``address``; :class:`ConnectionError` when none
        answers within ``timeout`` seconds."""
        from distributed import Client

        timeout = CONNECT_TIMEOUT if timeout is None else float(timeout)
        try:
            client = Client(address, timeout=timeout, set_as_default=False)
        except (OSError, TimeoutError) as exc:
            raise ConnectionError(f"scheduler {address!r}: no Dask scheduler reachable there within "
                                  f"{timeout:g} s ({type(exc).__name__}); start one (dask scheduler) or "
                                  "use scheduler='local'") from None
        ex = cls(client, None, retries)
        ex._owns_client = True
        return ex

    def describe(self) -> str:
        """Where the tasks run (valid after :meth:`close` too)."""
        if self.n_local:
            return f"dask (LocalCluster, {self.n_local} single-threaded worker process(es))"
        if self._address is None and self.client is not None:
            self._address = str(getattr(self.client.scheduler, "address", "?"))
        return f"dask (scheduler {self._address})"

    def close(self) -> None:
        self.describe()  # remember the address before the client goes
        if self.cluster is not None:  # only what we started; a user's client stays open
            self.client.close()
            self.cluster.close()
            self.client = self.cluster = None
        elif self.client is not None and self.n_local == 0 and self._owns_client:
            self.client.close()
            self.client = None

    # ------------------------------------------------------------------ running
    def run(self, fn, shared, shared_key, tasks, on_result, progress=False, desc="tasks"):
        from asyncio import CancelledError as AsyncCancelled
        from concurrent.futures import CancelledError as FuturesCancelled

        from distributed import as_completed
        from distributed.scheduler import KilledWorker

        if not tasks:
            return
        client = self.start()
        shared_f = client.scatter({shared_key: shared}, broadcast=True, hash=False)[shared_key]
        futures = {client.submit(_in_worker, fn, shared_f, *t.args, key=t.key, pure=True, retries=self.retries): t
                   for t in tasks}
        lost: list[str] = []
        try:
            with self._bar(len(tasks), progress, desc) as bar:
                for fut in as_completed(list(futures), loop=client.loop):
                    t = futures[fut]
                    try:
                        res = fut.result()
                    except (KilledWorker, FuturesCancelled, AsyncCancelled):
                        # the worker died allowed-failures times, or the scheduler gave the
                        # task up with it (e.g. its input lost with the worker)
                        lost.append(t.label)
                        bar.update(1)
                        continue
                    on_result(t, res)
                    fut.release()
                    bar.update(1)
        finally:
            for fut in futures:  # nothing left running for a driver that gave up
                if not fut.done():
                    fut.cancel()
            shared_f.release()
        if lost:
            lost.sort()
            names = ", ".join(lost[:5]) + (f" and {len(lost) - 5} more" if len(lost) > 5 else "")
            raise WorkerLost(f"{names}: the worker running {'it' if len(lost) == 1 else 'them'} died repeatedly "
                             "(Dask KilledWorker); every other result is kept — check the workers' memory limit "
                             "and rerun to resume")


def _is_client(obj: Any) -> bool:
    return type(obj).__name__ == "Client" and type(obj).__module__.startswith("distributed")


def make_executor(executor: Any = None, workers: int | None = None, retries: int = 2,
                  connect_timeout: float | None = None, environ: dict[str, Any] | None = None) -> Executor:
    """The executor of a study's ``executor=`` / ``workers=`` options.

    Parameters
    ----------
    executor : None or ``"serial"`` (in-process), ``"local"`` (a new LocalCluster),
        a scheduler address (``"tcp://host:8786"``, ``"host:8786"``), a
        ``distributed.Client`` or an :class:`Executor`.
    workers : worker processes of ``"local"`` (default: the number of CPU cores); not
        allowed with the other choices (the cluster's size is its own).
    environ : extra environment of the worker processes of ``"local"`` (see
        :meth:`DaskExecutor.local`); ignored by the other choices.

    Raises
    ------
    ValueError : a bad choice or worker count.
    ImportError : Dask requested but not installed (the message says how to install it).
    ConnectionError : an address where no scheduler answers within ``connect_timeout``.
    """
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise ValueError(f"workers must be a positive integer, got {workers!r}")
    if isinstance(executor, Executor):
        return executor
    if executor is None or executor == "serial":
        if workers not in (None, 1):
            raise ValueError(f"workers={workers} needs executor='local' (serial runs one task at a time)")
        return SerialExecutor()
    if _is_client(executor):
        if workers is not None:
            raise ValueError("workers applies to executor='local' only; a given Client has its own workers")
        return DaskExecutor(executor, None, retries)
    if not isinstance(executor, str) or not executor.strip():
        raise ValueError(f"executor must be None, 'serial', 'local', a scheduler address or a "
                         f"distributed.Client, got {executor!r}")
    if executor != "local" and ":" not in executor:
        raise ValueError(f"executor / --scheduler {executor!r}: give 'local' or a scheduler address "
                         "such as tcp://host:8786")
    try:
        import distributed  # noqa: F401
    except ImportError:
        raise ImportError(INSTALL_HINT) from None
    if executor == "local":
        return DaskExecutor.local(workers or os.cpu_count() or 1, retries, environ)
    if workers is not None:
        raise ValueError("workers applies to executor='local' only; a running scheduler has its own workers")
    return DaskExecutor.connect(executor, retries, CONNECT_TIMEOUT if connect_timeout is None else connect_timeout)


def run_tasks(fn: Callable[..., Any], shared: Any, shared_key: str, tasks: Iterable[Task],
              on_result: Callable[[Task, Any], None], executor: Any = None, workers: int | None = None,
              progress: bool = False, desc: str = "tasks") -> float:
    """:func:`make_executor`, run, close what was started; returns the wall time in seconds."""
    t0 = time.perf_counter()
    ex = make_executor(executor, workers)
    try:
        ex.run(fn, shared, shared_key, list(tasks), on_result, progress, desc)
    finally:
        if ex is not executor:
            ex.close()
    return time.perf_counter() - t0
