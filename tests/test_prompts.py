"""Prompt parsing, prompts files, fitting prompts to the image, batched decoding."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import photo, tiny_config

import slimseg
from slimseg.errors import SlimsegError, UsageError
from slimseg.inference.prompts import Prompt, fit_to_image, load_prompts_file, predict_prompts, prompts_from_options


def test_options_make_one_object_per_box_and_one_for_all_points():
    assert prompts_from_options(["0,0,10,10", "5,5,20,20"], []) == [Prompt(box=(0, 0, 10, 10)), Prompt(box=(5, 5, 20, 20))]
    assert prompts_from_options(["0,0,10,10"], ["3,4", "5,6,0"]) == [Prompt(((3, 4), (5, 6)), (1, 0), (0, 0, 10, 10))]
    with pytest.raises(UsageError):
        prompts_from_options([" 1, 2 ,3,inf"], [])


@pytest.mark.parametrize(
    "content, fragment",
    [
        ("not json", "not valid JSON"),
        ('{"a.jpg": {"box": [1, 2, 3, 4]}}', "must be a list of prompts"),
        ('[{"box": [1, 2, 3]}]', "malformed 'box'"),
        ('[{"box": 5}]', "[0]"),
        ('[{"points": [[1, 2, 3]]}]', "label must be 1"),
        ('[{"mask": []}]', "'box' and/or 'points'"),
        ("[{}]", "needs at least one point or a box"),
    ],
)
def test_bad_prompts_files_name_the_file_and_the_entry(tmp_path, content, fragment):
    path = tmp_path / "prompts.json"
    path.write_text(content)
    with pytest.raises(SlimsegError) as caught:
        load_prompts_file(path)
    assert str(path) in str(caught.value) and fragment in str(caught.value)


@pytest.mark.parametrize(
    "content, message",
    [
        ('[{"points": [1, 2]}]', "pp.json[0]: 'points' must be a list of points: write one point as [[1, 2]]"),
        ('[{"box": [0, 0, 9, 9]}, {"points": []}]', "pp.json[1]: a prompt needs at least one point or a box"),
        ('[{"points": [[10, 20]], "labels": [0]}]', "pp.json[0]: unknown key 'labels' (a prompt has 'box' and/or "
         "'points'); labels go as the third number of each point, [x, y, label]"),
        ('[{"box": "1,2,30,40"}]', "pp.json[0]: malformed 'box' \"1,2,30,40\": expected [x0, y0, x1, y1] in pixels"),
        ('[{"box": [1, 2, NaN, 4]}]', "pp.json[0]: malformed 'box' [1, 2, NaN, 4]: expected [x0, y0, x1, y1] in pixels"),
        ('[{"box": [true, 2, 3, 4]}]', "pp.json[0]: malformed 'box' [true, 2, 3, 4]: expected [x0, y0, x1, y1] in pixels"),
        ('[{"points": [[1, 2], [3]]}]', "pp.json[0]: malformed point 1 [3] in 'points': expected [x, y] or [x, y, label] "
         "in pixels"),
        ('[{"points": "1,2"}]', "pp.json[0]: 'points' must be a list of [x, y] or [x, y, label] in pixels, got \"1,2\""),
        ('{"a.jpg": [{"box": [0, 0, 9, 9]}], "b.png": [{"box": [5, 5, 1, 1]}]}',
         "pp.json[b.png][0]: malformed 'box' [5, 5, 1, 1]: need x1 > x0 and y1 > y0"),
        ('{"a.jpg": {"box": [1, 2, 3, 4]}}', 'pp.json[a.jpg]: must be a list of prompts, got {"box": [1, 2, 3, 4]}'),
        ("[7]", "pp.json[0]: a prompt must be an object with 'box' and/or 'points', got 7"),
    ],
)
def test_malformed_prompts_say_file_entry_and_reason_in_one_line_with_exit_status_2(tmp_path, monkeypatch, content,
                                                                                    message):
    monkeypatch.chdir(tmp_path)
    Path("pp.json").write_text(content)
    with pytest.raises(UsageError) as caught:
        load_prompts_file("pp.json")
    assert str(caught.value) == message and caught.value.exit_code == 2


def test_empty_prompts_files_load_as_empty(tmp_path):
    # segment's PromptSource turns "no prompts at all" into an error naming the file
    for content, empty in (("[]", []), ("{}", {})):
        (tmp_path / "p.json").write_text(content)
        assert load_prompts_file(tmp_path / "p.json") == empty


def test_prompts_file_shapes(tmp_path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps({"x.jpg": [{"points": [[1, 2]]}]}))
    assert load_prompts_file(path) == {"x.jpg": [Prompt(((1.0, 2.0),), (1,))]}


def test_fit_to_image_clips_boxes_and_refuses_points():
    assert fit_to_image(Prompt(box=(-5, 10, 500, 40)), 100, 200).box == (0, 10, 200, 40)
    # clipped or not, every coordinate stays a float, so the JSON echo is [0.0, ...] throughout
    clipped = fit_to_image(Prompt(box=(-5.0, 10.0, 500.0, 40.0)), 100, 200)
    assert json.dumps(clipped.to_json()) == '{"box": [0.0, 10.0, 200.0, 40.0]}'
    assert json.dumps(Prompt(((3, 4),), (1,), (1, 2, 5, 6)).to_json()) == '{"points": [[3.0, 4.0, 1]], "box": [1.0, 2.0, 5.0, 6.0]}'
    with pytest.raises(SlimsegError, match="outside the 200x100 image"):
        fit_to_image(Prompt(box=(300, 0, 400, 50)), 100, 200)
    with pytest.raises(SlimsegError, match=r"point \(201, 5\)"):
        fit_to_image(Prompt(((201, 5),), (1,)), 100, 200)


def test_batched_decoding_equals_one_prompt_at_a_time():
    model = slimseg.build_model(tiny_config())
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    predictor = slimseg.Predictor(model)
    predictor.set_image(photo(100, 150))
    prompts = [Prompt(box=(10, 10, 80, 90)), Prompt(((30, 40),), (1,)), Prompt(box=(50, 5, 140, 60)),
               Prompt(((60, 50), (20, 20)), (1, 0), (5, 5, 100, 95)), Prompt(((100, 70),), (0,))]
    results = predict_prompts(predictor, prompts, multimask_output=True)
    assert [r.prompt for r in results] == prompts
    for result in results:
        kwargs = {}
        if result.prompt.points:
            kwargs = dict(point_coords=np.array(result.prompt.points), point_labels=np.array(result.prompt.labels))
        if result.prompt.box:
            kwargs["box"] = np.array(result.prompt.box)
        masks, scores, _ = predictor.predict(**kwargs, multimask_output=True)
        np.testing.assert_allclose(result.scores, scores, atol=1e-5)
        assert (result.masks != masks).mean() < 1e-3


def test_transform_torch_paths_agree_with_numpy():
    from slimseg.inference.transforms import ResizeLongestSide

    transform = ResizeLongestSide(256)
    image = photo(100, 150)
    resized = transform.apply_image_torch(torch.as_tensor(image).permute(2, 0, 1)[None].float())
    assert resized.shape == (1, 3, 171, 256) == (1, 3, *transform.apply_image(image).shape[:2])
    # antialiased bilinear in torch vs PIL's filter: close, not equal
    assert (resized[0].permute(1, 2, 0) - torch.as_tensor(transform.apply_image(image)).float()).abs().mean() < 3
    boxes = np.array([[10.0, 20.0, 140.0, 90.0]])
    torch.testing.assert_close(transform.apply_boxes_torch(torch.as_tensor(boxes), (100, 150)),
                               torch.as_tensor(transform.apply_boxes(boxes, (100, 150))).float())


def test_prompts_take_numpy_arrays_and_store_tuples():
    prompt = Prompt(points=np.array([[50, 60], [10, 20]]), labels=np.array([1, 0]), box=np.array([1, 2, 30, 40]))
    assert prompt == Prompt(((50, 60), (10, 20)), (1, 0), (1, 2, 30, 40))
    assert prompt.points == ((50.0, 60.0), (10.0, 20.0)) and prompt.labels == (1, 0)
    assert prompt.box == (1.0, 2.0, 30.0, 40.0) and hash(prompt) == hash(Prompt(((50, 60), (10, 20)), (1, 0), (1, 2, 30, 40)))
    assert Prompt(points=[[5, 6]], labels=[1]).to_json() == {"points": [[5.0, 6.0, 1]]}
    assert Prompt(box=np.array([[1, 2, 30, 40]])).box == (1.0, 2.0, 30.0, 40.0)


@pytest.mark.parametrize(
    "arguments, fragment",
    [
        (dict(box=(1, 2, 3)), "box must be 4 numbers x0, y0, x1, y1"),
        (dict(box=np.array([[1, 2, 3, 4], [5, 6, 7, 8]])), "make one Prompt per box"),
        (dict(box=(float("nan"), 1, 2, 3)), "box must be finite numbers"),
        (dict(points=((50, 60),)), "labels must have shape (1,), one label per point"),
        (dict(points=np.array([50, 60]), labels=np.array([1])), "points must have shape (N, 2), got (2,)"),
        (dict(points=((np.inf, 60),), labels=(1,)), "points must be finite numbers"),
        (dict(points=((50, 60),), labels=(7,)), "labels must be 1 (foreground) or 0 (background), got 7"),
        (dict(points=((50, 60),), labels=(-1,)), "labels must be 1 (foreground) or 0 (background), got -1"),
        (dict(), "a prompt needs at least one point or a box"),
    ],
)
def test_malformed_prompt_objects_are_refused(arguments, fragment):
    with pytest.raises(SlimsegError) as caught:
        Prompt(**arguments)
    assert fragment in str(caught.value) and "\n" not in str(caught.value)


def test_predict_prompts_before_set_image_says_so():
    predictor = slimseg.Predictor(slimseg.build_model(tiny_config()))
    with pytest.raises(SlimsegError, match="no image is set"):
        predict_prompts(predictor, [Prompt(box=(1, 2, 30, 40))], multimask_output=False)
