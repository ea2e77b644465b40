"""Every invocation of a program in shell, YAML, Dockerfile and Markdown text, checked against its click CLI.

1. ``extract_invocations(path, program)`` finds every invocation of a program in a file: string
   values and command/args arrays in YAML, RUN/CMD lines in Dockerfiles, fenced code blocks in
   Markdown, and plain shell text anywhere else. Only executable text is read: YAML comments and
   Markdown prose are not (write commands in code blocks if they should be checked).
2. ``check_invocation(group, args)`` walks a click group with those arguments and reports unknown
   subcommands, unknown options, missing option values, invalid choices, missing required options
   and surplus positional arguments.

tests/test_infra.py runs it on every file in infra/ against ``frcnn-jobs`` (jobs.cli) and the
pinned ``ray`` and ``mlflow``; tests/test_cmdlines.py checks the tool itself.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import click
import yaml

SHELL_PUNCT = "();<>|&"
# Operators that redirect instead of separating commands: an invocation ends
# at them, but the next word is a file name, not a command.
REDIRECTS = {">", ">>", "<", "<<", "<<-", "<<<", ">&", "&>", "&>>", "<&", ">|", "<>"}
# `2>&1`, `1>out`: a file-descriptor number glued to a redirect is part of the
# redirect (as in bash), not an argument of the command before it.
FD_REDIRECT = re.compile(r"(?<![\w$/.:=,@%+-])\d+(?=[<>])")
ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
# Words after which the next word is still in command position.
# `$` is a prompt in documentation (`$ frcnn-jobs ...`).
PREFIX_WORDS = {
    "$", "!", "{", "builtin", "command", "do", "elif", "else", "env", "exec", "if",
    "nice", "nohup", "sudo", "then", "time", "until", "while",
}
# Wrappers whose options are followed by N operands before the command.
OPERAND_WRAPPERS = {"timeout": 1, "flock": 1}
SHELLS = {"sh", "bash", "dash", "zsh"}
# `docker run` flags that take no value (everything else is assumed to take one).
DOCKER_RUN_FLAGS = {
    "--rm", "-i", "-t", "-it", "-ti", "-d", "--init", "--privileged",
    "--interactive", "--tty", "--detach", "--read-only",
}


def _basename(tok: str) -> str:
    return tok.rsplit("/", 1)[-1]


def _is_program(tok: str, program: str) -> bool:
    """`program`, or a filesystem path to it (`.venv/bin/frcnn-jobs`), but not a
    URI or a resource path that merely ends with the name (`s3://mlflow`,
    `job/frcnn-jobs`, `local/mlflow`)."""
    if tok == program:
        return True
    if "://" in tok or not tok.endswith("/" + program):
        return False
    return tok[0] in "/.~$" or "/bin/" in tok


def _tokenize(line: str) -> list[str]:
    lex = shlex.shlex(line, posix=True, punctuation_chars=SHELL_PUNCT)
    lex.whitespace_split = True
    lex.commenters = "#"
    return list(lex)


def _token_lines(text: str):
    """Yield the tokens of each logical shell line: continuation lines joined,
    comments dropped, quotes spanning lines handled, heredoc bodies skipped."""
    lines = re.sub(r"\\\r?\n", " ", text).splitlines()
    i = 0
    while i < len(lines):
        buf = lines[i]
        i += 1
        while True:
            try:
                toks = _tokenize(FD_REDIRECT.sub("", buf))
                break
            except ValueError:  # an open quote: the string goes on next line
                if i >= len(lines):
                    toks = []
                    break
                buf += "\n" + lines[i]
                i += 1
        yield toks
        for k, tok in enumerate(toks[:-1]):
            if tok in ("<<", "<<-"):
                delim = toks[k + 1].lstrip("-")
                while i < len(lines) and lines[i].strip() != delim:
                    i += 1
                i += 1


def _simple_commands(tokens: list[str]) -> list[list[str]]:
    """Split a token list at `;`, `&&`, `||`, `|`, `&`, `(`, `)`."""
    cmds, cur = [], []
    for tok in tokens:
        if tok and tok not in REDIRECTS and all(c in SHELL_PUNCT for c in tok):
            if cur:
                cmds.append(cur)
            cur = []
        else:
            cur.append(tok)
    if cur:
        cmds.append(cur)
    return cmds


def _command_positions(cmd: list[str]) -> list[int]:
    """Indexes in a simple command where a program name would be executed."""
    n = len(cmd)
    i = 0
    while i < n:
        tok = cmd[i]
        base = _basename(tok)
        if ASSIGNMENT.match(tok):
            i += 1
        elif base in PREFIX_WORDS:
            i += 1
            while i < n and (cmd[i].startswith("-") or ASSIGNMENT.match(cmd[i])):
                i += 1
        elif base in OPERAND_WRAPPERS:
            i += 1
            while i < n and cmd[i].startswith("-"):
                i += 1
            i += OPERAND_WRAPPERS[base]
        else:
            break
    positions = [i] if i < n else []
    # docker/podman run [flags] IMAGE COMMAND...
    if i + 1 < n and _basename(cmd[i]) in ("docker", "podman") and cmd[i + 1] == "run":
        j = i + 2
        while j < n and cmd[j].startswith("-"):
            j += 1 if ("=" in cmd[j] or cmd[j] in DOCKER_RUN_FLAGS) else 2
        if j + 1 < n:
            positions.append(j + 1)
    # End of options: `ray job submit ... -- CMD`, `kubectl exec ... -- CMD`.
    positions += [k + 1 for k in range(i, n - 1) if cmd[k] == "--"]
    return sorted(set(positions))


def invocations_in_shell(text: str, program: str) -> list[list[str]]:
    """Arguments of every `program ...` invocation in shell text."""
    found: list[list[str]] = []
    for tokens in _token_lines(text):
        for cmd in _simple_commands(tokens):
            for pos in _command_positions(cmd):
                tok = cmd[pos]
                if _is_program(tok, program):
                    args = []
                    for t in cmd[pos + 1 :]:
                        if t in REDIRECTS:
                            break
                        args.append(t)
                    # A bare name checks nothing (and in YAML is usually a
                    # label or a container name, not a command).
                    if args:
                        found.append(args)
                elif _basename(tok) == "trap" and pos + 1 < len(cmd):
                    found.extend(invocations_in_shell(cmd[pos + 1], program))
                elif _basename(tok) in SHELLS:
                    # sh -c 'SCRIPT' / bash -euc "SCRIPT": scan the script too.
                    j, has_c = pos + 1, False
                    while j < len(cmd) and cmd[j].startswith("-") and cmd[j][1:].isalpha():
                        has_c = has_c or "c" in cmd[j][1:]
                        j += 1
                    if has_c and j < len(cmd):
                        found.extend(invocations_in_shell(cmd[j], program))
    return found


def yaml_command_texts(node):
    """Shell texts in a parsed YAML document: every string, plus each
    entrypoint/command/args group joined into one command line (k8s splits a
    command across `command:` and `args:`, compose across `entrypoint:` and
    `command:`)."""
    if isinstance(node, dict):
        parts = [node[k] for k in ("entrypoint", "command", "args") if k in node]
        if parts and any(isinstance(p, list) for p in parts) and all(
            isinstance(p, str) or (isinstance(p, list) and all(isinstance(x, (str, int, float)) for x in p))
            for p in parts
        ):
            yield " ".join(
                shlex.join(str(x) for x in p) if isinstance(p, list) else shlex.quote(p) for p in parts
            )
        for v in node.values():
            yield from yaml_command_texts(v)
    elif isinstance(node, list):
        for v in node:
            yield from yaml_command_texts(v)
    elif isinstance(node, str):
        yield node


def invocations_in_node(node, program: str) -> list[list[str]]:
    """Invocations in a parsed YAML node. Deduplicated: a script in `args:` is
    seen both on its own and inside the joined command line."""
    found = []
    for shell_text in yaml_command_texts(node):
        found.extend(invocations_in_shell(shell_text, program))
    return _dedupe(found)


def invocations_in_yaml(text: str, program: str) -> list[list[str]]:
    return _dedupe([inv for doc in yaml.safe_load_all(text) for inv in invocations_in_node(doc, program)])


FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")


def markdown_code_blocks(text: str) -> list[str]:
    blocks, cur, fence = [], None, None
    for line in text.splitlines():
        m = FENCE.match(line)
        if cur is None:
            if m:
                cur, fence = [], m.group(1)
        elif m and m.group(1)[0] == fence[0] and len(m.group(1)) >= len(fence) and not line.strip()[len(m.group(1)):]:
            blocks.append("\n".join(cur))
            cur = None
        else:
            cur.append(line)
    return blocks


def invocations_in_markdown(text: str, program: str) -> list[list[str]]:
    return [inv for block in markdown_code_blocks(text) for inv in invocations_in_shell(block, program)]


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    lines = [ln for ln in text.splitlines() if not ln.lstrip().startswith("#")]
    joined = re.sub(r"\\[ \t]*\n", " ", "\n".join(lines))
    out = []
    for line in joined.splitlines():
        m = re.match(r"^\s*([A-Za-z]+)\s+(.*)$", line)
        if m:
            out.append((m.group(1).upper(), m.group(2).strip()))
    return out


def invocations_in_dockerfile(text: str, program: str) -> list[list[str]]:
    found = []
    for instr, rest in dockerfile_instructions(text):
        if instr == "HEALTHCHECK":
            rest = rest.split("CMD", 1)[1].strip() if "CMD" in rest else ""
        elif instr == "RUN":
            rest = re.sub(r"^(--\S+\s+)+", "", rest)  # RUN --mount=... flags
        elif instr not in ("CMD", "ENTRYPOINT"):
            continue
        if rest.startswith("["):  # exec form
            try:
                rest = shlex.join(json.loads(rest))
            except ValueError:
                pass
        found.extend(invocations_in_shell(rest, program))
    return found


def _dedupe(invocations: list[list[str]]) -> list[list[str]]:
    seen, out = set(), []
    for inv in invocations:
        if tuple(inv) not in seen:
            seen.add(tuple(inv))
            out.append(inv)
    return out


def extract_invocations(path: Path, program: str) -> list[list[str]]:
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        found = invocations_in_yaml(text, program)
    elif path.suffix == ".md":
        found = invocations_in_markdown(text, program)
    elif path.name == "Dockerfile" or path.name.startswith("Dockerfile.") or path.suffix == ".dockerfile":
        found = invocations_in_dockerfile(text, program)
    else:
        found = invocations_in_shell(text, program)
    return _dedupe(found)


# --------------------------------------------------------------------------
# Checking an invocation against a click CLI
# --------------------------------------------------------------------------

NEGATIVE_NUMBER = re.compile(r"^-\d")


def _is_literal(value: str) -> bool:
    """False for values only known at run time ($VAR, $(cmd), `cmd`)."""
    return not any(c in value for c in "$`")


def check_invocation(group: click.Command, args: list[str], prog: str = "prog") -> list[str]:
    """Problems with running `prog ARGS` against the click command `group`."""
    ctx = click.Context(group, info_name=prog)
    cmd: click.Command = group
    path = [prog]
    i = 0
    # Descend through nested groups: `ray job submit`.
    while isinstance(cmd, click.Group):
        if i >= len(args):
            return []  # bare group invocation just prints usage
        tok = args[i]
        if tok.startswith("-"):
            break  # group-level options (e.g. --help) are checked below
        sub = cmd.get_command(ctx, tok)
        if sub is None:
            return [f"`{' '.join(path)}` has no command {tok!r} (has: {sorted(cmd.list_commands(ctx))})"]
        ctx = click.Context(sub, info_name=tok, parent=ctx)
        cmd, i = sub, i + 1
        path.append(tok)
    where = " ".join(path)

    options: dict[str, click.Option] = {}
    for p in cmd.get_params(ctx):
        if isinstance(p, click.Option):
            for opt in (*p.opts, *p.secondary_opts):
                options[opt] = p
    help_names = set(ctx.help_option_names)

    problems: list[str] = []
    seen: set[str] = set()
    positional: list[str] = []
    unknown = False
    rest = args[i:]
    j = 0
    while j < len(rest):
        tok = rest[j]
        if tok == "--":
            positional.extend(rest[j + 1 :])
            break
        if not tok.startswith("-") or tok == "-" or NEGATIVE_NUMBER.match(tok):
            positional.append(tok)
            j += 1
            continue
        name, eq, inline = tok.partition("=") if tok.startswith("--") else (tok, "", "")
        if name in help_names:
            return problems  # click prints help and exits before validating
        param = options.get(name)
        if param is None:
            if isinstance(cmd, click.Group) or not cmd.ignore_unknown_options:
                problems.append(f"`{where}`: unknown option {name!r} (known: {sorted(options)})")
                unknown = True
            j += 1
            continue
        seen.add(param.name)
        if param.is_flag or param.count:
            j += 1
            continue
        if eq:
            values = [inline]
            j += 1
        else:
            values = rest[j + 1 : j + 1 + param.nargs]
            if len(values) < param.nargs or any(v in REDIRECTS for v in values):
                problems.append(f"`{where}`: option {name!r} needs {param.nargs} value(s)")
            j += 1 + param.nargs
        if isinstance(param.type, click.Choice):
            choices = [str(c) for c in param.type.choices]
            for v in values:
                if _is_literal(v) and not (
                    v in choices
                    or (not param.type.case_sensitive and v.lower() in [c.lower() for c in choices])
                ):
                    problems.append(f"`{where}`: {name} {v!r} is not one of {choices}")

    if isinstance(cmd, click.Group):
        return problems  # only group-level options were given

    for p in cmd.get_params(ctx):
        if isinstance(p, click.Option) and p.required and p.name not in seen and not p.envvar:
            problems.append(f"`{where}`: missing required option {p.opts[0]!r}")
    arguments = [p for p in cmd.params if isinstance(p, click.Argument)]
    required = sum(max(a.nargs, 1) for a in arguments if a.required)
    if len(positional) < required:
        problems.append(f"`{where}`: expects {required} positional argument(s), got {positional}")
    if not unknown and not any(a.nargs == -1 for a in arguments):
        capacity = sum(a.nargs for a in arguments)
        if len(positional) > capacity:
            problems.append(f"`{where}`: unexpected positional argument(s) {positional[capacity:]}")
    return problems
