"""Time GET /healthz every 20 ms from a process of its own: python healthz_probe.py URL SECONDS.

Prints one JSON list of [seconds since the epoch at the start, seconds taken or null]. A
process of its own, so that the load's client threads cannot delay its requests.
"""

import http.client
import json
import sys
import time
from urllib.parse import urlsplit

INTERVAL = 0.02


def probe(url: str, seconds: float) -> list:
    """Return when each GET /healthz started and how long it took (None: failed or over 10 s)."""
    parts = urlsplit(url)
    samples, deadline = [], time.monotonic() + seconds
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    while time.monotonic() < deadline:
        began, wall = time.monotonic(), time.time()
        try:
            connection.request("GET", "/healthz")
            response = connection.getresponse()
            response.read()
            samples.append([wall, time.monotonic() - began if response.status == 200 else None])
        except (OSError, http.client.HTTPException):
            samples.append([wall, None])
            connection.close()
        time.sleep(max(0.0, INTERVAL - (time.monotonic() - began)))
    return samples


if __name__ == "__main__":
    print(json.dumps(probe(sys.argv[1], float(sys.argv[2]))))
