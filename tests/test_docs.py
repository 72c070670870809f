"""The documentation is checked like code: docs/ builds with MkDocs in strict mode (a broken link or anchor
fails), and what README.md and docs/ name must exist: every `helios-deploy COMMAND --option` names a real
command of the click CLI and real options of it, every `python -m helios_deploy...` / `from helios_deploy...
import ...` names real modules and attributes, and every repository path (helios_deploy/..., runtime/...)
exists."""

from __future__ import annotations

import ast
import importlib
import importlib.util
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import click
import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = sorted((ROOT / "docs").glob("*.md")) + [ROOT / "README.md"]

# Backticked paths whose first segment is one of these are repository paths and must exist. engines/ is the
# artifact root: only its README is in the repository, the rest (engines/demo/, ...) is what commands write.
SOURCE_ROOTS = {"helios_deploy", "export", "runtime", "tests", "docs", ".ci"}
TOP_FILES = {"Makefile", "pyproject.toml", "mkdocs.yml", "README.md", "engines/README.md"}
# Options the docs name that belong to other programs (said so where they are named), not to our CLI.
FOREIGN_OPTIONS = {"--grpc-max-response-pool-size", "--model-control-mode", "--load-model"}  # tritonserver's options

FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
SPAN = re.compile(r"(?<!`)`([^`\n]+)`(?!`)")
PATHLIKE = re.compile(r"^[\w.\-/]+$")
MODULE = re.compile(r"^helios_deploy(\.\w+)+$")
PROSE_PATH = re.compile(r"(?<![\w/.-])((?:%s)/[\w/.-]*\w/?)" % "|".join(re.escape(r) for r in sorted(SOURCE_ROOTS)))


# ----------------------------------------------------------------------------------------------- reading pages

def split_page(text: str) -> tuple[list[tuple[str, str]], list[str]]:
    """(fenced blocks as (language, body), inline code spans outside them)."""
    blocks = [(m.group(1), m.group(2)) for m in FENCE.finditer(text)]
    prose = FENCE.sub("", text)
    return blocks, SPAN.findall(prose)


def command_lines(block: str) -> list[list[str]]:
    """The argument lists after `helios-deploy` in a shell block (comments dropped, `&&` / `;` / `|` split)."""
    found = []
    for line in block.splitlines():
        try:
            tokens = shlex.split(line, comments=True)
        except ValueError:
            continue
        segment: list[str] = []
        for tok in tokens + ["&&"]:
            if tok in ("&&", ";", "|", "||"):
                if "helios-deploy" in segment:
                    found.append(segment[segment.index("helios-deploy") + 1:])
                segment = []
            else:
                segment.append(tok)
    return found


# ------------------------------------------------------------------------------------------------ the checks

def cli_commands() -> dict[str, click.Command]:
    from helios_deploy.cli import cli

    ctx = click.Context(cli)
    return {name: cli.get_command(ctx, name) for name in cli.list_commands(ctx)}


def option_names(command: click.Command) -> set[str]:
    names = {"--help", "-h"}
    for p in command.params:
        if isinstance(p, click.Option):
            names.update(p.opts + p.secondary_opts)
    return names


def check_invocation(args: list[str], commands: dict[str, click.Command]) -> list[str]:
    """What is wrong with `helios-deploy ARGS`: an unknown command, or options that command does not have."""
    if not args or args[0].startswith("-"):
        return [f"--{a.lstrip('-')} is not a top-level option" for a in args[:1]
                if a.split("=")[0] not in ("--help", "-h", "--version")]
    name, rest = args[0], args[1:]
    if name not in commands:
        return [f"`helios-deploy {name}`: no such command (commands: {', '.join(commands)})"]
    known = option_names(commands[name])
    problems = []
    for tok in rest:
        tok = tok.strip("[](),")  # `[--steps ...]`: an optional option is still an option
        if not tok.startswith("-") or tok in ("-", "..."):
            continue
        for opt in tok.split("=")[0].split("/"):  # `--height/--width` names two options
            if opt.startswith("-") and opt.rstrip(".") not in known:
                problems.append(f"`helios-deploy {name}` has no option {opt}")
    return problems


def check_span_options(span: str, commands: dict[str, click.Command]) -> list[str]:
    """An inline span `COMMAND --opt ...` (or `gen/bench --opt`) is an invocation without the program name; a
    span that is only options (`--calibration-chunks`) must name an option some command has."""
    words = span.split()
    first = words[0]
    if first == "helios-deploy":
        return check_invocation(words[1:], commands)
    names = first.split("/")
    if all(n in commands for n in names) and any(w.strip("[(").startswith("--") for w in words[1:]):
        return [p for n in names for p in check_invocation([n] + words[1:], commands)]
    if first.startswith("--"):
        everyone = set().union(*(option_names(c) for c in commands.values())) | serve_options() | FOREIGN_OPTIONS
        return [f"{opt}: no command has this option" for w in words if w.startswith("--")
                for opt in w.split("=")[0].split("/") if opt.startswith("--") and opt not in everyone]
    return []


def serve_options() -> set[str]:
    """The options of `python -m helios_deploy.serving.server serve` (argparse)."""
    from helios_deploy.serving import service

    return {"--grpc-port", "--http-port", "--metrics-port", "--address", "--exit-timeout-secs", "--drain-timeout-secs",
            "--tritonserver"} & set(
        re.findall(r"--[\w-]+", Path(service.__file__).read_text()))


def check_module(dotted: str) -> list[str]:
    """`helios_deploy.a.b.Name`: the longest importable module prefix, then attributes."""
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        module = ".".join(parts[:i])
        try:
            spec = importlib.util.find_spec(module)
        except ModuleNotFoundError:
            spec = None
        if spec is not None:
            obj = importlib.import_module(module)
            for attr in parts[i:]:
                if not hasattr(obj, attr):
                    return [f"`{dotted}`: {module} has no {attr}"]
                obj = getattr(obj, attr)
            return []
    return [f"`{dotted}`: no such module"]


def check_python_block(body: str) -> list[str]:
    """Every `from helios_deploy... import X` / `import helios_deploy...` in a python block resolves."""
    problems = []
    for node in ast.walk(ast.parse(body)):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("helios_deploy"):
            problems += [p for a in node.names for p in check_module(f"{node.module}.{a.name}")]
        elif isinstance(node, ast.Import):
            problems += [p for a in node.names if a.name.startswith("helios_deploy") for p in check_module(a.name)]
    return problems


def check_path(span: str) -> list[str]:
    path = span.split("::")[0].rstrip(",.;:")
    if not PATHLIKE.match(path) or ("/" not in path and path not in TOP_FILES):
        return []
    first = path.split("/")[0]
    if first not in SOURCE_ROOTS and path not in TOP_FILES:
        return []
    return [] if (ROOT / path).exists() else [f"`{path}`: no such file or folder in the repository"]


def check_readme_links(text: str) -> list[str]:
    """README.md is not built by MkDocs: its relative links to files in the repository are checked here."""
    problems = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        path = target.split("#")[0]
        if not path or "://" in target or path.startswith("../"):
            continue
        if not (ROOT / path).exists():
            problems.append(f"link to {target}: no such file")
    return problems


def check_page(text: str, commands: dict[str, click.Command]) -> list[str]:
    blocks, spans = split_page(text)
    problems = []
    for lang, body in blocks:
        if lang == "python":
            problems += check_python_block(body)
            continue
        for args in command_lines(body):
            problems += check_invocation(args, commands)
        for module in re.findall(r"python -m (helios_deploy[\w.]*)", body):
            problems += check_module(module)
    problems += [p for path in PROSE_PATH.findall(FENCE.sub("", text)) for p in check_path(path)]
    for span in spans:
        problems += check_span_options(span, commands)
        problems += check_path(span)
        if MODULE.match(span):
            problems += check_module(span)
    return problems


# ---------------------------------------------------------------------------------------------------- tests

@pytest.fixture(scope="module")
def commands():
    return cli_commands()


def mkdocs_build(config: Path, site: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(config), "-d", str(site)],
                          capture_output=True, text=True, timeout=300)


def test_mkdocs_builds_strict(tmp_path):
    result = mkdocs_build(ROOT / "mkdocs.yml", tmp_path / "site")
    assert result.returncode == 0, result.stdout + result.stderr
    built = {p.stem for p in (ROOT / "docs").glob("*.md")}
    assert (tmp_path / "site" / "index.html").is_file()
    assert all((tmp_path / "site" / name / "index.html").is_file() for name in built - {"index"})


def test_mkdocs_fails_on_a_broken_link_and_anchor(tmp_path):
    """The config's strictness is real: a page with a missing page link, a missing anchor and a link out of
    docs/ fails the build and each is named."""
    shutil.copytree(ROOT / "docs", tmp_path / "docs")
    shutil.copy(ROOT / "mkdocs.yml", tmp_path / "mkdocs.yml")
    (tmp_path / "docs" / "broken.md").write_text(
        "# Broken\n\n[a](no-such-page.md) [b](runtime.md#no-such-anchor) [c](../Makefile)\n")
    result = mkdocs_build(tmp_path / "mkdocs.yml", tmp_path / "site")
    out = result.stdout + result.stderr
    assert result.returncode != 0
    assert "no-such-page.md" in out and "no-such-anchor" in out and "../Makefile" in out


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_page_names_real_commands_options_modules_and_paths(page, commands):
    text = page.read_text()
    problems = check_page(text, commands)
    if page.name == "README.md" and page.parent == ROOT:
        problems += check_readme_links(text)
    assert not problems, "\n".join(problems)


def test_pages_are_checked_at_all(commands):
    """The extraction finds what the pages hold (else the check above could pass on nothing)."""
    text = "\n".join(p.read_text() for p in PAGES)
    blocks, spans = split_page(text)
    invocations = [a for lang, body in blocks if lang != "python" for a in command_lines(body)]
    assert {a[0] for a in invocations} >= {"export", "parity", "quantize", "build", "verify", "generate", "triton"}
    assert sum(check_path(s) == [] and "/" in s for s in spans) > 20


def test_checks_catch_a_missing_command_option_module_and_path(commands):
    page = """
```bash
helios-deploy export ckpt -o arts --no-such-flag   # a comment naming --ignored is fine
helios-deploy frobnicate arts
python -m helios_deploy.serving.nothere serve repo
```

```python
from helios_deploy.runtime import Pipeline, NoSuchThing
```

Use `build --dry-run --wat`, `generate/bench --height/--depth`, `--calibration-chunks` and `--made-up`;
see `runtime/nothere.py`, `helios_deploy/model/specs.py` and `helios_deploy.serving.client.NoClient`;
the graphs are written by export/graphio.py (in prose too), not by `tiny-checkpoint OUT [--widht N]`.
"""
    problems = "\n".join(check_page(page, commands))
    for expected in ["export` has no option --no-such-flag", "frobnicate`: no such command",
                     "helios_deploy.serving.nothere", "has no NoSuchThing", "`helios-deploy build` has no option --wat",
                     "`helios-deploy generate` has no option --depth", "`helios-deploy bench` has no option --depth",
                     "--made-up: no command", "`runtime/nothere.py`: no such file", "has no NoClient",
                     "`export/graphio.py`: no such file", "`helios-deploy tiny-checkpoint` has no option --widht"]:
        assert expected in problems, f"not caught: {expected}\n{problems}"
    for fine in ["--ignored", "--calibration-chunks", "helios_deploy/model/specs.py", "Pipeline`", "--dry-run"]:
        assert fine not in problems, problems


def links_leaving_the_repository(page: Path, text: str) -> list[str]:
    """Links (relative to the page) and backticked ../ paths (relative to the repository, as the pages write
    paths) that resolve outside the repository: a user's clone has nothing there."""
    links = [t for t in re.findall(r"\]\(([^)\s]+)\)", text) if "://" not in t and not t.startswith(("mailto:", "#"))]
    spans = [s for s in SPAN.findall(FENCE.sub("", text)) if s.startswith("../")]
    problems = []
    for base, target in [(page.parent, t) for t in links] + [(ROOT, s) for s in spans]:
        resolved = (base / target.split("#")[0]).resolve()
        if resolved != ROOT and ROOT not in resolved.parents:
            problems.append(f"{page.name}: {target} leaves the repository")
    return problems


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_link_leaves_the_repository(page):
    assert not links_leaving_the_repository(page, page.read_text())


def test_a_link_out_of_the_repository_is_caught():
    page = ROOT / "docs" / "x.md"
    text = "[a](../../shared/docs/HELIOS.md) [b](model.md#the-tiny-trained-helios) `../shared/x.md` [c](../README.md)"
    assert links_leaving_the_repository(page, text) == ["x.md: ../../shared/docs/HELIOS.md leaves the repository",
                                                       "x.md: ../shared/x.md leaves the repository"]
    assert links_leaving_the_repository(ROOT / "README.md", "[H](../shared/docs/HELIOS.md)") != []
