"""Where a training job stands, as files beside its Ray Train checkpoints: the status file rank 0
leaves for the driver, and the latest checkpoint a ``--resume`` would start from.

Ray's ``Result`` only carries the metrics of checkpointed reports, so an outcome that ends the
run without a checkpoint (a NaN loss) reaches the driver through ``_frcnn_status.json``.
"""

from __future__ import annotations

import re
from typing import Any

from pipelines.storage import Location

STATUS_FILE = "_frcnn_status.json"
_CHECKPOINT_DIR = re.compile(r"^epoch-(\d{4,})$")


def checkpoint_dir_name(epoch: int) -> str:
    return f"epoch-{epoch:04d}"


def checkpoint_epoch(path: str) -> int | None:
    """The epoch of a checkpoint folder named by :func:`checkpoint_dir_name`, else None."""
    m = _CHECKPOINT_DIR.match(path.rstrip("/").rsplit("/", 1)[-1])
    return int(m.group(1)) if m else None


def checkpoint_step(path: str, steps_per_epoch: int) -> int:
    """The step a checkpoint folder was written at (its epoch's last step)."""
    return (checkpoint_epoch(path) + 1) * steps_per_epoch


def run_folder(storage_path: str, ray_name: str) -> Location:
    return Location.of(storage_path).child(ray_name)


def write_status(folder: str, status: dict[str, Any]) -> None:
    Location.of(folder).child(STATUS_FILE).write_json(status)


def read_status(folder: str) -> dict[str, Any]:
    try:
        return Location.of(folder).child(STATUS_FILE).read_json()
    except FileNotFoundError:
        return {}


def clear_status(folder: str) -> None:
    Location.of(folder).child(STATUS_FILE).delete()


def latest_checkpoint(folder: str, checkpoint_file: str) -> str | None:
    """The newest complete checkpoint folder of a Ray Train run (the one ``--resume`` continues
    from), or None. A folder without the checkpoint file (a copy cut short) does not count."""
    loc = Location.of(folder)
    epochs = sorted(((int(m.group(1)), name) for name in loc.list_dirs() if (m := _CHECKPOINT_DIR.match(name))),
                    reverse=True)
    for _, name in epochs:
        if loc.child(name, checkpoint_file).is_file():
            return loc.child(name).shown
    return None
