"""ATSS sample assignment (Zhang et al., "Bridging the Gap Between Anchor-based and Anchor-free Detection via
Adaptive Training Sample Selection", CVPR 2020), batched; written by hand: effdet, timm and torchvision lack it.

For each box: on every level take the k anchor locations whose centres are nearest the box's centre; all
anchors there are candidates. The box's IoU threshold is the mean plus the standard deviation of its
candidates' IoUs. A candidate is positive if its IoU reaches that threshold and its centre lies inside the
box; an anchor positive for several boxes goes to the one it overlaps most. The paper tiles one anchor per
location and takes k anchors; effdet tiles n (scales x aspect ratios) per location, so k locations give
k x n candidates, which keeps the statistics over the anchor shapes too.
"""
from __future__ import annotations

import torch

INSIDE_EPS = 0.01  # a centre this close to the box's edge does not count as inside (mmdetection's value)


def atss_matches(iou: torch.Tensor, boxes: torch.Tensor, valid: torch.Tensor, anchor_centers: torch.Tensor,
                 levels: list[tuple[int, int, int]], topk: int) -> torch.Tensor:
    """iou [B, G, A]; boxes [B, G, 4] y1,x1,y2,x2; valid [B, G]; anchor_centers [A, 2] (y, x);
    levels: (first anchor, anchor count, anchors per location) per level, in anchor order.

    Returns [B, A]: the index of each anchor's box, or -1 for background.
    """
    box_centers = (boxes[..., :2] + boxes[..., 2:]) / 2  # [B, G, 2]
    candidates = []
    for start, count, per_location in levels:
        location_centers = anchor_centers[start:start + count:per_location]  # anchors of a location share it
        distance = torch.cdist(box_centers, location_centers.expand(len(boxes), -1, -1))  # [B, G, L]
        k = min(topk, distance.shape[-1])
        nearest = distance.topk(k, dim=-1, largest=False).indices  # [B, G, k]
        offsets = torch.arange(per_location, device=iou.device)
        candidates.append((start + nearest[..., None] * per_location + offsets).flatten(2))
    candidates = torch.cat(candidates, dim=-1)  # [B, G, K]
    candidate_iou = iou.gather(2, candidates)
    threshold = candidate_iou.mean(-1, keepdim=True) + candidate_iou.std(-1, keepdim=True)
    centers = anchor_centers[candidates]  # [B, G, K, 2]
    inside = torch.cat([centers - boxes[..., None, :2], boxes[..., None, 2:] - centers], -1).amin(-1) > INSIDE_EPS
    positive = (candidate_iou >= threshold) & inside & valid[..., None]
    score = torch.full_like(iou, -1.0).scatter_(2, candidates, torch.where(positive, candidate_iou, -1.0))
    best, matches = score.max(dim=1)  # per anchor, its best positive box
    return matches.masked_fill(best < 0, -1)
