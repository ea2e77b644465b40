"""pipelines.runtime: Ray Data's retried I/O errors are valid regular expressions that match the
errors Ray retries by default, less the unreachable store; setting them raises no warning."""

from __future__ import annotations

import re
import warnings

import pytest

from pipelines import runtime

_RAY_DEFAULTS = (
    "AWS Error INTERNAL_FAILURE",
    "AWS Error NETWORK_CONNECTION",
    "AWS Error SLOW_DOWN",
    "AWS Error UNKNOWN (HTTP status 503)",
    "AWS Error SERVICE_UNAVAILABLE",
)


def test_patterns_are_regexes_matching_the_literal_errors():
    patterns = runtime.retried_io_patterns(_RAY_DEFAULTS)
    assert len(patterns) == 4
    for pattern in patterns:
        re.compile(pattern)
    # each error text, as Ray formats it, is matched by a regex search (not only as a substring)
    for text in ("AWS Error INTERNAL_FAILURE", "AWS Error SLOW_DOWN", "AWS Error UNKNOWN (HTTP status 503)",
                 "AWS Error SERVICE_UNAVAILABLE"):
        err = f"OSError: When uploading part for key 'k': AWS Error {text.split('AWS Error ')[1]} during x"
        assert sum(bool(re.search(p, err)) for p in patterns) == 1
    assert not any(re.search(p, "OSError: AWS Error NETWORK_CONNECTION during CreateMultipartUpload")
                   for p in patterns)
    # the literal 503 pattern, read as a regex unescaped, would not match its own text
    assert not re.search("AWS Error UNKNOWN (HTTP status 503)", "AWS Error UNKNOWN (HTTP status 503)")


@pytest.mark.integration  # imports Ray (no cluster is started)
def test_bounded_io_retries_sets_and_restores_without_warning():
    import ray

    ctx = ray.data.DataContext.get_current()
    saved = list(ctx.retried_io_errors)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with runtime.bounded_io_retries():
            inside = list(ctx.retried_io_errors)
    assert inside == runtime.retried_io_patterns(saved)
    assert list(ctx.retried_io_errors) == saved
