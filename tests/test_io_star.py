"""STAR reading and writing: every shared STAR file, malformed input, round trips (also of a
classification's model STAR)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cryotorch.errors import InputError
from cryotorch.io import ClassSummary, ModelSummary, OptimiserSummary, read_model_star, read_star, write_model_star, write_optimiser_star, write_star

MALFORMED = "metadata/aspire/sample.star"


def _star_files(shared_data: Path) -> list[Path]:
    return sorted(path for path in shared_data.rglob("*.star") if not str(path).endswith(MALFORMED))


def test_every_shared_star_file_loads(shared_data: Path) -> None:
    files = _star_files(shared_data)
    assert len(files) >= 19
    for path in files:
        blocks = read_star(path)
        assert blocks, path


def test_malformed_aspire_sample_names_file_line_and_problem(shared_data: Path) -> None:
    # The "Mars" row has 5 values for 4 columns (and a later row has 1 value for 2 columns).
    with pytest.raises(InputError) as error:
        read_star(shared_data / MALFORMED)
    message = str(error.value)
    assert "sample.star" in message and "line 20" in message
    assert "has 5 values but the loop declares 4 columns" in message


def test_relion_blocks_types_and_order(shared_data: Path) -> None:
    blocks = read_star(shared_data / "real_particles/relion31_cryodrgn/relion31.v2.star")
    assert list(blocks) == ["particles", "optics"]
    particles = blocks["particles"]
    assert isinstance(particles, pd.DataFrame) and len(particles) == 5
    assert particles["rlnClassNumber"].dtype == np.int64
    assert particles["rlnDefocusU"].dtype == np.float64
    assert particles["rlnImageName"].iloc[0] == "000001@relion31.mrcs"
    general = read_star(shared_data / "metadata/starfile/postprocess.star")["general"]
    assert isinstance(general, dict) and "rlnFinalResolution" in general


def test_quotes_and_empty_loop(shared_data: Path) -> None:
    quoted = read_star(shared_data / "metadata/starfile/loop_double_quote.star")[""]
    assert quoted["quote_string"].tolist() == ["quote string"] * 2
    assert quoted["whitespace_string"].tolist() == [" "] * 2
    assert quoted["empty_string"].tolist() == ["", ""]
    assert quoted["number_and_string"].tolist() == ["4.0", "noquote"]
    empty = read_star(shared_data / "metadata/starfile/empty_loop.star")[""]
    assert list(empty.columns) == ["rlnCoordinateX"] and len(empty) == 0


def test_round_trip_keeps_values_types_and_text(tmp_path: Path) -> None:
    table = pd.DataFrame(
        {
            "rlnImageName": ["000001@a b.mrcs", "000002@c.mrcs"],
            "rlnDefocusU": [12345.678901234, 1e-7],
            "rlnClassNumber": [1, 2],
            "rlnEmpty": ["", "x"],
        }
    )
    blocks = {"general": {"rlnFinalResolution": 3.5, "rlnName": "two words"}, "particles": table}
    path = tmp_path / "out.star"
    write_star(path, blocks, relion_version=30001)
    assert path.read_text().count("# version 30001") == 2
    back = read_star(path)
    assert back["general"] == blocks["general"]
    pd.testing.assert_frame_equal(back["particles"], table)
    assert [entry.name for entry in tmp_path.iterdir()] == ["out.star"]  # no temporary left behind


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("data_a\nloop_\n_x\n_y\n1 2\n3\n", "line 6: row 2"),
        ("loop_\n_x\n1\n", "before any data_ block"),
        ("data_a\nloop_\n_x\n1\nloop_\n_y\n2\n", "a second loop_"),
        ("data_a\n_x 1\ndata_a\n_y 2\n", "appears twice"),
        ("data_a\n_x\n", "needs exactly one value"),
        ("data_a extra\n", "line 1: unexpected text after data_a; put each block name on its own line"),
        ("data_a\n_x 1\nloop_\n_y\n2\n", "line 3: block data_a mixes _key value pairs with a loop_"),
        ("data_a\nloop_\n_x 1\n", "line 3: unexpected value after loop label _x; put one label per line"),
        ("data_a\nloop_\n_x\n1\n_y\n", "line 5: label _y after the rows of the loop in block data_a"),
        ("data_a\nloop_\n_x\n;\ntext\n;\n", "line 4: multi-line ';' text fields are not supported"),
        ("data_a\n1 2\n", "line 2: value '1' outside any loop_ or _key"),
        ("# only a comment\n", "holds no data_ block; check that it is a STAR file"),
        # a comment ends a line's values (quoted '#' is a value)
        ("data_a\nloop_\n_x\n_y\n'a b' 1 # note\n'#c' 2 3\n", "line 6: row 2 of the loop in block data_a has 3 values"),
    ],
)
def test_malformed_structures_name_the_line(tmp_path: Path, text: str, fragment: str) -> None:
    path = tmp_path / "bad.star"
    path.write_text(text)
    with pytest.raises(InputError, match="bad.star") as error:
        read_star(path)
    assert fragment in str(error.value)


def test_missing_file_is_input_error(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="nothere.star"):
        read_star(tmp_path / "nothere.star")


def test_a_model_star_reads_back_to_the_bit_and_names_what_it_lacks(tmp_path: Path) -> None:
    # a class3d run continued from an earlier iteration rebuilds its model from this file
    rng = np.random.default_rng(3)
    box, n_shells = 12, 7

    def spectrum() -> np.ndarray:
        return np.exp(rng.normal(size=n_shells) * 20)

    written = ModelSummary(
        box_size=box, pixel_size_angstrom=4.2 + 1e-13, current_resolution_angstrom=16.8, current_image_size=10, padding_factor=2.0,
        tau2_fudge=4.0, sigma_offsets_angstrom=float(rng.random()), log_likelihood=float(rng.normal() * 1e9), average_pmax=float(rng.random()),
        classes=[
            ClassSummary(f"run_it007_class00{k}.mrc", float(rng.random()), float(rng.random()), float(rng.random()), 16.8, spectrum(), spectrum(), spectrum())
            for k in (1, 2, 3)
        ],
        group_names=["opticsGroup1", "opticsGroup4"], group_particle_counts=np.array([5, 9]), group_scales=rng.random(2),
        group_sigma2_noise=np.stack([spectrum(), spectrum()]),
    )
    path = tmp_path / "run_it007_model.star"
    write_model_star(path, written)
    read = read_model_star(path)
    for name in ("box_size", "pixel_size_angstrom", "current_resolution_angstrom", "current_image_size", "padding_factor", "tau2_fudge",
                 "sigma_offsets_angstrom", "log_likelihood", "average_pmax", "group_names"):
        assert getattr(read, name) == getattr(written, name), name
    for name in ("group_particle_counts", "group_scales", "group_sigma2_noise"):
        np.testing.assert_array_equal(getattr(read, name), getattr(written, name))
    assert len(read.classes) == 3
    for ours, theirs in zip(read.classes, written.classes, strict=True):
        assert (ours.map_name, ours.distribution, ours.accuracy_rotations_deg, ours.resolution_angstrom) == (
            theirs.map_name, theirs.distribution, theirs.accuracy_rotations_deg, theirs.resolution_angstrom)
        for name in ("ssnr", "tau2", "sigma2"):
            np.testing.assert_array_equal(getattr(ours, name), getattr(theirs, name))
    blocks = read_star(path)
    damaged = {
        "no_tau2": ("model_class_2", lambda block: block.drop(columns="rlnReferenceTau2"), "data_model_class_2 has no column rlnReferenceTau2"),
        "short": ("model_optics_group_2", lambda block: block.iloc[:-1], "data_model_optics_group_2 has 6 rows, its box of 12 px needs 7"),
        "nan": ("model_classes", lambda block: block.assign(rlnClassDistribution=["0.1", "nan", "0.3"]), "rlnClassDistribution of data_model_classes has the value 'nan' in row 2"),
    }
    for name, (block_name, damage, fragment) in damaged.items():
        broken = tmp_path / f"{name}.star"
        write_star(broken, blocks | {block_name: damage(blocks[block_name])})
        with pytest.raises(InputError, match=re.escape(f"{broken}: ") + ".*" + re.escape(fragment)):
            read_model_star(broken)
    without_groups = tmp_path / "without_groups.star"
    write_star(without_groups, {name: block for name, block in blocks.items() if name != "model_groups"})
    with pytest.raises(InputError, match=re.escape(f"{without_groups}: no loop block data_model_groups")):
        read_model_star(without_groups)


def test_a_run_names_its_files_as_relion_does(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # RELION's Subset selection opens rlnModelStarFile, and the class images it names, from
    # the project folder: paths relative to the working directory, absolute outside it
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "Class3D" / "run1"
    run.mkdir(parents=True)
    files = {name: str(run / f"run_it025_{name}.star") for name in ("model", "data", "sampling")}
    settings = dict.fromkeys(("oversampling_order", "random_seed", "increment_shells", "iteration", "n_iterations"), 1)
    flags = dict.fromkeys(("zero_mask", "solvent_flattening", "fast_subsets", "skip_align", "correct_ctf", "ignore_ctf_until_first_peak", "references_ctf_corrected"), False)
    figures = dict.fromkeys(("oversampling_fraction", "particle_diameter_angstrom", "highres_limit_estep_angstrom", "changes_orientations_deg",
                             "changes_offsets_angstrom", "changes_classes", "overall_accuracy_rotations_deg", "overall_accuracy_translations_angstrom"), 1.0)
    write_optimiser_star(run / "run_it025_optimiser.star", OptimiserSummary(
        output_root=str(run / "run"), model_star=files["model"], data_star=files["data"], sampling_star=files["sampling"], solvent_mask="None",
        **settings, **flags, **figures))
    general = read_star(run / "run_it025_optimiser.star")["optimiser_general"]
    assert isinstance(general, dict)
    assert (general["rlnOutputRootName"], general["rlnModelStarFile"], general["rlnExperimentalDataStarFile"]) == (
        "Class3D/run1/run", "Class3D/run1/run_it025_model.star", "Class3D/run1/run_it025_data.star")
    spectrum = np.ones(3)
    model = ModelSummary(4, 2.0, 8.0, 4, 2.0, 4.0, 1.0, 0.0, 0.5, [ClassSummary(str(run / "run_it025_class001.mrc"), 1.0, 1.0, 1.0, 8.0, spectrum, spectrum, spectrum),
                         ClassSummary("/elsewhere/map.mrc", 0.0, 1.0, 1.0, 8.0, spectrum, spectrum, spectrum)], ["opticsGroup1"], np.array([3]), np.ones(1), spectrum[None])
    write_model_star(run / "run_it025_model.star", model)
    assert [entry.map_name for entry in read_model_star(run / "run_it025_model.star").classes] == ["Class3D/run1/run_it025_class001.mrc", "/elsewhere/map.mrc"]
