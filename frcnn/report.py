"""An evaluation's numbers as people read them: the metrics dict, per-class rows, the printed table
and ``per_class.csv``.

    scores = score_detections(detections, ground_truth, class_names)
    print(format_table(scores.per_class, scores.metrics))
    write_per_class_csv(scores.per_class, "per_class.csv")

Metric names are stable across runs (what makes runs comparable in MLflow): ``map50`` (VOC
all-point mAP@0.5), ``map50_voc07`` (11-point), ``coco_map``, ``coco_ap50``, ``coco_ap75``,
``coco_ap_small|medium|large``, and ``ap50_<class>`` per class.
"""

from __future__ import annotations

import csv
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .coco import evaluate_coco
from .evaluation import VocResult, evaluate_voc

__all__ = ["HEADLINE", "Scores", "format_table", "score_detections", "write_per_class_csv"]

HEADLINE = ("map50", "map50_voc07", "coco_map", "coco_ap50", "coco_ap75", "coco_ap_small", "coco_ap_medium",
            "coco_ap_large")
CSV_FIELDS = ("class", "num_gt", "num_det", "ap_voc", "ap_voc07")


@dataclass
class Scores:
    metrics: dict[str, float]
    per_class: list[dict[str, Any]]  # class, num_gt, num_det, ap_voc, ap_voc07
    voc: VocResult  # the all-point result (precision/recall curves for the plot)


def _metric_safe(name: str) -> str:
    return re.sub(r"[^0-9A-Za-z_\-. /]", "_", name)


def score_detections(detections: Mapping[str, Mapping[str, Any]], ground_truth: Mapping[str, Mapping[str, Any]],
                     class_names: Sequence[str]) -> Scores:
    """VOC all-point and 11-point AP per class and their means, and COCO AP."""
    voc = evaluate_voc(detections, ground_truth, class_names)
    voc07 = evaluate_voc(detections, ground_truth, class_names, use_07_metric=True)
    coco = evaluate_coco(detections, ground_truth, class_names)
    metrics: dict[str, float] = {"map50": float(voc.map), "map50_voc07": float(voc07.map)}
    metrics.update({f"coco_{k}": float(v) for k, v in coco.items()})
    per_class = []
    for name in class_names:
        metrics[f"ap50_{_metric_safe(name)}"] = float(voc.ap[name])
        per_class.append({"class": name, "num_gt": voc.num_gt[name], "num_det": voc.num_det[name],
                          "ap_voc": float(voc.ap[name]), "ap_voc07": float(voc07.ap[name])})
    return Scores(metrics, per_class, voc)


def write_per_class_csv(per_class: Sequence[Mapping[str, Any]], path: str | os.PathLike[str]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(CSV_FIELDS))
        w.writeheader()
        for row in per_class:
            w.writerow({**row, "ap_voc": f"{row['ap_voc']:.6f}", "ap_voc07": f"{row['ap_voc07']:.6f}"})


def _fmt(v: float | None) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4f}"


def format_table(per_class: Sequence[Mapping[str, Any]], metrics: Mapping[str, float]) -> str:
    """Per-class gt/det counts and AP, then the headline metrics and the run's counts."""
    width = max([len("class")] + [len(r["class"]) for r in per_class])
    lines = [f"{'class':<{width}}  {'gt':>6}  {'det':>7}  {'AP50':>6}  {'AP50-07':>7}"]
    for r in per_class:
        lines.append(f"{r['class']:<{width}}  {r['num_gt']:>6}  {r['num_det']:>7}  {_fmt(r['ap_voc']):>6}  "
                     f"{_fmt(r['ap_voc07']):>7}")
    lines.append("")
    lines.append("  ".join(f"{k}={_fmt(metrics[k])}" for k in HEADLINE if k in metrics))
    extra = [k for k in ("images", "images_with_errors", "images_missing", "objects_left_out", "images_per_s")
             if k in metrics]
    lines.append("  ".join(f"{k}={metrics[k]:.4g}" for k in extra))
    return "\n".join(lines)
