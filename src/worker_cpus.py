"""Run each worker process on a CPU of its own, when there is one CPU for each worker.

A request changes threads several times (granian's I/O thread, a Python thread, the GIL, the
Redis reply); kept on one CPU, a worker's threads wake where they run. On a 2-CPU machine the
service served 25% to 39% more requests a second, at less CPU each (docs/performance.md).
"""

import logging
import multiprocessing
import os

log = logging.getLogger(__name__)
LOCK_SECONDS = 5


def service_process(pid: int, parent: int) -> bool:
    """Tell whether pid is the main process (parent) or a running worker of it (Linux): a
    worker that has ended is gone or a zombie, and its pid may since name another program."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            state, ppid = stat.read().rsplit(")", 1)[1].split()[:2]
    except (OSError, ValueError):
        return False
    return state not in ("Z", "X") and parent in (pid, int(ppid))


class WorkerCpus:
    """The CPUs the service may run on, one for each worker, claimed by the workers."""

    def __init__(self, cpus: list[int]):
        self.cpus = cpus
        # Made before the workers are forked and shared with them: for each CPU, the pid of
        # the worker on it and when it claimed it (a count of claims).
        self._owners = multiprocessing.RawArray("q", 2 * len(cpus))
        self._lock = multiprocessing.Lock()

    @classmethod
    def for_workers(cls, workers: int, enabled: bool = True) -> "WorkerCpus | None":
        """Return the CPUs to run the workers on, or None when they are left to the kernel."""
        if not enabled or not hasattr(os, "sched_setaffinity"):
            return None
        cpus = sorted(os.sched_getaffinity(0))
        if workers < 2 or len(cpus) != workers:
            log.info("%d worker(s) for %d CPU(s): the kernel places the workers", workers,
                     len(cpus))
            return None
        return cls(cpus)

    def claim(self) -> int | None:
        """Take a CPU for this worker: one whose worker has ended, else the one claimed longest
        ago (a worker started while all run, as on SIGHUP, replaces the oldest); None when
        the claims stay locked."""
        owners, count = self._owners, len(self.cpus)
        # A worker killed while it held the lock would hold it for good: its successors go on.
        if not self._lock.acquire(timeout=LOCK_SECONDS):
            return None
        try:
            parent = os.getppid()
            free = [at for at in range(count)
                    if not service_process(owners[2 * at], parent)]
            at = free[0] if free else min(range(count), key=lambda at: owners[2 * at + 1])
            owners[2 * at], owners[2 * at + 1] = os.getpid(), max(owners[1::2]) + 1
        finally:
            self._lock.release()
        return self.cpus[at]

    def pin_this_worker(self) -> int | None:
        """Run every thread of this process, and those it starts later, on a CPU of its own."""
        cpu = self.claim()
        if cpu is None:
            log.warning("worker %d left to the kernel: the CPUs' claims stayed locked for %d s",
                        os.getpid(), LOCK_SECONDS)
            return None
        try:
            for thread in os.listdir("/proc/self/task"):
                os.sched_setaffinity(int(thread), {cpu})
        except OSError as error:
            log.warning("worker %d left to the kernel: cannot run it on CPU %d: %s",
                        os.getpid(), cpu, error)
            return None
        log.info("worker %d runs on CPU %d", os.getpid(), cpu)
        return cpu
