"""slimseg against the references it replaces: same machine, same process, same random weights.

1. SAM-B image encoder, segment-anything's against slimseg's (target: slimseg <= 0.6x the time);
   the embeddings must agree.
2. SlimSAM-77 (transformers SamModel, hidden size 168, MLP 696, loaded by slimseg from its
   save_pretrained folder): encoder + one box prompt, transformers against slimseg (target:
   slimseg >= 3x faster), the same work on both sides: the normalised, padded image in, the
   low-res mask logits out; slimseg's SlimSAM-77 encoder against its floor, the MACs at this
   machine's dense matmul rate, the faster of two measurements taken before and after it
   (target: within 2.5x); and against slimseg's SAM-B encoder
   (target: >= 8x faster).
3. SegEvery, 32x32 grid on SAM-B: segment-anything's SamAutomaticMaskGenerator against
   slimseg.MaskGenerator on a real photo (target: >= 3x); the masks must be the same. Random
   weights fail segment-anything's default filters, so both get thresholds that let about 5 %
   of a calibration grid's candidates through (printed).
AutoPPN against the grid is benchmarks/segevery_samplers.py. The two sides of each encoder and
box comparison are timed in turn, a run of one then a run of the other, so that drift in the
speed of a shared machine slows both alike; the SAM-B encoder is timed again beside SlimSAM-77's.

Run:  python benchmarks/compare_references.py [--runs 3] [--threads 2] [--skip-segevery]
      [--points-per-side 32] [--json PATH]
segment-anything's generator takes minutes per image at 32x32 on a CPU. Prints the machine, a
markdown table of ratios against the targets, the agreement checks, and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from slimseg.allocator import tune_cpu_allocator

# the references are built by the test suite's helpers (segment-anything needs its stand-in)
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from reference import (  # noqa: E402
    import_segment_anything,
    randomise,
    real_photo,
    reference_sam,
    transformers_slimsam_77,
)

import slimseg  # noqa: E402
from slimseg.benchmark import (  # noqa: E402
    Timing,
    describe_machine,
    floor_seconds,
    machine_line,
    matmul_rate,
    model_work,
    time_alternating,
    time_runs,
)
from slimseg.benchmark.stages import encoder_input  # noqa: E402
from slimseg.devices import resolve_device  # noqa: E402
from slimseg.inference.everything.crops import build_all_layer_point_grids  # noqa: E402
from slimseg.inference.everything.data import stability_score  # noqa: E402
from slimseg.inference.masks import decode_rle  # noqa: E402
from slimseg.io import atomic_write_text  # noqa: E402
from slimseg.modeling.sam import sam_b_config  # noqa: E402

BOX = np.array([100.0, 90.0, 420.0, 500.0])  # XYXY in the 600x512 photo: the person
CALIBRATION_SIDE = 8  # thresholds are chosen on an 8x8 grid's candidates (or the grid itself if smaller)


def _relative_error(ours: torch.Tensor | np.ndarray, theirs: torch.Tensor | np.ndarray) -> float:
    ours, theirs = np.asarray(ours, dtype=np.float64), np.asarray(theirs, dtype=np.float64)
    return float(np.abs(ours - theirs).max() / max(np.abs(theirs).max(), 1e-12))


class Bench:
    """Timing with the run's settings: ``warmup`` untimed runs, median of ``runs``."""

    def __init__(self, device: torch.device, runs: int, warmup: int) -> None:
        self.device, self.runs, self.warmup = device, runs, warmup
        self.rows: list[dict] = []
        self.checks: dict[str, object] = {}

    def time(self, work: Callable[[], object], runs: int | None = None, warmup: int | None = None) -> Timing:
        with torch.inference_mode():
            return time_runs(work, self.device, self.runs if runs is None else runs,
                             self.warmup if warmup is None else warmup)

    def alternate(self, *works: Callable[[], object]) -> list[float]:
        """Median seconds of each work, the works timed in turn run by run (time_alternating)."""
        with torch.inference_mode():
            return [timing.median for timing in time_alternating(works, self.device, self.runs, self.warmup)]

    def row(self, name: str, ours: float, theirs: float, ratio: float, shown: str, target: str, met: bool) -> None:
        self.rows.append({"comparison": name, "slimseg_s": ours, "reference_s": theirs, "ratio": ratio,
                          "shown": shown, "target": target, "met": met})


def sam_b_encoders(bench: Bench, folder: Path, image: np.ndarray
                   ) -> tuple[torch.nn.Module, torch.nn.Module, Callable[[], object]]:
    """Section 1: segment-anything's SAM-B and slimseg's, the same weights through a .pth;
    returns both models and a call of slimseg's encoder."""
    from segment_anything import SamPredictor

    torch.manual_seed(0)
    reference = reference_sam(sam_b_config())
    path = folder / "sam_vit_b_random.pth"
    torch.save(randomise(reference), path)
    reference.to(bench.device)
    ours = slimseg.load_model(path, device=bench.device)
    theirs_predictor, ours_predictor = SamPredictor(reference), slimseg.Predictor(ours)
    tensor = encoder_input(ours_predictor, image)

    def ours_encoder() -> None:
        ours_predictor.set_torch_image(tensor, image.shape[:2])

    print(f"SAM-B image encoder: segment-anything and slimseg in turn, {bench.warmup} warm-up + "
          f"{bench.runs} run(s) each", flush=True)
    theirs, mine = bench.alternate(lambda: theirs_predictor.set_torch_image(tensor, image.shape[:2]), ours_encoder)
    bench.checks["sam_b_embedding_max_relative_error"] = _relative_error(
        ours_predictor.get_image_embedding().cpu(), theirs_predictor.get_image_embedding().cpu())
    bench.row("SAM-B image encoder, slimseg vs segment-anything", mine, theirs, mine / theirs,
              f"{mine / theirs:.2f}x the time", "<= 0.6x the time", mine / theirs <= 0.6)
    return reference, ours, ours_encoder


def slimsam_77(bench: Bench, folder: Path, image: np.ndarray, sam_b_encoder: Callable[[], object]) -> None:
    """Section 2: transformers' SlimSAM-77 against slimseg's loading of its folder."""
    hf_model = transformers_slimsam_77()
    hf_model.save_pretrained(folder / "slimsam-77")
    hf_model.to(bench.device)
    ours = slimseg.load_model(folder / "slimsam-77", device=bench.device)
    predictor = slimseg.Predictor(ours)
    tensor = encoder_input(predictor, image)
    pixel_values = ours.preprocess(tensor.float())
    boxes = torch.as_tensor(predictor.transform.apply_boxes(BOX, image.shape[:2]), dtype=torch.float,
                            device=bench.device)[None]  # (images, boxes, 4) in the resized frame

    # Both sides: encoder, prompt encoder and decoder, from the normalised and padded image
    # (slimseg also normalises and pads it, ~1 ms) to the low-res logits. Resizing the photo
    # and upscaling the mask are left out of both.
    def transformers_box() -> object:
        embeddings = hf_model.get_image_embeddings(pixel_values)
        return hf_model(image_embeddings=embeddings, input_boxes=boxes, multimask_output=False)

    def slimseg_box() -> tuple:
        predictor.set_torch_image(tensor, image.shape[:2])
        return predictor.predict_low_res(None, None, boxes[0], multimask_output=False)

    print(f"SlimSAM-77 encoder + box prompt: transformers and slimseg in turn, {bench.warmup} warm-up + "
          f"{bench.runs} run(s) each", flush=True)
    theirs, mine = bench.alternate(transformers_box, slimseg_box)
    with torch.inference_mode():
        hf_out = transformers_box()
        low_res, _ = slimseg_box()
        hf_embedding = hf_model.get_image_embeddings(pixel_values)
    bench.checks["slimsam_77_embedding_max_relative_error"] = _relative_error(
        predictor.get_image_embedding().cpu(), hf_embedding.cpu())
    bench.checks["slimsam_77_box_low_res_max_relative_error"] = _relative_error(
        low_res[0].cpu(), hf_out.pred_masks[0, 0].cpu())
    bench.row("SlimSAM-77 encoder + box prompt, slimseg vs transformers", mine, theirs, theirs / mine,
              f"{theirs / mine:.1f}x faster", ">= 3x faster", theirs / mine >= 3)

    print("SlimSAM-77 encoder alone, in turn with slimseg's SAM-B encoder, and the dense matmul rate", flush=True)
    before = matmul_rate(bench.device, torch.float32)
    encoder, sam_b = bench.alternate(lambda: predictor.set_torch_image(tensor, image.shape[:2]), sam_b_encoder)
    # the faster rate of the two around the runs: a floor taken in a slow minute would flatter
    rate = max(before, matmul_rate(bench.device, torch.float32), key=lambda r: r.flops_per_second)
    floor = floor_seconds(model_work(ours.config, prompts=1).encoder_macs, rate)
    bench.checks["matmul"] = {"flops_per_second": rate.flops_per_second, "size": rate.size}
    bench.row("SlimSAM-77 encoder vs its floor", encoder, floor, encoder / floor, f"{encoder / floor:.2f}x the floor",
              "<= 2.5x the floor", encoder / floor <= 2.5)
    bench.row("SlimSAM-77 encoder vs slimseg's SAM-B encoder", encoder, sam_b, sam_b / encoder,
              f"{sam_b / encoder:.1f}x faster", ">= 8x faster", sam_b / encoder >= 8)
    bench.checks["slimsam_77_global_attention_without_bias_s"] = _bare_global_attention(bench, ours.config)


def _bare_global_attention(bench: Bench, config) -> float:
    """Seconds of the fused attention kernel alone over SlimSAM-77's global blocks, with no
    relative-position bias and no projections: the part of the encoder that the matmul floor
    does not see (at 14 channels per head the softmax, not the products, bounds it)."""
    encoder = config.image_encoder
    blocks = [block for block in encoder.blocks if block.is_global]
    q = torch.randn(1, blocks[0].num_heads, encoder.grid_size**2, blocks[0].qk_dim // blocks[0].num_heads,
                    device=bench.device)
    one = bench.time(lambda: torch.nn.functional.scaled_dot_product_attention(q, q, q)).median
    return one * len(blocks)


def calibrate_thresholds(model: torch.nn.Module, image: np.ndarray, side: int) -> tuple[float, float]:
    """pred_iou_thresh passing the best 10 % of the candidates of a calibration grid, and the
    stability threshold passing half of those: about 5 % of the candidates, on both generators.
    Each threshold lies halfway between two candidates' scores, away from float noise."""
    predictor = slimseg.Predictor(model)
    with torch.inference_mode():
        predictor.set_image(image)
        grid = build_all_layer_point_grids(min(side, CALIBRATION_SIDE), 0, 1)[0] * np.array(image.shape[1::-1])
        coords = torch.as_tensor(predictor.transform.apply_coords(grid, image.shape[:2]), dtype=torch.float,
                                 device=predictor.device)
        labels = torch.ones(len(grid), dtype=torch.int, device=predictor.device)
        low_res, iou = predictor.predict_low_res(coords[:, None], labels[:, None], multimask_output=True)
        iou_thresh = _between(iou.flatten(), keep=0.10)
        survivors = low_res.flatten(0, 1)[iou.flatten() > iou_thresh]
        stability = stability_score(predictor.upscale_masks(survivors[:, None])[:, 0], model.mask_threshold, 1.0)
    return iou_thresh, _between(torch.nan_to_num(stability, nan=0.0), keep=0.5)


def _between(scores: torch.Tensor, keep: float) -> float:
    """A threshold halfway between the scores around the top ``keep`` fraction (at least one kept)."""
    ordered = torch.sort(scores.double().cpu(), descending=True).values
    if len(ordered) < 2:
        return 0.0
    index = min(max(int(len(ordered) * keep), 1), len(ordered) - 1)
    return float((ordered[index - 1] + ordered[index]) / 2)


def _masks_match(ours: list[dict], theirs: list[dict]) -> int:
    """How many masks, in order, have the same box (to 1 px) and pixels (to 0.1 % of their area)."""
    matched = 0
    for mine, other in zip(ours, theirs):
        boxes_close = np.allclose(mine["bbox"], other["bbox"], atol=1)
        differ = np.count_nonzero(decode_rle(mine["segmentation"]) != decode_rle(other["segmentation"]))
        matched += bool(boxes_close and differ <= max(1, 1e-3 * max(mine["area"], other["area"])))
    return matched


def segevery(bench: Bench, reference: torch.nn.Module, ours: torch.nn.Module, image: np.ndarray, side: int,
             runs: int) -> None:
    """Section 3: SegEvery on the grid, segment-anything's generator against slimseg's."""
    from segment_anything import SamAutomaticMaskGenerator

    iou_thresh, stability_thresh = calibrate_thresholds(ours, image, side)
    options = dict(points_per_side=side, pred_iou_thresh=iou_thresh, stability_score_thresh=stability_thresh,
                   output_mode="coco_rle")
    generators = {"segment-anything": SamAutomaticMaskGenerator(reference, **options),
                  "slimseg": slimseg.MaskGenerator(ours, **options)}
    seconds, records = {}, {}
    for name, generator in generators.items():
        print(f"SegEvery {side}x{side}: {name}, {runs} run(s)", flush=True)

        def generate() -> None:
            records[name] = generator.generate(image)

        seconds[name] = bench.time(generate, runs=runs, warmup=0).median
    mine, theirs = seconds["slimseg"], seconds["segment-anything"]
    bench.checks["segevery"] = {
        "pred_iou_thresh": iou_thresh, "stability_score_thresh": stability_thresh, "points_per_side": side,
        "masks_slimseg": len(records["slimseg"]), "masks_segment_anything": len(records["segment-anything"]),
        "masks_matching": _masks_match(records["slimseg"], records["segment-anything"]),
    }
    bench.row(f"SegEvery {side}x{side} grid on SAM-B, slimseg vs segment-anything", mine, theirs, theirs / mine,
              f"{theirs / mine:.1f}x faster", ">= 3x faster", theirs / mine >= 3)


def _seconds(value: float) -> str:
    return f"{value:.3g} s" if value >= 1 else f"{value * 1e3:.3g} ms"


def print_report(bench: Bench, machine: dict) -> None:
    print(f"\nMachine: {machine_line(machine)}; CPU {machine['cpu']}\n")
    print("| comparison | slimseg | reference | ratio | target | met |")
    print("|---|---|---|---|---|---|")
    for row in bench.rows:
        print(f"| {row['comparison']} | {_seconds(row['slimseg_s'])} | {_seconds(row['reference_s'])} | "
              f"{row['shown']} | {row['target']} | {'yes' if row['met'] else '**no**'} |")
    print()
    for name, value in bench.checks.items():
        print(f"- {name}: {value}")
    print("- AutoPPN against the 32x32 grid: see benchmarks/segevery_samplers.py\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="timed runs per encoder/prompt measurement (median)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs first")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")
    parser.add_argument("--skip-segevery", action="store_true", help="leave out the SegEvery comparison")
    parser.add_argument("--points-per-side", type=int, default=32, help="SegEvery grid side (smaller for a smoke run)")
    parser.add_argument("--segevery-runs", type=int, default=1, help="timed SegEvery runs per generator")
    parser.add_argument("--json", type=Path, default=None, help="also write the JSON line's content to this file")
    args = parser.parse_args()
    if min(args.runs, args.segevery_runs, args.points_per_side) < 1 or args.warmup < 0:
        parser.error("--runs, --segevery-runs and --points-per-side must be >= 1, --warmup >= 0")
    if args.threads is not None:
        if args.threads < 1:
            parser.error("--threads must be >= 1")
        torch.set_num_threads(args.threads)
    if args.json is not None and not args.json.parent.is_dir():
        parser.error(f"--json {args.json}: folder {args.json.parent} does not exist")
    import_segment_anything()
    # as the slimseg command does; the references run in this process and get it too
    tuned = tune_cpu_allocator()

    device = resolve_device(args.device)
    machine = describe_machine(device, torch.float32)
    print(f"Machine: {machine_line(machine)}; CPU {machine['cpu']}; allocator tuned: {tuned}", flush=True)
    bench = Bench(device, args.runs, args.warmup)
    image = real_photo()
    with tempfile.TemporaryDirectory() as folder:
        reference, ours, sam_b_encoder = sam_b_encoders(bench, Path(folder), image)
        slimsam_77(bench, Path(folder), image, sam_b_encoder)
        if not args.skip_segevery:
            segevery(bench, reference, ours, image, args.points_per_side, args.segevery_runs)
    print_report(bench, machine)
    line = json.dumps({"machine": machine, "settings": vars(args) | {"json": str(args.json) if args.json else None},
                       "results": bench.rows, "checks": bench.checks})
    print(line)
    if args.json is not None:
        atomic_write_text(args.json, line + "\n")


if __name__ == "__main__":
    main()
