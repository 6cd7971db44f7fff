"""Bounded memory per request: a worker does not grow with the shapes of the customers it serves."""

import psutil
import pytest

from http_client import call
from service_process import ServiceProcess


def resident_megabytes(process: psutil.Process) -> float:
    """Return the resident memory of a process and its children, in MB."""
    return sum(part.memory_info().rss for part in [process, *process.children()]) / 2**20


@pytest.mark.cluster
def test_new_shapes_of_max_fields_fields_do_not_grow_a_worker(empty_redis_cluster):
    env = {**empty_redis_cluster.service_env(), "WORKERS": "1", "THREADS": "2",
           "LOG_LEVEL": "WARNING"}
    with ServiceProcess(env) as service:
        workers = psutil.Process(service.process.pid).children()
        assert len(workers) == 1

        def cycle(shape: int):
            fields = {f"shape{shape}-field{n}": n for n in range(1000)}
            url = f"{service.url}/customers/shape{shape}"
            assert call(url, "PUT", fields)[0] == 201
            assert len(call(url)[2]) == 1001
            assert len(call(f"{service.url}/customers")[2][0]) == 1001
            assert call(url, "DELETE")[0] == 204

        for shape in range(5):  # the allocator's and the caches' first growth
            cycle(shape)
        before = resident_megabytes(workers[0])
        for shape in range(5, 65):
            cycle(shape)
        grown = resident_megabytes(workers[0]) - before
    print(f"\nworker grew {grown:.1f} MB over 60 shapes of 1,000 fields")
    assert grown <= 50
