"""The registered model: an MLflow "model from code" pyfunc around a state-dict checkpoint.

Loading it runs this file and ``torch.load(..., weights_only=True)``: no pickled code. Prediction
goes through ``frcnn.inference.Detector``, the same code as ``infer``'s and ``evaluate``'s actors.
The registered model carries its own copy of ``frcnn/`` (``code_paths``), so this file imports
only ``frcnn``, MLflow and pandas: never ``jobs`` or ``pipelines``, which a serving host lacks.

    model = mlflow.pyfunc.load_model("models:/frcnn@champion")
    out = model.predict(pd.DataFrame({"image": [jpeg_bytes, ...]}))
    # one row per image: boxes (list of [x1, y1, x2, y2] in the image's pixels), scores, labels,
    # class_names, category_ids (the dataset's id of each label: COCO's own), and error (None, or
    # why the image could not be decoded)

The ``error`` column has the object dtype: pandas would otherwise store it as strings with NaN for
the missing ones, and MLflow's scoring server would answer ``"error": NaN`` (not JSON) instead of
``null``.
"""

from __future__ import annotations

import mlflow
import pandas as pd
from mlflow.pyfunc import PythonModel


class FrcnnPyfunc(PythonModel):
    batch_size = 8

    def load_context(self, context) -> None:
        from frcnn.inference import Detector

        self.detector = Detector.from_checkpoint(context.artifacts["checkpoint"], "cpu")

    # The pandas hint: MLflow validates that a DataFrame comes in (and warns when predict has no hint).
    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        images = list(model_input["image"])
        rows, errors = [], []
        for start in range(0, len(images), self.batch_size):
            for d in self.detector.predict(images[start:start + self.batch_size]):
                labels = d.labels.tolist()
                rows.append({"boxes": d.boxes.tolist(), "scores": d.scores.tolist(), "labels": labels,
                             "class_names": [self.detector.class_name(k) for k in labels],
                             "category_ids": [self.detector.category_id(k) for k in labels]})
                errors.append(d.error)
        frame = pd.DataFrame(rows, columns=["boxes", "scores", "labels", "class_names", "category_ids"])
        frame["error"] = pd.Series(errors, index=frame.index, dtype=object)
        return frame


mlflow.models.set_model(FrcnnPyfunc())
