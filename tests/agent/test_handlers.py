"""The reference agent's built-in handlers and the code_review analysis, called directly (they
are plain coroutines: no server needed), and the `agentmesh agent run` refusals."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import json_format, struct_pb2

from agentmesh.v1 import agents_pb2, common_pb2, tasks_pb2
from servers.agent import review
from servers.agent.handlers import CodeReview, echo, sleep
from servers.agent.runtime import (
    RESULT_MAX_BYTES,
    Agent,
    AgentRefused,
    TaskFailed,
    _StreamClosed,
    execute,
)
from servers.tasks import dispatch

ROOT = Path(__file__).resolve().parents[2]

VULNERABLE = """\
import sqlite3

DB_PASSWORD = "hunter2"


def load(db: sqlite3.Connection, user_id: str) -> object:
    query = "SELECT * FROM users WHERE id = " + user_id
    return db.execute(query).fetchall()


def run(expression: str) -> object:
    return eval(expression)


def safe_read(path: str) -> str:
    try:
        return open(path).read()
    except:
        return ""


# TODO: add rate limiting here
def lookup(db: sqlite3.Connection, name: str) -> object:
    return db.execute(f"SELECT id FROM users WHERE name = '{name}'").fetchone()
"""

CLEAN = '''\
"""A module with nothing to flag."""

import os
import sqlite3


def load(db: sqlite3.Connection, user_id: str) -> list[object]:
    password = os.environ["DB_PASSWORD"]
    token_type = "bearer"
    message = "evaluate the TODO list"  # a word in a string is data
    prompt = f"Select a file from the list, {user_id}"
    db.execute("SELECT * FROM users WHERE id = ?", (user_id,))
    return [password, token_type, message, prompt]


def parse(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        return 0
'''


class Reports:
    """Collects what a handler reports, as the runtime's `report` would send it."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, str]] = []

    async def __call__(self, progress: int, message: str = "") -> None:
        self.calls.append((progress, message))

    @property
    def values(self) -> list[int]:
        return [progress for progress, _ in self.calls]


def make_task(task_type: str, description: str = "", **metadata: Any) -> tasks_pb2.Task:
    task = tasks_pb2.Task(task_id="t-1", type=task_type, description=description)
    json_format.ParseDict(metadata, task.metadata)
    return task


async def review_file(workdir: Path, requested: str, **metadata: Any) -> dict[str, Any]:
    reports = Reports()
    result = await CodeReview(workdir)(
        make_task("code_review", "review", file_path=requested, **metadata), reports
    )
    assert reports.values[0] == 0 and reports.values[-1] == 100
    return dict(result)


def found(result: dict[str, Any]) -> set[tuple[int, str, str]]:
    return {(i["line"], i["severity"], i["type"]) for i in result["issues"]}


async def test_code_review_finds_each_issue_on_its_line(tmp_path: Path) -> None:
    (tmp_path / "auth.py").write_text(VULNERABLE)
    result = await review_file(tmp_path, "auth.py")
    assert found(result) == {
        (3, "high", "security"),  # hard-coded password
        (7, "high", "security"),  # SQL concatenation
        (12, "high", "security"),  # eval
        (18, "medium", "quality"),  # bare except
        (22, "low", "maintenance"),  # TODO
        (24, "high", "security"),  # f-string SQL in execute()
    }
    by_line = {i["line"]: i for i in result["issues"]}
    assert "eval" in by_line[12]["description"]
    assert "SQL injection" in by_line[7]["description"]
    assert "credential" in by_line[3]["description"]
    assert all(i["file"] == "auth.py" and i["suggestion"] for i in result["issues"])
    assert result["summary"] == "Found 6 issues (4 high, 1 medium, 1 low)"
    assert result["metrics"]["lines_analyzed"] == len(VULNERABLE.splitlines())
    assert result["metrics"]["issues_found"] == 6
    assert result["metrics"]["time_taken"] >= 0


async def test_code_review_of_a_clean_file_finds_nothing(tmp_path: Path) -> None:
    (tmp_path / "clean.py").write_text(CLEAN)
    result = await review_file(tmp_path, "clean.py")
    assert result["issues"] == []
    assert result["summary"] == "Found 0 issues (0 high, 0 medium, 0 low)"
    assert result["metrics"]["issues_found"] == 0


async def test_code_review_result_is_a_task_result(tmp_path: Path) -> None:
    (tmp_path / "auth.py").write_text(VULNERABLE)
    outcome = await execute(
        CodeReview(tmp_path), make_task("code_review", file_path="auth.py"), Reports()
    )
    assert isinstance(outcome, struct_pb2.Struct)
    assert json_format.MessageToDict(outcome)["metrics"]["issues_found"] == 6


async def test_long_lines_long_functions_and_rules(tmp_path: Path) -> None:
    body = "\n".join(f"    x{i} = {i}" for i in range(85))
    source = f"def big() -> None:\n{body}\n\n\nLONG = '{'a' * 130}'\n"
    (tmp_path / "big.py").write_text(source)
    result = await review_file(tmp_path, "big.py")
    assert found(result) == {(1, "medium", "maintainability"), (89, "low", "style")}
    assert "86 lines" in result["issues"][0]["description"]
    only_style = await review_file(tmp_path, "big.py", rules=["style"])
    assert found(only_style) == {(89, "low", "style")}
    assert only_style["summary"] == "Found 1 issue (0 high, 0 medium, 1 low)"


async def test_code_review_of_other_languages_uses_line_patterns(tmp_path: Path) -> None:
    (tmp_path / "app.js").write_text(
        'const apiKey = "sk-live-123";\n'
        "// FIXME: remove before release\n"
        'db.query("SELECT * FROM users WHERE id = " + req.params.id);\n'
        "const total = eval(input);\n"
        "const match = /a/.exec(text);\n"
    )
    result = await review_file(tmp_path, "app.js")
    assert found(result) == {
        (1, "high", "security"),
        (2, "low", "maintenance"),
        (3, "high", "security"),
        (4, "high", "security"),
    }


async def test_python_that_does_not_parse_is_still_reviewed(tmp_path: Path) -> None:
    (tmp_path / "broken.py").write_text('def f(:\n    return eval(x)\nAPI_KEY = "abc123"\n')
    result = await review_file(tmp_path, "broken.py")
    assert (1, "high", "syntax") in found(result)
    assert {(2, "high", "security"), (3, "high", "security")} <= found(result)


async def test_seed_004_absolute_path_is_read_from_the_workdir_root(tmp_path: Path) -> None:
    (tmp_path / "src" / "auth").mkdir(parents=True)
    (tmp_path / "src" / "auth" / "module.py").write_text(VULNERABLE)
    result = await review_file(tmp_path, "/src/auth/module.py", language="python")
    assert result["issues"][0]["file"] == "/src/auth/module.py"
    assert result["metrics"]["issues_found"] == 6
    inside = await review_file(tmp_path, str(tmp_path / "src" / "auth" / "module.py"))
    assert inside["metrics"]["issues_found"] == 6
    # The work directory given through a symlink: an absolute path through it is inside too.
    link = tmp_path.parent / f"{tmp_path.name}-link"
    link.symlink_to(tmp_path)
    linked = await review_file(link, str(link / "src" / "auth" / "module.py"))
    assert linked["metrics"]["issues_found"] == 6


async def assert_refused(workdir: Path, **metadata: Any) -> TaskFailed:
    with pytest.raises(TaskFailed) as caught:
        await CodeReview(workdir)(make_task("code_review", **metadata), Reports())
    assert caught.value.code == "VALIDATION_ERROR"
    assert caught.value.retryable is False
    return caught.value


@pytest.mark.parametrize(
    "requested",
    ["../outside.py", "../../etc/passwd", "/etc/passwd", "sub/../../outside.py", "missing.py"],
)
async def test_code_review_refuses_paths_outside_the_workdir(
    tmp_path: Path, requested: str
) -> None:
    workdir = tmp_path / "work"
    (workdir / "sub").mkdir(parents=True)
    (tmp_path / "outside.py").write_text("eval('1')\n")
    await assert_refused(workdir, file_path=requested)


async def test_code_review_refuses_a_symlink_out_of_the_workdir(tmp_path: Path) -> None:
    workdir = tmp_path / "work"
    workdir.mkdir()
    (tmp_path / "secret.py").write_text("PASSWORD = 'x'\n")
    (workdir / "link.py").symlink_to(tmp_path / "secret.py")
    (workdir / "dir").symlink_to(tmp_path)
    await assert_refused(workdir, file_path="link.py")
    await assert_refused(workdir, file="dir/secret.py")
    # A symlink that stays inside is fine.
    (workdir / "real.py").write_text("x = 1\n")
    (workdir / "alias.py").symlink_to(workdir / "real.py")
    result = await review_file(workdir, "alias.py")
    assert result["metrics"]["issues_found"] == 0


async def test_code_review_refuses_hidden_files_whether_or_not_they_exist(
    tmp_path: Path,
) -> None:
    """From the default work directory (where the agent was started), a task could learn which
    of .env, .git or .agentmesh exist, their line counts and which lines look like secrets."""
    (tmp_path / ".env").write_text("API_KEY = 'sk-live'\n")
    (tmp_path / ".agentmesh" / "keys").mkdir(parents=True)
    (tmp_path / ".agentmesh" / "keys" / "signing-key.pem").write_text("-----BEGIN-----\n")
    (tmp_path / "plain.py").symlink_to(tmp_path / ".env")
    for requested in (".env", ".agentmesh/keys/signing-key.pem", "plain.py", ".missing"):
        error = await assert_refused(tmp_path, file_path=requested)
        assert "hidden" in error.message, (requested, error.message)
    # A name that only contains a dot is an ordinary file.
    (tmp_path / "module.v2.py").write_text("x = 1\n")
    assert (await review_file(tmp_path, "module.v2.py"))["metrics"]["issues_found"] == 0


async def test_code_review_refuses_big_binary_and_special_files(tmp_path: Path) -> None:
    (tmp_path / "big.py").write_bytes(b"x = 1\n" * (2 * 1024 * 1024 // 6 + 1))
    error = await assert_refused(tmp_path, file_path="big.py")
    assert error.details["size"] == (tmp_path / "big.py").stat().st_size > 2 * 1024 * 1024
    (tmp_path / "blob.py").write_bytes(b"\x00\x01\x02")
    await assert_refused(tmp_path, file_path="blob.py")
    (tmp_path / "folder").mkdir()
    await assert_refused(tmp_path, file_path="folder")
    os.mkfifo(tmp_path / "pipe.py")
    await assert_refused(tmp_path, file_path="pipe.py")


@pytest.mark.parametrize("metadata", [{}, {"file_path": ""}, {"file_path": 3}])
async def test_code_review_needs_a_file(tmp_path: Path, metadata: dict[str, Any]) -> None:
    await assert_refused(tmp_path, **metadata)


async def test_code_review_rules_must_be_a_list(tmp_path: Path) -> None:
    (tmp_path / "a.py").write_text("x = 1\n")
    await assert_refused(tmp_path, file_path="a.py", rules="security")


def test_lower_case_sql_and_deep_nesting() -> None:
    source = 'def f(db, n):\n    db.execute("select id, name from users where n = %s" % n)\n'
    assert [(i.line, i.type) for i in review.analyze(source, python=True)] == [(2, "security")]
    # Too deep for the parser: the line checks still answer instead of failing the task.
    chain = "x = " + " + ".join(['"a"'] * 20000) + "\n"
    assert [i.type for i in review.analyze(chain, python=True)] == ["style"]


def test_summary_counts_by_severity() -> None:
    issues = review.analyze("eval(x)\nexec(y)\n# TODO later\n", python=True)
    assert review.summarize(issues) == "Found 3 issues (2 high, 0 medium, 1 low)"


async def test_sleep_reports_progress_and_finishes() -> None:
    reports = Reports()
    started = time.monotonic()
    result = await sleep(make_task("sleep", seconds=0.3), reports)
    assert time.monotonic() - started >= 0.3
    assert result == {"slept": 0.3}
    assert reports.values[0] == 0 and reports.values[-1] == 100
    assert reports.values == sorted(reports.values)


async def test_sleep_zero_and_default() -> None:
    reports = Reports()
    assert await sleep(make_task("sleep", seconds=0), reports) == {"slept": 0.0}
    assert reports.values[-1] == 100


@pytest.mark.parametrize("seconds", [-1, "abc", True, 3601, None, [1]])
async def test_sleep_refuses_invalid_seconds(seconds: object) -> None:
    with pytest.raises(TaskFailed) as caught:
        await sleep(make_task("sleep", seconds=seconds), Reports())
    assert caught.value.code == "VALIDATION_ERROR"
    assert caught.value.retryable is False


async def test_echo_returns_description_and_metadata() -> None:
    task = make_task("echo", "hello agents", n=1, tags=["a", "b"], nested={"k": True})
    result = await echo(task, Reports())
    assert result == {
        "echo": "hello agents",
        "metadata": {"n": 1, "tags": ["a", "b"], "nested": {"k": True}},
    }


async def test_execute_turns_exceptions_into_task_errors() -> None:
    async def fails(task: tasks_pb2.Task, report: Any) -> dict[str, object]:
        raise TaskFailed("RATE_LIMITED", "upstream said no", retryable=True, details={"n": 1})

    async def crashes(task: tasks_pb2.Task, report: Any) -> dict[str, object]:
        raise RuntimeError("boom " * 200)

    async def not_json(task: tasks_pb2.Task, report: Any) -> dict[str, object]:
        return {"when": object()}

    task = make_task("x")
    failed = await execute(fails, task, Reports())
    assert isinstance(failed, tasks_pb2.TaskError)
    assert (failed.code, failed.retryable) == ("RATE_LIMITED", True)
    assert json_format.MessageToDict(failed.details) == {"n": 1}
    crashed = await execute(crashes, task, Reports())
    assert isinstance(crashed, tasks_pb2.TaskError)
    assert (crashed.code, crashed.retryable) == ("INTERNAL_ERROR", True)
    assert crashed.message.startswith("boom") and len(crashed.message) == 500
    bad = await execute(not_json, task, Reports())
    assert isinstance(bad, tasks_pb2.TaskError)
    assert (bad.code, bad.retryable) == ("INTERNAL_ERROR", False)


@pytest.mark.parametrize(
    "result",
    [{"x": math.nan}, {"x": [math.inf]}, {"x": 10**400}, {"x": {"y": -math.inf}}],
    ids=["nan", "inf-in-list", "beyond-a-double", "nested-minus-inf"],
)
async def test_a_result_the_mesh_would_refuse_becomes_the_tasks_error(result: object) -> None:
    """A number JSON cannot write, or one no double holds: sent, the mesh would refuse the
    outcome and the task would sit held until its lease ran out (or the agent crash on it).
    It fails the task at once instead, not retried: the same handler would do it again."""

    async def returns(task: tasks_pb2.Task, report: Any) -> object:
        return result

    outcome = await execute(returns, make_task("x"), Reports())  # type: ignore[arg-type]
    assert isinstance(outcome, tasks_pb2.TaskError), outcome
    assert (outcome.code, outcome.retryable) == ("INTERNAL_ERROR", False)
    assert outcome.message.startswith("the handler's result is not a JSON object")


async def test_a_result_larger_than_the_mesh_keeps_fails_the_task_here() -> None:
    """The mesh keeps 1 MiB of result (and fails a task with more); past its 4 MiB frames the
    stream itself would break, and the agent send it again on every reconnection. The agent
    fails the task with the mesh's own error instead, measured as the mesh does (UTF-8)."""

    async def returns(task: tasks_pb2.Task, report: Any) -> dict[str, object]:
        return {"blob": "日" * 400_000}  # 1.2 MB of UTF-8, 2.4 MB as \\u escapes

    async def fits(task: tasks_pb2.Task, report: Any) -> dict[str, object]:
        return {"blob": "日" * 300_000}  # 0.9 MB

    large = await execute(returns, make_task("x"), Reports())
    assert isinstance(large, tasks_pb2.TaskError), large
    assert (large.code, large.retryable) == ("RESULT_TOO_LARGE", False)
    assert isinstance(await execute(fits, make_task("x"), Reports()), struct_pb2.Struct)
    assert RESULT_MAX_BYTES == dispatch.RESULT_MAX_BYTES


async def test_error_messages_and_details_keep_to_what_the_mesh_takes() -> None:
    """A NUL in an exception's message (the mesh refuses any text with one, and ends the
    stream: the agent reconnected and sent it again, for ever); details it would refuse
    (NaN) are left out rather than refusing the whole outcome."""

    async def nul(task: tasks_pb2.Task, report: Any) -> dict[str, object]:
        raise RuntimeError("bad byte \x00 here")

    async def nan_details(task: tasks_pb2.Task, report: Any) -> dict[str, object]:
        raise TaskFailed("UPSTREAM", "no", details={"score": math.nan})

    crashed = await execute(nul, make_task("x"), Reports())
    assert isinstance(crashed, tasks_pb2.TaskError)
    assert crashed.message == "bad byte \ufffd here"
    failed = await execute(nan_details, make_task("x"), Reports())
    assert isinstance(failed, tasks_pb2.TaskError)
    assert (failed.code, failed.message) == ("UPSTREAM", "no")
    assert not failed.HasField("details")


def run_cli(
    *args: str, key: str | None = None, cwd: Path = ROOT
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "AGENTMESH_API_KEY"}
    if key is not None:
        env["AGENTMESH_API_KEY"] = key
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "generated")])
    return subprocess.run(
        [sys.executable, "-m", "servers.cli", "agent", "run", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_cli_refuses_to_start_without_an_api_key() -> None:
    done = run_cli()
    assert done.returncode == 2
    assert "AGENTMESH_API_KEY" in done.stderr


def test_cli_refuses_an_unknown_capability() -> None:
    # The key is never used: the command stops before it connects.
    done = run_cli("--capability", "echo", "--capability", "translate", key="amk_unused")
    assert done.returncode == 2
    assert "translate" in done.stderr


def test_cli_refuses_a_missing_workdir(tmp_path: Path) -> None:
    done = run_cli("--workdir", str(tmp_path / "nope"), key="amk_unused")
    assert done.returncode == 2
    assert "--workdir" in done.stderr


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("bad\u202ename", "name must not hold"),
        ("tab\there", "name must not hold"),
        ("zero\u200bwidth", "name must not hold"),
        ("   ", "name must not be blank"),
    ],
)
def test_cli_refuses_a_name_the_mesh_would_refuse(name: str, why: str) -> None:
    """The mesh refuses such a Hello; the agent would reconnect and be refused for ever."""
    done = run_cli("--name", name, key="amk_unused")
    assert done.returncode == 2, done.stderr
    assert why in done.stderr


def test_a_refused_hello_is_final_and_a_busy_mesh_is_not() -> None:
    """VALIDATION_ERROR: the same Hello would be refused again, so run() stops (the CLI exits
    1). A mesh that cannot take it now (its registry down) is tried again."""
    agent = Agent(name="hello", api_key="amk_test", capabilities=["echo"])

    def refusal(code: str) -> agents_pb2.ConnectResponse:
        return agents_pb2.ConnectResponse(error=common_pb2.StreamError(code=code, message="m"))

    with pytest.raises(AgentRefused, match="VALIDATION_ERROR"):
        agent._welcomed(refusal("VALIDATION_ERROR"))
    with pytest.raises(_StreamClosed):
        agent._welcomed(refusal("SERVICE_UNAVAILABLE"))


async def test_a_result_too_deep_for_the_stream_is_reported_as_an_error() -> None:
    """The mesh could not decode a frame carrying it, and the agent would send it again on
    every reconnection: it is turned into a non-retryable error before it is sent."""
    deep: dict[str, object] = {}
    for _ in range(40):
        deep = {"a": deep}

    async def handler(task: tasks_pb2.Task, report: Any) -> dict[str, object]:
        return deep

    async def report(progress: int, message: str = "") -> None:
        pass

    outcome = await execute(handler, tasks_pb2.Task(task_id="t"), report)
    assert isinstance(outcome, tasks_pb2.TaskError)
    assert outcome.code == "RESULT_TOO_DEEP" and not outcome.retryable


def test_a_handler_error_is_shaped_as_the_mesh_takes_it() -> None:
    """The mesh refuses an outcome with a code that is not UPPER_SNAKE or an empty message,
    which would leave the task held until its time limit: the SDK mends them instead."""
    odd = TaskFailed("not upper", "").to_proto()
    assert odd.code == "INTERNAL_ERROR" and odd.message.startswith("'not upper'")
    assert TaskFailed("QUOTA", "").to_proto().message == "QUOTA"
    big = TaskFailed("BIG", "x", details={"blob": "b" * 70_000}).to_proto()
    assert not big.HasField("details")
    kept = TaskFailed("SMALL", "x", details={"n": 1}).to_proto()
    assert json_format.MessageToDict(kept.details) == {"n": 1}
    # No text field may hold a NUL (an exception's words about a binary file may).
    assert TaskFailed("BINARY", "byte \x00 here").to_proto().message == "byte \ufffd here"


def test_a_long_line_of_sql_words_is_reviewed_in_linear_time() -> None:
    """`SELECT\\b.*\\bFROM` tried every SELECT against the rest of the line: 144 KB of "SELECT a"
    took 11 s (a 1 MiB line, about ten minutes) in a thread no cancellation stops. The match
    now looks at most 1,000 characters ahead: well under a second."""
    started = time.perf_counter()
    review.analyze("SELECT a " * 18_000, python=False)
    assert time.perf_counter() - started < 2.5
