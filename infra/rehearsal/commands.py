"""The rehearsal's job command lines: infra/README's, with the rehearsal's addresses, sizes and buckets."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from infra.rehearsal.stack import CONFIG

FJ = "frcnn-jobs"
PRECOMPUTED = {s: f"s3://frcnn/precomputed/synth-{s}" for s in ("train", "val", "test")}


@dataclass(frozen=True)
class RawData:
    local: Path  # the generated VOC tree
    voc: str  # its VOC2007 folder, relative
    data_root: str  # s3://frcnn/raw/...
    splits: dict[str, int]


def precompute_cmd(data: RawData, split: str, out: str, on_error: str = "fail") -> str:
    return (f"{FJ} precompute --dataset voc --data-root {data.data_root} --split {split} --year 2007 "
            f"--out {out} --config {CONFIG} --on-error {on_error} --experiment frcnn-precompute")
