"""Zero-shot COCO evaluation: box/point-prompt mIoU, SegEvery AR@K, detection-prompted mask AP.

``predict`` makes the predictions of one image, ``scoring`` turns predictions into metrics
(and can be fed ground-truth masks), ``store`` keeps per-image results for resume, ``run``
ties them together over (sharded) images.
"""

from slimseg.evaluation.coco.run import PROMPTS, CocoEvaluation, RunningMetric, protocol, score_records, shard
from slimseg.evaluation.coco.scoring import area_range, average_recall, instance_records, miou_table, segm_ap
from slimseg.evaluation.coco.store import ResultStore

__all__ = [
    "PROMPTS",
    "CocoEvaluation",
    "ResultStore",
    "RunningMetric",
    "area_range",
    "average_recall",
    "instance_records",
    "miou_table",
    "protocol",
    "score_records",
    "segm_ap",
    "shard",
]
