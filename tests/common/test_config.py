"""Settings from the environment."""

from __future__ import annotations

from pathlib import Path

import pytest

from servers.common.config import Settings


def test_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    s = Settings.from_env({})
    assert s.public_port == 8080
    assert s.data_dir == tmp_path / ".agentmesh"
    assert s.database_url == f"sqlite+aiosqlite:///{tmp_path / '.agentmesh' / 'agentmesh.db'}"
    assert s.redis_url is None
    assert s.host == "127.0.0.1"


def test_environment_wins(tmp_path: Path) -> None:
    s = Settings.from_env(
        {
            "AGENTMESH_PORT": "9000",
            "AGENTMESH_DATA_DIR": str(tmp_path),
            "AGENTMESH_AUTH_PORT": "50051",
            "DATABASE_URL": "postgresql+asyncpg://u@h/db",
            "REDIS_URL": "redis://127.0.0.1:6379/0",
        }
    )
    assert (s.public_port, s.service_ports["auth"], s.service_ports["tasks"]) == (9000, 50051, 0)
    assert s.database_url.startswith("postgresql+asyncpg://")
    assert s.redis_url == "redis://127.0.0.1:6379/0"


@pytest.mark.parametrize("value", ["eighty", "70000", "-1"])
def test_bad_ports_are_refused_with_a_message(value: str) -> None:
    with pytest.raises(SystemExit, match="AGENTMESH_PORT"):
        Settings.from_env({"AGENTMESH_PORT": value})


@pytest.mark.parametrize(
    "name",
    [
        "AGENTMESH_EVENT_RETENTION_SECONDS",
        "AGENTMESH_EVENT_RETENTION_MAX",
        "AGENTMESH_STREAM_HEARTBEAT_SECONDS",
    ],
)
def test_event_settings_must_be_positive(name: str) -> None:
    with pytest.raises(SystemExit, match=name):
        Settings.from_env({name: "0"})
    assert getattr(Settings.from_env({name: "7"}), _FIELDS[name]) == 7


_FIELDS = {
    "AGENTMESH_EVENT_RETENTION_SECONDS": "event_retention_seconds",
    "AGENTMESH_EVENT_RETENTION_MAX": "event_retention_max",
    "AGENTMESH_STREAM_HEARTBEAT_SECONDS": "stream_heartbeat_seconds",
}


def test_agents_are_kept_seven_days_offline_and_a_thousand_an_owner() -> None:
    settings = Settings.from_env({})
    assert (settings.agent_retention_days, settings.agents_per_owner) == (7, 1000)
    assert Settings.from_env({"AGENTMESH_AGENT_RETENTION_DAYS": "0"}).agent_retention_days == 0
    for name, bad in (
        ("AGENTMESH_AGENT_RETENTION_DAYS", "-1"),
        ("AGENTMESH_AGENT_RETENTION_DAYS", "1000000000"),
        ("AGENTMESH_AGENTS_PER_OWNER", "0"),
    ):
        with pytest.raises(SystemExit, match=name):
            Settings.from_env({name: bad})


def test_an_idle_agent_polls_for_work_every_two_seconds_unless_told() -> None:
    assert Settings.from_env({}).claim_poll_seconds == 2
    assert Settings.from_env({"AGENTMESH_CLAIM_POLL_SECONDS": "30"}).claim_poll_seconds == 30
    with pytest.raises(SystemExit, match="AGENTMESH_CLAIM_POLL_SECONDS"):
        Settings.from_env({"AGENTMESH_CLAIM_POLL_SECONDS": "0"})


def test_the_auth_cache_keeps_entries_two_seconds_and_at_most_five_minutes() -> None:
    assert Settings.from_env({}).auth_cache_seconds == 2
    assert Settings.from_env({"AGENTMESH_AUTH_CACHE_SECONDS": "0"}).auth_cache_seconds == 0
    for bad in ("-1", "301", "soon"):
        with pytest.raises(SystemExit, match="AGENTMESH_AUTH_CACHE_SECONDS"):
            Settings.from_env({"AGENTMESH_AUTH_CACHE_SECONDS": bad})


def test_a_stopping_replica_drains_three_seconds_unless_told() -> None:
    assert Settings.from_env({}).drain_seconds == 3
    assert Settings.from_env({"AGENTMESH_DRAIN_SECONDS": "0"}).drain_seconds == 0
    for bad in ("-1", "61", "soon"):
        with pytest.raises(SystemExit, match="AGENTMESH_DRAIN_SECONDS"):
            Settings.from_env({"AGENTMESH_DRAIN_SECONDS": bad})


def test_a_process_has_no_metrics_port_unless_given_one() -> None:
    assert Settings.from_env({}).metrics_port is None
    assert Settings.from_env({"AGENTMESH_METRICS_PORT": ""}).metrics_port is None
    assert Settings.from_env({"AGENTMESH_METRICS_PORT": "0"}).metrics_port == 0  # a free one
    assert Settings.from_env({"AGENTMESH_METRICS_PORT": "9464"}).metrics_port == 9464
    for bad in ("-1", "70000", "ninety"):
        with pytest.raises(SystemExit, match="AGENTMESH_METRICS_PORT"):
            Settings.from_env({"AGENTMESH_METRICS_PORT": bad})


def test_task_retention_is_thirty_days_and_zero_keeps_tasks() -> None:
    assert Settings.from_env({}).task_retention_days == 30
    assert Settings.from_env({"AGENTMESH_TASK_RETENTION_DAYS": "0"}).task_retention_days == 0
    for bad in ("-1", "1000000000"):
        with pytest.raises(SystemExit, match="AGENTMESH_TASK_RETENTION_DAYS"):
            Settings.from_env({"AGENTMESH_TASK_RETENTION_DAYS": bad})


def test_upstreams_are_ipv4_addresses_or_one_name_by_service() -> None:
    settings = Settings.from_env(
        {
            "AGENTMESH_TASKS_UPSTREAMS": "10.0.0.5:7001, 10.0.0.6:7001,",
            "AGENTMESH_AGENTS_UPSTREAMS": "agents.mesh.local:7003",
            "AGENTMESH_AUTH_UPSTREAMS": "",
        }
    )
    assert settings.upstreams == {
        "tasks": (("10.0.0.5", 7001), ("10.0.0.6", 7001)),
        "agents": (("agents.mesh.local", 7003),),
    }
    for bad in (
        "10.0.0.5",
        "10.0.0.5:0",
        "10.0.0.5:70000",
        "[::1]:7001",
        "bad_name:7001",
        "tasks-a:7001,tasks-b:7001",  # several names: give one that resolves to all
    ):
        with pytest.raises(SystemExit, match="AGENTMESH_TASKS_UPSTREAMS"):
            Settings.from_env({"AGENTMESH_TASKS_UPSTREAMS": bad})
