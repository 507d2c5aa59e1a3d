"""The documentation's examples run, so they cannot drift from the code.

- Python blocks of README.md and docs/*.md (docs/integrations.md is run by
  tests/test_integrations.py) run in order, one namespace per page, on the tiny
  packages: ``path/to/bge-m3-package`` and ``path/to/reranker-package`` become the
  ``package_dir`` and ``reranker_dir`` fixtures. A line ``EXPR  # -> VALUE`` (VALUE a
  Python literal, optionally followed by two spaces and a remark) is checked: numbers
  to the precision written (0.3648 means within 5e-5), sequences and dicts item by
  item.
- Every ``m3``/``m3-export`` command in a shell block (bash, console, or an untagged
  synopsis) is checked against the real parsers (``m3_runtime.cli.build_parser``,
  ``m3_exporter.cli.build_parser``): a plain command must parse as ``main`` parses it;
  a synopsis line (with ``[...]``) must name only options the subcommand has, with
  the choices it has. Shell blocks are never run.
- ``<!-- not run: why -->`` right before a block keeps a Python block from running
  (model hub, GPU); its commands are still parsed, which needs neither.
- Links between the pages (files and ``#anchors``) resolve.
"""

from __future__ import annotations

import argparse
import ast
import io
import math
import re
import shlex
import tokenize
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
# The pages whose Python blocks this file runs; docs/integrations.md has its own test.
RUN_PAGES = sorted([ROOT / "README.md", *(p for p in DOCS.glob("*.md") if p.name != "integrations.md")])
# The pages whose commands and links are checked.
CHECK_PAGES = sorted(
    [*RUN_PAGES, ROOT / "CONTRIBUTING.md", ROOT / "runtime" / "README.md", ROOT / "exporter" / "README.md"]
)
PLACEHOLDERS = {"path/to/bge-m3-package": "package_dir", "path/to/reranker-package": "reranker_dir"}
NOT_RUN = re.compile(r"<!--\s*not run:[^>]*-->\s*$")
FENCE = re.compile(r"^```(\w*)\s*$")


@dataclass(frozen=True)
class Block:
    page: Path
    line: int  # 1-based line of the opening fence
    lang: str
    code: str
    not_run: bool

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def blocks(page: Path) -> list[Block]:
    """The fenced blocks of a page, in order, with the ``not run`` mark of the line before each."""
    lines = page.read_text(encoding="utf-8").splitlines()
    out: list[Block] = []
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        start = i
        i += 1
        body = []
        while i < len(lines) and lines[i].strip() != "```":
            body.append(lines[i])
            i += 1
        before = next((lines[k] for k in range(start - 1, -1, -1) if lines[k].strip()), "")
        out.append(Block(page, start + 1, m.group(1), "\n".join(body) + "\n", bool(NOT_RUN.match(before))))
        i += 1
    return out


def _page_id(page: Path) -> str:
    return str(page.relative_to(ROOT))


# -- Python blocks ------------------------------------------------------------------------


def _signature(code: str) -> ast.FunctionDef | None:
    """A block that is a call signature, ``Name(a, b=1, *, c=2)``, as a def; else None."""
    try:
        ast.parse(code)
        return None  # runnable code
    except SyntaxError:
        pass
    try:
        tree = ast.parse("def " + code.strip() + ": pass")
    except SyntaxError:
        return None
    node = tree.body[0]
    return node if isinstance(node, ast.FunctionDef) else None


def _check_signature(node: ast.FunctionDef, where: str) -> None:
    """A documented signature names the parameters of ``m3_runtime.<Name>`` in order, with its defaults."""
    import inspect

    import m3_runtime

    target = getattr(m3_runtime, node.name)
    params = [p for p in inspect.signature(target).parameters.values() if p.name != "self"]
    args = node.args
    documented = [
        *((a.arg, d, inspect.Parameter.POSITIONAL_OR_KEYWORD) for a, d in _with_defaults(args.args, args.defaults)),
        *((a.arg, d, inspect.Parameter.KEYWORD_ONLY) for a, d in zip(args.kwonlyargs, args.kw_defaults, strict=True)),
    ]
    assert [(n, k) for n, _, k in documented] == [(p.name, p.kind) for p in params], (
        f"{where}: documented {[n for n, _, _ in documented]}, the code has {[p.name for p in params]}"
    )
    for (name, default, _), param in zip(documented, params, strict=True):
        want = inspect.Parameter.empty if default is None else ast.literal_eval(default)
        assert want == param.default, f"{where}: {name} defaults to {param.default!r}, the docs say {want!r}"


def _with_defaults(args: list[ast.arg], defaults: list[ast.expr]) -> list[tuple[ast.arg, ast.expr | None]]:
    return list(zip(args, [None] * (len(args) - len(defaults)) + list(defaults), strict=True))


def _expectations(code: str) -> dict[int, str]:
    """Line number -> the literal after ``# ->`` on that line."""
    out = {}
    for tok in tokenize.generate_tokens(io.StringIO(code).readline):
        if tok.type == tokenize.COMMENT and tok.string.startswith("# ->"):
            out[tok.start[0]] = re.split(r"\s{2,}", tok.string[4:].strip(), maxsplit=1)[0]
    return out


def _decimals(literal: str) -> list[int]:
    """Digits after the point of each number in ``literal``, in order (0 for integers)."""
    return [len(frac) for frac in re.findall(r"-?\d+(?:\.(\d+))?(?:e-?\d+)?", literal)]


def _same(got: Any, want: Any, decimals: list[int]) -> bool:
    """``got`` equals ``want`` to the precision written; ``decimals`` is consumed in order."""
    if hasattr(got, "tolist") and not isinstance(got, (str, bytes)):
        got = got.tolist()
    if isinstance(want, bool) or want is None or isinstance(want, str):
        return got == want
    if isinstance(want, (int, float)):
        places = decimals.pop(0)
        if not isinstance(got, (int, float)) or isinstance(got, bool):
            return False
        if isinstance(want, int) and places == 0:
            return got == want
        return math.isclose(got, want, rel_tol=0, abs_tol=0.5 * 10.0**-places * (1 + 1e-9))
    if isinstance(want, (list, tuple)):
        return (
            isinstance(got, (list, tuple))
            and len(got) == len(want)
            and all(_same(g, w, decimals) for g, w in zip(got, want, strict=True))
        )
    if isinstance(want, dict):
        if not isinstance(got, dict) or list(got) != list(want):
            return False
        return all(_same(got[k], want[k], decimals) for k in want)
    raise TypeError(f"cannot compare with {want!r}")


def _check(value: Any, literal: str, where: str) -> None:
    want = ast.literal_eval(literal)
    if not _same(value, want, _decimals(literal)):
        raise AssertionError(f"{where}: got {value!r}, the docs say {literal}")


def _instrument(code: str, name: str) -> ast.Module:
    """``code`` with every ``EXPR  # -> VALUE`` statement replaced by a check of EXPR."""
    expected = _expectations(code)
    tree = ast.parse(code, filename=name)
    seen = set()
    for k, node in enumerate(tree.body):
        if isinstance(node, ast.Expr) and node.end_lineno in expected:
            line = node.end_lineno
            seen.add(line)
            call = ast.Call(
                func=ast.Name("__doc_check__", ast.Load()),
                args=[node.value, ast.Constant(expected[line]), ast.Constant(f"{name} line {line}")],
                keywords=[],
            )
            tree.body[k] = ast.copy_location(ast.Expr(call), node)
    missing = sorted(set(expected) - seen)
    if missing:  # a "# ->" that would silently check nothing
        raise AssertionError(f"{name}: '# ->' on lines {missing} is not after a top-level expression")
    return ast.fix_missing_locations(tree)


def _run_pages() -> list[Path]:
    return [p for p in RUN_PAGES if any(b.lang == "python" for b in blocks(p))]


def test_every_page_is_covered():
    """New pages are picked up by glob; the README and the reference pages all have examples."""
    names = {p.name for p in _run_pages()}
    assert {"README.md", "runtime.md"} <= names, names
    for page in RUN_PAGES:
        for block in blocks(page):
            if block.lang == "python" and not block.not_run and _signature(block.code) is None:
                used = [ph for ph in PLACEHOLDERS if ph in block.code]
                assert "out/tiny" not in block.code, f"{block.where}: use a placeholder path, not out/..."
                assert used or "M3Model(" not in block.code, f"{block.where}: loads a package without a placeholder"


@pytest.mark.parametrize("page", _run_pages(), ids=_page_id)
def test_python_examples_run(page, package_dir, reranker_dir, tmp_path, monkeypatch, capsys):
    paths = {"package_dir": package_dir, "reranker_dir": reranker_dir}
    monkeypatch.chdir(tmp_path)
    ns: dict[str, Any] = {"__name__": "__docs__", "__doc_check__": _check}
    ran = 0
    for block in blocks(page):
        if block.lang != "python" or block.not_run:
            continue
        signature = _signature(block.code)
        if signature is not None:
            _check_signature(signature, block.where)
            continue
        code = block.code
        for placeholder, fixture in PLACEHOLDERS.items():
            code = code.replace(placeholder, str(paths[fixture]))
        exec(compile(_instrument(code, block.where), block.where, "exec"), ns)
        ran += 1
    assert ran, f"{_page_id(page)} has Python blocks but all are marked not run"


def test_expectation_checker_can_fail():
    """The ``# ->`` check refuses a wrong value, a wrong precision and a wrong shape."""
    _check(0.36479803, "0.3648", "x")
    _check((2, 64), "(2, 64)", "x")
    _check([-0.24129915], "[-0.2413]", "x")
    for value, literal in [(0.3650, "0.3648"), ((2, 63), "(2, 64)"), ([1, 2], "[1, 2, 3]"), ({"a": 1}, "{}")]:
        with pytest.raises(AssertionError):
            _check(value, literal, "x")
    with pytest.raises(AssertionError, match="not after a top-level expression"):
        _instrument("x = 1  # -> 1\n", "x")


# -- shell blocks: m3 and m3-export commands ------------------------------------------------

SHELL_LANGS = {"bash", "sh", "console", "shell", ""}


def _parsers() -> dict[str, argparse.ArgumentParser]:
    from m3_runtime.cli import build_parser as runtime_parser

    parsers = {"m3": runtime_parser()}
    try:
        from m3_exporter.cli import build_parser as exporter_parser
    except ImportError:  # a runtime-only environment (M3_TEST_PACKAGES): m3-export lines are skipped
        pass
    else:
        parsers["m3-export"] = exporter_parser()
    return parsers


def _logical_lines(block: Block) -> list[str]:
    """Command lines: ``$ `` prompts stripped in console blocks, synopsis and backslash
    continuations joined, output lines of console blocks dropped."""
    console = block.lang == "console"
    out: list[str] = []
    for raw in block.code.splitlines():
        line = raw.rstrip()
        if console:
            if line.startswith("$ "):
                out.append(line[2:])
            continue
        if out and (out[-1].endswith("\\") or re.match(r"^\s+\[", line)):
            out[-1] = out[-1].rstrip("\\") + " " + line.strip()
        elif line.strip():
            out.append(line.strip())
    return out


def _commands(line: str) -> list[list[str]]:
    """The m3/m3-export invocations in one shell line (pipes, ``&&`` and ``&`` split it)."""
    try:
        words = shlex.split(line, comments=True)
    except ValueError:
        return []
    out, current = [], []
    for word in [*words, "|"]:
        if word in ("|", "&&", "&", ";", "||"):
            if current and Path(current[0]).name in ("m3", "m3-export"):
                out.append([Path(current[0]).name, *current[1:]])
            current = []
        else:
            current.append(word)
    return out


def _subparser(parser: argparse.ArgumentParser, args: list[str]) -> tuple[argparse.ArgumentParser, list[str]]:
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        return parser, args
    for i, word in enumerate(args):
        if word in subs[0].choices:
            return subs[0].choices[word], args[i + 1 :]
    return parser, args


def _options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {opt: action for action in parser._actions for opt in action.option_strings}


def _check_synopsis(prog: str, parser: argparse.ArgumentParser, args: list[str], where: str) -> None:
    sub, rest = _subparser(parser, args)
    options = _options(sub) | (_options(parser) if sub is parser else {})
    words = [w.strip("[]") for w in rest]
    for i, word in enumerate(words):
        if not word.startswith("--"):
            continue
        name = word.split("=", 1)[0]
        assert name in options, f"{where}: {prog} {' '.join(args[:1])} has no option {name}"
        choices = options[name].choices
        value = words[i + 1] if i + 1 < len(words) else ""
        if choices and value.startswith("{"):
            assert set(value.strip("{}").split(",")) == set(choices), f"{where}: {name} takes {sorted(choices)}"
        elif choices and "|" in value:
            assert set(value.split("|")) <= set(choices), f"{where}: {name} takes {sorted(choices)}"


def _check_command(prog: str, parser: argparse.ArgumentParser, args: list[str], where: str) -> None:
    """Parse as the entry points do: m3 parses the subcommand's arguments intermixed."""
    # Both exit before the positional arguments are needed (m3-export's main checks
    # --list-models before parsing).
    for flag in ("--version", "--list-models"):
        if flag in args:
            assert flag in _options(parser), f"{where}: {prog} has no option {flag}"
            return
    sub, rest = _subparser(parser, args)
    try:
        if sub is parser:
            parser.parse_args(args)
        else:
            sub.parse_intermixed_args(rest)
    except SystemExit as exc:
        raise AssertionError(f"{where}: `{prog} {shlex.join(args)}` does not parse") from exc


def _shell_blocks() -> list[Block]:
    return [b for page in CHECK_PAGES for b in blocks(page) if b.lang in SHELL_LANGS]


def test_shell_commands_parse(capsys):
    parsers = _parsers()
    checked = 0
    for block in _shell_blocks():
        for line in _logical_lines(block):
            for prog, *args in _commands(line):
                if prog not in parsers:
                    continue
                where = f"{block.where}: {line[:60]}"
                if any(w.startswith("[") or w == "..." or "|" in w for w in args):
                    _check_synopsis(prog, parsers[prog], args, where)
                else:
                    _check_command(prog, parsers[prog], args, where)
                checked += 1
    capsys.readouterr()  # argparse's usage messages
    assert checked >= 15, checked  # 34 with m3-export, 22 without


def test_command_checker_can_fail():
    parsers = _parsers()
    with pytest.raises(AssertionError):
        _check_command("m3", parsers["m3"], ["encode", "pkg", "--no-such-option"], "x")
    with pytest.raises(AssertionError):
        _check_command("m3", parsers["m3"], ["score", "pkg", "only-a-query"], "x")
    with pytest.raises(AssertionError):
        _check_synopsis("m3", parsers["m3"], ["serve", "[PACKAGE]", "[--no-such-option", "N]"], "x")
    with pytest.raises(AssertionError):
        _check_synopsis("m3", parsers["m3"], ["encode", "PKG", "[--variant", "{fp32,int4}]"], "x")


# -- links ------------------------------------------------------------------------------------

LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    text = page.read_text(encoding="utf-8")
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)  # '#' lines in code are not headings
    seen: dict[str, int] = {}
    out = set()
    for heading in re.findall(r"^#{1,6} (.+)$", text, flags=re.M):
        slug = _slug(heading)
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


@pytest.mark.parametrize("page", CHECK_PAGES, ids=_page_id)
def test_links_resolve(page):
    text = re.sub(r"^```.*?^```", "", page.read_text(encoding="utf-8"), flags=re.S | re.M)
    for target in LINK.findall(text):
        if re.match(r"[a-z]+:", target):
            continue  # https:, mailto:
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        assert dest.exists(), f"{_page_id(page)}: link to {target}: {dest} does not exist"
        if anchor and dest.suffix == ".md":
            assert anchor in _anchors(dest), f"{_page_id(page)}: link to {target}: no such heading in {dest.name}"


# -- option tables ------------------------------------------------------------------------------

# Pages whose tables document a command's options, and which command (program, subcommand).
OPTION_TABLES = {"docs/server.md": ("m3", "serve"), "docs/exporting.md": ("m3-export", None)}


@pytest.mark.parametrize("page, command", OPTION_TABLES.items(), ids=list(OPTION_TABLES))
def test_option_tables_name_real_options(page, command):
    """Every ``--option`` in the first column of a table is an option of the command, and
    every option of the command is in a table (help aside)."""
    prog, sub = command
    parsers = _parsers()
    if prog not in parsers:
        pytest.skip(f"{prog} is not installed here")
    parser = parsers[prog]
    if sub is not None:
        parser, _ = _subparser(parser, [sub])
    text = (ROOT / page).read_text(encoding="utf-8")
    documented = set()
    for first in re.findall(r"^\| *([^|]+?) *\|", text, flags=re.M):
        documented |= set(re.findall(r"`(--[a-z0-9-]+)", first))
    options = {o for o in _options(parser) if o.startswith("--") and o != "--help"}
    assert documented, page
    assert documented <= options, f"{page} documents options {prog} lacks: {sorted(documented - options)}"
    assert options <= documented, f"{page} leaves out options of {prog}: {sorted(options - documented)}"


# -- console outputs: checked, or marked illustrative and checked for shape ---------------------

# Console output from these commands is run here on the tiny packages and compared;
# every other console block with output lines must be marked ``<!-- illustrative: why -->``.
RUNNABLE = ("m3 encode ", "m3 score ", "m3 rerank ", "m3 info ", "m3-export --list-models")
ILLUSTRATIVE = re.compile(r"<!--\s*illustrative:[^>]*-->\s*$")
CONSOLE_PATHS = {"out/tiny-m3": "package_dir", "out/tiny-reranker": "reranker_dir"}
NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:e[-+]?\d+)?")


@dataclass(frozen=True)
class Session:
    """One ``$ command`` of a console block, its standard input and the output shown."""

    where: str
    command: str
    stdin: str | None
    output: list[str]


def console_blocks(page: Path) -> list[tuple[Block, bool, list[Session]]]:
    """Console blocks that show output: (block, marked illustrative, sessions)."""
    lines = page.read_text(encoding="utf-8").splitlines()
    out = []
    for block in blocks(page):
        if block.lang != "console":
            continue
        sessions: list[Session] = []
        for raw in block.code.splitlines():
            if raw.startswith("$ "):
                command = re.sub(r"\s+#.*$", "", raw[2:]).strip()
                stdin = None
                piped = re.match(r"^printf '([^']*)' \| (.*)$", command)
                if piped:
                    stdin, command = piped.group(1).encode().decode("unicode_escape"), piped.group(2)
                sessions.append(Session(block.where, command, stdin, []))
            elif raw.strip() and sessions:
                sessions[-1].output.append(raw)
        if any(s.output for s in sessions):
            before = next((lines[k] for k in range(block.line - 2, -1, -1) if lines[k].strip()), "")
            out.append((block, bool(ILLUSTRATIVE.match(before)), sessions))
    return out


def _runnable(command: str) -> bool:
    return command.startswith(RUNNABLE) and "&" not in command


def _run_console(command: str, stdin: str | None, paths: dict[str, Path], capsys, monkeypatch) -> list[str]:
    import io
    import sys

    argv = shlex.split(command)
    argv = [str(paths[CONSOLE_PATHS[a]]) if a in CONSOLE_PATHS else a for a in argv]
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    capsys.readouterr()
    if argv[0] == "m3-export":
        from m3_exporter.cli import main as export_main

        rc = export_main(argv[1:])
    else:
        from m3_runtime.cli import main

        rc = main(argv[1:])
    out, err = capsys.readouterr()
    assert rc == 0, f"{command}: exit status {rc}: {err}"
    return out.splitlines()


def _pattern(expected: str) -> tuple[re.Pattern[str], list[str]]:
    """``expected`` as a regex: its numbers captured, ``...`` and ``…`` any text."""
    parts, numbers, pos = [], [], 0
    for m in re.finditer(rf"\.\.\.|…|{NUMBER.pattern}", expected):
        parts.append(re.escape(expected[pos : m.start()]))
        if m.group() in ("...", "…"):
            parts.append(".*?")
        else:
            parts.append(f"({NUMBER.pattern})")
            numbers.append(m.group())
        pos = m.end()
    parts.append(re.escape(expected[pos:]))
    return re.compile("".join(parts) + r"\Z"), numbers


def line_matches(expected: str, actual: str) -> bool:
    """``actual`` is ``expected`` but for ``...`` and numbers within the precision written
    (or 1e-5 relative, what fp32 may differ by between machines)."""
    pattern, numbers = _pattern(expected)
    m = pattern.match(actual)
    if not m:
        return False
    for want, got in zip(numbers, m.groups(), strict=True):
        decimals = len(want.split(".")[1].split("e")[0]) if "." in want else 0
        tol = max(0.5 * 10.0**-decimals if "e" not in want else 0.0, 1e-5 * max(1.0, abs(float(want))))
        if abs(float(got) - float(want)) > tol:
            return False
    return True


def shape(line: str) -> str:
    """What an illustrative line promises: its label (``package``, ``vs PyTorch``,
    ``SHA-256``), or the keys of a JSON line."""
    text = line.strip()
    if text.startswith("{"):
        return "keys " + " ".join(re.findall(r'"(\w[\w+]*)":', text))
    return re.split(r" {2,}|:", text)[0]


def _in_order(wanted: list[str], have: list[str]) -> bool:
    it = iter(have)
    return all(any(w == h for h in it) for w in wanted)


def test_console_outputs_are_checked_or_marked(package_dir, reranker_dir, capsys, monkeypatch, tmp_path):
    """A console block's output is what the command prints today (run on the tiny
    packages, numbers to the precision shown), or the block is marked illustrative; an
    illustrative block whose commands run here must still have that output's shape."""
    paths = {"package_dir": package_dir, "reranker_dir": reranker_dir}
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    checked = 0
    for page in CHECK_PAGES:
        for block, illustrative, sessions in console_blocks(page):
            runnable = all(_runnable(s.command) for s in sessions)
            if not illustrative:
                assert runnable, (
                    f"{block.where}: console output of a command this test cannot run here; "
                    "mark the block <!-- illustrative: why -->"
                )
            if not runnable:
                continue
            for s in sessions:
                if s.command.startswith("m3-export") and "m3-export" not in _parsers():
                    continue
                got = _run_console(s.command, s.stdin, paths, capsys, monkeypatch)
                if illustrative:
                    want = [shape(x) for x in s.output]
                    assert _in_order(want, [shape(x) for x in got]), (
                        f"{block.where}: `{s.command}` no longer prints lines like {want}; it prints:\n"
                        + "\n".join(got)
                    )
                else:
                    assert len(got) == len(s.output) and all(
                        line_matches(w, g) for w, g in zip(s.output, got, strict=True)
                    ), (
                        f"{block.where}: `{s.command}` prints\n"
                        + "\n".join(got)
                        + "\nthe docs show\n"
                        + "\n".join(s.output)
                    )
                checked += 1
    assert checked >= 6


def test_console_checker_can_fail():
    assert line_matches('{"a": 1.2800, "b": [0.5, ...]}', '{"a": 1.28004, "b": [0.5, 0.25, 1.0]}')
    assert not line_matches('{"a": 1.2800}', '{"a": 1.2304}')
    assert not line_matches('{"a": 1.2800}', '{"b": 1.2800}')
    assert line_matches("package      /…/out/tiny-m3", "package      /tmp/x/out/tiny-m3")
    assert shape("  int8        2.6 MB  int8 MatMuls") == "int8" and shape("        vs PyTorch: x 1") == "vs PyTorch"
    assert shape('{"index": 0, "dense": [...], "sparse": {...}}') == "keys index dense sparse"
    assert _in_order(["a", "c"], ["a", "b", "c"]) and not _in_order(["c", "a"], ["a", "b", "c"])
