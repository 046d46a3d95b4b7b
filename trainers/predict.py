"""Detections from a logged model's raw network: letterboxed input, effdet's decode and NMS, original coordinates."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from effdet.anchors import Anchors
from effdet.bench import _batch_detection, _post_process
from effdet.data.transforms import ResizePad
from PIL import Image, ImageDraw, ImageOps, UnidentifiedImageError

from trainers.annotations import LabelMap
from trainers.centernet import decode as decode_centers
from trainers.data import FILL_COLOR, as_rgb, to_model_input
from trainers.errors import PredictError
from trainers.model import effdet_config
from trainers.spec import ModelSpec

BATCH_SIZE = 8


def read_image(path: Path) -> Image.Image:
    """RGB pixels as displayed: EXIF orientation applied, as annotation tools (and training, by default) show photos."""
    try:
        with Image.open(path) as img:
            return as_rgb(ImageOps.exif_transpose(img))
    except (UnidentifiedImageError, OSError) as err:
        raise PredictError(f"{path}: not a readable image: {err}") from None


def on_device(graph: torch.fx.GraphModule, device: torch.device) -> torch.fx.GraphModule:
    """Move an exported graph to a device. torch.export burns the export device into some nodes
    (_assert_tensor_metadata(device=cpu)), which .to() leaves alone; rewritten here as torch's
    move_to_device_pass does for an ExportedProgram, which MLflow's loader no longer hands out."""
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())  # tensors report cuda:N, and the check compares
    for node in graph.graph.nodes:
        if isinstance(node.kwargs.get("device"), torch.device):
            node.kwargs = {**node.kwargs, "device": device}
    graph.recompile()
    return graph.to(device)


class Detector:
    """The raw network's graph plus what the head's prediction bench adds around it: for the anchor head
    effdet's anchors, top-k, decode and NMS; for the center head trainers/centernet.py's peak decoding."""

    def __init__(self, graph: torch.nn.Module, spec: ModelSpec, categories: list[dict], device: torch.device):
        if len(categories) != spec.num_classes:
            raise PredictError(f"categories.json names {len(categories)} categories but the model has "
                               f"{spec.num_classes} classes")
        self.graph, self.spec, self.device = graph, spec, device
        self.labels = LabelMap(tuple(int(c["id"]) for c in categories))
        self.names = {int(c["id"]): str(c.get("name", c["id"])) for c in categories}
        self.config = effdet_config(spec)
        self.anchors = Anchors.from_config(self.config).to(device) if spec.head == "anchor" else None
        self.resize = ResizePad(spec.image_size, interpolation="bilinear", fill_color=FILL_COLOR)

    def __call__(self, images: list[Image.Image]) -> list[np.ndarray]:
        """Per image: rows x1, y1, x2, y2 (its own pixels), score, category id, best first."""
        results = []
        for start in range(0, len(images), BATCH_SIZE):
            results.extend(self._batch(images[start:start + BATCH_SIZE]))
        return results

    @torch.inference_mode()
    def _batch(self, images: list[Image.Image]) -> list[np.ndarray]:
        pixels, scales = [], []
        for image in images:
            padded, info = self.resize(image, {})  # letterboxed at the top left, as in evaluation
            pixels.append(np.asarray(padded, dtype=np.uint8).transpose(2, 0, 1))
            scales.append(info["img_scale"])
        x = to_model_input(torch.from_numpy(np.stack(pixels)), self.device)
        img_scale = torch.tensor(scales, dtype=torch.float32, device=self.device)
        img_size = torch.tensor([image.size for image in images], dtype=torch.float32, device=self.device)  # w, h
        class_out, box_out = self.graph(x)
        c = self.config
        if self.spec.head == "center":
            detections = decode_centers(class_out, box_out, stride=2 ** self.spec.center_level, img_scale=img_scale,
                                        img_size=img_size, max_det=c.max_det_per_image)
        else:
            class_out, box_out, indices, classes = _post_process(
                class_out, box_out, num_levels=c.num_levels, num_classes=c.num_classes,
                max_detection_points=c.max_detection_points)
            detections = _batch_detection(len(images), class_out, box_out, self.anchors.boxes, indices, classes,
                                          img_scale, img_size, max_det_per_image=c.max_det_per_image,
                                          soft_nms=c.soft_nms)
        detections = detections.float().cpu().numpy()
        rows = []
        for dets in detections:
            dets = dets[dets[:, 4] > 0]  # effdet pads with all-zero rows
            dets[:, 5] = self.labels.to_categories(dets[:, 5]) if len(dets) else dets[:, 5]
            rows.append(dets)
        return rows


def coco_results(file_name: str, detections: np.ndarray, score_threshold: float) -> list[dict]:
    """COCO result records (bbox x, y, w, h) for one image's detections at or above the threshold."""
    return [{"file_name": file_name, "category_id": int(cls), "bbox": [round(float(v), 2) for v in
                                                                      (x1, y1, x2 - x1, y2 - y1)],
             "score": round(float(score), 4)}
            for x1, y1, x2, y2, score, cls in detections if score >= score_threshold]


def draw(image: Image.Image, records: list[dict], names: dict[int, str]) -> Image.Image:
    """A copy of the image with each record's box and 'name score'."""
    image = image.copy()
    pen = ImageDraw.Draw(image)
    width = max(1, round(max(image.size) / 200))
    for r in records:
        x, y, w, h = r["bbox"]
        pen.rectangle([x, y, x + w, y + h], outline=(255, 0, 0), width=width)
        pen.text((x + width, y + width), f"{names.get(r['category_id'], r['category_id'])} {r['score']:.2f}",
                 fill=(255, 255, 0))
    return image
