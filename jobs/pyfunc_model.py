"""The registered model: an MLflow "model from code" pyfunc around a state-dict checkpoint.

Loading it runs this file and ``torch.load(..., weights_only=True)``: no pickled code.

    model = mlflow.pyfunc.load_model("models:/frcnn@champion")
    out = model.predict(pd.DataFrame({"image": [jpeg_bytes, ...]}))
    # one row per image: boxes (list of [x1, y1, x2, y2] in the image's pixels), scores, labels, class_names
"""

from __future__ import annotations

import io

import mlflow
from mlflow.pyfunc import PythonModel


class FrcnnPyfunc(PythonModel):
    def load_context(self, context) -> None:
        from frcnn.training import load_checkpoint, model_from_checkpoint

        state = load_checkpoint(context.artifacts["checkpoint"])
        self.model = model_from_checkpoint(state).eval()

    def predict(self, context, model_input, params=None):
        import numpy as np
        import pandas as pd
        from PIL import Image

        from frcnn.canvas import to_tensor

        model = self.model
        names = list(model.cfg.class_names)
        rows = []
        for data in model_input["image"]:
            image = Image.open(io.BytesIO(data))
            canvas, scale = model.canvas.apply_image(image)
            det = model.detect(to_tensor(canvas)[None], [scale], [(image.height, image.width)])[0]
            labels = det["labels"].tolist()
            rows.append({
                "boxes": det["boxes"].numpy().astype(np.float32).tolist(),
                "scores": det["scores"].tolist(),
                "labels": labels,
                "class_names": [names[l - 1] if names else str(l) for l in labels],
            })
        return pd.DataFrame(rows)


mlflow.models.set_model(FrcnnPyfunc())
