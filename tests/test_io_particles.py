"""Particle metadata: RELION 3.0/3.1/5 and cryoSPARC files from other programs, round trips."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cryotorch.data.particles import common_geometry, half_set_labels
from cryotorch.errors import InputError
from cryotorch.io import (
    ParticleImageReader,
    ParticleTable,
    read_particles,
    read_star,
    validate_particle_images,
    write_mrc,
    write_particles,
)

PARTICLE_FILES = [
    "real_particles/aspire_sample/sample_particles_relion31.star",
    "real_particles/aspire_sample/sample_relion_data.star",
    "real_particles/relion31_cryodrgn/relion31.star",
    "real_particles/relion31_cryodrgn/relion31.v2.star",
    "real_particles/empiar10076_cryodrgn/empiar_10076_7.star",
    "real_particles/empiar10076_cryodrgn/empiar_10076_7.cs",
    "real_particles/trpv1_cryojax/trpv1_small_stack.star",
    "maps/aspire_70S/rln_proj_65_centered.star",
    "maps/aspire_70S/rln_proj_65_shifted.star",
    "metadata/cryodrgn/relion5.star",
    "metadata/cryodrgn/relion31.6opticsgroups.star",
    "metadata/cryodrgn/FinalRefinement-OriginalParticles-PfCRT.star",
    "metadata/cryodrgn/cryosparc_P12_J24_001_particles.cs",
    "metadata/cryodrgn/cryosparc_J2_particles_exported.cs",
    "metadata/cryosparc_tools/4k_dataset.cs",
]


def assert_tables_equal(first: ParticleTable, second: ParticleTable, rtol: float = 0.0, skip: tuple[str, ...] = ()) -> None:
    """Every typed field equal (floats to ``rtol``), paths exactly."""
    for name in ParticleTable.array_field_names():
        if name in skip:
            continue
        a, b = getattr(first, name), getattr(second, name)
        if a.dtype == object or np.issubdtype(a.dtype, np.integer):
            np.testing.assert_array_equal(a, b, err_msg=name)
        else:
            np.testing.assert_allclose(a, b, rtol=rtol, atol=1e-9 if rtol else 0.0, err_msg=name)
    assert (first.has_poses, first.has_ctf) == (second.has_poses, second.has_ctf)


@pytest.mark.parametrize("relative", PARTICLE_FILES)
def test_every_particle_file_loads(shared_data: Path, relative: str) -> None:
    table = read_particles(shared_data / relative)
    assert len(table) == {"4k_dataset.cs": 0}.get(Path(relative).name, len(table))
    for name in ParticleTable.array_field_names():
        assert len(getattr(table, name)) == len(table)
    assert all(Path(path).is_absolute() for path in table.stack_paths)
    if relative.startswith(("real_particles", "maps")):
        validate_particle_images(table)  # the stacks are present and consistent
        images = ParticleImageReader(table).read(np.arange(len(table)))
        assert images.shape == (len(table), table.box_size_px[0], table.box_size_px[0])


def test_empty_cryosparc_file_and_empty_round_trip(shared_data: Path, tmp_path: Path) -> None:
    table = read_particles(shared_data / "metadata/cryosparc_tools/4k_dataset.cs")
    assert len(table) == 0 and table.euler_deg.shape == (0, 3) and not table.has_poses
    write_particles(tmp_path / "empty.star", table)
    assert len(read_particles(tmp_path / "empty.star")) == 0


def test_relion31_blocks_in_either_order(shared_data: Path) -> None:
    folder = shared_data / "real_particles/relion31_cryodrgn"
    first, second = read_particles(folder / "relion31.star"), read_particles(folder / "relion31.v2.star")
    assert_tables_equal(first, second)
    assert first.has_poses and first.has_ctf and first.pixel_size_angstrom[0] == 2.806
    assert first.box_size_px[0] == 256 and first.stack_paths[0] == str(folder / "relion31.mrcs")
    np.testing.assert_array_equal(first.stack_indices, np.arange(5))
    np.testing.assert_allclose(first.origin_angstrom[0], (0.019324, -0.64686))
    assert first.spherical_aberration_mm[0] == 0.01 and first.voltage_kv[0] == 300.0


def test_empiar10076_star_and_cs_describe_the_same_particles(shared_data: Path) -> None:
    folder = shared_data / "real_particles/empiar10076_cryodrgn"
    star = read_particles(folder / "empiar_10076_7.star")
    cs = read_particles(folder / "empiar_10076_7.cs")
    # cryoSPARC stores float32: 5 µm / 38168 = 1.3099979 Å; 5.28° = 0.09215339 rad.
    assert_tables_equal(star, cs, rtol=1e-6)
    np.testing.assert_allclose(star.pixel_size_angstrom, 5e4 / 38168)
    assert star.box_size_px[0] == 320  # from the stack header (RELION 3.0 has no rlnImageSize)
    assert not star.has_poses and star.has_ctf


def test_aspire_relion30_and_31_agree_where_the_files_agree(shared_data: Path) -> None:
    folder = shared_data / "real_particles/aspire_sample"
    old = read_particles(folder / "sample_relion_data.star")
    new = read_particles(folder / "sample_particles_relion31.star")
    # The ASPIRE fixtures are not exact copies of each other: the 3.1 file has 1.4 Å pixels
    # (3.0: 5 µm / 37369.2 = 1.338 Å), a second 200 kV optics group for rows 9-17, row 15
    # with the angles and origin of row 14, and the 3.0 pixel origins copied as Å values.
    differing = ("pixel_size_angstrom", "voltage_kv", "optics_group", "euler_deg", "origin_angstrom")
    assert_tables_equal(old, new, skip=differing)
    np.testing.assert_allclose(old.pixel_size_angstrom, 5e4 / 37369.207031)
    np.testing.assert_array_equal(new.pixel_size_angstrom, 1.4)
    np.testing.assert_array_equal(new.optics_group, [1] * 8 + [2] * 9)
    np.testing.assert_array_equal(new.voltage_kv, [300.0] * 8 + [200.0] * 9)
    np.testing.assert_array_equal(old.voltage_kv, 300.0)
    same = np.arange(17) != 14
    np.testing.assert_array_equal(old.euler_deg[same], new.euler_deg[same])
    np.testing.assert_allclose(old.origin_angstrom[same] / old.pixel_size_angstrom[same, None], new.origin_angstrom[same])


def test_pixel_origins_in_a_31_file_are_converted(shared_data: Path) -> None:
    table = read_particles(shared_data / "maps/aspire_70S/rln_proj_65_shifted.star")
    assert table.pixel_size_angstrom[0] == 1.0 and not table.has_ctf and table.has_poses
    np.testing.assert_array_equal(table.origin_angstrom, [[6, 10], [10, -5], [-8, 11], [-13, -3]])


def test_six_optics_groups_resolved_per_particle(shared_data: Path) -> None:
    path = shared_data / "metadata/cryodrgn/relion31.6opticsgroups.star"
    table = read_particles(path)
    blocks = read_star(path)
    optics = blocks["optics"].set_index("rlnOpticsGroup")
    groups = blocks["particles"]["rlnOpticsGroup"].to_numpy()
    np.testing.assert_array_equal(table.optics_group, groups)
    np.testing.assert_array_equal(table.pixel_size_angstrom, optics.loc[groups, "rlnImagePixelSize"])
    np.testing.assert_array_equal(table.spherical_aberration_mm, optics.loc[groups, "rlnSphericalAberration"])
    assert set(np.unique(table.spherical_aberration_mm)) == {2.6, 2.7}


def test_relion5_file(shared_data: Path) -> None:
    table = read_particles(shared_data / "metadata/cryodrgn/relion5.star")
    assert len(table) == 17 and table.voltage_kv[0] == 100.0 and table.box_size_px[0] == 448
    assert {Path(path).name for path in table.stack_paths} == {"toy_images_a.mrcs", "toy_images_b.mrcs"}


def test_round_trip_keeps_fields_and_unknown_columns(shared_data: Path, tmp_path: Path) -> None:
    for relative in PARTICLE_FILES[:4] + ["metadata/cryodrgn/relion31.6opticsgroups.star"]:
        table = read_particles(shared_data / relative)
        out = tmp_path / "out.star"
        write_particles(out, table)
        back = read_particles(out)
        assert_tables_equal(table, back)
        assert back.source_particles is not None and table.source_particles is not None
        for column in ("rlnCoordinateX", "rlnMicrographName", "rlnNrOfSignificantSamples"):
            if column in table.source_particles:
                pd.testing.assert_series_equal(back.source_particles[column], table.source_particles[column])
        assert out.read_text().lstrip().startswith("# version 30001")


def test_round_trip_of_cryosparc_and_extra_columns(shared_data: Path, tmp_path: Path) -> None:
    table = read_particles(shared_data / "metadata/cryodrgn/cryosparc_P12_J24_001_particles.cs").select(np.arange(50))
    out = tmp_path / "from_cs.star"
    classes = np.arange(50) % 3 + 1
    write_particles(out, table, extra_columns={"rlnClassNumber": classes, "rlnLogLikeliContribution": np.ones(50)})
    back = read_particles(out)
    assert_tables_equal(table, back, skip=("class_number",))
    np.testing.assert_array_equal(back.class_number, classes)
    assert back.source_particles is not None and (back.source_particles["rlnLogLikeliContribution"] == 1.0).all()


def test_written_image_paths_are_named_as_relion_names_them(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # relative to the working directory (RELION's project folder) wherever the STAR file lies,
    # absolute for a stack outside it; read back from the STAR file's folder or the folders above
    (tmp_path / "project" / "Extract").mkdir(parents=True)
    stack = tmp_path / "project" / "Extract" / "a.mrcs"
    write_mrc(stack, np.zeros((3, 4, 4)), voxel_size_angstrom=2.0)
    table = ParticleTable.from_arrays(stack_paths=[str(stack)] * 3, stack_indices=[2, 0, 1], pixel_size_angstrom=2.0, box_size_px=4)
    monkeypatch.chdir(tmp_path / "project")
    (tmp_path / "project" / "Select" / "job009").mkdir(parents=True)
    for star in (Path("particles.star"), Path("Select/job009/particles.star")):
        write_particles(star, table)
        names = read_star(star)["particles"]["rlnImageName"].tolist()
        assert names == ["000003@Extract/a.mrcs", "000001@Extract/a.mrcs", "000002@Extract/a.mrcs"]
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert read_particles(tmp_path / "project" / "Select" / "job009" / "particles.star").stack_paths.tolist() == [str(stack)] * 3
    write_particles(tmp_path / "project" / "outside.star", table.select(np.arange(1)))
    assert read_star(tmp_path / "project" / "outside.star")["particles"]["rlnImageName"][0] == f"000003@{stack}"


def test_project_dir_resolution(tmp_path: Path) -> None:
    (tmp_path / "Extract").mkdir()
    (tmp_path / "Refine3D").mkdir()
    write_mrc(tmp_path / "Extract" / "a.mrcs", np.zeros((2, 4, 4)), voxel_size_angstrom=2.0)
    star = tmp_path / "Refine3D" / "run_data.star"
    header = "data_optics\nloop_\n_rlnOpticsGroup\n_rlnImagePixelSize\n_rlnImageSize\n1 2.0 4\ndata_particles\nloop_\n_rlnImageName\n_rlnOpticsGroup\n"
    star.write_text(header + "000002@Extract/a.mrcs 1\n")
    with_project = read_particles(star, project_dir=tmp_path)
    assert with_project.stack_paths[0] == str(tmp_path / "Extract" / "a.mrcs")
    validate_particle_images(with_project)
    # without it, found in the folder above the STAR file's, as RELION's job folders sit in their project
    assert read_particles(star).stack_paths[0] == str(tmp_path / "Extract" / "a.mrcs")
    star.write_text(header + "000002@Extract/b.mrcs 1\n")
    without = read_particles(star)  # found nowhere: the STAR folder, which validation reports
    assert without.stack_paths[0] == str(tmp_path / "Refine3D" / "Extract" / "b.mrcs")


def test_select_subsets_source_rows(shared_data: Path) -> None:
    table = read_particles(shared_data / "real_particles/trpv1_cryojax/trpv1_small_stack.star")
    subset = table.select(np.array([7, 2]))
    assert len(subset) == 2 and subset.source_particles is not None
    np.testing.assert_array_equal(subset.stack_indices, [7, 2])
    assert subset.source_particles["rlnImageName"].tolist() == ["000008@trpv1_small_stack.mrcs", "000003@trpv1_small_stack.mrcs"]
    np.testing.assert_array_equal(table.select(table.random_subset == 1).random_subset, 1)


def test_from_arrays_broadcasts_and_defaults() -> None:
    table = ParticleTable.from_arrays(stack_paths=["/a.mrcs", "/b.mrcs"], stack_indices=[0, 1], pixel_size_angstrom=1.5, box_size_px=64, defocus_u_angstrom=[1e4, 2e4])
    assert table.pixel_size_angstrom.tolist() == [1.5, 1.5] and table.box_size_px.dtype == np.int64
    assert table.has_ctf and not table.has_poses and table.euler_deg.shape == (2, 3)
    np.testing.assert_array_equal(table.defocus_v_angstrom, [1e4, 2e4])
    assert table.ctf_scale.tolist() == [1.0, 1.0] and table.random_subset.tolist() == [0, 0]


def test_mixed_pixel_sizes_share_the_coarsest_and_half_sets_are_drawn_where_missing(shared_data: Path) -> None:
    # a RELION 3.1 file of six optics groups at 1.24 and 1.25 Å/px: all read at 1.25 Å, in
    # the first group's 196 px (its own pixel size); a group without a box cannot be placed
    path = shared_data / "metadata/cryodrgn/relion31.6opticsgroups.star"
    table = read_particles(path)
    assert common_geometry(table, str(path)) == (196, 1.25)
    table.box_size_px[table.optics_group == 2] = 0
    with pytest.raises(InputError, match=r"relion31\.6opticsgroups\.star: optics groups \[2\] have no box size or pixel size, beside others that do; set rlnImageSize"):
        common_geometry(table, str(path))
    assert common_geometry(read_particles(shared_data / "metadata/cryodrgn/relion5.star"), "relion5.star") == (448, 0.89)
    # without rlnRandomSubset a seeded split puts ceil(N/2) particles in half 1; a valid column is kept
    table = ParticleTable.from_arrays(stack_paths=["/a.mrcs"] * 7, stack_indices=np.arange(7), pixel_size_angstrom=1.0, box_size_px=32)
    halves = half_set_labels(table, seed=3)
    assert sorted(halves.tolist()) == [1, 1, 1, 1, 2, 2, 2]
    np.testing.assert_array_equal(halves, half_set_labels(table, seed=3))
    assert any((half_set_labels(table, seed) != halves).any() for seed in range(4, 10))
    table.random_subset = np.array([2, 1, 2, 1, 2, 1, 2])
    np.testing.assert_array_equal(half_set_labels(table, seed=3), table.random_subset)


def test_image_reader_keeps_few_stacks_open_and_refuses_mixed_boxes(tmp_path: Path) -> None:
    # one stack per micrograph, as RELION extracts them: 5 stacks of 3 images, read in an
    # order that comes back to each stack after others, through a reader that holds 2 open
    rng = np.random.default_rng(0)
    stacks = [rng.normal(size=(3, 8, 8)).astype(np.float32) for _ in range(5)]
    paths = [tmp_path / f"mic{index}.mrcs" for index in range(5)]
    for path, images in zip(paths, stacks):
        write_mrc(path, images, voxel_size_angstrom=2.0)
    table = ParticleTable.from_arrays(
        stack_paths=[str(path) for path in paths for _ in range(3)], stack_indices=np.tile(np.arange(3), 5), pixel_size_angstrom=2.0, box_size_px=8,
    )
    reader = ParticleImageReader(table, max_open_stacks=2)
    every = np.concatenate(stacks)
    for rows in (np.array([0, 14, 5]), np.array([9, 1, 12, 6]), np.array([2, 13, 4, 10])):
        np.testing.assert_array_equal(reader.read(rows), every[rows])
        assert len(reader._open_stacks) <= 2
    np.testing.assert_array_equal(reader.read(np.arange(15)), every)
    table.box_size_px[12:] = 16
    with pytest.raises(InputError, match=r"rows \[0, 12\] mix box sizes \[8, 16\]; read images of one box size at a time"):
        ParticleImageReader(table).read(np.array([0, 12]))


def test_image_reader_preload_and_pickle(shared_data: Path) -> None:
    table = read_particles(shared_data / "real_particles/trpv1_cryojax/trpv1_small_stack.star")
    rows = np.array([9, 0, 4, 4])
    lazy = ParticleImageReader(table)
    expected = lazy.read(rows)
    np.testing.assert_array_equal(ParticleImageReader(table, preload=True).read(rows), expected)
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(lazy)).read(rows), expected)
    assert expected.dtype == np.float32 and expected.shape == (4, 48, 48)
