"""The code_review analysis: what a reviewer would flag, found without an AI provider.

Every file gets the line checks (long lines, TODO/FIXME comments, and patterns for eval, secrets
and SQL built from strings). A Python file that parses gets `ast` checks instead of those
patterns, because the syntax tree tells a call from the same word in a string or a comment, and
adds what only the tree shows: bare `except:` and overlong functions.
"""

from __future__ import annotations

import ast
import io
import re
import tokenize
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

SEVERITIES = ("high", "medium", "low")
MAX_LINE = 120
MAX_FUNCTION = 80
# A result is one gRPC message; a minified file could otherwise yield a finding per line.
MAX_LISTED = 1000

SQL_INJECTION = "SQL built from a formatted or concatenated string (SQL injection)"
SQL_FIX = "Use parameterized queries: pass the values as parameters, e.g. execute(sql, params)"
SECRET_FIX = "Read it from the environment or a secret store; rotate the exposed value"

# A name that ends in a secret's word: DB_PASSWORD and apiKey, not password_hint or TOKEN_URL.
_SECRET_NAME = re.compile(
    r"(?:^|_)(?:password|passwd|pwd|secret|secret_?key|client_?secret|api_?key|"
    r"access_?key|private_?key|token|auth_?token|access_?token|refresh_?token)$",
    re.IGNORECASE,
)
_SECRET_LINE = re.compile(
    r"""(?ix)(?:^|[^\w])[\w.-]*(?:password|passwd|pwd|secret|api[_-]?key|access[_-]?key|
    private[_-]?key|token)["']?\s*[:=]\s*["'][^"'\s]+["']"""
)
_PLACEHOLDER = re.compile(r"^\s*$|^\$\{.*\}$|^<.*>$")
# Upper-case keywords are SQL; lower-case ones only in SQL's shape, so that "Select a file
# from the list" is prose.
_SQL = re.compile(
    r"\b(?:SELECT\b.{0,1000}?\bFROM|INSERT\s+INTO|UPDATE\s+\w+\s+SET|DELETE\s+FROM|DROP\s+TABLE|"
    r"ALTER\s+TABLE|CREATE\s+TABLE)\b"
    r"|(?i:\bselect\s+(?:\*|[\w.]+(?:\s*,\s*[\w.]+)*)\s+from\s+\w+|\binsert\s+into\s+\w+|"
    r"\bdelete\s+from\s+\w+|\bupdate\s+\w+\s+set\s+\w+\s*=)",
    re.DOTALL,
)
_DYNAMIC_LINE = re.compile(r"""["']\s*\+|\+\s*["']|\$\{|["']\s*%\s*[\w(]|\.format\(|\bf["']""")
_EVAL_LINE = re.compile(r"(?<![\w.])(eval|exec)\s*\(")
_BARE_EXCEPT_LINE = re.compile(r"^\s*except\s*:")
_MARKER = re.compile(r"\b(TODO|FIXME|XXX|HACK)\b")
_COMMENTED_MARKER = re.compile(r"(?:#|//|/\*|<!--|--|^\s*\*|;).*?\b(TODO|FIXME|XXX|HACK)\b")
_SQL_METHODS = {"execute", "executemany", "executescript", "exec_driver_sql", "raw", "mogrify"}
_SUBPROCESS = {"run", "call", "check_call", "check_output", "Popen"}


@dataclass(frozen=True)
class Issue:
    """One finding; `type` is the kind of concern (security, quality, maintenance, ...)."""

    severity: str
    type: str
    line: int
    description: str
    suggestion: str

    def as_dict(self, file: str) -> dict[str, object]:
        return {
            "severity": self.severity,
            "type": self.type,
            "file": file,
            "line": self.line,
            "description": self.description,
            "suggestion": self.suggestion,
        }


def analyze(source: str, *, python: bool) -> list[Issue]:
    """Every finding in `source`, by line, the most severe first on each line."""
    lines = source.splitlines()
    issues = list(_long_lines(lines))
    tree: ast.Module | None = None
    if python:
        try:
            tree = ast.parse(source)
            visitor = _PythonChecks()
            visitor.visit(tree)
        except RecursionError:
            # Nesting too deep for the parser or the visitor (a long chain of `+`, say): the
            # line patterns still give an answer, where failing would only be retried.
            tree = None
        except (SyntaxError, ValueError) as exc:
            line = getattr(exc, "lineno", None) or 1
            message = getattr(exc, "msg", str(exc))
            issues.append(
                Issue(
                    "high",
                    "syntax",
                    line,
                    f"the file does not parse as Python: {message}",
                    "Fix the syntax error; only line checks could run on this file",
                )
            )
    if tree is not None:
        issues += visitor.issues
        issues += _python_markers(source, lines)
    else:
        issues += _pattern_checks(lines, python=python)
    unique = {(i.line, i.type, i.description): i for i in issues}
    rank = {severity: n for n, severity in enumerate(SEVERITIES)}
    return sorted(unique.values(), key=lambda i: (i.line, rank[i.severity], i.description))


def summarize(issues: Iterable[Issue]) -> str:
    """Seed 004's summary line: "Found 5 issues (2 high, 1 medium, 2 low)"."""
    counts = Counter(issue.severity for issue in issues)
    total = sum(counts.values())
    by_severity = ", ".join(f"{counts[s]} {s}" for s in SEVERITIES)
    return f"Found {total} issue{'' if total == 1 else 's'} ({by_severity})"


def document(
    issues: list[Issue], *, file: str, lines_analyzed: int, time_taken: float
) -> dict[str, object]:
    """Seed 004's code_review result: summary, issues and metrics."""
    listed = issues
    if len(issues) > MAX_LISTED:
        rank = {severity: n for n, severity in enumerate(SEVERITIES)}
        most_severe = sorted(issues, key=lambda i: rank[i.severity])[:MAX_LISTED]
        listed = sorted(most_severe, key=lambda i: (i.line, rank[i.severity]))
    result: dict[str, object] = {
        "summary": summarize(issues),
        "issues": [issue.as_dict(file) for issue in listed],
        "metrics": {
            "lines_analyzed": lines_analyzed,
            "time_taken": round(time_taken, 3),
            "issues_found": len(issues),
        },
    }
    if listed is not issues:
        result["truncated"] = True
    return result


# -- line checks ------------------------------------------------------------------------------


def _long_lines(lines: list[str]) -> Iterator[Issue]:
    for number, line in enumerate(lines, 1):
        if len(line) > MAX_LINE:
            yield Issue(
                "low",
                "style",
                number,
                f"line is {len(line)} characters long (over {MAX_LINE})",
                "Break it up; long lines are hard to read and to review in a diff",
            )


def _marker(number: int, text: str) -> Issue:
    return Issue(
        "low",
        "maintenance",
        number,
        f"unresolved comment: {text.strip()[:200]}",
        "Resolve it, or track it in the issue tracker and link it",
    )


def _pattern_checks(lines: list[str], *, python: bool) -> Iterator[Issue]:
    """For files without a syntax tree: other languages, and Python that does not parse."""
    for number, line in enumerate(lines, 1):
        if found := _EVAL_LINE.search(line):
            yield _eval_issue(number, found.group(1))
        if _SECRET_LINE.search(line):
            yield _secret_issue(number)
        if _SQL.search(line) and _DYNAMIC_LINE.search(line):
            yield Issue("high", "security", number, SQL_INJECTION, SQL_FIX)
        if python and _BARE_EXCEPT_LINE.match(line):
            yield _bare_except(number)
        match = _COMMENTED_MARKER.search(line)
        if match:
            yield _marker(number, line[match.start(1) :])


def _python_markers(source: str, lines: list[str]) -> Iterator[Issue]:
    """TODO/FIXME in comments only; a marker inside a string is data, not a note."""
    try:
        for token in tokenize.generate_tokens(io.StringIO(source).readline):
            if token.type == tokenize.COMMENT:
                match = _MARKER.search(token.string)
                if match:
                    yield _marker(token.start[0], token.string[match.start() :])
    except (tokenize.TokenError, SyntaxError):
        for number, line in enumerate(lines, 1):
            match = _COMMENTED_MARKER.search(line)
            if match:
                yield _marker(number, line[match.start(1) :])


# -- Python checks ----------------------------------------------------------------------------


def _eval_issue(line: int, name: str) -> Issue:
    return Issue(
        "high",
        "security",
        line,
        f"{name}() runs arbitrary code; with any outside input it is code injection",
        "Parse the data instead (ast.literal_eval, json.loads) or dispatch on known names",
    )


def _secret_issue(line: int) -> Issue:
    return Issue("high", "security", line, "hard-coded credential in the source", SECRET_FIX)


def _bare_except(line: int) -> Issue:
    return Issue(
        "medium",
        "quality",
        line,
        "bare `except:` also catches KeyboardInterrupt and SystemExit and hides bugs",
        "Catch the exceptions you expect, e.g. `except ValueError:`",
    )


def _name_of(node: ast.expr) -> str:
    """The dotted name of a call's target (`cursor.execute`), or ""."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _name_of(node.value)
        return f"{base}.{node.attr}" if base else node.attr
    return ""


def _is_secret_literal(node: ast.expr | None) -> bool:
    return (
        isinstance(node, ast.Constant)
        and isinstance(node.value, str)
        and not _PLACEHOLDER.match(node.value)
    )


def _dynamic_text(node: ast.expr) -> str | None:
    """The literal text of a string built at run time (f-string, +, % or .format), or None
    when `node` is not such a string."""
    if isinstance(node, ast.JoinedStr):
        if not any(isinstance(v, ast.FormattedValue) for v in node.values):
            return None
        return "".join(
            v.value for v in node.values if isinstance(v, ast.Constant) and isinstance(v.value, str)
        )
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add | ast.Mod):
        parts = _literal_parts(node) if isinstance(node.op, ast.Add) else _literal_parts(node.left)
        if not parts:
            return None
        if isinstance(node.op, ast.Add) and _all_literal(node):
            return None
        return "".join(parts)
    if (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == "format"
        and isinstance(node.func.value, ast.Constant)
        and isinstance(node.func.value.value, str)
    ):
        return node.func.value.value
    return None


def _formatted(node: ast.expr) -> bool:
    """Whether a query argument is built by formatting: `sql % args` is as dangerous when
    `sql` is a variable as when it is a literal."""
    return _dynamic_text(node) is not None or (
        isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mod)
    )


def _literal_parts(node: ast.expr) -> list[str]:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        return _literal_parts(node.left) + _literal_parts(node.right)
    if isinstance(node, ast.JoinedStr):
        return [
            v.value for v in node.values if isinstance(v, ast.Constant) and isinstance(v.value, str)
        ]
    return []


def _all_literal(node: ast.expr) -> bool:
    if isinstance(node, ast.Constant):
        return True
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        return _all_literal(node.left) and _all_literal(node.right)
    return False


class _PythonChecks(ast.NodeVisitor):
    def __init__(self) -> None:
        self.issues: list[Issue] = []

    def _add(self, issue: Issue) -> None:
        self.issues.append(issue)

    def visit_Call(self, node: ast.Call) -> None:
        name = _name_of(node.func)
        last = name.rsplit(".", 1)[-1]
        if name in ("eval", "exec", "builtins.eval", "builtins.exec"):
            self._add(_eval_issue(node.lineno, last))
        if last in _SQL_METHODS and node.args and _formatted(node.args[0]):
            self._add(Issue("high", "security", node.lineno, SQL_INJECTION, SQL_FIX))
        self._check_sql_string(node)
        shell = any(
            k.arg == "shell" and isinstance(k.value, ast.Constant) and k.value.value is True
            for k in node.keywords
        )
        if name in ("os.system", "os.popen") or (
            shell and last in _SUBPROCESS and name.startswith("subprocess")
        ):
            self._add(
                Issue(
                    "high",
                    "security",
                    node.lineno,
                    f"{name}() runs a shell command line; with outside input it is command "
                    "injection",
                    "Pass an argument list to subprocess.run without shell=True",
                )
            )
        for keyword in node.keywords:
            if keyword.arg and _SECRET_NAME.search(keyword.arg):
                if _is_secret_literal(keyword.value):
                    self._add(_secret_issue(keyword.value.lineno))
        self.generic_visit(node)

    def _check_sql_string(self, node: ast.expr) -> None:
        text = _dynamic_text(node)
        if text is not None and _SQL.search(text):
            self._add(Issue("high", "security", node.lineno, SQL_INJECTION, SQL_FIX))

    def visit_JoinedStr(self, node: ast.JoinedStr) -> None:
        self._check_sql_string(node)
        self.generic_visit(node)

    def visit_BinOp(self, node: ast.BinOp) -> None:
        self._check_sql_string(node)
        self.generic_visit(node)

    def _check_assignment(self, targets: list[ast.expr], value: ast.expr | None) -> None:
        if not _is_secret_literal(value):
            return
        for target in targets:
            name = _name_of(target).rsplit(".", 1)[-1]
            if name and _SECRET_NAME.search(name):
                self._add(_secret_issue(target.lineno))
                return

    def visit_Assign(self, node: ast.Assign) -> None:
        self._check_assignment(node.targets, node.value)
        self.generic_visit(node)

    def visit_AnnAssign(self, node: ast.AnnAssign) -> None:
        self._check_assignment([node.target], node.value)
        self.generic_visit(node)

    def visit_Dict(self, node: ast.Dict) -> None:
        for key, value in zip(node.keys, node.values, strict=True):
            if (
                isinstance(key, ast.Constant)
                and isinstance(key.value, str)
                and _SECRET_NAME.search(key.value)
                and _is_secret_literal(value)
            ):
                self._add(_secret_issue(key.lineno))
        self.generic_visit(node)

    def visit_ExceptHandler(self, node: ast.ExceptHandler) -> None:
        if node.type is None:
            self._add(_bare_except(node.lineno))
        self.generic_visit(node)

    def _check_length(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        length = (node.end_lineno or node.lineno) - node.lineno + 1
        if length > MAX_FUNCTION:
            self._add(
                Issue(
                    "medium",
                    "maintainability",
                    node.lineno,
                    f"function {node.name}() is {length} lines long (over {MAX_FUNCTION})",
                    "Split it into smaller functions that each do one thing",
                )
            )
        self.generic_visit(node)

    visit_FunctionDef = _check_length
    visit_AsyncFunctionDef = _check_length
