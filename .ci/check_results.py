"""Fail unless the test run included real-cluster tests and skipped none."""

import sys
import xml.etree.ElementTree as ET

# Modules that must run in CI: real processes, TLS and ACL users, fault injection.
REQUIRED = ("test_outage", "test_embedded", "test_api_tls_acl", "test_connection",
            "test_faults", "test_embedded_faults", "test_iam_auth", "test_deploy",
            "test_metrics_workers", "test_docs_browser", "test_slow_clients",
            "test_slow_database", "test_idempotency_faults", "test_generated_client",
            "test_foreign_data", "test_make_targets", "test_transfer")

cases = list(ET.parse(sys.argv[1]).iter("testcase"))
skipped = [case.get("name") for case in cases if case.find("skipped") is not None]
modules = {case.get("classname", "").split(".")[-1] for case in cases}
cluster = [case for case in cases if "[cluster" in case.get("name", "")
           or case.get("classname", "").split(".")[-1] in REQUIRED]
print(f"{len(cases)} tests, {len(cluster)} on real Redis processes, {len(skipped)} skipped")
if skipped:
    sys.exit(f"skipped in CI: {skipped}")
if not cluster:
    sys.exit("no real-cluster test ran")
missing = [module for module in REQUIRED if module not in modules]
if missing:
    sys.exit(f"required test modules did not run: {missing}")
