"""The command-line extraction and checking tool (infra/cmdlines.py) on known samples."""

from __future__ import annotations

import click
import pytest

from infra.cmdlines import (
    check_invocation,
    invocations_in_dockerfile,
    invocations_in_markdown,
    invocations_in_shell,
    invocations_in_yaml,
)

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

