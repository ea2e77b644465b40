"""Static checks for everything under infra/.

Nothing here talks to a cluster, a registry or a docker daemon: the manifests
are checked by parsing them, by cross-checking them against each other, and by
checking every command line they contain against the real click CLIs
(``frcnn-jobs`` from ``jobs.cli``, plus the pinned ``ray`` and ``mlflow``).

The command-line check works in two steps:

1. ``extract_invocations(path, program)`` finds every invocation of a program
   in a file: string values and command/args arrays in YAML, RUN/CMD lines in
   Dockerfiles, fenced code blocks in Markdown, and plain shell text anywhere
   else. Only executable text is read: YAML comments and Markdown prose are not
   (write commands in code blocks if they should be checked).
2. ``check_invocation(group, args)`` walks a click group with those arguments
   and reports unknown subcommands, unknown options, missing option values,
   invalid choices, missing required options and surplus positional arguments.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import re
import shlex
import tomllib
from pathlib import Path
from urllib.parse import urlparse

import click
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
INFRA = REPO / "infra"


# --------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------


def infra_files() -> list[Path]:
    return sorted(p for p in INFRA.rglob("*") if p.is_file() and "__pycache__" not in p.parts)


def yaml_files() -> list[Path]:
    return [p for p in infra_files() if p.suffix in (".yaml", ".yml")]


def rel(path: Path) -> str:
    return path.relative_to(REPO).as_posix()


@functools.cache
def load_docs(path: Path) -> tuple:
    return tuple(d for d in yaml.safe_load_all(path.read_text()) if d is not None)


def k8s_docs() -> list[tuple[Path, dict]]:
    """Every Kubernetes object in infra/ (anything with apiVersion + kind)."""
    out = []
    for path in yaml_files():
        for doc in load_docs(path):
            if isinstance(doc, dict) and "apiVersion" in doc and "kind" in doc:
                out.append((path, doc))
    return out


def docs_of_kind(kind: str) -> list[dict]:
    return [d for _, d in k8s_docs() if d["kind"] == kind]


def pyproject_pins() -> dict[str, str]:
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = {}
    for dep in deps:
        m = re.match(r"^([A-Za-z0-9_.-]+)(?:\[[^\]]*\])?==([^;\s]+)", dep)
        if m:
            pins[m.group(1).lower()] = m.group(2)
    return pins


def walk(node):
    """Yield every mapping nested anywhere in a parsed YAML document."""
    if isinstance(node, dict):
        yield node
        for v in node.values():
            yield from walk(v)
    elif isinstance(node, list):
        for v in node:
            yield from walk(v)


def pod_containers(doc: dict) -> list[dict]:
    """All containers (and init containers) of all pod specs inside a document."""
    out = []
    for m in walk(doc):
        for key in ("containers", "initContainers"):
            if isinstance(m.get(key), list):
                out.extend(c for c in m[key] if isinstance(c, dict))
    return out


# --------------------------------------------------------------------------
# Invocation extractor
# --------------------------------------------------------------------------

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


def _yaml_command_texts(node):
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
            yield from _yaml_command_texts(v)
    elif isinstance(node, list):
        for v in node:
            yield from _yaml_command_texts(v)
    elif isinstance(node, str):
        yield node


def invocations_in_node(node, program: str) -> list[list[str]]:
    """Invocations in a parsed YAML node. Deduplicated: a script in `args:` is
    seen both on its own and inside the joined command line."""
    found = []
    for shell_text in _yaml_command_texts(node):
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


def all_invocations(program: str) -> list[tuple[str, list[str]]]:
    return [(rel(p), inv) for p in infra_files() for inv in extract_invocations(p, program)]


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


def check_all(program: str, group: click.Command) -> list[str]:
    problems = []
    for where, args in all_invocations(program):
        for problem in check_invocation(group, args, prog=program):
            problems.append(f"{where}: {program} {shlex.join(args)}\n    -> {problem}")
    return problems


# --------------------------------------------------------------------------
# Tests of the extractor and the checker themselves
# --------------------------------------------------------------------------

SAMPLE_SHELL = r"""
# frcnn-jobs train --this-is-a-comment
cd /srv/frcnn && .venv/bin/frcnn-jobs infer --model m --incremental >> /var/log/x.log 2>&1
frcnn-jobs promote models:/frcnn/3 --alias champion; echo done
ray job submit --address http://head:8265 -- frcnn-jobs infer --model "models:/frcnn@champion" \
    --concurrency 2 | tee out.log
FOO=1 exec frcnn-jobs infer --model=x &
docker run --rm -e A=b --gpus all registry.example.com/frcnn/frcnn-jobs:0.1.0 frcnn-jobs --help
bash -c 'frcnn-jobs infer --model y && frcnn-jobs promote z --alias a'
0 * * * * cd /srv && flock -n /tmp/lock frcnn-jobs infer --model cron --input '/data/in
coming' --incremental
pip install frcnn-jobs
kubectl -n frcnn logs job/frcnn-jobs
echo "frcnn-jobs infer --quoted-string-is-data"
cat <<'EOF'
frcnn-jobs train --inside-a-heredoc
EOF
frcnn-jobs infer --model after-heredoc
"""

SAMPLE_SHELL_EXPECTED = [
    ["infer", "--model", "m", "--incremental"],
    ["promote", "models:/frcnn/3", "--alias", "champion"],
    ["infer", "--model", "models:/frcnn@champion", "--concurrency", "2"],
    ["infer", "--model=x"],
    ["--help"],
    ["infer", "--model", "y"],
    ["promote", "z", "--alias", "a"],
    ["infer", "--model", "cron", "--input", "/data/in\ncoming", "--incremental"],
    ["infer", "--model", "after-heredoc"],
]


def test_extractor_finds_known_invocations_in_shell_text():
    assert invocations_in_shell(SAMPLE_SHELL, "frcnn-jobs") == SAMPLE_SHELL_EXPECTED


def test_extractor_finds_nested_programs_independently():
    ray = invocations_in_shell(SAMPLE_SHELL, "ray")
    assert ray == [
        ["job", "submit", "--address", "http://head:8265", "--", "frcnn-jobs", "infer",
         "--model", "models:/frcnn@champion", "--concurrency", "2"],
    ]
    # `s3://mlflow` and `local/mlflow` are data, not the mlflow program.
    assert invocations_in_shell("mc mb local/mlflow && x --dest s3://mlflow", "mlflow") == []


SAMPLE_YAML = """
apiVersion: v1
kind: Pod
metadata: {name: sample}
spec:
  containers:
    - name: split
      command: ["frcnn-jobs"]
      args: ["infer", "--model", "a"]
    - name: script
      command: ["/bin/sh", "-c"]
      args:
        - |
          set -e
          frcnn-jobs promote b --alias c
      lifecycle:
        preStop:
          exec:
            command: ["/bin/sh", "-c", "ray stop"]
---
entrypoint: >-
  frcnn-jobs train
  --data s3://d
  --workers 8
# frcnn-jobs comment --ignored
name: frcnn-jobs
image: registry.example.com/frcnn/frcnn-jobs:0.1.0
"""


def test_extractor_reads_yaml_values_and_command_arrays():
    assert invocations_in_yaml(SAMPLE_YAML, "frcnn-jobs") == [
        ["infer", "--model", "a"],
        ["promote", "b", "--alias", "c"],
        ["train", "--data", "s3://d", "--workers", "8"],
    ]
    assert invocations_in_yaml(SAMPLE_YAML, "ray") == [["stop"]]


def test_extractor_reads_markdown_code_blocks_only():
    text = (
        "Run `frcnn-jobs train --in-prose` when ready; frcnn-jobs infer is hourly.\n\n"
        "```bash\n$ frcnn-jobs evaluate --model m  # comment --not-an-option\n```\n\n"
        "~~~\nfrcnn-jobs ui --port 5000\n~~~\n"
    )
    assert invocations_in_markdown(text, "frcnn-jobs") == [
        ["evaluate", "--model", "m"],
        ["ui", "--port", "5000"],
    ]


def test_extractor_reads_dockerfile_shell_and_exec_forms():
    text = (
        "FROM python:3.11\n"
        "# RUN frcnn-jobs commented --out\n"
        "RUN --mount=type=cache,target=/root/.cache pip install . \\\n"
        " && frcnn-jobs --help > /dev/null\n"
        'CMD ["frcnn-jobs", "ui", "--port", "5000"]\n'
        "LABEL x=frcnn-jobs\n"
    )
    assert invocations_in_dockerfile(text, "frcnn-jobs") == [["--help"], ["ui", "--port", "5000"]]


@click.group()
def fake_cli():
    """Stand-in for jobs.cli.main with the same shape."""


@fake_cli.command()
@click.option("--model", required=True)
@click.option("--input", "input_")
@click.option("--incremental/--full", default=False)
@click.option("--concurrency", type=int)
@click.option("--mode", type=click.Choice(["fast", "exact"]))
def infer(**_):
    pass


@fake_cli.command()
@click.argument("model")
@click.option("--alias", required=True)
def promote(**_):
    pass


def test_checker_accepts_valid_invocations():
    for args in (
        ["infer", "--model", "m", "--incremental"],
        ["infer", "--model=x", "--full", "--mode", "exact"],
        ["infer", "--model", "$MODEL", "--mode", "$MODE"],
        ["promote", "models:/frcnn/3", "--alias", "champion"],
        ["--help"],
        ["promote", "--help"],
        [],
    ):
        assert check_invocation(fake_cli, args) == [], args


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["train", "--data", "x"], "no command 'train'"),
        (["infer", "--model", "m", "--gpus", "1"], "unknown option '--gpus'"),
        (["infer", "--model"], "needs 1 value"),
        (["infer", "--model", "m", "--mode", "slow"], "'slow' is not one of"),
        (["infer", "--incremental"], "missing required option '--model'"),
        (["promote", "--alias", "a"], "expects 1 positional"),
        (["promote", "a", "b", "--alias", "c"], "unexpected positional"),
    ],
)
def test_checker_reports_problems(args, expected):
    problems = check_invocation(fake_cli, args)
    assert any(expected in p for p in problems), problems


def test_checker_runs_on_extracted_sample():
    # Extractor and checker together: every sample invocation fits the fake CLI.
    invocations = invocations_in_shell(SAMPLE_SHELL, "frcnn-jobs")
    problems = [p for inv in invocations for p in check_invocation(fake_cli, inv)]
    assert problems == []
    bad = invocations_in_shell("frcnn-jobs infer --model m --concurency 2", "frcnn-jobs")
    assert ["unknown option '--concurency'" in p for p in check_invocation(fake_cli, bad[0])] == [True]


# --------------------------------------------------------------------------
# YAML / Kubernetes structure
# --------------------------------------------------------------------------


def test_infra_has_the_expected_files():
    names = {rel(p) for p in infra_files()}
    for expected in (
        "infra/README.md",
        "infra/docker/Dockerfile",
        "infra/k8s/kuberay/raycluster.yaml",
        "infra/k8s/kuberay/rayjob-train.yaml",
        "infra/k8s/kuberay/rayjob-precompute.yaml",
        "infra/k8s/kuberay/cronjob-infer.yaml",
        "infra/k8s/kuberay/secret-example.yaml",
        "infra/ray-cluster/aws.yaml",
        "infra/mlflow/docker-compose.yaml",
    ):
        assert expected in names


@pytest.mark.parametrize("path", yaml_files(), ids=rel)
def test_yaml_parses_to_mappings(path):
    docs = list(yaml.safe_load_all(path.read_text()))
    assert [d for d in docs if d is not None], f"{rel(path)} is empty"
    for doc in docs:
        assert doc is None or isinstance(doc, dict), f"{rel(path)}: a document is a {type(doc).__name__}"


def test_kubernetes_documents_have_identity():
    k8s_files = [p for p in yaml_files() if "k8s" in p.relative_to(INFRA).parts]
    assert k8s_files
    for path in k8s_files:
        for doc in load_docs(path):
            where = f"{rel(path)}: {doc.get('kind')}"
            assert isinstance(doc.get("apiVersion"), str) and doc["apiVersion"], where
            assert isinstance(doc.get("kind"), str) and doc["kind"], where
            assert isinstance(doc.get("metadata"), dict), where
            assert isinstance(doc["metadata"].get("name"), str) and doc["metadata"]["name"], where
            if doc["kind"] != "Namespace":
                # Explicit namespaces: cross-namespace DNS names below rely on them.
                assert doc["metadata"].get("namespace") in {"frcnn", "mlflow"}, where


def test_container_commands_args_and_env_are_strings():
    # The API server rejects `args: [5000]` or `value: 1`; YAML makes that easy.
    for path, doc in k8s_docs():
        for c in pod_containers(doc):
            for key in ("command", "args"):
                for item in c.get(key, []):
                    assert isinstance(item, str), f"{rel(path)}: {c['name']}.{key} has {item!r}"
            for env in c.get("env", []):
                if "value" in env:
                    assert isinstance(env["value"], str), f"{rel(path)}: {c['name']} env {env['name']}"
    for cm in docs_of_kind("ConfigMap"):
        for k, v in cm.get("data", {}).items():
            assert isinstance(v, str), f"ConfigMap {cm['metadata']['name']}: {k}"


def _raycluster() -> dict:
    clusters = docs_of_kind("RayCluster")
    assert len(clusters) == 1
    return clusters[0]


def _group_gpus(group: dict) -> int:
    gpus = 0
    for c in group["template"]["spec"]["containers"]:
        gpus += int(c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0))
    return gpus


def test_raycluster_head_is_cpu_only_and_gpu_group_fits_8x1_training():
    rc = _raycluster()
    spec = rc["spec"]
    assert rc["apiVersion"] == "ray.io/v1"
    assert spec["rayVersion"] == pyproject_pins()["ray"]

    head = spec["headGroupSpec"]
    assert _group_gpus(head) == 0
    assert str(head["rayStartParams"].get("num-cpus")) == "0"

    gpu_groups = [g for g in spec["workerGroupSpecs"] if _group_gpus(g) > 0]
    assert len(gpu_groups) == 1
    gpu = gpu_groups[0]
    assert gpu["replicas"] == 8
    assert gpu["minReplicas"] <= gpu["replicas"] <= gpu["maxReplicas"]
    (container,) = gpu["template"]["spec"]["containers"]
    limits = container["resources"]["limits"]
    assert int(limits["nvidia.com/gpu"]) == 1
    # Extended resources: a request, if given, must equal the limit.
    requests = container["resources"].get("requests", {})
    assert int(requests.get("nvidia.com/gpu", limits["nvidia.com/gpu"])) == 1

    for group in [head, *spec["workerGroupSpecs"]]:
        for c in group["template"]["spec"]["containers"]:
            assert c["image"] == container["image"], "head and workers must run the same image"


def test_raycluster_requires_a_token_from_an_existing_secret():
    # Job submission runs arbitrary code with the pods' credentials: the head
    # must demand Ray's auth token, kept in a Secret we ship an example of.
    rc = _raycluster()
    auth = rc["spec"]["authOptions"]
    assert auth["mode"] == "token"
    keys = _secret_keys()[(rc["metadata"]["namespace"], auth["secretName"])]
    assert "auth_token" in keys  # the key name KubeRay reads


def _rayjob(name: str) -> dict:
    (job,) = [j for j in docs_of_kind("RayJob") if j["metadata"]["name"] == name]
    return job


def _option(args: list[str], name: str) -> str | None:
    for k, tok in enumerate(args):
        if tok == name and k + 1 < len(args):
            return args[k + 1]
        if tok.startswith(name + "="):
            return tok.split("=", 1)[1]
    return None


def test_rayjobs_attach_to_the_raycluster():
    rc = _raycluster()
    jobs = docs_of_kind("RayJob")
    assert {j["metadata"]["name"] for j in jobs} >= {"frcnn-train", "frcnn-precompute"}
    for job in jobs:
        spec = job["spec"]
        # One of the two ways to get a cluster, never both.
        assert ("clusterSelector" in spec) != ("rayClusterSpec" in spec)
        assert spec["clusterSelector"]["ray.io/cluster"] == rc["metadata"]["name"]
        assert job["metadata"]["namespace"] == rc["metadata"]["namespace"]
        assert invocations_in_shell(spec["entrypoint"], "frcnn-jobs"), job["metadata"]["name"]


def test_train_rayjob_matches_gpu_group_and_uses_object_store():
    (train,) = [
        a for a in invocations_in_shell(_rayjob("frcnn-train")["spec"]["entrypoint"], "frcnn-jobs")
        if a[0] == "train"
    ]
    workers = int(_option(train, "--workers"))
    gpus_per_worker = int(_option(train, "--gpus-per-worker"))
    assert (workers, gpus_per_worker) == (8, 1)
    gpu = [g for g in _raycluster()["spec"]["workerGroupSpecs"] if _group_gpus(g) > 0][0]
    assert gpus_per_worker <= _group_gpus(gpu)
    assert workers * gpus_per_worker <= gpu["replicas"] * _group_gpus(gpu)
    for opt in ("--data", "--val-data", "--storage-path"):
        assert urlparse(_option(train, opt)).scheme == "s3", opt


def test_model_configs_exist_in_the_image_and_match_between_precompute_and_train():
    # Shards carry anchor targets for one model config and training refuses
    # shards made for another: every cluster precompute/train must pass the
    # same --config, and that config must ship inside the installed package.
    from frcnn.config import CONFIG_NAMES

    configs = set()
    for where, args in all_invocations("frcnn-jobs"):
        if args and args[0] in ("precompute", "train") and "s3://" in " ".join(args):
            config = _option(args, "--config")
            assert config, f"{where}: {args[0]} on VOC without --config (defaults to the tiny synth config)"
            configs.add(config)
    assert len(configs) == 1, configs
    (config,) = configs
    assert config in CONFIG_NAMES, f"--config {config} is not a packaged config {CONFIG_NAMES}"
    assert (REPO / "frcnn" / "configs" / f"{config}.yaml").is_file()


def test_storage_paths_are_object_store_uris_everywhere():
    # Ray Train workers on different nodes share no disk: storage_path must be
    # an object store (or a shared filesystem, which none of our targets have).
    found = 0
    for where, args in all_invocations("frcnn-jobs"):
        if args and args[0] == "train":
            storage = _option(args, "--storage-path")
            multi = int(_option(args, "--workers") or 1) > 1
            if multi or storage is not None:
                found += 1
                assert storage is not None, f"{where}: multi-worker train without --storage-path"
                assert urlparse(storage).scheme in {"s3", "gs", "abfs", "az"}, f"{where}: {storage}"
    assert found


def _cronjob() -> dict:
    (cron,) = docs_of_kind("CronJob")
    return cron


def test_cronjob_is_scheduled_and_forbids_overlap():
    cron = _cronjob()
    assert cron["apiVersion"] == "batch/v1"
    spec = cron["spec"]
    assert isinstance(spec["schedule"], str) and len(spec["schedule"].split()) == 5
    assert spec["concurrencyPolicy"] == "Forbid"
    # A run must end before the next one is due.
    assert spec["jobTemplate"]["spec"]["activeDeadlineSeconds"] < 3600


def _container_env(container: dict) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}


def _expand(value: str, env: dict[str, str]) -> str:
    return re.sub(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?", lambda m: env.get(m.group(1), m.group(0)), value)


def test_cronjob_submits_champion_inference_to_the_raycluster_head():
    cron = _cronjob()
    rc = _raycluster()
    (container,) = pod_containers(cron)
    env = _container_env(container)

    ray = invocations_in_node(container, "ray")
    (submit,) = [a for a in ray if a[:2] == ["job", "submit"]]
    address = urlparse(_expand(_option(submit, "--address"), env))
    head_svc = f"{rc['metadata']['name']}-head-svc"
    assert address.scheme == "http" and address.port == 8265
    assert address.hostname in {head_svc, f"{head_svc}.{rc['metadata']['namespace']}.svc.cluster.local"}
    assert "--" in submit
    # The head requires Ray token auth; the client sends the token only in token mode.
    auth_secret = rc["spec"]["authOptions"]["secretName"]
    assert env["RAY_AUTH_MODE"] == "token"
    (token_env,) = [e for e in container["env"] if e["name"] == "RAY_AUTH_TOKEN"]
    assert token_env["valueFrom"]["secretKeyRef"] == {"name": auth_secret, "key": "auth_token"}
    # The trap that stops the Ray job when the pod is killed targets the same job.
    (stop,) = [a for a in ray if a[:2] == ["job", "stop"]]
    assert _option(stop, "--address") == _option(submit, "--address")
    assert _option(submit, "--submission-id") in stop

    (infer,) = invocations_in_node(container, "frcnn-jobs")
    assert infer[0] == "infer"
    assert "--incremental" in infer
    assert _option(infer, "--model") == "models:/frcnn@champion"
    assert urlparse(_option(infer, "--input")).scheme == "s3"
    assert urlparse(_option(infer, "--output")).scheme == "s3"
    # --concurrency x --gpus-per-actor must fit next to a full 8-GPU training run.
    gpu = [g for g in rc["spec"]["workerGroupSpecs"] if _group_gpus(g) > 0][0]
    need = int(_option(infer, "--concurrency") or 1) * float(_option(infer, "--gpus-per-actor") or 0)
    assert 8 + need <= gpu["maxReplicas"] * _group_gpus(gpu)


def test_example_secrets_hold_only_placeholders():
    secrets = docs_of_kind("Secret")
    assert secrets
    for s in secrets:
        assert "data" not in s, "use stringData with visible placeholders, not base64 data"
        for key, value in s.get("stringData", {}).items():
            if any(w in key.upper() for w in ("PASSWORD", "SECRET", "ACCESS_KEY", "TOKEN", "ROOT_USER")):
                assert "CHANGE-ME" in str(value), f"Secret {s['metadata']['name']}.{key} looks real"
    env_example = INFRA / "mlflow" / ".env.example"
    for line in env_example.read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            key, _, value = line.partition("=")
            if any(w in key for w in ("PASSWORD", "SECRET", "ACCESS_KEY")):
                assert "CHANGE-ME" in value, key


def _secret_keys() -> dict[tuple[str, str], set[str]]:
    return {
        (s["metadata"]["namespace"], s["metadata"]["name"]): set(s.get("stringData", {}))
        for s in docs_of_kind("Secret")
    }


def test_secret_and_configmap_references_resolve():
    secrets = _secret_keys()
    configmaps = {(c["metadata"]["namespace"], c["metadata"]["name"]) for c in docs_of_kind("ConfigMap")}
    for path, doc in k8s_docs():
        ns = doc["metadata"].get("namespace")
        for m in walk(doc):
            if "secretRef" in m:
                assert (ns, m["secretRef"]["name"]) in secrets, f"{rel(path)}: {m}"
            if "configMapRef" in m:
                assert (ns, m["configMapRef"]["name"]) in configmaps, f"{rel(path)}: {m}"
            if "secretKeyRef" in m:
                ref = m["secretKeyRef"]
                assert ref["key"] in secrets.get((ns, ref["name"]), set()), f"{rel(path)}: {ref}"
    # The Ray pods and MLflow must use the same S3 application user.
    assert secrets[("frcnn", "frcnn-credentials")] <= secrets[("mlflow", "mlflow-credentials")]


def test_cluster_dns_names_point_at_existing_services():
    services = {}
    for svc in docs_of_kind("Service"):
        key = (svc["metadata"]["namespace"], svc["metadata"]["name"])
        services[key] = {p["port"] for p in svc["spec"]["ports"]}
    # KubeRay creates `<name>-head-svc` with the dashboard on 8265.
    for rc in docs_of_kind("RayCluster"):
        services[(rc["metadata"]["namespace"], f"{rc['metadata']['name']}-head-svc")] = {6379, 8265, 10001}
    pattern = re.compile(r"://(?:[^@/\s]*@)?([a-z0-9-]+)\.([a-z0-9-]+)\.svc\.cluster\.local:(\d+)")
    checked = 0
    for path in yaml_files():
        for match in pattern.finditer(path.read_text()):
            name, ns, port = match.group(1), match.group(2), int(match.group(3))
            assert port in services.get((ns, name), set()), f"{rel(path)}: {match.group(0)}"
            checked += 1
    assert checked >= 4


def test_services_select_existing_pods():
    workloads = [d for _, d in k8s_docs() if d["kind"] in ("Deployment", "StatefulSet")]
    for svc in docs_of_kind("Service"):
        selector = svc["spec"]["selector"]
        ns = svc["metadata"]["namespace"]
        matches = [
            w for w in workloads
            if w["metadata"]["namespace"] == ns
            and selector.items() <= w["spec"]["template"]["metadata"]["labels"].items()
        ]
        assert matches, f"Service {ns}/{svc['metadata']['name']} selects no pods"
        for w in matches:
            assert w["spec"]["selector"]["matchLabels"].items() <= w["spec"]["template"]["metadata"]["labels"].items()


def test_mlflow_k8s_server_uses_postgres_and_proxied_s3():
    (deploy,) = [d for d in docs_of_kind("Deployment") if d["metadata"]["name"] == "mlflow"]
    (container,) = pod_containers(deploy)
    argv = container["command"] + container["args"]
    assert argv[:2] == ["mlflow", "server"]
    assert _option(argv, "--backend-store-uri").startswith(PG_URI_PREFIX)
    assert _option(argv, "--artifacts-destination") == "s3://mlflow"
    assert "--serve-artifacts" in argv
    assert _option(argv, "--host") == "0.0.0.0"
    # In-cluster clients use the Service DNS name; MLflow must accept that Host.
    allowed = _option(argv, "--allowed-hosts").split(",")
    from fnmatch import fnmatch

    for host in ("mlflow:5000", "mlflow.mlflow.svc.cluster.local:5000", "localhost:5000"):
        assert any(fnmatch(host, pattern) for pattern in allowed), host


# --------------------------------------------------------------------------
# docker compose
# --------------------------------------------------------------------------


# The store URIs name their driver: SQLAlchemy 2.1 (what MLflow 3.17.2 resolves) maps a bare
# `postgresql://` to psycopg 3, so a URI that relies on the default breaks when either moves.
PG_URI_PREFIX = "postgresql+psycopg://"


def test_mlflow_image_installs_the_driver_its_store_uris_name():
    instructions = dockerfile_instructions((INFRA / "mlflow" / "Dockerfile").read_text())
    runs = " ".join(rest for instr, rest in instructions if instr == "RUN")
    assert re.search(r"pip install [^&]*[\"']?psycopg\[binary\]", runs), runs
    assert "psycopg2" not in runs
    assert "import psycopg" in runs  # the build fails, not the first server start
    (deploy,) = [d for d in docs_of_kind("Deployment") if d["metadata"]["name"] == "mlflow"]
    (container,) = pod_containers(deploy)
    uris = [_option(container["command"] + container["args"], "--backend-store-uri"),
            _option(_compose_argv(_compose()["services"]["mlflow"]), "--backend-store-uri")]
    for uri in uris:
        assert uri.split("://")[0] == "postgresql+psycopg", uri
    # The package itself carries the same driver (the rehearsal's server runs from it).
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    assert any(re.match(r"psycopg\[binary\]", d) for d in deps), deps


def test_package_carries_the_job_server():
    # `ray job submit` needs the head's job server, which only `ray[default]` installs.
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    (ray,) = [d for d in deps if re.match(r"ray\[", d)]
    extras = set(re.match(r"ray\[([^\]]*)\]", ray).group(1).split(","))
    assert {"default", "train", "data"} <= extras, ray


def _compose() -> dict:
    (doc,) = load_docs(INFRA / "mlflow" / "docker-compose.yaml")
    return doc


def _compose_argv(service: dict) -> list[str]:
    argv = []
    for key in ("entrypoint", "command"):
        value = service.get(key)
        if isinstance(value, list):
            argv += [str(v) for v in value]
        elif isinstance(value, str):
            argv += shlex.split(value)
    return argv


def test_compose_has_postgres_minio_and_mlflow_on_postgres():
    services = _compose()["services"]
    assert "postgres" in services
    assert "minio" in services or "s3" in services
    assert "mlflow" in services
    mlflow = services["mlflow"]
    argv = _compose_argv(mlflow)
    env = mlflow.get("environment", {})
    uri = _option(argv, "--backend-store-uri") or env.get("MLFLOW_BACKEND_STORE_URI")
    assert uri and uri.startswith(PG_URI_PREFIX), uri
    assert _option(argv, "--artifacts-destination").startswith("s3://")
    assert "--serve-artifacts" in argv
    # MLflow needs the database healthy and the buckets created before it starts.
    deps = mlflow["depends_on"]
    assert deps["postgres"]["condition"] == "service_healthy"
    assert deps["minio-init"]["condition"] == "service_completed_successfully"
    for name in ("postgres", "minio", "mlflow"):
        assert "test" in services[name].get("healthcheck", {}), name
    # The S3 endpoint MLflow uses must be the compose MinIO service.
    assert urlparse(env["MLFLOW_S3_ENDPOINT_URL"]).hostname == "minio"


def test_compose_volumes_are_declared():
    doc = _compose()
    declared = set(doc.get("volumes") or {})
    for name, svc in doc["services"].items():
        for vol in svc.get("volumes", []):
            source = vol.split(":", 1)[0]
            if not source.startswith((".", "/", "~", "$")):
                assert source in declared, f"{name}: {source}"


# --------------------------------------------------------------------------
# Ray cluster launcher
# --------------------------------------------------------------------------


def test_ray_cluster_launcher_config_matches_rays_schema():
    import jsonschema  # a dependency of ray itself

    spec = importlib.util.find_spec("ray")
    assert spec and spec.submodule_search_locations, "ray is a pinned dependency"
    schema_path = Path(next(iter(spec.submodule_search_locations))) / "autoscaler" / "ray-schema.json"
    schema = json.loads(schema_path.read_text())
    (config,) = load_docs(INFRA / "ray-cluster" / "aws.yaml")
    jsonschema.validate(config, schema)

    assert config["provider"]["type"] == "aws"
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["node_config"]["InstanceType"] == "m5.2xlarge"
    assert head["resources"].get("CPU") == 0
    workers = [t for name, t in types.items() if name != config["head_node_type"]]
    (gpu,) = [t for t in workers if t["node_config"]["InstanceType"] == "g5.xlarge"]
    assert (gpu["min_workers"], gpu["max_workers"]) == (0, 8)
    assert gpu["resources"].get("GPU") == 1
    assert config["max_workers"] >= gpu["max_workers"]
    assert "frcnn-jobs" in config["docker"]["image"]


# --------------------------------------------------------------------------
# Versions pinned in infra/ follow pyproject.toml
# --------------------------------------------------------------------------


def _from_images(dockerfile: Path) -> list[str]:
    args = {}
    images = []
    for instr, rest in dockerfile_instructions(dockerfile.read_text()):
        if instr == "ARG" and "=" in rest:
            k, v = rest.split("=", 1)
            args[k.strip()] = v.strip()
        elif instr == "FROM":
            image = rest.split()[0]
            images.append(re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), image))
    return images


def test_image_versions_follow_pyproject_pins():
    pins = pyproject_pins()
    (ray_image,) = _from_images(INFRA / "docker" / "Dockerfile")
    m = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)-py(\d)(\d+)-(gpu|cu\d+)", ray_image)
    assert m, ray_image
    assert m.group(1) == pins["ray"]
    requires = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["requires-python"]
    assert f">={m.group(2)}.{m.group(3)}" in requires

    (mlflow_image,) = _from_images(INFRA / "mlflow" / "Dockerfile")
    assert mlflow_image == f"ghcr.io/mlflow/mlflow:v{pins['mlflow']}"
    assert _compose()["services"]["mlflow"]["image"].endswith(":" + pins["mlflow"])
    (deploy,) = [d for d in docs_of_kind("Deployment") if d["metadata"]["name"] == "mlflow"]
    assert pod_containers(deploy)[0]["image"].endswith(":" + pins["mlflow"])


def test_dockerfile_installs_the_package():
    instructions = dockerfile_instructions((INFRA / "docker" / "Dockerfile").read_text())
    runs = " ".join(rest for instr, rest in instructions if instr == "RUN")
    assert re.search(r"pip install [^&]*\.(\s|$)", runs), "the image must `pip install .` the package"
    copied = {rest.split()[-2] for instr, rest in instructions if instr == "COPY"}
    assert {"pyproject.toml", "jobs", "frcnn", "pipelines"} <= copied


def test_embedded_python_compiles():
    # Heredoc scripts (`python - <<'PY' ... PY`) inside YAML are code too.
    heredoc = re.compile(r"python3?\s+-\s*<<-?\s*'?(\w+)'?[^\n]*\n(.*?)\n\s*\1\s*$", re.S | re.M)
    count = 0
    for path in yaml_files():
        for doc in load_docs(path):
            for text in _yaml_command_texts(doc):
                for m in heredoc.finditer(text):
                    compile(m.group(2), f"{rel(path)}:<heredoc {m.group(1)}>", "exec")
                    count += 1
    assert count >= 1


# --------------------------------------------------------------------------
# Every command line in infra/ against the real CLIs
# --------------------------------------------------------------------------


def test_infra_invokes_every_workflow_step():
    commands = {args[0] for _, args in all_invocations("frcnn-jobs") if args and not args[0].startswith("-")}
    assert {"precompute", "train", "evaluate", "promote", "infer"} <= commands, commands


def test_frcnn_jobs_invocations_match_cli():
    # Deliberately not skipped when jobs.cli is missing: the CLI is part of the
    # package these manifests deploy, so its absence is a failure.
    from jobs.cli import main

    assert isinstance(main, click.Group)
    invocations = all_invocations("frcnn-jobs")
    assert len(invocations) >= 10
    problems = check_all("frcnn-jobs", main)
    assert not problems, "\n".join(problems)


def test_ray_invocations_match_pinned_ray_cli():
    from ray.scripts.scripts import cli

    assert all_invocations("ray")
    problems = check_all("ray", cli)
    assert not problems, "\n".join(problems)


def test_mlflow_invocations_match_pinned_mlflow_cli():
    from mlflow.cli import cli

    assert all_invocations("mlflow")
    problems = check_all("mlflow", cli)
    assert not problems, "\n".join(problems)
