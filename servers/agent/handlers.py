"""The reference agent's built-in task types. None of them needs an AI provider.

- `echo`: {"echo": description, "metadata": metadata}.
- `sleep`: waits metadata "seconds" (0-3600, default 1), reporting progress about every second.
- `code_review`: reviews one file of the agent's work directory (see review.py) and answers
  seed 004's document: {"summary", "issues": [...], "metrics": {...}}.
"""

from __future__ import annotations

import asyncio
import math
import os
import stat
import time
from pathlib import Path

from agentmesh.v1 import tasks_pb2

from . import review
from .runtime import Handler, Progress, TaskFailed, metadata_of

MAX_SLEEP_SECONDS = 3600
MAX_FILE_BYTES = 1 << 20
PYTHON_SUFFIXES = {".py", ".pyi", ".pyw"}


def invalid(message: str, **details: object) -> TaskFailed:
    return TaskFailed("VALIDATION_ERROR", message, retryable=False, details=details)


async def echo(task: tasks_pb2.Task, report: Progress) -> dict[str, object]:
    return {"echo": task.description, "metadata": metadata_of(task)}


def _seconds(value: object) -> float:
    # bool is an int in Python, but `true` is not a number of seconds in JSON.
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise invalid("metadata.seconds must be a number", seconds=str(value)[:100])
    if not 0 <= value <= MAX_SLEEP_SECONDS:
        raise invalid(f"metadata.seconds must be 0 to {MAX_SLEEP_SECONDS}", seconds=value)
    return float(value)


async def sleep(task: tasks_pb2.Task, report: Progress) -> dict[str, object]:
    seconds = _seconds(metadata_of(task).get("seconds", 1))
    loop = asyncio.get_running_loop()
    started = loop.time()
    deadline = started + seconds
    await report(0, f"sleeping {seconds:g} s")
    while (left := deadline - loop.time()) > 0:
        await asyncio.sleep(min(1.0, left))
        done = min(1.0, (loop.time() - started) / seconds)
        await report(int(done * 100))
    await report(100, "awake")
    return {"slept": seconds}


class CodeReview:
    """The `code_review` handler, confined to one work directory: the file named by metadata
    "file_path" (seed 004) or "file" must resolve inside it, symlinks followed, and not be or
    lie in a hidden folder."""

    def __init__(self, workdir: str | os.PathLike[str]) -> None:
        self.workdir = Path(workdir).resolve(strict=True)
        # As given (absolute), for requests that name it so through a symlink on its way.
        self._given = Path(workdir).absolute()
        if not self.workdir.is_dir():
            raise NotADirectoryError(str(workdir))

    async def __call__(self, task: tasks_pb2.Task, report: Progress) -> dict[str, object]:
        metadata = metadata_of(task)
        requested = metadata.get("file_path") or metadata.get("file")
        if not isinstance(requested, str) or not requested:
            raise invalid('metadata.file_path (or "file") must name a file to review')
        rules = metadata.get("rules")
        if rules is not None and (
            not isinstance(rules, list) or not all(isinstance(r, str) for r in rules)
        ):
            raise invalid("metadata.rules must be a list of issue types, e.g. ['security']")
        started = time.perf_counter()
        await report(0, f"reading {requested}")
        path = self.resolve(requested)
        source = await asyncio.to_thread(_read_text, path, requested)
        lines = len(source.splitlines())
        await report(20, f"analysing {lines} lines")
        python = path.suffix in PYTHON_SUFFIXES or metadata.get("language") == "python"
        issues = await asyncio.to_thread(review.analyze, source, python=python)
        if rules is not None:
            issues = [issue for issue in issues if issue.type in rules]
        result = review.document(
            issues,
            file=requested,
            lines_analyzed=lines,
            time_taken=time.perf_counter() - started,
        )
        await report(100, str(result["summary"]))
        return result

    def resolve(self, requested: str) -> Path:
        """The file `requested` names inside the work directory. An absolute path that is not
        already inside it is read from the work directory's root, as seed 004's
        "/src/auth/module.py" is; either way the result must stay inside."""
        try:
            path = Path(requested)
            if path.is_absolute() and not path.is_relative_to(self.workdir):
                given = path.is_relative_to(self._given)
                path = path.relative_to(self._given if given else path.anchor)
            resolved = (self.workdir / path).resolve()
        except (OSError, RuntimeError, ValueError):
            raise invalid(f"cannot resolve {requested!r}", file=requested) from None
        # Checked before the file is opened, so that the answer says nothing about whether a
        # file outside the work directory exists.
        if not resolved.is_relative_to(self.workdir):
            raise invalid(f"{requested!r} is outside the agent's work directory", file=requested)
        # Hidden files and folders hold what a task must not probe: .env, .git, .ssh, the
        # mesh's own .agentmesh (its signing key). Their findings and line counts would say
        # what is in them. Judged on the name, so the answer says nothing about existence.
        if any(part.startswith(".") for part in resolved.relative_to(self.workdir).parts):
            raise invalid(
                f"{requested!r} is hidden (a name starting with '.'): not reviewed", file=requested
            )
        return resolved


def _read_text(path: Path, requested: str) -> str:
    # O_NOFOLLOW: the checked path has no symlink at its end, so one swapped in after the
    # check fails the open. O_NONBLOCK: opening a FIFO must not hang the agent.
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise invalid(f"{requested!r} does not exist", file=requested) from None
    except OSError as exc:
        raise invalid(f"cannot open {requested!r}: {exc.strerror}", file=requested) from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise invalid(f"{requested!r} is not a regular file", file=requested)
        if info.st_size > MAX_FILE_BYTES:
            raise invalid(
                f"{requested!r} is larger than {MAX_FILE_BYTES} bytes",
                file=requested,
                size=info.st_size,
            )
        chunks: list[bytes] = []
        size = 0
        while size <= MAX_FILE_BYTES and (chunk := os.read(fd, 1 << 16)):
            chunks.append(chunk)
            size += len(chunk)
    finally:
        os.close(fd)
    data = b"".join(chunks)
    if len(data) > MAX_FILE_BYTES:  # it grew after the check
        raise invalid(f"{requested!r} is larger than {MAX_FILE_BYTES} bytes", file=requested)
    if b"\0" in data:
        raise invalid(f"{requested!r} is not a text file", file=requested)
    return data.decode("utf-8", errors="replace")


def builtin_handlers(workdir: str | os.PathLike[str]) -> dict[str, Handler]:
    """The built-in handlers by task type; code_review reads files under `workdir`."""
    return {"echo": echo, "sleep": sleep, "code_review": CodeReview(workdir)}
