"""deploy/: the CloudFormation template lints clean; the systemd unit is verified and sandboxed."""

import configparser
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from cfnlint.decode import decode

from local_cluster import APP_ACCESS
from settings import load_config

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
TEMPLATE = DEPLOY / "customers-service.yaml"
UNIT = DEPLOY / "customers-service.service"
MAX_EXPOSURE = 2.5


@pytest.fixture(scope="module")
def template() -> dict:
    """The template as CloudFormation reads it."""
    decoded, problems = decode(str(TEMPLATE))
    assert problems == []
    return decoded


@pytest.fixture(scope="module")
def unit() -> configparser.ConfigParser:
    """The unit's settings (the last one of a repeated name)."""
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str
    parser.read(UNIT)
    return parser


@pytest.fixture(scope="module")
def systemd_analyze() -> str:
    """systemd-analyze from Debian's systemd package (.ci/run installs it)."""
    found = shutil.which("systemd-analyze")
    if found:
        return found
    message = "no systemd-analyze: apt-get install systemd (.ci/run does)"
    if os.environ.get("CI"):
        pytest.fail(message)  # CI must check the unit, never skip it
    pytest.skip(message)


def user_data(template: dict) -> str:
    """Return the hosts' start-up script, before substitution."""
    data = template["Resources"]["HostTemplate"]["Properties"]["LaunchTemplateData"]
    return data["UserData"]["Fn::Base64"]["Fn::Sub"][0]


def test_cfn_lint_passes_with_no_error_or_warning():
    linter = Path(sys.executable).with_name("cfn-lint")
    result = subprocess.run([str(linter), str(TEMPLATE)], capture_output=True, text=True,
                            timeout=120)
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def test_the_clusters_user_has_the_test_clusters_access_string_and_iam_authentication(template):
    user = template["Resources"]["ServiceUser"]["Properties"]
    assert user["AccessString"] == APP_ACCESS
    assert user["AuthenticationMode"] == {"Type": "iam"}
    assert template["Resources"]["Cluster"]["Properties"]["TLSEnabled"] is True


def test_the_hosts_may_connect_to_that_cluster_as_that_user_only(template):
    statements = template["Resources"]["HostRole"]["Properties"]["Policies"][0][
        "PolicyDocument"]["Statement"]
    assert statements == [{"Effect": "Allow", "Action": "memorydb:Connect",
                           "Resource": [{"Fn::GetAtt": ["Cluster", "ARN"]},
                                        {"Fn::GetAtt": ["ServiceUser", "Arn"]}]}]


def test_the_hosts_configuration_is_one_the_service_accepts(template):
    script = user_data(template)
    env_file = re.search(r"cat >/etc/customers-service/env <<EOF\n(.*?)\nEOF", script, re.S)
    placeholders = {"${Endpoint}": "clustercfg.example", "${ServiceUser}": "customers-service",
                    "${ClusterName}": "customers", "${AWS::Region}": "eu-west-1"}
    env = {}
    for line in env_file.group(1).splitlines():
        name, _, value = line.partition("=")
        env[name] = placeholders.get(value, value)
    config = load_config(env)
    assert (config.db_auth, config.db_tls, config.db_host) == ("iam", True, "clustercfg.example")
    assert "install -m 0644 deploy/customers-service.service /etc/systemd/system/" in script


def test_the_unit_runs_the_service_the_readmes_way_and_drains_on_sigterm(unit, template):
    service = unit["Service"]
    checkout = service["WorkingDirectory"]
    assert service["ExecStart"] == f"{checkout}/.venv/bin/python src/server.py"
    assert f"git clone --quiet ${{SourceRepository}} {checkout}\n" in user_data(template)
    assert service["EnvironmentFile"] in user_data(template)
    assert (service["Restart"], service["KillSignal"], service["KillMode"]) == (
        "on-failure", "SIGTERM", "mixed")
    assert int(service["TimeoutStopSec"]) > 20  # granian's drain (serving.py) ends first
    assert (service["User"], service["ProtectSystem"], service["NoNewPrivileges"]) == (
        "customers", "strict", "yes")


def test_systemd_analyze_verify_passes(systemd_analyze, tmp_path):
    # A root holding the executable the unit names, and the system's units it depends on.
    executable = tmp_path / "opt/customers-service/.venv/bin/python"
    executable.parent.mkdir(parents=True)
    executable.write_text("#!/bin/sh\n")
    executable.chmod(0o755)
    shutil.copytree("/usr/lib/systemd/system", tmp_path / "usr/lib/systemd/system",
                    symlinks=True)
    (tmp_path / "etc/systemd/system").mkdir(parents=True)
    shutil.copy(UNIT, tmp_path / "etc/systemd/system")
    result = subprocess.run([systemd_analyze, "verify", f"--root={tmp_path}", UNIT.name],
                            capture_output=True, text=True, timeout=60)
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def test_systemd_analyze_security_rates_the_unit_at_most_2_5(systemd_analyze):
    result = subprocess.run([systemd_analyze, "security", "--offline=true", str(UNIT)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    exposure = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    assert float(exposure.group(1)) <= MAX_EXPOSURE, result.stdout
