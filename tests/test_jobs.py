"""The simulate and reconstruct jobs end to end, through the real command line."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cryotorch.conventions import irfft3_centered, rfft2_centered, rfft3_centered
from cryotorch.data.phantom import blob_phantom
from cryotorch.io import ParticleImageReader, read_mrc, read_particles, read_star, write_mrc
from cryotorch.ops.filters import crop_or_pad, distance_to_region, lowpass_filter_3d
from cryotorch.jobs.simulate import coloured_noise_psd
from cryotorch.ops.fourier import radial_average, shell_index_2d, shell_power_3d, squared_magnitude
from cryotorch.ops.fsc import fourier_shell_correlation

REPO = Path(__file__).resolve().parents[1]


def train(*overrides: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run ``python -m cryotorch.train`` as a user would; returns the finished process."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    result = subprocess.run(
        [sys.executable, "-m", "cryotorch.train", *overrides], cwd=REPO, env=env, capture_output=True, text=True, timeout=900
    )
    if check and result.returncode != 0:
        raise AssertionError(f"train {' '.join(overrides)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


def torchrun(n_processes: int, *overrides: str) -> None:
    """Run ``python -m cryotorch.train`` under ``torchrun --standalone --nproc_per_node=N``."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n_processes}", "-m", "cryotorch.train", *overrides]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]


# runs the override lists of argv[1] (JSON: [[overrides, output folder], ...]) as
# ``python -m cryotorch.train`` would, one after the other in this one process, and prints
# the message of the bad input each stops with (null for a run that ends well)
_ONE_PROCESS_RUNS = """
import json, sys
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict
from cryotorch.train import CONFIG_DIR, input_error, run
messages = []
with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
    for overrides, folder in json.loads(sys.argv[1]):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
        with open_dict(cfg):
            cfg.hydra.runtime.output_dir = folder
        HydraConfig.instance().set_config(cfg)
        with open_dict(cfg):
            del cfg["hydra"]
        try:
            run(cfg)
            messages.append(None)
        except Exception as error:
            cause = input_error(error)
            if cause is None:
                raise
            messages.append(str(cause))
print(json.dumps(messages))
"""


def one_process_runs(cases: list[tuple[list[str], Path]]) -> list[str | None]:
    """Run ``cases`` (overrides, output folder) one after the other, as ``python -m
    cryotorch.train`` would, in one process rather than one each (most of a short run's time
    is its imports; the runs write no ``train.log``); returns the bad-input message each run
    stops with, None for one that ends well."""
    argument = json.dumps([[overrides, str(folder)] for overrides, folder in cases])
    result = subprocess.run([sys.executable, "-c", _ONE_PROCESS_RUNS, argument], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def simulation(map_path: Path, n_particles: int, snr: str) -> list[str]:
    """Overrides of a simulate run of ``map_path`` at 5 Å/px, box 64, realistic defocus."""
    return [
        "+job=simulate", f"job.maps=[{map_path}]", "job.pixel_size_angstrom=5.0", "job.box_size=64",
        f"job.n_particles={n_particles}", f"job.snr={snr}", "job.defocus_min_angstrom=8000",
        "job.defocus_max_angstrom=25000", "seed=0",
    ]


def test_blob_phantom_is_its_sum_of_gaussians() -> None:
    # the phantom made as one product of the blobs' profiles, against each blob's Gaussian of
    # its distance, summed voxel by voxel (the same draws, taken again with the same seed)
    box, pixel, n_blobs = 20, 2.0, 30
    generator = torch.Generator().manual_seed(5)
    directions = torch.randn(n_blobs, 3, generator=generator)
    directions /= directions.norm(dim=1, keepdim=True)
    centres = directions * 0.35 * box * torch.rand(n_blobs, 1, generator=generator) ** (1 / 3)
    centres[:, 0] = centres[:, 0] * 0.8 + 0.15 * 0.35 * box * torch.sign(centres[:, 1])
    weights = 0.5 + torch.rand(n_blobs, generator=generator)
    coordinate = torch.arange(box, dtype=torch.float64) - box // 2
    z, y, x = torch.meshgrid(coordinate, coordinate, coordinate, indexing="ij")
    expected = torch.zeros(box, box, box, dtype=torch.float64)
    for (cx, cy, cz), weight in zip(centres.double().tolist(), weights.double().tolist()):
        expected += weight * torch.exp(-((x - cx) ** 2 + (y - cy) ** 2 + (z - cz) ** 2) / (2 * 1.5**2))
    expected *= ((x**2 + y**2 + z**2).sqrt() < 0.45 * box).double()
    torch.testing.assert_close(blob_phantom(box, pixel, seed=5, n_blobs=n_blobs).double(), expected / expected.max(), rtol=0, atol=1e-6)


def test_simulate_writes_particles_truth_and_logs(tmp_path: Path) -> None:
    out = tmp_path / "sim"
    train("+job=simulate", "job.n_particles=40", "job.phantom_box_size=32", "job.junk_fraction=0.25", "job.noise=coloured", "job.origin_sigma_angstrom=6", f"hydra.run.dir={out}")
    particles = read_particles(out / "particles.star")
    truth = read_particles(out / "truth.star")
    assert len(particles) == len(truth) == 40
    assert particles.has_poses and particles.has_ctf
    assert set(np.unique(truth.class_number)) <= {1, 2} and (truth.class_number == 2).any()
    np.testing.assert_allclose(particles.euler_deg, truth.euler_deg)
    assert set(np.unique(particles.random_subset)) == {1, 2}
    assert (out / "phantom.mrc").is_file() and (out / "config.yaml").is_file()
    assert any((out / "tensorboard").glob("events.out.tfevents.*"))
    # images are normalised to unit noise, as after RELION's extraction
    junk = np.nonzero(truth.class_number == 2)[0]
    images = ParticleImageReader(particles).read(junk)
    assert images.std() == pytest.approx(1.0, rel=0.15)
    # with the spectrum asked for: their mean power over that of coloured_noise_psd is flat
    # beyond the sparse lowest shells (white noise would fall against it by the PSD's ~3.8)
    box, pixel = images.shape[-1], float(particles.pixel_size_angstrom[0])
    shells = shell_index_2d(box)
    measured = radial_average(squared_magnitude(rfft2_centered(torch.as_tensor(images, dtype=torch.float64))).mean(0), shells, box // 2)
    ratio = measured[2:] / radial_average(coloured_noise_psd(box, pixel).double(), shells, box // 2)[2:]
    assert float(ratio.max() / ratio.min()) < 2


def test_simulate_reuses_poses_and_ctfs_and_draws_class_fractions(shared_data: Path, tmp_path: Path) -> None:
    # poses cycled from a RELION STAR (4 rows), CTFs drawn from another (5 rows), three times
    # as many particles of the first map as of the second, and a particles.star without poses
    # (data to be aligned from scratch) beside the truth
    maps = [tmp_path / f"map{index}.mrc" for index in range(2)]
    for index, path in enumerate(maps):
        write_mrc(path, blob_phantom(16, 6.0, seed=index), 6.0)
    poses_star, ctfs_star = shared_data / "maps/aspire_70S/rln_proj_65_shifted.star", shared_data / "real_particles/relion31_cryodrgn/relion31.star"
    poses, ctfs = read_particles(poses_star), read_particles(ctfs_star)
    out = tmp_path / "sim"
    sim = ["+job=simulate", f"job.maps=[{maps[0]},{maps[1]}]", "job.n_particles=400"]
    star = out / "particles.star"
    messages = one_process_runs([
        ([*sim, "job.class_fractions=[3,1]", f"job.poses_from={poses_star}", f"job.ctf_from={ctfs_star}", "job.write_poses=false"], out),
        (["+job=reconstruct", f"data.particles={star}"], tmp_path / "rec"),
        (["+job=class3d", f"data.particles={star}", f"job.reference={maps[0]}", "sampling.align=false"], tmp_path / "cls"),
        (["+job=select", f"data.particles={star}", "job.classes=[1]"], tmp_path / "sel"),
        (["+job=select", f"data.particles={out / 'truth.star'}", "job.classes=[7]"], tmp_path / "sel7"),
        (["+job=select", f"data.particles={out / 'truth.star'}", "job.classes=[1,7]"], tmp_path / "sel17"),
    ])
    assert messages[0] is None and messages[5] is None
    no_poses = f"{star}: no rlnAngleRot/Tilt/Psi columns; reconstruct needs particles with poses"
    phrases = [no_poses, f"{star}: sampling.align=false needs particles with poses", f"{star}: no rlnClassNumber column",
               "job.classes=[7] select no particle (its particles are in classes [1, 2])"]
    for message, phrase in zip(messages[1:5], phrases, strict=True):
        assert message is not None and phrase in message
    particles, truth = read_particles(star), read_particles(out / "truth.star")
    assert not particles.has_poses and truth.has_poses
    cycle = np.arange(400) % 4
    np.testing.assert_allclose(truth.euler_deg, poses.euler_deg[cycle])
    np.testing.assert_allclose(truth.origin_angstrom, poses.origin_angstrom[cycle])
    drawn = np.stack([particles.defocus_u_angstrom, particles.defocus_v_angstrom, particles.defocus_angle_deg, particles.voltage_kv], 1)
    source = np.stack([ctfs.defocus_u_angstrom, ctfs.defocus_v_angstrom, ctfs.defocus_angle_deg, ctfs.voltage_kv], 1)
    row = np.abs(drawn[:, None, :] - source[None, :, :]).max(-1).argmin(1)
    np.testing.assert_allclose(drawn, source[row], rtol=1e-6)
    assert set(row.tolist()) == set(range(len(ctfs)))
    assert set(np.unique(truth.class_number)) == {1, 2} and abs(float(np.mean(truth.class_number == 1)) - 0.75) < 0.07
    assert len(read_particles(tmp_path / "sel17" / "particles.star")) == int((truth.class_number == 1).sum())


def test_simulate_bad_input_is_reported(shared_data: Path, tmp_path: Path) -> None:
    cube, small, flat, coarse, unknown = (tmp_path / f"{name}.mrc" for name in ("cube", "small", "flat", "coarse", "unknown"))
    write_mrc(cube, blob_phantom(16, 6.0, seed=0), 6.0)
    write_mrc(small, blob_phantom(12, 6.0, seed=0), 6.0)
    write_mrc(flat, torch.zeros(16, 16, 8), 6.0)
    write_mrc(coarse, blob_phantom(16, 6.0, seed=0), 7.0)
    write_mrc(unknown, blob_phantom(16, 6.0, seed=0), 0.0)
    no_ctf = shared_data / "maps/aspire_70S/rln_proj_65_shifted.star"
    cases = [
        ([f"job.maps=[{cube}]", "job.n_particles=0"], "job.n_particles must be at least 1, got 0"),
        ([f"job.maps=[{cube}]", "job.junk_fraction=1"], "job.junk_fraction must be in [0, 1), got 1"),
        ([f"job.maps=[{cube}]", "job.noise=pink"], "job.noise must be 'white' or 'coloured', got 'pink'"),
        ([f"job.maps=[{cube}]", "job.snr=0"], "job.snr must be positive (or null for noise-free images), got 0"),
        ([f"job.maps=[{cube}]", "job.defocus_min_angstrom=30000"], "job.defocus_min_angstrom is larger than job.defocus_max_angstrom: swap them"),
        ([f"job.maps=[{flat}]"], f"{flat}: map of shape (16, 16, 8) is not a cube"),
        ([f"job.maps=[{cube},{small}]"], "job.maps have different box sizes [(16, 16, 16), (12, 12, 12)]: resample them to one box"),
        ([f"job.maps=[{cube},{coarse}]"], "job.maps have different voxel sizes [6.0, 7.0] Å: resample them to one"),
        ([f"job.maps=[{unknown}]"], f"{unknown}: the header's voxel size is 0; set job.pixel_size_angstrom"),
        ([f"job.maps=[{cube},{cube}]", "job.class_fractions=[1]"], "job.class_fractions [1.0] must list one non-negative fraction per map (2)"),
        ([f"job.maps=[{cube}]", f"job.ctf_from={no_ctf}"], f"{no_ctf}: job.ctf_from needs a STAR with defocus columns"),
    ]
    messages = one_process_runs([(["+job=simulate", "job.n_particles=8", *overrides], tmp_path / str(number)) for number, (overrides, _) in enumerate(cases)])
    for (overrides, phrase), message in zip(cases, messages, strict=True):
        assert message is not None and phrase in message, overrides


def test_noise_free_reconstruction_matches_the_true_map(shared_data: Path, tmp_path: Path) -> None:
    map_path = shared_data / "maps" / "aspire_70S" / "clean70SRibosome_vol_65p.mrc"
    star, out = tmp_path / "sim" / "particles.star", tmp_path / "rec"
    # and without CTFs, in the simulation and the reconstruction
    plain_star, plain = tmp_path / "plain_sim" / "particles.star", tmp_path / "plain_rec"
    assert one_process_runs([
        (simulation(map_path, 5000, "null"), star.parent), (["+job=reconstruct", f"data.particles={star}"], out),
        ([*simulation(map_path, 1000, "null"), "job.ctf=false"], plain_star.parent), (["+job=reconstruct", f"data.particles={plain_star}", "job.ctf=false"], plain),
        # with a resolution limit: the sums held on the crop of the padded grid it reaches
        (["+job=reconstruct", f"data.particles={plain_star}", "job.ctf=false", "job.max_resolution_angstrom=20"], tmp_path / "limited"),
        # CTF correction asked for where the images have none
        (["+job=reconstruct", f"data.particles={plain_star}"], tmp_path / "asked"),
    ]) == [None, None, None, None, None, f"{plain_star}: the particles have no CTF parameters (rlnDefocusU/V, or ctf/df1_A in a .cs file); set job.ctf=false for images without a CTF, "
                                   "or estimate the CTFs first (CtfFind, or cryoSPARC's Patch CTF)"]
    assert not read_particles(plain_star).has_ctf
    truth = crop_or_pad(torch.as_tensor(np.array(read_mrc(map_path).data)), 64)
    reconstruction = torch.as_tensor(np.array(read_mrc(out / "run_class001.mrc").data))
    fsc = fourier_shell_correlation(rfft3_centered(reconstruction), rfft3_centered(truth))
    assert float(fsc[1:25].min()) >= 0.9  # up to 3/4 of Nyquist (shell 24 of 32)
    without_ctf = fourier_shell_correlation(rfft3_centered(torch.as_tensor(np.array(read_mrc(plain / "run_class001.mrc").data))), rfft3_centered(truth))
    assert float(without_ctf[1:17].min()) >= 0.9  # up to half Nyquist from 1,000 images
    # limited to 20 Å (shell 16): the same map up to the limit, next to nothing beyond it
    limited = rfft3_centered(torch.as_tensor(np.array(read_mrc(tmp_path / "limited" / "run_class001.mrc").data)))
    assert float(fourier_shell_correlation(limited, rfft3_centered(truth))[1:15].min()) >= 0.9
    power, plain_power = (shell_power_3d(spectrum) for spectrum in (limited, rfft3_centered(torch.as_tensor(np.array(read_mrc(plain / "run_class001.mrc").data)))))
    # the unlimited map's power up to the limit; beyond, below 2 % of it up to the last full shell
    ratio = power / plain_power
    assert torch.allclose(ratio[1:16], torch.ones(15, dtype=ratio.dtype), rtol=0, atol=0.01), ratio
    assert float(ratio[18:32].max()) < 0.02, ratio
    fsc_star = read_star(out / "run_fsc.star")
    assert float(fsc_star["general"]["rlnFinalResolution"]) < 13.0
    assert (out / "run_fsc.png").stat().st_size > 1000
    for name in ("run_half1_class001_unfil.mrc", "run_half2_class001_unfil.mrc"):
        assert read_mrc(out / name).voxel_size_angstrom[0] == pytest.approx(5.0)


def test_benchmark_maps_for_running_its_jobs_by_hand(shared_data: Path, tmp_path: Path) -> None:
    # scripts/bench_class3d.py --maps-only (README, "The benchmark set, step by step"): class A
    # is the 70S map in a 64 px box at 5 Å/px, class B the same map with one compact ball
    # holding 10 % of its positive mass (at least, to the next whole radius) set to zero, and
    # an empty map for the junk
    map_path = shared_data / "maps" / "aspire_70S" / "clean70SRibosome_vol_65p.mrc"
    result = subprocess.run(
        [sys.executable, "scripts/bench_class3d.py", "--map", str(map_path), "--maps-only", "--workdir", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    maps = {name: read_mrc(tmp_path / f"{name}.mrc") for name in ("classA", "classB", "junk")}
    assert all(m.data.shape == (64, 64, 64) and m.voxel_size_angstrom[0] == pytest.approx(5.0) for m in maps.values())
    class_a = np.array(maps["classA"].data)
    np.testing.assert_array_equal(class_a, crop_or_pad(torch.as_tensor(np.array(read_mrc(map_path).data)), 64).numpy())
    removed = np.array(maps["classB"].data) != class_a
    np.testing.assert_array_equal(np.array(maps["classB"].data)[removed], 0)
    positive = class_a.clip(min=0)
    assert 0.10 <= positive[removed].sum() / positive.sum() < 0.15
    # one ball: the changed voxels fill the smallest ball about their centre that holds them
    points = np.argwhere(removed)
    radius = np.linalg.norm(points - points.mean(0), axis=1).max()
    assert removed.sum() / (4 / 3 * np.pi * radius**3) > 0.9
    assert not np.array(maps["junk"].data).any()


def half_map_resolutions(shared_data: Path, tmp_path: Path, sizes: tuple[int, ...]) -> list[float]:
    """Half-map FSC 0.143 resolution (Å) of the map reconstructed from each number of
    simulated particles (SNR 0.05)."""
    map_path = shared_data / "maps" / "aspire_70S" / "clean70SRibosome_vol_65p.mrc"
    runs = []
    for n in sizes:
        star = tmp_path / f"sim{n}" / "particles.star"
        runs += [(simulation(map_path, n, "0.05"), star.parent), (["+job=reconstruct", f"data.particles={star}", "job.mask_diameter_angstrom=300"], tmp_path / f"rec{n}")]
    assert one_process_runs(runs) == [None] * len(runs)
    return [float(read_star(tmp_path / f"rec{n}" / "run_fsc.star")["general"]["rlnFinalResolution"]) for n in sizes]


def test_resolution_improves_with_more_particles(shared_data: Path, tmp_path: Path) -> None:
    few, many = half_map_resolutions(shared_data, tmp_path, (300, 3000))
    assert many < few - 2.0


def test_reconstruction_too_large_for_memory_names_a_resolution_that_fits(monkeypatch: pytest.MonkeyPatch) -> None:
    # on a device of 1 GB a 128-px box fits at 64 px but not at its Nyquist: the error comes
    # before any image is read and names a resolution limit whose crop fits
    from cryotorch import runtime
    from cryotorch.errors import InputError
    from cryotorch.jobs.reconstruct import ReconstructJob

    from conftest import memory_context

    monkeypatch.setattr(runtime, "device_memory_bytes", lambda device: 1e9)
    context = memory_context(device=torch.device("cpu"), padding_factor=2, sum_tree_leaves=8, particles="particles.star", memory_budget_bytes=2**24)
    job = ReconstructJob(name="reconstruct")
    job.check_memory(context, 1000, 64, 2.0)
    with pytest.raises(InputError, match=r"particles.star: reconstruct at a box of 128 px to 4 Å needs about 1.01 GB for its sums and maps, more than the 0.779 GB this process may use \(80 % of this device's 1 GB, less") as error:
        job.check_memory(context, 1000, 128, 2.0)
    limit = float(str(error.value).split("job.max_resolution_angstrom=")[1].split()[0])
    assert 4 < limit < 8
    job.max_resolution_angstrom = limit
    job.check_memory(context, 1000, 128, 2.0)
    job.max_resolution_angstrom = limit - 0.2
    with pytest.raises(InputError):
        job.check_memory(context, 1000, 128, 2.0)
    # 10,000 preloaded images of 128² px (0.66 GB) leave that limit too little room
    job.max_resolution_angstrom = limit
    context.preload = True
    with pytest.raises(InputError, match=r"less 0.655 GB of images held by data.preload=true"):
        job.check_memory(context, 10_000, 128, 2.0)


@pytest.mark.slow
def test_three_processes_reconstruct_what_one_does(tmp_path: Path) -> None:
    # three ranks do not split the 8-leaf summation tree into subtrees: their sums are
    # all-reduced (complex ones as real pairs) and agree with one process to rounding
    train("+job=simulate", "job.n_particles=200", "job.phantom_box_size=24", f"hydra.run.dir={tmp_path / 'sim'}")
    star = tmp_path / "sim" / "particles.star"
    train("+job=reconstruct", f"data.particles={star}", "compute.memory_budget_gb=0.0002", f"hydra.run.dir={tmp_path / 'one'}")
    torchrun(3, "+job=reconstruct", f"data.particles={star}", "compute.memory_budget_gb=0.0002", f"hydra.run.dir={tmp_path / 'three'}")
    for name in ("run_half1_class001_unfil.mrc", "run_half2_class001_unfil.mrc", "run_class001.mrc"):
        ours, theirs = (np.array(read_mrc(tmp_path / folder / name).data) for folder in ("three", "one"))
        np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-5 * float(np.abs(theirs).max()))


@pytest.mark.slow
def test_resolution_improves_from_1k_to_10k_particles(shared_data: Path, tmp_path: Path) -> None:
    few, many = half_map_resolutions(shared_data, tmp_path, (1000, 10000))
    assert many < few - 1.5


def test_symmetry_and_multirun(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    train("-m", "+job=simulate", "job.n_particles=20", "job.phantom_box_size=24", "job.snr=0.1,1.0", f"hydra.sweep.dir={sweep}")
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == ["0", "1"]
    out = tmp_path / "rec"
    train("+job=reconstruct", f"data.particles={sweep / '1' / 'particles.star'}", "model.symmetry=C2", f"hydra.run.dir={out}")
    assert (out / "run_class001.mrc").is_file()


def test_mask_create_makes_a_soft_mask_around_the_map(tmp_path: Path) -> None:
    # a phantom at 4 Å: the mask covers it, grown by 3 voxels, and falls to 0 over 3 more
    box, pixel = 40, 4.0
    phantom = blob_phantom(box, pixel, seed=2)
    map_path, no_pixel = tmp_path / "map.mrc", tmp_path / "no_pixel.mrc"
    write_mrc(map_path, phantom, pixel)
    write_mrc(no_pixel, phantom, 0.0)
    common = ["+job=mask_create", f"job.map={map_path}"]
    made, *bad = one_process_runs([
        ([*common, "job.threshold=0.05"], tmp_path / "mask"),
        ([*common, "job.threshold=5"], tmp_path / "b"),
        (common, tmp_path / "c"),
        (["+job=mask_create", f"job.map={no_pixel}", "job.threshold=0.05"], tmp_path / "d"),
        (["+job=mask_create", f"job.map={tmp_path / 'nope.mrc'}", "job.threshold=0.05"], tmp_path / "e"),
        ([*common, "job.threshold=0.05", "job.lowpass_A=5"], tmp_path / "f"),
    ])
    assert made is None
    written = read_mrc(tmp_path / "mask" / "mask.mrc")
    mask = torch.as_tensor(np.array(written.data))
    assert written.voxel_size_angstrom[0] == pytest.approx(pixel) and mask.shape == (box,) * 3
    assert float(mask.min()) == 0.0 and float(mask.max()) == 1.0
    # every voxel of the particle's density (as low-passed for the threshold) is inside
    smooth = irfft3_centered(lowpass_filter_3d(rfft3_centered(phantom), 15.0, pixel), box)
    assert bool((mask[smooth >= 0.05] == 1).all())
    # and nothing farther than extension + soft edge from it
    distance = distance_to_region(smooth >= 0.05, 7.0)
    assert bool((mask[distance >= 6.0] == 0).all()) and bool((mask[distance < 5.99] > 0).all())
    phrases = [
        "job.threshold=5 leaves no voxel on one side; the map's values span",
        "mask_create needs a binarisation threshold: set job.threshold",
        "its header holds no voxel size; set job.pixel_size_angstrom",
        "nope.mrc",
        "job.lowpass_A=5 Å is finer than the map's Nyquist (8 Å)",
    ]
    for message, phrase in zip(bad, phrases, strict=True):
        assert message is not None and phrase in message, (phrase, message)


def test_bad_input_fails_with_a_clear_message(tmp_path: Path) -> None:
    missing = train("+job=reconstruct", f"data.particles={tmp_path / 'nope.star'}", f"hydra.run.dir={tmp_path / 'a'}", check=False)
    assert missing.returncode == 2
    assert "nope.star" in missing.stderr + missing.stdout
    star = tmp_path / "c" / "particles.star"
    no_job, simulated, *bad = one_process_runs([
        ([], tmp_path / "b"),
        (["+job=simulate", "job.n_particles=4", "job.phantom_box_size=16"], tmp_path / "c"),
        (["+job=reconstruct", f"data.particles={star}", "model.symmetry=X7"], tmp_path / "d"),
        (["+job=reconstruct", f"data.particles={star}", "job.max_resolution_angstrom=0"], tmp_path / "e"),
        (["+job=reconstruct", f"data.particles={star}", "compute.memory_budget_gb=-1"], tmp_path / "f"),
        (["+job=reconstruct", f"data.particles={star}", "compute.accelerator=tpu"], tmp_path / "g"),
        (["+job=reconstruct", f"data.particles={star}", "compute.accelerator=cuda", "compute.devices=64"], tmp_path / "h"),
        (["+job=reconstruct", f"data.particles={star}", "compute.sum_tree_leaves=6"], tmp_path / "i"),
        (["+job=reconstruct", f"data.particles={star}", "job.tau2_fudge=0"], tmp_path / "j"),
        (["+job=reconstruct", f"data.particles={star}", "job.mask_diameter_angstrom=-1"], tmp_path / "k"),
        (["+job=reconstruct", f"data.particles={star}", "job.wiener_constant=-1"], tmp_path / "l"),
        (["+job=reconstruct", f"data.particles={star}", "job.fsc_threshold=1"], tmp_path / "m"),
        (["+job=reconstruct"], tmp_path / "n"),
        (["+job=select", "job.classes=[1]"], tmp_path / "o"),
    ])
    assert no_job is not None and "+job=" in no_job
    assert simulated is None and star.exists()
    # without a GPU cuda is refused as such; with one, 64 GPUs are more than it has
    no_gpus = "compute.accelerator=cuda, but PyTorch" if not torch.cuda.is_available() else "compute.devices=64 asks for more GPUs than the"
    phrases = ["X7", "job.max_resolution_angstrom=0 must be positive", "compute.memory_budget_gb=-1", "compute.accelerator=tpu is not one of auto, cpu, cuda", no_gpus,
               "compute.sum_tree_leaves=6 must be a power of two", "job.tau2_fudge must be positive, got 0",
               "job.mask_diameter_angstrom=-1 must be positive (Å), or null for none", "job.wiener_constant=-1 must be ≥ 0",
               "job.fsc_threshold=1 must lie in (0, 1), e.g. 0.143", "reconstruct needs particles: set data.particles=",
               "select needs a classification's data STAR: set data.particles="]
    for message, phrase in zip(bad, phrases, strict=True):
        assert message is not None and phrase in message


def test_two_processes_and_two_nodes_give_the_same_maps_as_one(tmp_path: Path) -> None:
    # the batches are the leaves of a summation tree shared out among the processes
    # (tree_leaves): with one thread each, two processes write one process's maps bit for
    # bit; a tiny budget makes batches of a few particles, so that every leaf holds some
    train("+job=simulate", "job.n_particles=200", "job.phantom_box_size=24", f"hydra.run.dir={tmp_path / 'sim'}")
    star = tmp_path / "sim" / "particles.star"
    train("+job=reconstruct", f"data.particles={star}", "compute.memory_budget_gb=0.0002", "compute.num_threads=1", f"hydra.run.dir={tmp_path / 'one'}")
    torchrun(2, "+job=reconstruct", f"data.particles={star}", "compute.memory_budget_gb=0.0002", f"hydra.run.dir={tmp_path / 'two'}")
    # two nodes of one process each (torchrun --nnodes=2, both on this machine): torchrun
    # leaves a node's single process all the cores, so it is given one thread as above
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    logs = [tmp_path / f"node{rank}.log" for rank in (0, 1)]
    nodes = []
    for rank, log in enumerate(logs):
        with log.open("w") as output:
            nodes.append(subprocess.Popen(
                [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1", f"--node_rank={rank}", "--master_addr=127.0.0.1",
                 f"--master_port={port}", "-m", "cryotorch.train", "+job=reconstruct", f"data.particles={star}", "compute.memory_budget_gb=0.0002",
                 "compute.num_threads=1", f"hydra.run.dir={tmp_path / 'nodes'}"],
                cwd=REPO, stdout=output, stderr=subprocess.STDOUT,
            ))
    try:
        codes = [node.wait(timeout=600) for node in nodes]
    finally:  # a node left waiting for the other is stopped, with its process
        for node in nodes:
            if node.poll() is None:
                node.terminate()
                node.wait(timeout=60)
    assert codes == [0, 0], "\n".join(log.read_text()[-3000:] for log in logs)
    for name in ("run_class001.mrc", "run_half1_class001_unfil.mrc", "run_half2_class001_unfil.mrc"):
        for layout in ("two", "nodes"):
            np.testing.assert_array_equal(read_mrc(tmp_path / layout / name).data, read_mrc(tmp_path / "one" / name).data)
