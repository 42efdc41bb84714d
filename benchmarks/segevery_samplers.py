"""SegEvery on one model: SAM's 32x32 grid against AutoPPN's proposals, end to end.

The model is Lite-SAM at full size (4.2 M parameters, 640 px) with random weights, except
its AutoPPN head, which is first trained (``slimseg.compress.train``, stage autoppn) on
generated SA-1B-format images so that its proposals follow objects as a trained head's
would. Held-out generated images are then segmented three ways:

- grid: 32x32 = 1024 point prompts (segment-anything's default);
- autoppn: the trained head's own proposals (peaks above its 0.05 score, at most 256);
- autoppn-all: every heatmap peak (threshold 0, at most 256): on a smooth trained heatmap
  that is still only a few dozen points;
- points-256: 256 seeded random points through the same sampler, the cost of the most
  prompts AutoPPN may propose (its top_k), whatever the heatmap.

Run:  python benchmarks/segevery_samplers.py [--images 2] [--threads 2]
Prints a table and one JSON line with seconds per stage, prompts, masks and the ratios.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import numpy as np
import torch

import slimseg
from slimseg.allocator import tune_cpu_allocator
from slimseg.compress.distill_config import DistillConfig
from slimseg.compress.train import train
from slimseg.data.datasets import SA1BDataset
from slimseg.data.images import read_image
from slimseg.data.synthetic import write_sa1b_folder
from slimseg.evaluation.proposal_recall import proposal_recall

SAMPLERS = {
    "grid": dict(sampler="grid", points_per_side=32),
    "autoppn": dict(sampler="autoppn"),
    "autoppn-all": dict(sampler="autoppn", max_proposals=256, proposal_thresh=0.0),
}


def _random_points(crop, predictor) -> np.ndarray:
    """256 seeded uniform points in the crop: the decoding cost of a full top_k."""
    height, width = crop.shape[:2]
    return np.random.default_rng(0).uniform(0, 1, (256, 2)) * np.array([width, height])


def _train_autoppn(root: Path, images: int, epochs: int) -> torch.nn.Module:
    write_sa1b_folder(root / "train", images, size=(480, 640), seed=1, objects=8)
    torch.manual_seed(0)
    model = slimseg.build_model("lite-sam")
    config = DistillConfig(epochs=epochs, batch_size=4, grad_accum=1, lr=3e-3, log_every=1000)
    model, result = train(model, SA1BDataset(root / "train", img_size=640), root / "run", config, stage="autoppn")
    losses = [round(record["train_loss"], 3) for record in result.epochs]
    print(f"AutoPPN training loss per epoch: {losses}")
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2, help="held-out images timed")
    parser.add_argument("--train-images", type=int, default=24)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tune_cpu_allocator()  # as the slimseg command does
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        model = _train_autoppn(root, args.train_images, args.epochs)
        paths = write_sa1b_folder(root / "test", args.images, size=(480, 640), seed=2, objects=8)
        recall = proposal_recall(model, SA1BDataset(root / "test", img_size=640))
        print(f"held-out proposal recall {recall.recall:.3f} ({recall.found}/{recall.objects} objects, "
              f"{recall.proposals:.1f} points per image; as many random points: {recall.random_recall:.3f})")
        images = [read_image(path) for path in paths]
        slimseg.MaskGenerator(model, points_per_side=4).generate(images[0])  # warm-up
        results = {}
        samplers = {**SAMPLERS, "points-256": dict(sampler="autoppn", point_proposer=_random_points)}
        for name, options in samplers.items():
            generator = slimseg.MaskGenerator(model, **options)
            runs = []
            for image in images:
                records, timings = generator.generate_timed(image)
                runs.append({**timings, "masks": len(records)})
            prompts = {"grid": 1024, "points-256": 256}.get(name)
            results[name] = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
            results[name]["prompts"] = prompts
        for name in ("autoppn", "autoppn-all"):
            results[name]["prompts"] = _proposals(model, images, SAMPLERS[name])
    grid = results["grid"]["total"]
    print(f"{'sampler':<12} {'prompts':>8} {'encoder':>8} {'proposer':>9} {'decoder':>8} {'post':>7} "
          f"{'total s':>8} {'speed-up':>9}")
    for name, row in results.items():
        print(f"{name:<12} {row['prompts']:>8.0f} {row['encoder']:>8.2f} {row['proposer']:>9.3f} "
              f"{row['decoder']:>8.2f} {row['postprocess']:>7.2f} {row['total']:>8.2f} {grid / row['total']:>8.1f}x")
    print(json.dumps({"threads": args.threads, "torch": torch.__version__, "recall": recall.recall,
                      "results": results}))


@torch.no_grad()
def _proposals(model: torch.nn.Module, images: list, options: dict) -> float:
    """Median number of points the AutoPPN sampler decodes per image."""
    from slimseg.inference.predictor import Predictor
    from slimseg.modeling.autoppn import propose_points

    predictor = Predictor(model)
    config = model.autoppn.config
    counts = []
    for image in images:
        predictor.set_image(image)
        logits = model.autoppn(predictor.get_image_embedding())
        proposals = propose_points(logits, options.get("max_proposals", config.top_k),
                                   options.get("proposal_thresh", config.score_threshold), model.img_size,
                                   predictor.input_size)[0]
        counts.append(len(proposals.points))
    return float(statistics.median(counts))


if __name__ == "__main__":
    main()
