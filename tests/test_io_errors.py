"""Bad inputs: each gives an InputError naming the file and the row or column."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cryotorch.errors import InputError
from cryotorch.io import (
    MrcStackWriter,
    ParticleImageReader,
    ParticleTable,
    read_particles,
    validate_particle_images,
    write_particles,
)

N_IMAGES, BOX_PX, PIXEL_A = 4, 8, 2.0


@pytest.fixture(autouse=True)
def _in_the_project_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test's folder is the working directory, as a RELION project folder is for its
    programs: the STAR files written there name their stack ``stack.mrcs``."""
    monkeypatch.chdir(tmp_path)


def _dataset(folder: Path, n_rows: int = N_IMAGES) -> Path:
    """A 4-image stack and a particle STAR file whose rows reference images 1..n_rows."""
    with MrcStackWriter(folder / "stack.mrcs", N_IMAGES, BOX_PX, PIXEL_A) as writer:
        writer.write(0, np.random.default_rng(0).normal(size=(N_IMAGES, BOX_PX, BOX_PX)))
    table = ParticleTable.from_arrays(
        stack_paths=[str(folder / "stack.mrcs")] * n_rows,
        stack_indices=np.arange(n_rows),
        pixel_size_angstrom=PIXEL_A,
        box_size_px=BOX_PX,
        defocus_u_angstrom=1e4,
    )
    write_particles(folder / "particles.star", table)
    return folder / "particles.star"


def _edit_star(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new))


def test_valid_dataset_passes(tmp_path: Path) -> None:
    table = read_particles(_dataset(tmp_path))
    validate_particle_images(table)
    assert ParticleImageReader(table).read(np.arange(N_IMAGES)).shape == (N_IMAGES, BOX_PX, BOX_PX)


def test_missing_stack(tmp_path: Path) -> None:
    star = _dataset(tmp_path)
    _edit_star(star, "000003@stack.mrcs", "000003@other.mrcs")
    with pytest.raises(InputError, match=r"particle row 3 of .*particles\.star.*other\.mrcs does not exist"):
        validate_particle_images(read_particles(star))


def test_index_past_end(tmp_path: Path) -> None:
    star = _dataset(tmp_path)
    _edit_star(star, "000002@stack.mrcs", "000009@stack.mrcs")
    table = read_particles(star)
    with pytest.raises(InputError, match=r"particle row 2 of .*particles\.star.*image 9 .*stack\.mrcs.*holds 4 images"):
        validate_particle_images(table)
    with pytest.raises(InputError, match=r"image index 9 \(1-based\).*stack\.mrcs"):
        ParticleImageReader(table).read(np.array([1]))


def test_truncated_stack(tmp_path: Path) -> None:
    star = _dataset(tmp_path)
    stack = tmp_path / "stack.mrcs"
    stack.write_bytes(stack.read_bytes()[:-4 * BOX_PX])
    with pytest.raises(InputError, match=r"particle row 1 of .*particles\.star.*stack\.mrcs is truncated"):
        validate_particle_images(read_particles(star))


def test_box_size_mismatch(tmp_path: Path) -> None:
    star = _dataset(tmp_path)
    _edit_star(star, f" {BOX_PX} 300.0", f" {BOX_PX * 2} 300.0")  # rlnImageSize in data_optics
    table = read_particles(star)
    with pytest.raises(InputError, match=r"particle row 1 of .*particles\.star: box size 16 px.*rlnImageSize.*stack\.mrcs"):
        validate_particle_images(table)
    with pytest.raises(InputError, match=r"particle row 1 .*stack\.mrcs are 8 px"):
        ParticleImageReader(table).read(np.array([0]))


def test_pixel_size_mismatch(tmp_path: Path) -> None:
    star = _dataset(tmp_path)
    _edit_star(star, f"opticsGroup1 {PIXEL_A}", "opticsGroup1 2.1")
    with pytest.raises(InputError, match=r"particle row 1 of .*particles\.star: pixel size 2\.1000 Å.*rlnImagePixelSize.*stack\.mrcs"):
        validate_particle_images(read_particles(star))


def test_pixel_size_within_one_percent_passes(tmp_path: Path) -> None:
    star = _dataset(tmp_path)
    _edit_star(star, f"opticsGroup1 {PIXEL_A}", "opticsGroup1 2.01")
    validate_particle_images(read_particles(star))


@pytest.mark.filterwarnings("ignore:Data array contains NaN values")  # mrcfile's header statistics
def test_nan_pixel(tmp_path: Path) -> None:
    star = _dataset(tmp_path)
    images = np.ones((N_IMAGES, BOX_PX, BOX_PX), dtype=np.float32)
    images[2, 3, 3] = np.nan
    with MrcStackWriter(tmp_path / "stack.mrcs", N_IMAGES, BOX_PX, PIXEL_A) as writer:
        writer.write(0, images)
    reader = ParticleImageReader(read_particles(star))
    reader.read(np.array([0, 1, 3]))
    with pytest.raises(InputError, match=r"particle row 3 of .*particles\.star: image 3 \(1-based\) of .*stack\.mrcs has NaN"):
        reader.read(np.array([0, 2]))
    with pytest.raises(InputError, match="particle row 3"):
        ParticleImageReader(read_particles(star), preload=True)


def test_missing_image_name_column(tmp_path: Path) -> None:
    star = tmp_path / "noimages.star"
    star.write_text("data_particles\nloop_\n_rlnDefocusU\n_rlnImagePixelSize\n10000 1.0\n")
    with pytest.raises(InputError, match=r"noimages\.star: required column rlnImageName is missing"):
        read_particles(star)


def test_missing_pixel_size(tmp_path: Path) -> None:
    star = tmp_path / "nopixel.star"
    star.write_text("data_\nloop_\n_rlnImageName\n1@a.mrcs\n")
    with pytest.raises(InputError, match=r"nopixel\.star: no pixel size.*rlnImagePixelSize"):
        read_particles(star)


@pytest.mark.parametrize("value", ["oops", "inf", "nan"])
def test_non_numeric_value_names_column_and_row(tmp_path: Path, value: str) -> None:
    star = _dataset(tmp_path)
    _edit_star(star, "000004@stack.mrcs 1 0.0 0.0 10000.0", f"000004@stack.mrcs 1 0.0 0.0 {value}")
    with pytest.raises(InputError, match=rf"particles\.star: column rlnDefocusU of data_particles has the value '{value}' in row 4, which is not a finite number"):
        read_particles(star)


def test_undefined_optics_group(tmp_path: Path) -> None:
    star = _dataset(tmp_path)
    _edit_star(star, "000002@stack.mrcs 1 ", "000002@stack.mrcs 3 ")
    with pytest.raises(InputError, match=r"particles\.star, particle row 2: rlnOpticsGroup 3 is not defined"):
        read_particles(star)


def test_bad_image_name(tmp_path: Path) -> None:
    star = _dataset(tmp_path)
    _edit_star(star, "000002@stack.mrcs", "x@stack.mrcs")
    with pytest.raises(InputError, match=r"particles\.star, particle row 2: rlnImageName 'x@stack\.mrcs'"):
        read_particles(star)


def test_malformed_particle_star(tmp_path: Path) -> None:
    star = _dataset(tmp_path)
    _edit_star(star, "000003@stack.mrcs 1", "000003@stack.mrcs 1 extra")
    with pytest.raises(InputError, match=r"particles\.star, line \d+: row 3 of the loop in block data_particles has 11 values"):
        read_particles(star)


def test_unknown_suffix(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"particles\.txt"):
        read_particles(tmp_path / "particles.txt")


_OPTICS = "data_optics\nloop_\n_rlnOpticsGroup\n_rlnImagePixelSize\n_rlnImageSize\n_rlnVoltage\n{rows}\n"
_PARTICLES = "data_particles\nloop_\n_rlnImageName\n{columns}\n{rows}\n"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (_OPTICS.format(rows="1 2.0 8 300\n2 2.0 8 300") + _PARTICLES.format(columns="_rlnRandomSubset", rows="1@stack.mrcs 1"),
         r"particles\.star: data_particles has no rlnOpticsGroup column but data_optics defines 2 groups; add rlnOpticsGroup to every particle row"),
        ("data_optics\nloop_\n_rlnImagePixelSize\n_rlnImageSize\n2.0 8\n2.0 8\n" + _PARTICLES.format(columns="_rlnOpticsGroup", rows="1@stack.mrcs 1"),
         r"particles\.star: data_optics has no rlnOpticsGroup column; number its rows 1, 2, \.\.\."),
        (_OPTICS.format(rows="1 2.0 8 300\n1 2.0 8 300") + _PARTICLES.format(columns="_rlnOpticsGroup", rows="1@stack.mrcs 1"),
         r"particles\.star: data_optics lists an rlnOpticsGroup twice; give each group one row"),
        (_OPTICS.format(rows="1 2.0 8 300") + _PARTICLES.format(columns="_rlnOpticsGroup\n_rlnRandomSubset", rows="1@stack.mrcs 1 1\n2@stack.mrcs 1 1.5"),
         r"particles\.star, particle row 2: column rlnRandomSubset holds 1\.5, which is not a whole number; fix the value"),
        (_OPTICS.format(rows="1 2.0 8 300") + _PARTICLES.format(columns="_rlnOpticsGroup\n_rlnRandomSubset", rows="1@stack.mrcs 1 3"),
         r"particles\.star, particle row 1: rlnRandomSubset is 3; it must be 1 or 2"),
        (_OPTICS.format(rows="1 0.0 8 300") + _PARTICLES.format(columns="_rlnOpticsGroup", rows="1@stack.mrcs 1"),
         r"particles\.star, particle row 1: pixel size 0\.0 Å is not positive; fix it"),
        ("data_a\nloop_\n_rlnAngleRot\n1.0\ndata_b\nloop_\n_rlnAngleTilt\n2.0\n",
         r"particles\.star: no particle table found — none of the blocks \(data_a, data_b\) has an rlnImageName column"),
        ("data_a\nloop_\n_rlnImageName\n1@stack.mrcs\ndata_b\nloop_\n_rlnImageName\n2@stack.mrcs\n",
         r"particles\.star: several blocks \(data_a, data_b\) list images"),
    ],
    ids=["optics-group-column", "optics-numbering", "optics-twice", "fractional-integer", "random-subset", "pixel-size", "no-particles", "two-particle-blocks"],
)
def test_malformed_relion_tables(tmp_path: Path, text: str, message: str) -> None:
    star = tmp_path / "particles.star"
    star.write_text(text)
    with pytest.raises(InputError, match=message):
        read_particles(star)


def test_metadata_column_is_read_or_named_missing_or_non_finite(tmp_path: Path) -> None:
    from dataclasses import replace

    table = read_particles(_dataset(tmp_path))
    np.testing.assert_array_equal(table.metadata("rlnDefocusU"), np.full(N_IMAGES, 1e4))
    np.testing.assert_array_equal(table.metadata("_rlnImagePixelSize"), np.full(N_IMAGES, PIXEL_A))  # from the optics table
    with pytest.raises(InputError, match=r"particles\.star: no column rlnNoSuchLabel; it holds .*rlnDefocusU"):
        table.metadata("rlnNoSuchLabel")
    scores = table.source_particles.assign(rlnMaxValueProbDistribution=[0.5, "nan", 0.2, 0.9])
    with pytest.raises(InputError, match=r"column rlnMaxValueProbDistribution has the value 'nan' in particle row 2, which is not a finite number"):
        replace(table, source_particles=scores).metadata("rlnMaxValueProbDistribution")
