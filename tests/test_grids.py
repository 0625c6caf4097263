"""A1111's X/Y/Z plot and Prompt matrix scripts (muralist.scripts.grids) on the tiny models."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from muralist.engine.txt2img import Interrupted, JobControl
from muralist.errors import InvalidRequestError
from muralist.infotext import parse_infotext, read_infotext
from muralist.request import GenerationRequest
from muralist.scripts.grids import (
    AXES,
    GridLabel,
    XYZSpec,
    a1111_axis_labels,
    draw_grid_annotations,
    find_axis,
    image_grid,
    parse_axis_values,
    plan_xyz,
    prompt_matrix_prompts,
    run_prompt_matrix,
    run_xyz,
    split_values,
    xyz_from_script_args,
)
from tests.conftest import pixels

CELL = 64
LEFT = CELL * 3 // 4  # A1111: the row-label strip is 3/4 of a cell wide


def req(**kw) -> GenerationRequest:
    base = dict(prompt="a cat", width=CELL, height=CELL, steps=2, seed=1234, model="tiny-sd15.safetensors")
    base.update(kw)
    return GenerationRequest(**base)


def cell_at(grid: Image.Image, ix: int, iy: int, left: int, top: int) -> Image.Image:
    return grid.crop((left + ix * CELL, top + iy * CELL, left + (ix + 1) * CELL, top + (iy + 1) * CELL))


# -- value syntax -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("axis", "text", "want"),
    [
        ("Steps", "1-5", [1, 2, 3, 4, 5]),
        ("Steps", "1-10 (+3)", [1, 4, 7, 10]),
        ("Steps", "10-1 (-3)", [10, 7, 4]),  # A1111: range(10, 1 + 1, -3)
        ("Steps", "1-10 [4]", [1, 4, 7, 10]),
        ("Steps", "1-10 [3]", [1, 5, 10]),  # linspace truncated to int
        ("Steps", " 2, 5-6 ,9", [2, 5, 6, 9]),
        ("Seed", "-1, -5--3", [-1, -5, -4, -3]),
        ("CFG Scale", "1-2 (+0.5)", [1.0, 1.5, 2.0]),
        ("CFG Scale", "0.1-0.3 (+0.1)", [0.1, 0.2, 0.3]),  # no floating-point overshoot
        ("CFG Scale", "1.5-0.5 (-0.5)", [1.5, 1.0, 0.5]),
        ("CFG Scale", "1-2 [3]", [1.0, 1.5, 2.0]),
        ("CFG Scale", "7.5, 3", [7.5, 3.0]),
        ("Denoising", ".25-.75 [3]", [0.25, 0.5, 0.75]),
        ("Prompt S/R", 'cat, "red, bird",dog', ["cat", "red, bird", "dog"]),
        ("Prompt S/R", "cat,", ["cat", ""]),  # an empty replacement removes the text
        ("Sampler", "Euler a, DPM++ 2M", ["Euler a", "DPM++ 2M"]),
        ("Size", "64x64, 128x64", ["64x64", "128x64"]),
        ("Nothing", "whatever", [None]),
    ],
)
def test_axis_values_use_a1111_syntax(axis: str, text: str, want: list) -> None:
    got = parse_axis_values(axis, text)
    assert got == pytest.approx(want) if axis in ("CFG Scale", "Denoising") else got == want
    assert all(type(v) is type(w) for v, w in zip(got, want, strict=True))


def test_axis_values_from_a_list_still_expand_ranges() -> None:
    assert parse_axis_values("Steps", [2, "3-4"]) == [2, 3, 4]
    assert split_values("a b\nc, d", raw_mode=True) == ["a b", "c, d"]
    assert split_values("a b\nc, d") == ["a b", "c", "d"]


@pytest.mark.parametrize(
    ("axis", "text", "fragment"),
    [
        ("Steps", "abc", "'abc': not a valid integer"),
        ("Steps", "2, 1.5", "'1.5': not a valid integer"),
        ("Steps", "5-1", "range is empty"),
        ("Steps", "1-5 (+0)", "step is 0"),
        ("Steps", "1-5 [0]", "count must be at least 1"),
        ("CFG Scale", "7, x", "'x': not a valid number"),
        ("CFG Scale", "nan", "not a valid number"),
        ("Steps", "", "no values"),
        ("Sampler", "Euler,,Euler a", "empty value"),
        ("Prompt S/R", ",cat", "cannot be empty"),
    ],
)
def test_bad_values_name_the_axis_and_value(axis: str, text: str, fragment: str) -> None:
    with pytest.raises(InvalidRequestError) as e:
        parse_axis_values(axis, text)
    assert str(e.value).startswith(f"{axis} axis")
    assert fragment in str(e.value)


def test_axis_types_by_name_or_a1111_index() -> None:
    assert find_axis("cfg scale").label == "CFG Scale"
    labels = a1111_axis_labels()
    # A1111 v1.10 txt2img dropdown: the indexes clients send in script_args.
    assert [labels[i] for i in (0, 1, 4, 6, 7, 9, 11, 17, 24, 25, 41)] == [
        "Nothing", "Seed", "Steps", "CFG Scale", "Prompt S/R", "Sampler", "Checkpoint name",
        "Schedule type", "Clip skip", "Denoising", "Size",
    ]
    assert find_axis(4).label == find_axis("4").label == "Steps"
    img2img = a1111_axis_labels(img2img=True)
    assert "Hires steps" not in img2img and "Image CFG Scale" in img2img
    assert find_axis(img2img.index("Sampler"), img2img=True).label == "Sampler"
    with pytest.raises(InvalidRequestError, match="'Sigma Churn' is not supported"):
        find_axis("Sigma Churn")
    with pytest.raises(InvalidRequestError, match="unknown axis type 'Colour'"):
        find_axis("Colour")
    with pytest.raises(InvalidRequestError, match="out of range"):
        find_axis(99)


def test_cell_labels_follow_a1111() -> None:
    assert AXES["Steps"].format(20) == "Steps: 20"
    assert AXES["CFG Scale"].format(7.0) == "CFG Scale: 7.0"
    assert AXES["Denoising"].format(0.30000000000000004) == "Denoising: 0.3"
    assert AXES["Sampler"].format("Euler a") == "Euler a"
    assert AXES["Prompt S/R"].format("dog") == "dog"
    assert AXES["Checkpoint name"].format("sub/model.safetensors") == "model.safetensors"
    assert AXES["Size"].format("512x768") == "Size: 512x768"
    assert AXES["Nothing"].format(None) == ""


# -- validation before generating ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "fragment"),
    [
        (XYZSpec("Steps", "2", "Sampler", "Euler, Nope"), "Y axis (Sampler): value 'Nope': unknown sampler"),
        (XYZSpec("Checkpoint name", "tiny-sd15.safetensors, missing.ckpt"), "X axis (Checkpoint name): value 'missing.ckpt'"),
        (XYZSpec("Steps", "2", "Nothing", "", "Prompt S/R", "dog, cat"), "Z axis (Prompt S/R): value 'dog': Prompt S/R did not find 'dog'"),
        (XYZSpec("Steps", "2, 3, 500"), "X axis (Steps): value 500: steps"),
        (XYZSpec("Size", "64x64, 64x65"), "value '64x65': height: must be a multiple of 8"),
        (XYZSpec("Size", "64by64"), "size must be WIDTHxHEIGHT"),
        (XYZSpec("Schedule type", "Karras, Nope"), "X axis (Schedule type): value 'Nope'"),
        (XYZSpec("Steps", "2", "Sigma Churn", "1"), "Y axis: axis type 'Sigma Churn' is not supported"),
    ],
)
def test_plot_is_validated_before_any_generation(engine, tmp_path: Path, monkeypatch, spec: XYZSpec, fragment: str) -> None:
    def no_generation(*a, **kw):
        raise AssertionError("generated before validating")

    monkeypatch.setattr(engine, "generate", no_generation)
    with pytest.raises(InvalidRequestError) as e:
        run_xyz(engine, req(), spec, save_to=tmp_path)
    assert fragment in str(e.value)
    assert not list(tmp_path.iterdir())


def test_costly_axis_is_generated_outermost(engine) -> None:
    plan = plan_xyz(engine, req(), XYZSpec("Checkpoint name", "tiny-sd15.safetensors, tiny-sd15-b.ckpt", "Steps", "1,2"))
    # A1111 switches models as rarely as it can: all of x=0 first, although x varies fastest in the grid.
    assert plan.order == [(0, 0, 0), (0, 1, 0), (1, 0, 0), (1, 1, 0)]
    plain = plan_xyz(engine, req(), XYZSpec("Steps", "1,2", "CFG Scale", "1,2"))
    assert plain.order == [(0, 0, 0), (1, 0, 0), (0, 1, 0), (1, 1, 0)]


def test_vary_seeds_and_kept_random_seeds(engine) -> None:
    plan = plan_xyz(engine, req(seed=100), XYZSpec("Steps", "1,2", "CFG Scale", "1,2,3", vary_seeds_x=True, vary_seeds_y=True))
    assert [plan.cells[(ix, iy, 0)].seed for iy in range(3) for ix in range(2)] == [100, 101, 102, 103, 104, 105]
    kept = plan_xyz(engine, req(seed=-1), XYZSpec("Steps", "1,2", no_fixed_seeds=True))
    assert {c.seed for c in kept.cells.values()} == {-1}
    fixed = plan_xyz(engine, req(seed=-1), XYZSpec("Steps", "1,2"))
    assert len({c.seed for c in fixed.cells.values()}) == 1 and -1 not in {c.seed for c in fixed.cells.values()}


def test_interrupted_before_start_generates_nothing(engine, tmp_path: Path) -> None:
    control = JobControl()
    control.interrupt()
    with pytest.raises(Interrupted):
        run_xyz(engine, req(), XYZSpec("Steps", "1,2"), control=control, save_to=tmp_path)
    assert not list(tmp_path.iterdir())


# -- X/Y/Z plot on the tiny model ---------------------------------------------------------------


def test_xy_plot_steps_by_sampler(engine, tmp_path: Path) -> None:
    seen = []
    spec = XYZSpec("Steps", "2,3", "Sampler", '"Euler","Euler a"')
    res = run_xyz(engine, req(seed=-1), spec, progress=seen.append, save_to=tmp_path)

    assert len(res.images) == 4 and res.cells == [(0, 0, 0), (1, 0, 0), (0, 1, 0), (1, 1, 0)]
    parsed = [parse_infotext(t) for t in res.infotexts]
    assert [(p["Steps"], p["Sampler"]) for p in parsed] == [("2", "Euler"), ("3", "Euler"), ("2", "Euler a"), ("3", "Euler a")]
    # Fixed seeds: -1 is drawn once, so every cell has the same seed.
    assert len(set(res.seeds)) == 1 and res.seeds[0] != -1
    assert {p["Seed"] for p in parsed} == {str(res.seeds[0])}
    assert [read_infotext(p) for p in res.paths] == res.infotexts
    assert res.labels == {"x": ["Steps: 2", "Steps: 3"], "y": ["Euler", "Euler a"], "z": [""]}

    # One grid: row labels on the left (3/4 cell), column labels on top, cells = the images.
    assert len(res.grids) == 1
    grid = res.grids[0]
    top = grid.height - 2 * CELL
    assert grid.width == 2 * CELL + LEFT and top > 0
    for img, (ix, iy, _) in zip(res.images, res.cells, strict=True):
        assert np.array_equal(pixels(cell_at(grid, ix, iy, LEFT, top)), pixels(img))
    legend = pixels(grid.crop((0, 0, grid.width, top)))
    assert legend.min() < 100 and (legend == 255).mean() > 0.5  # dark text on white
    # The grid's infotext is the first cell's plus A1111's script parameters.
    assert res.grid_paths[0].name == "xyz_grid-0000.png"
    text = read_infotext(res.grid_paths[0])
    assert text == res.grid_infotexts[0] and text.startswith(res.infotexts[0].rsplit(", Version:", 1)[0])
    info = parse_infotext(text)
    assert (info["Script"], info["X Type"], info["X Values"], info["Y Type"], info["Y Values"]) == (
        "X/Y/Z plot", "Steps", "2,3", "Sampler", '"Euler","Euler a"'
    )
    # Progress covers the whole job: 4 cells, each one "batch".
    assert {p.n_iter for p in seen} == {4} and {p.batch for p in seen} == {0, 1, 2, 3}
    assert seen[-1].fraction == pytest.approx(1.0)


def test_prompt_search_replace_per_column(engine, tmp_path: Path) -> None:
    res = run_xyz(engine, req(prompt="a cat on a mat", negative_prompt="ugly cat"), XYZSpec("Prompt S/R", "cat, dog"), save_to=tmp_path)
    parsed = [parse_infotext(t) for t in res.infotexts]
    assert [p["Prompt"] for p in parsed] == ["a cat on a mat", "a dog on a mat"]
    assert [p["Negative prompt"] for p in parsed] == ["ugly cat", "ugly dog"]
    assert res.labels["x"] == ["cat", "dog"]
    # No row labels: no left strip.
    assert res.grids[0].width == 2 * CELL
    assert not np.array_equal(pixels(res.images[0]), pixels(res.images[1]))


def test_checkpoint_axis_switches_the_model(engine, tmp_path: Path) -> None:
    spec = XYZSpec("Checkpoint name", "tiny-sd15.safetensors, tiny-sd15-b.ckpt")
    res = run_xyz(engine, req(steps=1), spec, save_to=tmp_path)
    assert [parse_infotext(t)["Model"] for t in res.infotexts] == ["tiny-sd15", "tiny-sd15-b"]
    assert res.labels["x"] == ["tiny-sd15.safetensors", "tiny-sd15-b.ckpt"]
    assert np.abs(pixels(res.images[0]) - pixels(res.images[1])).mean() > 5


def test_z_axis_gives_a_grid_per_value_and_a_combined_one(engine, tmp_path: Path) -> None:
    spec = XYZSpec("Seed", "-1, 5", "Nothing", "", "CFG Scale", "1, 7")
    res = run_xyz(engine, req(steps=1), spec, save_to=tmp_path)
    assert len(res.images) == 4 and res.cells[-1] == (1, 0, 1)
    random_seed = res.seeds[0]
    assert res.seeds == [random_seed, 5, random_seed, 5]
    assert [parse_infotext(t)["CFG scale"] for t in res.infotexts] == ["1.0", "1.0", "7.0", "7.0"]
    assert res.labels["z"] == ["CFG Scale: 1.0", "CFG Scale: 7.0"]
    assert len(res.grids) == 3 and [p.name for p in res.grid_paths] == ["xyz_grid-0000.png", "xyz_grid-0001.png", "xyz_grid-0002.png"]
    sub0, sub1, combined = res.grids
    assert sub0.size == sub1.size and sub0.width == 2 * CELL  # no row labels (Y is Nothing)
    assert combined.width == 2 * sub0.width and combined.height > sub0.height
    assert parse_infotext(res.grid_infotexts[0])["Fixed X Values"] == f"{random_seed}, 5"
    assert "Z Type" not in parse_infotext(res.grid_infotexts[0])
    assert parse_infotext(res.grid_infotexts[2])["Z Type"] == "CFG Scale"
    assert parse_infotext(res.grid_infotexts[1])["CFG scale"] == "7.0"  # a sub-grid carries its own first cell


# -- prompt matrix ------------------------------------------------------------------------------


def test_prompt_matrix_prompts_follow_a1111_order() -> None:
    assert prompt_matrix_prompts("a cat|red|hat") == ["a cat", "a cat, red", "a cat, hat", "a cat, red, hat"]
    assert prompt_matrix_prompts("a cat| red, |hat", put_at_start=True, delimiter=" ") == [
        "a cat", "red a cat", "hat a cat", "red hat a cat"
    ]
    assert prompt_matrix_prompts("no parts") == ["no parts"]
    assert len(prompt_matrix_prompts("a|b|c|d")) == 8


def test_prompt_matrix_images_and_grid(engine, tmp_path: Path) -> None:
    res = run_prompt_matrix(engine, req(prompt="a cat|red|hat", seed=-1), tmp_path)
    assert [parse_infotext(t)["Prompt"] for t in res.infotexts] == ["a cat", "a cat, red", "a cat, hat", "a cat, red, hat"]
    assert len(set(res.seeds)) == 1 and res.seeds[0] != -1
    assert res.labels == {"x": ["-red", "+red"], "y": ["-hat", "+hat"]}
    grid = res.grids[0]
    top = grid.height - 2 * CELL
    assert grid.width == 2 * CELL + LEFT and top > 0
    for i, img in enumerate(res.images):
        assert np.array_equal(pixels(cell_at(grid, i % 2, i // 2, LEFT, top)), pixels(img))
    assert res.grid_paths[0].name == "prompt_matrix-0000.png"
    assert read_infotext(res.grid_paths[0]) == res.infotexts[0]


def test_prompt_matrix_different_seeds(engine, tmp_path: Path) -> None:
    res = run_prompt_matrix(engine, req(prompt="a cat|red", seed=40, steps=1), tmp_path, different_seeds=True)
    assert res.seeds == [40, 41]
    assert res.grids[0].size == (2 * CELL, res.grids[0].height) and res.grids[0].height > CELL


# -- A1111 script_args --------------------------------------------------------------------------


def test_script_args_v110_layout_with_indexes_and_dropdowns(engine) -> None:
    labels = a1111_axis_labels()
    args = [
        labels.index("Steps"), "2,3", [],
        labels.index("Sampler"), "", ["Euler", "Euler a"],
        0, "", [],
        True, False, True, False,  # draw_legend, include_lone_images, include_sub_grids, no_fixed_seeds
        True, False, False,  # vary_seeds_x/y/z
        4, False,  # margin_size, csv_mode
    ]
    spec = xyz_from_script_args(args)
    assert (spec.x_type, spec.x_values, spec.y_type, spec.y_values, spec.z_type) == (
        "Steps", "2,3", "Sampler", ["Euler", "Euler a"], "Nothing"
    )
    assert spec.draw_legend and spec.include_sub_grids and not spec.no_fixed_seeds
    assert spec.vary_seeds_x and not spec.vary_seeds_y and spec.margin_size == 4
    plan = plan_xyz(engine, req(), spec)
    assert plan.values[0] == [2, 3] and plan.values[1] == ["Euler", "Euler a"]


def test_script_args_old_layout_names_and_csv_mode() -> None:
    args = ["Checkpoint name", "a.safetensors,b.ckpt", ["ignored"], "CFG Scale", "5-7", [], "Nothing", "", [],
            False, True, False, True, 10, True]  # ..., no_fixed_seeds, margin_size, csv_mode
    spec = xyz_from_script_args(args)
    assert (spec.x_type, spec.x_values) == ("Checkpoint name", "a.safetensors,b.ckpt")  # csv_mode: the text
    assert (spec.y_type, spec.y_values) == ("CFG Scale", "5-7")
    assert not spec.draw_legend and spec.include_lone_images and spec.no_fixed_seeds and spec.margin_size == 10
    with pytest.raises(InvalidRequestError, match="at least 9"):
        xyz_from_script_args([4, "1,2"])
    with pytest.raises(InvalidRequestError, match="out of range"):
        xyz_from_script_args([500, "1", [], 0, "", [], 0, "", []])


# -- grid drawing -------------------------------------------------------------------------------


def test_grid_layout_margins_and_mixed_sizes() -> None:
    red, blue = Image.new("RGB", (64, 64), "red"), Image.new("RGB", (64, 32), "blue")
    grid = image_grid([red, blue, red, red], rows=2)
    assert grid.size == (128, 128)
    assert grid.getpixel((64 + 10, 50)) == (255, 255, 255)  # the short image leaves background below it
    labelled = draw_grid_annotations(grid, 64, 64, [[GridLabel("a")], [GridLabel("b")]], [[GridLabel()], [GridLabel()]], margin=6)
    top = labelled.height - 128 - 6
    assert labelled.width == 128 + 6 and top > 0  # no row text: no left strip; one margin between cells
    assert labelled.getpixel((64 + 6 + 5, top + 5)) == (0, 0, 255)
    struck = draw_grid_annotations(grid, 64, 64, [[GridLabel("off", active=False)], [GridLabel("on")]], [[GridLabel("r")], [GridLabel("s")]])
    assert struck.width == 128 + LEFT
    legend = pixels(struck.crop((LEFT, 0, LEFT + 64, struck.height - 128))).reshape(-1, 3)
    colours = {tuple(int(v) for v in px) for px in legend}
    assert (0, 0, 0) not in colours and any(c[0] == c[1] == c[2] and 100 < c[0] < 200 for c in colours)  # grey only
