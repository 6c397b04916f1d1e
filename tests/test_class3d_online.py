"""class3d_online end to end on small simulated data with known classes and poses."""

from __future__ import annotations

import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from cryotorch.data.particles import half_set_labels
from cryotorch.data.phantom import blob_phantom
from cryotorch.em.estep import class_ess, class_temperature
from cryotorch.errors import InputError
from cryotorch.io import read_mrc, read_particles, write_mrc, write_particles
from cryotorch import runtime
from cryotorch.jobs import class3d_online
from cryotorch.jobs.class3d_online import kmeans
from cryotorch.ops.fourier import fourier_resample

from conftest import memory_context
from test_class3d import accuracy
from test_jobs import REPO, one_process_runs, torchrun, train

BOX, PIXEL = 32, 6.0


@pytest.fixture(scope="module")
def three_class_data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("class3d_online")
    maps = [blob_phantom(BOX, PIXEL, seed=seed) for seed in (21, 22, 23)]
    for index, volume in enumerate(maps):
        write_mrc(folder / f"map{index}.mrc", volume, PIXEL)
    sim = folder / "sim"
    train(
        "+job=simulate", f"job.maps=[{','.join(str(folder / f'map{i}.mrc') for i in range(3))}]", "job.n_particles=600",
        "job.snr=0.5", "job.origin_sigma_angstrom=4", "job.defocus_min_angstrom=10000", "job.defocus_max_angstrom=20000",
        f"hydra.run.dir={sim}",
    )
    return {"folder": folder, "particles": sim / "particles.star", "truth": sim / "truth.star"}


def online_overrides(data: dict[str, Path], *extra: str) -> list[str]:
    return [
        "+job=class3d_online", f"data.particles={data['particles']}", "job.K=3", "job.n_online_epochs=1", "job.batch_size_per_class=60",
        "job.init_particles_per_class=60", "job.max_full_iterations=3", *extra,
    ]


def classify(data: dict[str, Path], out: Path, *extra: str) -> None:
    train(*online_overrides(data, *extra), f"hydra.run.dir={out}")


def last_iteration(out: Path) -> int:
    return max(int(path.name[6:9]) for path in out.glob("run_it*_data.star"))


def test_online_em_separates_the_classes_from_random_subsets(three_class_data: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "online"
    classify(three_class_data, out)
    last = last_iteration(out)
    truth = read_particles(three_class_data["truth"]).class_number
    result = read_particles(out / f"run_it{last:03d}_data.star").class_number
    assert accuracy(truth, result) >= 0.95
    for name in (f"run_it{last:03d}_model.star", f"run_it{last:03d}_optimiser.star", f"run_it{last:03d}_class003.mrc",
                 f"run_it{last:03d}_class_ess.png", f"run_it{last:03d}_class_sizes.png"):
        assert (out / name).is_file(), name
    per_class = [read_particles(out / f"run_class{k:03d}_particles.star") for k in (1, 2, 3)]
    assert sum(len(table) for table in per_class) == len(truth)
    assert all((table.class_number == k).all() for k, table in zip((1, 2, 3), per_class))
    # clear-cut data: particles settle in one class each
    ess = torch.load(out / "run_checkpoint.pt", weights_only=True)["particles"]["class_ess"]
    assert float(ess.mean()) < 1.2


def test_pca_seeds_hard_assignment_focus_mask_crop_and_noise_background(three_class_data: dict[str, Path], tmp_path: Path) -> None:
    focus = three_class_data["folder"] / "focus.mrc"
    write_mrc(focus, torch.ones(BOX, BOX, BOX), PIXEL)
    out = tmp_path / "pca"
    # the particles' solvent area filled with noise (at the cropped box), not zeros
    classify(three_class_data, out, "job.init_mode=pca", "job.pca_n_reconstructions=9", "job.force_hard=true",
             f"job.focus_mask={focus}", "job.target_resolution_A=18", "job.zero_mask=false")
    last = last_iteration(out)
    truth = read_particles(three_class_data["truth"]).class_number
    assert accuracy(truth, read_particles(out / f"run_it{last:03d}_data.star").class_number) >= 0.9
    volume = read_mrc(out / f"run_it{last:03d}_class001.mrc")
    assert volume.data.shape == (22, 22, 22)  # 2·⌈32·6/18⌉: Nyquist at 18 Å or finer
    # the default particle mask is named with this job's keys
    assert "(job.mask_diameter_A and job.solvent_mask not given)" in (out / "train.log").read_text()
    assert volume.voxel_size_angstrom[0] == pytest.approx(PIXEL * 32 / 22, rel=1e-3)


# one thread, as torchrun gives each of its processes: two processes write the same bits
RESUMABLE = ["job.n_online_epochs=2", "job.max_full_iterations=1", "job.switch_threshold=null", "job.rms_change_threshold=null", "compute.num_threads=1"]


@pytest.fixture(scope="module")
def uninterrupted(three_class_data: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One process, two online epochs and one full-batch iteration, never stopped."""
    out = tmp_path_factory.mktemp("online_whole")
    classify(three_class_data, out, *RESUMABLE)
    return out


def test_a_killed_online_run_resumes_to_the_same_result(three_class_data: dict[str, Path], uninterrupted: Path, tmp_path: Path) -> None:
    resumed = tmp_path / "resumed"
    command = [sys.executable, "-m", "cryotorch.train", "+job=class3d_online", f"data.particles={three_class_data['particles']}", "job.K=3",
               "job.batch_size_per_class=60", "job.init_particles_per_class=60", *RESUMABLE, f"hydra.run.dir={resumed}"]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 600
    while not (resumed / "run_it001_class_sizes.png").exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    process.kill()  # SIGKILL, somewhere in the second epoch
    process.wait()
    classify(three_class_data, resumed, *RESUMABLE)
    a, b = (read_particles(out / "run_it003_data.star").class_number for out in (uninterrupted, resumed))
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(read_mrc(resumed / "run_it003_class002.mrc").data, read_mrc(uninterrupted / "run_it003_class002.mrc").data)
    # its running sums are in its checkpoint only: an earlier iteration's files are not enough
    earlier = tmp_path / "earlier"
    [message] = one_process_runs([(online_overrides(three_class_data, *RESUMABLE, f"job.continue_from={uninterrupted / 'run_it001_data.star'}"), earlier)])
    assert message is not None and "continues from its checkpoint only" in message and f"job.continue_from={uninterrupted} to go on from its iteration 3" in message


def test_a_converged_run_goes_on_under_other_stopping_criteria(three_class_data: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "converged"
    lenient = ["job.n_online_epochs=2", "job.max_full_iterations=2", "job.switch_threshold=1.0", "job.rms_change_threshold=10"]
    # the first converges in its first full-batch iteration (3), and the same command then finds it finished
    assert one_process_runs([(online_overrides(three_class_data, *lenient), out)] * 2) == [None, None]
    assert (out / "run_it003_data.star").is_file() and not (out / "run_it004_data.star").exists()
    classify(three_class_data, out, "job.n_online_epochs=2", "job.max_full_iterations=2", "job.switch_threshold=null", "job.rms_change_threshold=null")
    assert (out / "run_it004_data.star").is_file()


def test_two_processes_write_the_same_bits_as_one(three_class_data: dict[str, Path], uninterrupted: Path, tmp_path: Path) -> None:
    # every minibatch (and the consensus and initial maps) is cut into the same batches and
    # leaves of the summation tree, whatever the number of processes
    two = tmp_path / "two"
    torchrun(
        2, "+job=class3d_online", f"data.particles={three_class_data['particles']}", "job.K=3", "job.batch_size_per_class=60",
        "job.init_particles_per_class=60", *RESUMABLE, f"hydra.run.dir={two}",
    )
    for iteration in (1, 3):
        ones, twos = (read_particles(out / f"run_it{iteration:03d}_data.star") for out in (uninterrupted, two))
        np.testing.assert_array_equal(twos.class_number, ones.class_number)
        for k in (1, 2, 3):
            np.testing.assert_array_equal(read_mrc(two / f"run_it{iteration:03d}_class00{k}.mrc").data, read_mrc(uninterrupted / f"run_it{iteration:03d}_class00{k}.mrc").data)


def test_given_class_maps_seed_their_classes(three_class_data: dict[str, Path], tmp_path: Path) -> None:
    # the true maps, in reverse order and on another grey scale, without per-particle scales:
    # class k holds the particles of the k-th map given
    folder, out = three_class_data["folder"], tmp_path / "given"
    given = [folder / f"map{index}.mrc" for index in (2, 1, 0)]
    for path in given:
        write_mrc(tmp_path / path.name, 5.0 * torch.as_tensor(np.array(read_mrc(path).data)), PIXEL)
    maps = ",".join(str(tmp_path / path.name) for path in given)
    assert one_process_runs([(online_overrides(three_class_data, f"job.reference=[{maps}]", "job.per_particle_scale=none", "job.n_online_epochs=0", "job.max_full_iterations=2"), out)]) == [None]
    truth = read_particles(three_class_data["truth"]).class_number
    assert float(np.mean(read_particles(out / "run_it002_data.star").class_number == 4 - truth)) >= 0.95
    extra = torch.load(out / "run_checkpoint.pt", weights_only=True)["extra"]
    assert torch.equal(extra["particle_scale"], torch.ones(len(truth)))


def test_bad_options_are_reported(three_class_data: dict[str, Path], tmp_path: Path) -> None:
    result = train("+job=class3d_online", f"data.particles={three_class_data['particles']}", "job.init_mode=magic", f"hydra.run.dir={tmp_path / 'a'}", check=False)
    assert result.returncode == 2 and "job.init_mode" in result.stderr + result.stdout
    no_ctf = tmp_path / "no_ctf.star"
    write_particles(no_ctf, replace(read_particles(three_class_data["particles"]), has_ctf=False))
    cases = [
        ("job.target_resolution_A=5", ["Nyquist"]),
        # a STAR file carries no per-particle scale to take as input
        ("job.per_particle_scale=input", ["particles.star", "alignments3D/alpha"]),
        # it classifies at the given poses: asking it to align is an error, not silently ignored
        ("sampling.align=true", ["sampling.align=false"]),
        ("job.mask_diameter_A=5000", ["job.mask_diameter_A=5000 Å does not fit the particles' box"]),
        ("job.n_online_epochs=-1", ["job.n_online_epochs (-1) and job.max_full_iterations (3) must be ≥ 0"]),
        (f"job.reference=[{three_class_data['folder'] / 'map0.mrc'}]", ["job.reference lists 1 maps; class3d_online needs one map per class (job.K=3)"]),
        ("job.per_particle_scale=fitted", ["job.per_particle_scale must be 'consensus', 'input' or 'none', got 'fitted'"]),
        ("job.learning_rate=0", ["job.learning_rate must lie in (0, 1]"]),
        ("job.class_similarity=2", ["job.class_similarity must lie in [0, 1]"]),
        ("job.pca_n_reconstructions=2", ["job.pca_n_reconstructions ≥ job.K"]),
        (f"data.particles={no_ctf}", [f"{no_ctf}: the particles have no CTF parameters", "set job.ctf=false"]),
        ("job.scale_range=[1.5,2]", ["job.scale_range must be [low, high] with 0 < low ≤ 1 ≤ high, got [1.5, 2]"]),
        # sums that no machine holds are refused before anything is read
        ("job.K=1000000000 job.pca_n_reconstructions=1000000000", ["class3d_online with job.K=1000000000 at a box of 32 keeps about", "use fewer classes"]),
    ]
    messages = one_process_runs([(online_overrides(three_class_data, *override.split()), tmp_path / str(number)) for number, (override, _) in enumerate(cases)])
    for (override, phrases), message in zip(cases, messages, strict=True):
        assert message is not None and all(phrase in message for phrase in phrases), override


def test_sums_that_do_not_fit_name_a_target_resolution_that_does(monkeypatch: pytest.MonkeyPatch) -> None:
    # on a device of 1 GB, 3 classes fit at a box of 64 but not of 96 (480 Å): the resolution
    # named gives a box whose sums fit
    monkeypatch.setattr(runtime, "device_memory_bytes", lambda device: 1e9)
    job = class3d_online.OnlineClass3DJob(name="class3d_online", K=3)
    job.table, job.full_box = np.zeros(1000), 96
    context = memory_context(padding_factor=2, device=torch.device("cpu"), sum_tree_leaves=8, memory_budget_bytes=2**24)
    job.check_sums_fit(64, 320.0, context)
    with pytest.raises(
        InputError,
        match=r"job.K=3 at a box of 96 keeps about 1.74 GB of sums, more than the 0.779 GB this process may use \(80 % of this device's 1 GB, less 0.021 GB for "
        r"the working arrays of compute.memory_budget_gb\); set job.target_resolution_A=13.4 or coarser",
    ) as error:
        job.check_sums_fit(96, 480.0, context)
    target = float(str(error.value).split("job.target_resolution_A=")[1].split()[0])
    job.target_resolution_A = target
    assert job.working_box(96, 5.0, context) == 72
    job.check_sums_fit(72, 480.0, context)
    # the working arrays of a larger budget leave less
    context.memory_budget_bytes = 2**28
    with pytest.raises(InputError, match="at a box of 64 keeps about"):
        job.check_sums_fit(64, 320.0, context)
    # two processes on one CPU node each get half of it
    context.memory_budget_bytes = 2**24
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    with pytest.raises(InputError, match=r"at a box of 64 keeps about 0.518 GB of sums, more than the 0.379 GB this process may use \(80 % of this device's 1 GB, shared by 2 processes"):
        job.check_sums_fit(64, 320.0, context)


def test_class_temperature_reaches_the_target_ess() -> None:
    logits = torch.randn(200, 8, generator=torch.Generator().manual_seed(0)) * 20
    plain = float(class_ess(torch.softmax(logits, -1)).mean())
    assert class_temperature(logits, plain / 2) == 1.0  # already broad enough
    tau = class_temperature(logits, 4.0)
    assert tau < 1 and float(class_ess(torch.softmax(tau * logits, -1)).mean()) == pytest.approx(4.0, rel=1e-3)


def test_kmeans_finds_separated_clusters() -> None:
    generator = torch.Generator().manual_seed(1)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    points = torch.cat([centre + torch.randn(30, 2, generator=generator) for centre in centres])
    labels = kmeans(points, 3, np.random.default_rng(0))
    truth = np.repeat([0, 1, 2], 30)
    assert accuracy(truth, labels.numpy()) == 1.0


def test_fourier_crop_keeps_band_limited_values() -> None:
    coordinate = torch.arange(64) - 32
    y, x = torch.meshgrid(coordinate * 2.0, coordinate * 2.0, indexing="ij")
    image = torch.exp(-(x**2 + y**2) / (2 * 20.0**2))
    coarse = torch.arange(32) - 16
    y2, x2 = torch.meshgrid(coarse * 4.0, coarse * 4.0, indexing="ij")
    torch.testing.assert_close(fourier_resample(image[None], 32, ndim=2)[0], torch.exp(-(x2**2 + y2**2) / (2 * 20.0**2)), atol=1e-3, rtol=0)
    z3, y3, x3 = torch.meshgrid(coarse * 4.0, coarse * 4.0, coarse * 4.0, indexing="ij")
    fine = torch.meshgrid(coordinate * 2.0, coordinate * 2.0, coordinate * 2.0, indexing="ij")
    volume = torch.exp(-((fine[2] - 5) ** 2 + fine[1] ** 2 + fine[0] ** 2) / (2 * 15.0**2))
    torch.testing.assert_close(fourier_resample(volume, 32), torch.exp(-((x3 - 5) ** 2 + y3**2 + z3**2) / (2 * 15.0**2)), atol=1e-3, rtol=0)
    with pytest.raises(ValueError):
        fourier_resample(image[None], 31, ndim=2)


def _rotation_vectors(matrices: torch.Tensor) -> np.ndarray:
    """``(N, 3)`` axis-angle vectors (radians) of rotation matrices, via unit quaternions."""
    m = matrices.double()
    trace = m[:, 0, 0] + m[:, 1, 1] + m[:, 2, 2]
    w = 0.5 * (1 + trace).clamp(min=0).sqrt()
    xyz = 0.5 * torch.stack([(1 + m[:, 0, 0] - m[:, 1, 1] - m[:, 2, 2]), (1 - m[:, 0, 0] + m[:, 1, 1] - m[:, 2, 2]), (1 - m[:, 0, 0] - m[:, 1, 1] + m[:, 2, 2])], -1).clamp(min=0).sqrt()
    signs = torch.sign(torch.stack([m[:, 2, 1] - m[:, 1, 2], m[:, 0, 2] - m[:, 2, 0], m[:, 1, 0] - m[:, 0, 1]], -1))
    xyz = xyz * torch.where(signs == 0, 1.0, signs)
    norm = xyz.norm(dim=-1, keepdim=True)
    angle = 2 * torch.atan2(norm, w[:, None])
    return (angle * xyz / norm.clamp(min=1e-12)).numpy()


def test_a_posed_cryosparc_export_is_classified(three_class_data: dict[str, Path], tmp_path: Path) -> None:
    """The particles as a cryoSPARC refinement export (.cs with alignments3D poses, shifts,
    half sets and per-particle scales), classified with the export's scales."""
    from cryotorch.conventions import euler_deg_to_matrix
    from cryotorch.io._cryosparc import cryosparc_pose_to_euler_deg

    table = read_particles(three_class_data["particles"])
    n = len(table)
    stack = Path(table.stack_paths[0])
    assert all(Path(p) == stack for p in table.stack_paths)
    relion = euler_deg_to_matrix(torch.as_tensor(table.euler_deg))
    poses = _rotation_vectors(relion.transpose(-1, -2))  # cryoSPARC rotates by Aᵀ
    torch.testing.assert_close(euler_deg_to_matrix(torch.as_tensor(cryosparc_pose_to_euler_deg(poses))), relion)
    records = np.zeros(n, dtype=[
        ("uid", "<u8"), ("blob/path", "S64"), ("blob/idx", "<u4"), ("blob/psize_A", "<f4"), ("blob/shape", "<u4", (2,)),
        ("ctf/accel_kv", "<f4"), ("ctf/cs_mm", "<f4"), ("ctf/amp_contrast", "<f4"), ("ctf/df1_A", "<f4"), ("ctf/df2_A", "<f4"),
        ("ctf/df_angle_rad", "<f4"), ("ctf/phase_shift_rad", "<f4"), ("alignments3D/pose", "<f4", (3,)), ("alignments3D/shift", "<f4", (2,)),
        ("alignments3D/split", "<u4"), ("alignments3D/alpha", "<f4"),
    ])
    records["uid"] = np.arange(n)
    records["blob/path"] = f"J7/extract/{stack.name}".encode()  # project-relative; found beside the .cs
    records["blob/idx"] = table.stack_indices
    records["blob/psize_A"] = table.pixel_size_angstrom
    records["blob/shape"] = np.stack([table.box_size_px, table.box_size_px], -1)
    for field, values in (("ctf/accel_kv", table.voltage_kv), ("ctf/cs_mm", table.spherical_aberration_mm), ("ctf/amp_contrast", table.amplitude_contrast),
                          ("ctf/df1_A", table.defocus_u_angstrom), ("ctf/df2_A", table.defocus_v_angstrom),
                          ("ctf/df_angle_rad", np.deg2rad(table.defocus_angle_deg)), ("ctf/phase_shift_rad", np.deg2rad(table.phase_shift_deg))):
        records[field] = values
    records["alignments3D/pose"] = poses
    records["alignments3D/shift"] = np.asarray(table.origin_angstrom) / np.asarray(table.pixel_size_angstrom)[:, None]
    records["alignments3D/split"] = half_set_labels(table, 0) - 1
    alpha = np.random.default_rng(5).uniform(0.9, 1.1, n).astype(np.float32)
    records["alignments3D/alpha"] = alpha
    export = stack.parent / "P3_J9_particles.cs"
    with open(export, "wb") as handle:
        np.save(handle, records)
    out = tmp_path / "cs"
    train("+job=class3d_online", f"data.particles={export}", "job.K=3", "job.batch_size_per_class=60", "job.init_particles_per_class=60",
          "job.per_particle_scale=input", *RESUMABLE, f"hydra.run.dir={out}")
    from_cs = read_particles(out / "run_it003_data.star").class_number
    truth = read_particles(three_class_data["truth"]).class_number
    assert accuracy(truth, from_cs) >= 0.95
    extra = torch.load(out / "run_checkpoint.pt", weights_only=True)["extra"]
    np.testing.assert_allclose(extra["particle_scale"].numpy(), alpha)
