"""MRC maps and stacks: header edge cases from EMDB/RELION files, modes, round trips."""

from __future__ import annotations

from pathlib import Path

import mrcfile
import numpy as np
import pytest
import torch

from cryotorch.errors import InputError
from cryotorch.io import ImageStack, MrcStackWriter, read_mrc, write_mrc

EDGE = "maps/mrc_header_edgecases"


def test_emd_3001_axis_order_is_made_standard(shared_data: Path) -> None:
    volume = read_mrc(shared_data / EDGE / "EMD-3001.map")
    # Stored as (sections=y, rows=x, columns=z) with mapc/mapr/maps = 3/1/2: 73 z, 25 y, 43 x.
    assert volume.data.shape == (73, 25, 43) and volume.data.dtype == np.float32
    with mrcfile.open(shared_data / EDGE / "EMD-3001.map", permissive=True) as raw:
        np.testing.assert_array_equal(volume.data, np.transpose(raw.data, (2, 0, 1)))
    np.testing.assert_allclose(volume.voxel_size_angstrom, (17.93 / 40, 4.71 / 12, 33.03 / 72), rtol=1e-6)
    # nystart (rows → x) = -21, nzstart (sections → y) = -12, nxstart (columns → z) = 0.
    np.testing.assert_allclose(volume.origin_angstrom, (-21 * 17.93 / 40, -12 * 4.71 / 12, 0.0), rtol=1e-6)


def test_emd_3197_nxstart_and_non_zero_origin(shared_data: Path) -> None:
    volume = read_mrc(shared_data / EDGE / "EMD-3197.map")
    assert volume.data.shape == (20, 20, 20)
    np.testing.assert_allclose(volume.origin_angstrom, (-2 * 11.4, 0.0, 0.0), rtol=1e-6)
    segmented = read_mrc(shared_data / EDGE / "emd_21457_seg.mrc")
    assert segmented.data.shape == (47, 40, 48)
    np.testing.assert_allclose(segmented.origin_angstrom, (162.75, 231.0, 204.75), rtol=1e-6)


def test_float16_written_by_relion(shared_data: Path) -> None:
    volume = read_mrc(shared_data / EDGE / "float16.mrc")
    assert volume.data.shape == (1, 64, 64) and volume.data.dtype == np.float32
    with ImageStack(shared_data / EDGE / "float16.mrc") as stack:
        assert stack.n_images == 1 and stack.box_size_px == 64
        np.testing.assert_array_equal(stack.read(np.array([0])), volume.data)
        assert stack.pixel_size_angstrom == pytest.approx(3.5953124)


def test_every_shared_map_and_stack_loads(shared_data: Path) -> None:
    for path in sorted(shared_data.glob("**/*.mrc*")) + sorted(shared_data.glob("**/*.map")):
        volume = read_mrc(path)
        assert volume.data.ndim == 3 and np.isfinite(volume.data).all(), path


@pytest.mark.parametrize("dimensions", [2, 3])
def test_write_read_round_trip(tmp_path: Path, dimensions: int) -> None:
    data = np.random.default_rng(0).normal(size=(5, 6, 7)[3 - dimensions :]).astype(np.float32)
    path = tmp_path / "map.mrc"
    write_mrc(path, torch.from_numpy(data), voxel_size_angstrom=1.25, origin_angstrom=(1.5, -2.0, 3.0))
    volume = read_mrc(path)
    np.testing.assert_array_equal(volume.data, data.reshape((1,) * (3 - dimensions) + data.shape))
    assert volume.voxel_size_angstrom[:2] == (1.25, 1.25)
    assert volume.origin_angstrom == (1.5, -2.0, 3.0)
    assert [entry.name for entry in tmp_path.iterdir()] == ["map.mrc"]


@pytest.mark.parametrize(("mode", "dtype"), [(0, np.int8), (1, np.int16), (2, np.float32), (6, np.uint16), (12, np.float16)])
def test_stack_modes(tmp_path: Path, mode: int, dtype: type) -> None:
    images = (np.arange(3 * 4 * 4) % 50).reshape(3, 4, 4).astype(dtype)
    path = tmp_path / "stack.mrcs"
    with mrcfile.new(path) as mrc:
        mrc.set_data(images)
        mrc.set_image_stack()
        mrc.voxel_size = 2.0
    with mrcfile.open(path, header_only=True) as mrc:
        assert int(mrc.header.mode) == mode
    with ImageStack(path) as stack:
        assert (stack.n_images, stack.box_size_px, stack.pixel_size_angstrom) == (3, 4, 2.0)
        read = stack.read(np.array([2, 0]))
    assert read.dtype == np.float32
    np.testing.assert_array_equal(read, images[[2, 0]].astype(np.float32))


def test_stack_writer_then_image_stack(tmp_path: Path) -> None:
    images = np.random.default_rng(1).normal(size=(5, 8, 8)).astype(np.float32)
    path = tmp_path / "out.mrcs"
    with MrcStackWriter(path, n_images=5, box_size_px=8, pixel_size_angstrom=1.5) as writer:
        assert not path.exists()  # published only on a clean exit
        writer.write(0, images[:3])
        writer.write(3, images[3:])
    with ImageStack(path) as stack:
        assert (stack.n_images, stack.box_size_px, stack.pixel_size_angstrom) == (5, 8, 1.5)
        np.testing.assert_array_equal(stack.read(np.arange(5)), images)
    with mrcfile.open(path, header_only=True) as mrc:
        assert int(mrc.header.ispg) == 0


def test_stack_writer_leaves_nothing_on_failure(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="never written"):
        with MrcStackWriter(tmp_path / "partial.mrcs", n_images=3, box_size_px=4, pixel_size_angstrom=1.0) as writer:
            writer.write(0, np.zeros((2, 4, 4)))
    with pytest.raises(RuntimeError):
        with MrcStackWriter(tmp_path / "failed.mrcs", n_images=1, box_size_px=4, pixel_size_angstrom=1.0):
            raise RuntimeError("job died")
    assert list(tmp_path.iterdir()) == []


def test_image_index_past_end_names_file_and_index(tmp_path: Path) -> None:
    path = tmp_path / "small.mrcs"
    write_mrc(path, np.zeros((2, 4, 4)), voxel_size_angstrom=1.0)
    with ImageStack(path) as stack, pytest.raises(InputError, match=r"image index 3 \(1-based\).*small\.mrcs"):
        stack.read(np.array([0, 2]))


def test_truncated_file_is_input_error(tmp_path: Path) -> None:
    path = tmp_path / "cut.mrcs"
    write_mrc(path, np.zeros((3, 8, 8)), voxel_size_angstrom=1.0)
    path.write_bytes(path.read_bytes()[:-100])
    for reader in (read_mrc, ImageStack):
        with pytest.raises(InputError, match="cut.mrcs.*truncated"):
            reader(path)


def test_map_with_nan_or_infinite_voxels_is_input_error(tmp_path: Path) -> None:
    path = tmp_path / "holes.mrc"
    volume = np.zeros((6, 5, 4), dtype=np.float32)
    volume[2, 3, 1] = np.nan
    volume[4, 0, 0] = np.inf
    with mrcfile.new(path) as mrc:  # mrcfile warns of the NaN on writing, as for any map that holds one
        with pytest.warns(RuntimeWarning):
            mrc.set_data(volume)
    with pytest.raises(InputError, match=r"holes\.mrc: 2 of 120 voxels are NaN or infinite \(the first at x, y, z = 1, 3, 2\)"):
        read_mrc(path)


def test_unreadable_maps_and_stacks_are_input_errors(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"MRC file .*nope\.mrc does not exist; check the path"):
        read_mrc(tmp_path / "nope.mrc")
    stub = tmp_path / "stub.mrc"
    stub.write_bytes(b"not an MRC file")
    with pytest.raises(InputError, match=r"stub\.mrc.*check that it is an intact MRC file|stub\.mrc.*truncated or not an MRC file"):
        read_mrc(stub)
    complex_map = tmp_path / "complex.mrc"
    with mrcfile.new(complex_map) as mrc:
        mrc.set_data(np.zeros((4, 4, 4), dtype=np.complex64))
    with pytest.raises(InputError, match=r"complex\.mrc has mode 4; supported modes are 0, 1, 2, 6 and 12 — convert it to mode 2"):
        read_mrc(complex_map)
    oblong = tmp_path / "oblong.mrcs"
    write_mrc(oblong, np.zeros((2, 4, 6)), voxel_size_angstrom=1.0)
    with pytest.raises(InputError, match=r"image stack .*oblong\.mrcs has non-square 6x4 images; crop or re-extract them square"):
        ImageStack(oblong)
    swapped = tmp_path / "swapped.mrcs"
    with mrcfile.new(swapped) as mrc:
        mrc.set_data(np.zeros((2, 4, 4), dtype=np.float32))
        mrc.header.mapc, mrc.header.mapr = 2, 1
    with pytest.raises(InputError, match=r"image stack .*swapped\.mrcs stores its axes in the order mapc/mapr/maps = 2/1/3; rewrite it in the standard order 1/2/3"):
        ImageStack(swapped)
