"""The systemd units in deploy/: systemd accepts them, and they say what the server needs."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from asgilook_aiohttp.config import Config
from asgilook_aiohttp.connections import SPARE_DESCRIPTORS

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
SERVICE = DEPLOY / "asgilook-aiohttp.service"
SOCKET = DEPLOY / "asgilook-aiohttp.socket"
BACKUP_SERVICE = DEPLOY / "asgilook-aiohttp-backup.service"
BACKUP_TIMER = DEPLOY / "asgilook-aiohttp-backup.timer"
INSTALLED_EXEC_START = "/opt/asgilook-aiohttp/bin/asgilook-aiohttp"
DEFAULT_SHUTDOWN_TIMEOUT = 30.0
# systemd-analyze security's overall exposure, times ten (1.2 when this was written).
MAX_EXPOSURE = 20

Unit = dict[str, dict[str, list[str]]]


def parse_unit(path: Path) -> Unit:
    """Every ``Key=value`` of a unit file, by section; repeated keys keep all their values."""
    unit: Unit = {}
    section: dict[str, list[str]] | None = None
    logical = ""
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not logical and (not line or line.startswith(("#", ";"))):
            continue
        if line.endswith("\\"):
            logical += line[:-1] + " "
            continue
        line, logical = logical + line, ""
        if line.startswith("[") and line.endswith("]"):
            section = unit.setdefault(line[1:-1], {})
            continue
        key, sep, value = line.partition("=")
        assert sep, f"{path.name}: not a Key=value line: {raw!r}"
        assert section is not None, f"{path.name}: {key} comes before any section"
        section.setdefault(key.strip(), []).append(value.strip())
    return unit


def last(unit: Unit, section: str, key: str) -> str:
    """The value that takes effect: the last assignment of the key."""
    values = unit.get(section, {}).get(key)
    assert values, f"[{section}] {key}= is not set"
    return values[-1]


def is_true(value: str) -> bool:
    return value.lower() in {"1", "yes", "true", "on"}


_TIME_UNITS = {
    "us": 1e-6,
    "usec": 1e-6,
    "ms": 1e-3,
    "msec": 1e-3,
    "": 1.0,
    "s": 1.0,
    "sec": 1.0,
    "second": 1.0,
    "seconds": 1.0,
    "m": 60.0,
    "min": 60.0,
    "minute": 60.0,
    "minutes": 60.0,
    "h": 3600.0,
    "hr": 3600.0,
    "hour": 3600.0,
    "hours": 3600.0,
}


def seconds(span: str) -> float:
    """A systemd time span ("45", "45s", "1min 30s", "infinity") in seconds."""
    if span.strip() == "infinity":
        return float("inf")
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", span.replace(" ", ""))
    assert parts, f"not a time span: {span!r}"
    assert "".join(n + u for n, u in parts) == span.replace(" ", ""), f"bad span {span!r}"
    return sum(float(number) * _TIME_UNITS[unit] for number, unit in parts)


def environment(unit: Unit) -> dict[str, str]:
    """The variables the [Service] section's Environment= lines set, later ones winning."""
    variables: dict[str, str] = {}
    for line in unit.get("Service", {}).get("Environment", []):
        if not line:  # an empty assignment resets the list
            variables.clear()
        for assignment in shlex.split(line):
            name, _, value = assignment.partition("=")
            variables[name] = value
    return variables


@pytest.fixture(scope="module")
def service() -> Unit:
    return parse_unit(SERVICE)


@pytest.fixture(scope="module")
def socket_unit() -> Unit:
    return parse_unit(SOCKET)


def systemd_analyze() -> str:
    found = shutil.which("systemd-analyze")
    if found is None:
        pytest.skip("systemd-analyze is not on PATH (install systemd to check the units)")
    return found


def test_systemd_analyze_verify_accepts_every_unit(tmp_path: Path) -> None:
    analyze = systemd_analyze()
    # verify insists that ExecStart= exists, so point it at this environment's script.
    script = Path(sys.executable).parent / "asgilook-aiohttp"
    assert script.is_file(), f"{script} is missing: install the project into this environment"
    text = SERVICE.read_text(encoding="utf-8")
    assert f"ExecStart={INSTALLED_EXEC_START}\n" in text
    (tmp_path / SERVICE.name).write_text(
        text.replace(f"ExecStart={INSTALLED_EXEC_START}", f"ExecStart={script}"),
        encoding="utf-8",
    )
    for unit in (SOCKET, BACKUP_TIMER):
        shutil.copy(unit, tmp_path / unit.name)
    backup = BACKUP_SERVICE.read_text(encoding="utf-8")
    assert f"ExecStart={INSTALLED_EXEC_START} backup " in backup
    (tmp_path / BACKUP_SERVICE.name).write_text(
        backup.replace(f"ExecStart={INSTALLED_EXEC_START}", f"ExecStart={script}"),
        encoding="utf-8",
    )
    names = (SOCKET.name, SERVICE.name, BACKUP_SERVICE.name, BACKUP_TIMER.name)
    result = subprocess.run(
        [analyze, "verify", *(str(tmp_path / name) for name in names)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
        check=False,
    )
    assert (result.returncode, result.stderr) == (0, ""), result.stderr


def test_the_nightly_backup_runs_as_the_servers_own_dynamic_user() -> None:
    server, backup = parse_unit(SERVICE), parse_unit(BACKUP_SERVICE)
    assert last(backup, "Service", "Type") == "oneshot"
    # Units that name one dynamic user share its UID; the server's is named after its unit.
    assert is_true(last(server, "Service", "DynamicUser"))
    assert "User" not in server["Service"]
    assert is_true(last(backup, "Service", "DynamicUser"))
    assert last(backup, "Service", "User") == SERVICE.stem
    # The library is the first state directory, which the server takes as its storage.
    library = last(server, "Service", "StateDirectory")
    assert last(backup, "Service", "StateDirectory").split()[0] == library
    assert (
        last(backup, "Unit", "ConditionPathExists") == f"/var/lib/private/{library}/index.sqlite3"
    )
    assert last(backup, "Service", "ExecStart") == f"{INSTALLED_EXEC_START} backup ${{DEST}}"
    assert last(parse_unit(BACKUP_TIMER), "Timer", "Persistent") == "true"


def test_systemd_analyze_security_exposure_stays_low() -> None:
    analyze = systemd_analyze()
    usage = subprocess.run(
        [analyze, "--help"], capture_output=True, text=True, timeout=60, check=False
    )
    if "--offline" not in usage.stdout or "--threshold" not in usage.stdout:
        pytest.skip("this systemd-analyze cannot review a unit file offline (systemd < 250)")
    result = subprocess.run(
        [analyze, "security", "--offline=yes", f"--threshold={MAX_EXPOSURE}", str(SERVICE)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-400:] + result.stderr


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ("Type", "notify"),
        ("NotifyAccess", "main"),
        ("KillMode", "mixed"),
        ("Restart", "on-failure"),
        ("ExecStart", INSTALLED_EXEC_START),
        ("ProtectSystem", "strict"),
        ("CapabilityBoundingSet", ""),
        ("SystemCallArchitectures", "native"),
        ("UMask", "0077"),
    ],
)
def test_service_setting(service: Unit, key: str, expected: str) -> None:
    assert last(service, "Service", key) == expected


@pytest.mark.parametrize(
    "key",
    [
        "DynamicUser",
        "PrivateTmp",
        "NoNewPrivileges",
        "ProtectHome",
        "PrivateDevices",
        "ProtectKernelTunables",
        "ProtectKernelModules",
        "ProtectKernelLogs",
        "ProtectControlGroups",
        "ProtectClock",
        "ProtectHostname",
        "RestrictNamespaces",
        "LockPersonality",
        "RestrictRealtime",
        "RestrictSUIDSGID",
        "RemoveIPC",
    ],
)
def test_service_hardening_switched_on(service: Unit, key: str) -> None:
    assert is_true(last(service, "Service", key))


def test_service_keeps_state_in_a_state_directory(service: Unit) -> None:
    assert last(service, "Service", "StateDirectory") == "asgilook-aiohttp"
    # The server finds it through $STATE_DIRECTORY; an explicit storage path would bypass it.
    assert "ASGILOOK_STORAGE_PATH" not in environment(service)


def test_service_has_a_watchdog(service: Unit) -> None:
    assert 0 < seconds(last(service, "Service", "WatchdogSec")) < float("inf")


def test_service_address_families_allow_forkserver_and_ip(service: Unit) -> None:
    families = last(service, "Service", "RestrictAddressFamilies").split()
    assert sorted(families) == ["AF_INET", "AF_INET6", "AF_UNIX"]


def test_service_syscall_filter_keeps_setrlimit(service: Unit) -> None:
    filters = service["Service"]["SystemCallFilter"]
    assert filters[0] == "@system-service"
    denied = {name for line in filters if line.startswith("~") for name in line[1:].split()}
    # Workers cap their own address space; setrlimit is in @resources, prlimit64 in @default.
    assert not denied & {"@resources", "@default", "setrlimit", "prlimit64"}
    # The forkserver forks its workers, and everything needs sockets.
    assert not denied & {"@process", "@network-io", "fork", "clone", "socket", "socketpair"}


def test_descriptor_limit_holds_every_connection_served(service: Unit) -> None:
    limit = int(last(service, "Service", "LimitNOFILE"))
    assert (limit - SPARE_DESCRIPTORS) // 2 >= Config(storage_path=Path()).max_connections


def test_stop_timeout_outlasts_the_drain(service: Unit) -> None:
    drain = float(
        environment(service).get("ASGILOOK_SHUTDOWN_TIMEOUT", str(DEFAULT_SHUTDOWN_TIMEOUT))
    )
    assert "--shutdown-timeout" not in last(service, "Service", "ExecStart")
    assert seconds(last(service, "Service", "TimeoutStopSec")) > drain


def test_socket_listens_on_localhost_for_the_service(socket_unit: Unit) -> None:
    assert socket_unit["Socket"]["ListenStream"] == ["127.0.0.1:8000"]
    assert "Accept" not in socket_unit["Socket"]  # one service for all connections
    assert last(socket_unit, "Install", "WantedBy") == "sockets.target"


def test_service_uses_the_socket_when_there_is_one(service: Unit) -> None:
    unit = service["Unit"]
    assert "asgilook-aiohttp.socket" in " ".join(unit["After"]).split()
    assert "asgilook-aiohttp.socket" in " ".join(unit.get("Wants", [])).split()


@pytest.mark.parametrize(
    ("span", "expected"),
    [("45", 45.0), ("45s", 45.0), ("1min 30s", 90.0), ("1m30s", 90.0), ("500ms", 0.5)],
)
def test_time_spans_parse(span: str, expected: float) -> None:
    assert seconds(span) == pytest.approx(expected)
