"""Greedy box NMS with torchvision's semantics (suppress IoU > threshold, per category)."""

import torch


def box_area(boxes: torch.Tensor) -> torch.Tensor:
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


def _iou(box: torch.Tensor, others: torch.Tensor) -> torch.Tensor:
    top_left = torch.maximum(box[:2], others[:, :2])
    bottom_right = torch.minimum(box[2:], others[:, 2:])
    inter = (bottom_right - top_left).clamp(min=0).prod(dim=1)
    return inter / (box_area(box[None]) + box_area(others) - inter)


def nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    order = torch.argsort(scores, descending=True, stable=True)
    keep = []
    suppressed = torch.zeros(len(boxes), dtype=torch.bool)
    for position, index in enumerate(order.tolist()):
        if suppressed[position]:
            continue
        keep.append(index)
        rest = order[position + 1 :]
        suppressed[position + 1 :] |= _iou(boxes[index].float(), boxes[rest].float()) > iou_threshold
    return torch.as_tensor(keep, dtype=torch.long)


def batched_nms(boxes: torch.Tensor, scores: torch.Tensor, idxs: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    if boxes.numel() == 0:
        return torch.empty((0,), dtype=torch.long)
    # Offsetting each category's boxes apart makes one NMS pass act per category.
    offsets = idxs.to(boxes) * (boxes.max() + 1)
    return nms(boxes + offsets[:, None], scores, iou_threshold)
