"""Each worker on a CPU of its own, when there is one CPU for each worker."""

import multiprocessing
import os

import psutil
import pytest

import worker_cpus
from http_client import call
from service_process import ServiceProcess
from worker_cpus import WorkerCpus

FORK = multiprocessing.get_context("fork")
ALLOWED = sorted(os.sched_getaffinity(0))


def claiming(cpus: WorkerCpus, claimed, stop):
    """A worker's stand-in: claim a CPU, say which, and run until told to stop."""
    claimed.put((os.getpid(), cpus.claim()))
    stop.wait(30)


class Workers:
    """Processes forked as granian forks its workers, each claiming a CPU."""

    def __init__(self, cpus: WorkerCpus):
        self.cpus, self.claimed, self.running = cpus, FORK.Queue(), []

    def start(self) -> int:
        """Start one and return the CPU it claimed."""
        stop = FORK.Event()
        process = FORK.Process(target=claiming, args=(self.cpus, self.claimed, stop))
        process.start()
        pid, cpu = self.claimed.get(timeout=10)
        assert pid == process.pid
        self.running.append((cpu, process, stop))
        return cpu

    def end(self, cpu: int) -> None:
        """End the worker that claimed cpu first."""
        for claim in self.running:
            if claim[0] == cpu:
                self.running.remove(claim)
                claim[2].set()
                claim[1].join(10)
                return

    def end_all(self) -> None:
        while self.running:
            self.end(self.running[0][0])


def test_workers_claim_each_cpu_once_and_a_replacement_takes_the_one_freed():
    workers = Workers(WorkerCpus([5, 7, 9]))
    try:
        assert sorted(workers.start() for _ in range(3)) == [5, 7, 9]
        workers.end(7)  # a worker that crashed: granian starts another
        assert workers.start() == 7
    finally:
        workers.end_all()


def test_a_cpu_whose_worker_pid_now_names_another_program_is_free():
    cpus = WorkerCpus([5, 7])
    # The worker on CPU 5 ended long ago, and its pid is now init's: no worker of this service.
    cpus._owners[:] = [1, 1, 0, 0]
    assert cpus.claim() == 5


def test_a_worker_started_while_all_run_takes_the_cpu_claimed_longest_ago():
    # As on SIGHUP: granian starts each new worker before it stops the old one.
    workers = Workers(WorkerCpus([0, 1]))
    try:
        first, second = workers.start(), workers.start()
        assert workers.start() == first
        assert workers.start() == second
    finally:
        workers.end_all()


def test_a_worker_whose_claim_stays_locked_or_whose_cpu_is_refused_is_left_to_the_kernel(
        monkeypatch, caplog):
    before = os.sched_getaffinity(0)
    locked = WorkerCpus(ALLOWED)
    monkeypatch.setattr(worker_cpus, "LOCK_SECONDS", 0.1)
    # As if a worker had been killed while it held the lock.
    assert locked._lock.acquire(timeout=1)
    try:
        assert locked.pin_this_worker() is None
        assert "claims stayed locked" in caplog.text
        # A CPU this process may not use (taken away by the container's cpuset, say).
        assert WorkerCpus([max(ALLOWED) + 4096]).pin_this_worker() is None
        assert "cannot run it on CPU" in caplog.text
        assert os.sched_getaffinity(0) == before
    finally:
        os.sched_setaffinity(0, before)  # the tests after this one start services from here


@pytest.mark.parametrize(("workers", "enabled"), [(len(ALLOWED) + 1, True), (1, True),
                                                  (len(ALLOWED), False)])
def test_without_one_worker_for_each_cpu_or_when_turned_off_the_kernel_places_them(
        workers, enabled):
    assert WorkerCpus.for_workers(workers, enabled) is None


def affinities(service: ServiceProcess) -> dict:
    """Return {process name: [CPUs of each thread]} of the service's processes."""
    found = {}
    for process in (psutil.Process(service.process.pid),
                    *psutil.Process(service.process.pid).children()):
        threads = [os.sched_getaffinity(thread.id) for thread in process.threads()]
        found.setdefault(process.name(), []).append(threads)
    return found


def test_the_service_runs_each_worker_and_all_its_threads_on_a_cpu_of_its_own(tmp_path):
    assert len(ALLOWED) >= 2, "the tests need a machine with 2 CPUs or more"
    service = ServiceProcess({"WORKERS": str(len(ALLOWED)), "DATA_DIR": str(tmp_path / "data"),
                              "LOG_LEVEL": "INFO"}, cwd=tmp_path).start()
    try:
        found = affinities(service)
        assert call(service.url + "/customers/pinned", "PUT", {"name": "Ada"})[0] == 201
    finally:
        service.stop()
    main, *workers = found["python"]
    # The main process keeps every CPU, as does the embedded database.
    assert set(map(frozenset, main)) == {frozenset(ALLOWED)}
    assert set(map(frozenset, found["valkey-server"][0])) == {frozenset(ALLOWED)}
    # Each worker's threads (granian's runtime, the Python request threads) share one CPU.
    assert sorted(next(iter(threads[0])) for threads in workers) == ALLOWED
    for threads in workers:
        assert len(threads) > 2 and len(set(map(frozenset, threads))) == 1
        assert len(threads[0]) == 1
    assert "runs on CPU" in service.printed


def test_the_service_leaves_its_workers_to_the_kernel_when_told(tmp_path):
    service = ServiceProcess({"WORKERS": str(len(ALLOWED)), "PIN_WORKERS": "false",
                              "DATA_DIR": str(tmp_path / "data")}, cwd=tmp_path).start()
    try:
        found = affinities(service)
    finally:
        service.stop()
    for threads in found["python"]:
        assert set(map(frozenset, threads)) == {frozenset(ALLOWED)}
