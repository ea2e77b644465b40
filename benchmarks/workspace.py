"""The synthetic data the rows share: one generated VOC folder, named splits of it, and training
shards precomputed at the tiny config, each made once per benchmark run (whichever row needs it
first), so that any row can also run alone (``python -m benchmarks.run --only N``)."""

from __future__ import annotations

import time
from pathlib import Path

from .common import ray_up, say

SEED = 11


class Workspace:
    """``root``: a temporary folder; ``n_images``: how many synth images the wanted rows need."""

    def __init__(self, root: Path, n_images: int) -> None:
        self.root = Path(root)
        self.n_images = n_images
        self._voc: Path | None = None
        self._shards: dict[int, str] = {}

    @property
    def voc(self) -> Path:
        if self._voc is None:
            from pipelines.synth import generate

            voc = self.root / "voc"
            t = time.perf_counter()
            summary = generate(str(voc), n_images=self.n_images, seed=SEED)
            say(f"data: generated {self.n_images} synth images ({summary['objects']} objects, 160-400 px) in "
                f"{time.perf_counter() - t:.1f} s")
            self._voc = voc
        return self._voc

    def ids(self, n: int) -> list[str]:
        if n > self.n_images:
            raise ValueError(f"{n} images wanted, the workspace was sized for {self.n_images}")
        return [f"{i:06d}" for i in range(n)]

    def split(self, name: str, n: int) -> str:
        """A split file ``name`` of the first ``n`` images; returns the split's name."""
        sets = self.voc / "VOCdevkit" / "VOC2007" / "ImageSets" / "Main"
        (sets / f"{name}.txt").write_text("".join(f"{i}\n" for i in self.ids(n)))
        return name

    def image_paths(self, n: int) -> list[Path]:
        return [self.voc / "VOCdevkit" / "VOC2007" / "JPEGImages" / f"{i}.jpg" for i in self.ids(n)]

    def train_shards(self, n: int) -> str:
        """The first ``n`` images precomputed at the tiny config (192x192), as `frcnn-jobs
        precompute` writes them. Uses the running Ray instance, or starts one and stops it."""
        if n in self._shards:
            return self._shards[n]
        import ray

        from frcnn.config import tiny_config
        from pipelines.precompute import precompute
        from pipelines.synth import SYNTH_CLASSES

        split = self.split(f"bench_train_{n}", n)
        out = self.root / f"train_shards_{n}"
        started = not ray.is_initialized()
        if started:
            ray_up()
        try:
            t = time.perf_counter()
            precompute(str(self.voc), split, str(out), tiny_config(len(SYNTH_CLASSES), SYNTH_CLASSES),
                       overwrite=True, progress=False)
            say(f"data: {n} images precomputed at the tiny config (192x192) in {time.perf_counter() - t:.1f} s")
        finally:
            if started:
                ray.shutdown()
        self._shards[n] = str(out)
        return self._shards[n]
