"""Tiny generated canvases with known shapes, the tiny detector built for them, and the recipe
that overfits it (the ``tiny_trained_model`` fixture in conftest.py trains through it)."""

from __future__ import annotations

import dataclasses
import random

import numpy as np
import torch
from PIL import Image, ImageDraw

from frcnn import FasterRCNN, tiny_config, total_loss

CANVAS = 128
NUM_CLASSES = 3
COLORS = {1: (220, 40, 40), 2: (40, 200, 40), 3: (40, 40, 230)}


def make_images(n: int = 4, size: int = CANVAS, seed: int = 0):
    """``n`` noisy grey canvases, each with 2 or 3 non-overlapping filled shapes: class 1 red
    rectangles, class 2 green ellipses, class 3 blue rectangles. -> uint8 (n, 3, size, size),
    boxes [x1, y1, x2, y2] (pixel edges), labels."""
    rng = random.Random(seed)
    noise = np.random.RandomState(seed)
    images, boxes, labels = [], [], []
    for i in range(n):
        bg = np.clip(110 + noise.randint(-20, 21, (size, size, 3)), 0, 255).astype(np.uint8)
        im = Image.fromarray(bg)
        draw = ImageDraw.Draw(im)
        bs, ls = [], []
        while len(bs) < 2 + i % 2:
            w, h = rng.randint(24, 60), rng.randint(24, 60)
            x1, y1 = rng.randint(2, size - w - 2), rng.randint(2, size - h - 2)
            b = [x1, y1, x1 + w, y1 + h]
            if any(not (b[2] + 4 <= o[0] or o[2] + 4 <= b[0] or b[3] + 4 <= o[1] or o[3] + 4 <= b[1]) for o in bs):
                continue
            c = (len(bs) + i) % 3 + 1
            shape = draw.ellipse if c == 2 else draw.rectangle
            shape([b[0], b[1], b[2] - 1, b[3] - 1], fill=COLORS[c])  # PIL's corners are inclusive
            bs.append(b)
            ls.append(c)
        images.append(torch.from_numpy(np.array(im)).permute(2, 0, 1))
        boxes.append(torch.tensor(bs, dtype=torch.float32))
        labels.append(torch.tensor(ls, dtype=torch.int64))
    return torch.stack(images), boxes, labels


def make_model(seed: int = 0, **roi_changes) -> FasterRCNN:
    torch.manual_seed(seed)
    cfg = tiny_config(num_classes=NUM_CLASSES, canvas=CANVAS)
    if roi_changes:
        cfg = cfg.replace(roi=dataclasses.replace(cfg.roi, **roi_changes))
    return FasterRCNN(cfg)


@dataclasses.dataclass(frozen=True)
class TinyTrained:
    """A tiny detector overfitted on ``make_images(n_images)``, in eval mode, with its data and
    the losses seen every 25 steps (``(step, {loss: value})``)."""

    model: FasterRCNN
    images: torch.Tensor
    boxes: list[torch.Tensor]
    labels: list[torch.Tensor]
    history: tuple


def overfit(n_images: int = 4, steps: int = 200, lr: float = 0.02) -> TinyTrained:
    """SGD on ``n_images`` canvases for ``steps`` steps at one torch thread (float32); every
    step's loss must be finite."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        images, boxes, labels = make_images(n_images)
        model = make_model(seed=0).train()
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)
        targets = {"boxes": boxes, "labels": labels}
        history = []
        for step in range(steps):
            losses = model(images, targets)
            loss = total_loss(losses)
            assert torch.isfinite(loss), (step, losses)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if step % 25 == 0 or step == steps - 1:
                history.append((step, {k: round(float(v.detach()), 4) for k, v in losses.items()}))
    finally:
        torch.set_num_threads(before)
    return TinyTrained(model.eval(), images, boxes, labels, tuple(history))
