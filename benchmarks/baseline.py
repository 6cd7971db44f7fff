"""The original example's algorithm and serving, rebuilt as the benchmark's baseline.

Flask's development server, a RedisCluster client, SCAN plus one HGETALL round trip per
customer into one list, and a body printed on every request but the list, as the original
prints them (a POST's and a PUT's request, a GET's customer).
The client is redis-py's own (redis.cluster) unless BASELINE_CLIENT=rediscluster: then
redis-py-cluster's, built as the original builds it (run that in benchmarks/.venv-original,
which has the original's Flask, Flask-RESTful, redis-py-cluster and redis).
"""

import os
import sys
import uuid

from flask import Flask, request
from flask_restful import Api, Resource, abort


def connect():
    """Return the cluster client that BASELINE_CLIENT names."""
    host, port = os.environ["DBHOST"], int(os.environ["DBPORT"])
    if os.environ.get("BASELINE_CLIENT") == "rediscluster":
        from rediscluster import RedisCluster
        # The original's arguments, less TLS and ACL (the loopback cluster has neither).
        return RedisCluster(startup_nodes=[{"host": host, "port": port}],
                            decode_responses=True, skip_full_coverage_check=True)
    from redis.cluster import RedisCluster
    return RedisCluster(host=host, port=port, decode_responses=True)


redis = connect()
app = Flask(__name__)
api = Api(app)


class Customers(Resource):
    def get(self):
        customers = []
        for key in redis.scan_iter("customer:*"):
            customer = redis.hgetall(key)
            customer["id"] = key.split(":", 1)[1]
            customers.append(customer)
        return customers

    def post(self):
        customer = request.get_json()
        print(customer)
        customer_id = str(uuid.uuid4())
        redis.hset("customer:" + customer_id, mapping=customer)
        customer["id"] = customer_id
        return customer, 201


class Customers_ID(Resource):  # noqa: N801 - the original's name
    def get(self, customer_id):
        customer = redis.hgetall("customer:" + customer_id)
        print(customer)
        if not customer:
            abort(404)
        customer["id"] = customer_id
        return customer

    def put(self, customer_id):
        customer = request.get_json()
        print(customer)
        redis.hset("customer:" + customer_id, mapping=customer)
        return "", 204

    def delete(self, customer_id):
        redis.delete("customer:" + customer_id)
        return "", 204


api.add_resource(Customers, "/customers")
api.add_resource(Customers_ID, "/customers/<customer_id>")

if __name__ == "__main__":
    app.run(host="127.0.0.1", port=int(sys.argv[1]))
