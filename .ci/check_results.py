"""Fail unless the test run included real-cluster tests and skipped none."""

import sys
import xml.etree.ElementTree as ET

cases = list(ET.parse(sys.argv[1]).iter("testcase"))
skipped = [case.get("name") for case in cases if case.find("skipped") is not None]
cluster = [case for case in cases if "[cluster" in case.get("name", "")
           or case.get("classname", "").split(".")[-1] in ("test_outage", "test_embedded")]
print(f"{len(cases)} tests, {len(cluster)} on real Redis processes, {len(skipped)} skipped")
if skipped:
    sys.exit(f"skipped in CI: {skipped}")
if not cluster:
    sys.exit("no real-cluster test ran")
