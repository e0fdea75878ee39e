"""The shipped unit file: the directives the operations contract relies on, and
`systemd-analyze verify` when the tool is installed."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

UNIT = Path(__file__).resolve().parent.parent / "systemd" / "viewkeeper.service"
TEMPLATE = UNIT.parent / "viewkeeper@.service"


def parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    """section → key → values in order (keys like LoadCredential= may repeat)."""
    sections: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    current = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = line[1:-1]
            continue
        key, sep, value = line.partition("=")
        assert sep, f"not a key=value line: {raw!r}"
        sections[current][key.strip()].append(value.strip())
    return sections


@pytest.fixture(scope="module")
def service() -> dict[str, list[str]]:
    return parse_unit(UNIT.read_text())["Service"]


REQUIRED = {
    "Type": "notify",
    "NotifyAccess": "main",
    "ExecStart": "/usr/local/bin/viewkeeper run -c /etc/viewkeeper/viewkeeper.yaml",
    "WatchdogSec": "30",
    "Restart": "on-failure",
    "RestartSec": "5",
    "KillMode": "mixed",
    "KillSignal": "SIGTERM",
    "TimeoutStopSec": "60",
    "DynamicUser": "yes",
    "StateDirectory": "viewkeeper",
    "ProtectSystem": "strict",
    "ProtectHome": "yes",
    "NoNewPrivileges": "yes",
    "PrivateTmp": "yes",
    "PrivateDevices": "yes",
    "ProtectKernelTunables": "yes",
    "ProtectKernelModules": "yes",
    "ProtectKernelLogs": "yes",
    "ProtectControlGroups": "yes",
    "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6",
    "RestrictNamespaces": "yes",
    "LockPersonality": "yes",
    "MemoryDenyWriteExecute": "yes",
    "SystemCallArchitectures": "native",
    "CapabilityBoundingSet": "",
    "UMask": "0077",
}


@pytest.mark.parametrize(("key", "value"), sorted(REQUIRED.items()))
def test_required_directive(service: dict[str, list[str]], key: str, value: str) -> None:
    assert service.get(key) == [value], f"{key}= should be exactly {value!r}"


def test_system_calls_are_limited_to_a_normal_service(service: dict[str, list[str]]) -> None:
    assert service["SystemCallFilter"][0] == "@system-service"


def test_secrets_come_from_credentials(service: dict[str, list[str]]) -> None:
    assert "redis-password:/etc/viewkeeper/redis-password" in service["LoadCredential"]
    assert "opensearch-password:/etc/viewkeeper/opensearch-password" in service["LoadCredential"]
    assert not any("PASSWORD" in env.upper() for env in service.get("Environment", []))


def test_the_example_config_uses_those_credentials() -> None:
    example = (UNIT.parent / "viewkeeper.yaml").read_text()
    assert "password_credential: redis-password" in example
    assert "password_credential: opensearch-password" in example


def test_an_invalid_config_is_not_restarted_into(service: dict[str, list[str]]) -> None:
    assert service["RestartPreventExitStatus"] == ["78"]


def test_installed_for_multi_user() -> None:
    assert parse_unit(UNIT.read_text())["Install"]["WantedBy"] == ["multi-user.target"]


def test_systemd_analyze_verify_accepts_the_unit(tmp_path: Path) -> None:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed (optional tooling)")
    # verify also checks that ExecStart= exists; the program is not installed on a test
    # machine, so point the copy at one that is. Every other line is checked as shipped.
    copy = tmp_path / "viewkeeper.service"
    copy.write_text(UNIT.read_text().replace("/usr/local/bin/viewkeeper", sys.executable))
    result = subprocess.run(
        [tool, "verify", "--man=no", str(copy)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    output = (result.stdout + result.stderr).strip()
    # Unknown keys or bad values are only warnings (exit 0): fail on any line about the unit.
    about_unit = [line for line in output.splitlines() if "viewkeeper.service" in line]
    assert result.returncode == 0, output
    assert about_unit == [], output


def test_restarts_are_never_rate_limited_away() -> None:
    """DynamoDB unreachable at start exits 1; systemd must keep trying, not give up."""
    assert parse_unit(UNIT.read_text())["Unit"]["StartLimitIntervalSec"] == ["0"]


def test_the_processes_share_a_private_runtime_directory(service: dict[str, list[str]]) -> None:
    """`run --processes N`: the parent's sd_notify sockets and the children's metrics files
    live in $RUNTIME_DIRECTORY (a tmpfs), writable under ProtectSystem=strict."""
    assert service["RuntimeDirectory"] == ["viewkeeper"]
    assert service["RuntimeDirectoryMode"] == ["0700"]


def test_the_example_config_runs_a_process_per_core() -> None:
    assert "processes: auto" in (UNIT.parent / "viewkeeper.yaml").read_text()


# the template differs from the unit in these keys only: the hardening is the same
TEMPLATE_ONLY = {
    ("Unit", "Description"): ["viewkeeper %i (DynamoDB Streams -> Redis / OpenSearch)"],
    ("Service", "ExecStart"): ["/usr/local/bin/viewkeeper run -c /etc/viewkeeper/%i.yaml"],
    ("Service", "StateDirectory"): ["viewkeeper/%i"],
    ("Service", "RuntimeDirectory"): ["viewkeeper/%i"],
}


def test_the_template_is_the_unit_per_config_file_with_the_same_hardening() -> None:
    unit, template = parse_unit(UNIT.read_text()), parse_unit(TEMPLATE.read_text())
    assert unit.keys() == template.keys()
    for section, keys in unit.items():
        assert keys.keys() == template[section].keys(), section
        for key, values in keys.items():
            wanted = TEMPLATE_ONLY.get((section, key), values)
            assert template[section][key] == wanted, (section, key)


def test_systemd_analyze_verify_accepts_the_template(tmp_path: Path) -> None:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed (optional tooling)")
    template = tmp_path / "viewkeeper@.service"
    template.write_text(TEMPLATE.read_text().replace("/usr/local/bin/viewkeeper", sys.executable))
    instance = tmp_path / "viewkeeper@orders.service"
    instance.symlink_to(template)
    result = subprocess.run(
        [tool, "verify", "--man=no", str(instance)], capture_output=True, text=True, timeout=60
    )
    output = (result.stdout + result.stderr).strip()
    assert result.returncode == 0, output
    assert [line for line in output.splitlines() if "viewkeeper@" in line] == [], output
