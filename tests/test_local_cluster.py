"""The tests' own clusters: ports that cannot collide; no node left running by a failed start."""

import random
import socket

import pytest

import local_cluster
from local_cluster import LocalCluster, free_cluster_ports


def test_no_node_gets_a_port_that_is_another_nodes_cluster_bus_port(monkeypatch):
    drawn = iter([20904, 10904, 10905])  # 10904's bus port would be the first node's port
    monkeypatch.setattr(random, "randint", lambda low, high: next(drawn))
    monkeypatch.setattr(local_cluster, "port_free", lambda port: True)
    assert free_cluster_ports(2) == [20904, 10905]


@pytest.mark.cluster
def test_a_cluster_that_fails_to_start_stops_the_nodes_it_started(redis_server_binary,
                                                                   tmp_path):
    cluster = LocalCluster(redis_server_binary, tmp_path)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", cluster.nodes[-1].port))  # bound, not listening: refused
        with pytest.raises(RuntimeError, match="did not start"):
            cluster.start()
    assert all(node.process.poll() is not None for node in cluster.nodes)
