"""The errors a command anticipates, as types every layer can raise (frcnn, pipelines, jobs).

A ``JobError``'s message is the one line a user sees: it names the file, URI or record and the
reason. ``frcnn-jobs`` turns every ``JobError`` (and the standard library's file errors, which
name their path) into ``Error: <message>`` and exit status 1, with the traceback only under
``frcnn-jobs -v`` (``jobs.console.clean_error``). Anything else is a bug and keeps its traceback.

Subclass the kind that fits, beside the standard base a caller may already catch:

- ``ConfigError``: a config file or value that cannot be used (``frcnn.config``);
- ``DatasetError``: a dataset's layout, an annotation, a manifest, the ground truth;
- ``StorageError``: a store that does not answer or refuses (an object store, a tracking store).
"""

from __future__ import annotations


class JobError(Exception):
    """An anticipated error: its message is one line naming the input and the reason."""


class ConfigError(JobError, ValueError):
    """A config that cannot be used; the message names the file and the key."""


class DatasetError(JobError, ValueError):
    """Input data that cannot be used: a layout, an annotation, a manifest, the ground truth."""


class StorageError(JobError, OSError):
    """A store that cannot be read or written; the message names the URI."""
