"""COCO bbox evaluation with pycocotools COCOeval: predicting on every rank, gathering and scoring on rank 0."""
from __future__ import annotations

import contextlib
import io

import numpy as np
import torch
import torch.distributed as dist
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from trainers.annotations import LabelMap
from trainers.data import effdet_detections_to_coco, to_model_input

STAT_NAMES = ("map", "map50", "map75", "map_small", "map_medium", "map_large")


class CocoEvaluator:
    """reset / process / evaluate over one split's ground truth (trainers.annotations.SplitIndex.coco_ground_truth)."""

    def __init__(self, coco_gt: COCO, labels: LabelMap):
        self.coco_gt = coco_gt
        self.labels = labels
        self.reset()

    def reset(self) -> None:
        self.results: list[np.ndarray] = []
        self.image_ids: set[int] = set()

    def process(self, image_ids, detections) -> None:
        """image_ids: [B]; detections: [B, N, 6] effdet rows in original-image pixels."""
        image_ids = np.asarray(image_ids)
        self.image_ids.update(int(i) for i in image_ids)
        self.results.append(effdet_detections_to_coco(detections, image_ids, self.labels))

    def evaluate(self) -> dict[str, float]:
        results = np.concatenate(self.results) if self.results else np.zeros((0, 7))
        if not len(results):
            return {name: 0.0 for name in STAT_NAMES}
        with contextlib.redirect_stdout(io.StringIO()):  # COCOeval prints its tables
            coco_dt = self.coco_gt.loadRes(results)
            cocoeval = COCOeval(self.coco_gt, coco_dt, iouType="bbox")
            # Only the images we saw count; otherwise unseen images read as misses.
            cocoeval.params.imgIds = sorted(self.image_ids)
            cocoeval.evaluate()
            cocoeval.accumulate()
            cocoeval.summarize()
        # COCOeval reports -1 where a size range has no ground truth.
        return {name: max(0.0, float(v)) for name, v in zip(STAT_NAMES, cocoeval.stats[:6])}


def evaluate_all(predictors: dict, loader, evaluator: CocoEvaluator, *, device: torch.device, rank: int,
                 world_size: int, channels_last: bool, amp_dtype: torch.dtype | None) -> tuple[dict, str]:
    """Score every set of weights (raw, EMA); the better one's scores become the trial's, and it is deployed.

    Returns ({} , "raw") on ranks other than 0, which only predict.
    """
    scores = {name: evaluate(predictor, loader, evaluator, device=device, rank=rank, world_size=world_size,
                             channels_last=channels_last, amp_dtype=amp_dtype)
              for name, predictor in predictors.items()}
    if rank != 0:
        return {}, "raw"
    best = max(scores, key=lambda name: (scores[name]["map"], name == "ema"))  # a tie goes to the EMA
    return {**scores[best], **{f"map_{name}": s["map"] for name, s in scores.items()}}, best


def evaluate(predictor, loader, evaluator: CocoEvaluator, *, device: torch.device, rank: int, world_size: int,
             channels_last: bool, amp_dtype: torch.dtype | None) -> dict:
    """Predict this rank's shard of the validation split; rank 0 gathers every rank's detections and scores them."""
    predictor.eval()
    image_ids, detections = [], []
    autocast = (torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None
                else contextlib.nullcontext())
    with torch.inference_mode(), autocast:
        for images, targets in loader:
            info = {"img_scale": targets["img_scale"].to(device), "img_size": targets["img_size"].to(device)}
            image_ids.append(targets["image_id"].numpy())
            detections.append(predictor(to_model_input(images, device, channels_last), info).float())
    # Copied to the host once, after the last batch was queued, so the device never waits on a copy.
    detections = [rows.cpu().numpy() for rows in detections]
    if world_size > 1:
        gathered: list = [None] * world_size
        dist.all_gather_object(gathered, (image_ids, detections))
        image_ids = [ids for part in gathered for ids in part[0]]
        detections = [dets for part in gathered for dets in part[1]]
    if rank != 0:
        return {}
    evaluator.reset()
    for ids, dets in zip(image_ids, detections):
        evaluator.process(ids, dets)
    scores = evaluator.evaluate()
    scores["eval_images"] = len(evaluator.image_ids)
    return scores
