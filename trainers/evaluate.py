"""COCO bbox evaluation with pycocotools COCOeval, behind a reset/process/evaluate protocol."""
from __future__ import annotations

import contextlib
import io

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from trainers.data import LabelMap, effdet_detections_to_coco

STAT_NAMES = ("map", "map50", "map75", "map_small", "map_medium", "map_large")


class CocoEvaluator:
    def __init__(self, coco_gt: COCO, labels: LabelMap):
        self.coco_gt = coco_gt
        self.labels = labels
        self.reset()

    def reset(self) -> None:
        self.results: list[dict] = []
        self.image_ids: list[int] = []

    def process(self, image_ids, detections) -> None:
        """image_ids: [B]; detections: [B, N, 6] effdet rows in original-image pixels."""
        detections = np.asarray(detections)
        for image_id, rows in zip(np.asarray(image_ids).tolist(), detections):
            self.image_ids.append(int(image_id))
            self.results.extend(effdet_detections_to_coco(rows, image_id, self.labels))

    def evaluate(self) -> dict[str, float]:
        if not self.results:
            return {name: 0.0 for name in STAT_NAMES}
        with contextlib.redirect_stdout(io.StringIO()):  # COCOeval prints its tables
            coco_dt = self.coco_gt.loadRes(self.results)
            cocoeval = COCOeval(self.coco_gt, coco_dt, iouType="bbox")
            # Only the images we saw count; otherwise unseen images read as misses.
            cocoeval.params.imgIds = sorted(set(self.image_ids))
            cocoeval.evaluate()
            cocoeval.accumulate()
            cocoeval.summarize()
        # COCOeval reports -1 where a size range has no ground truth.
        return {name: max(0.0, float(v)) for name, v in zip(STAT_NAMES, cocoeval.stats[:6])}
