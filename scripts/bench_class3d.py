r"""class3d benchmark: accuracy against the oracle, and seconds per iteration.

Builds the benchmark data set with ``+job=simulate`` from the 70S ribosome map (5 Å/px,
box 64): class A = the map, class B = the map with a compact region holding ~10 % of its
mass removed, noise-only junk; realistic defocus 0.8–2.5 µm. Then runs

- the oracle: the same E-step with the TRUE maps (A, B and an empty map for junk) held
  fixed at the true poses, three iterations so that the noise model is learnt, whose
  class accuracy is the best this likelihood can reach on this data;
- class3d from a 40 Å low-passed consensus reconstruction, without and/or with alignment;
- with ``--aligned-oracle``, the aligned oracle: the true maps held fixed, searched with the
  same alignment schedule as class3d (the best this sampling can do without knowing the
  poses),

and prints oracle accuracy, achieved accuracy (labels matched), the adjusted Rand index,
the share of the junk in one class, the resolution at which each real class's map (the class
holding most of its particles) keeps an FSC of 0.5 with its true map and their FSC at 20 Å
(twice the Nyquist period), with alignment the median angle between the real particles' true
and found orientations, and seconds per iteration read from the run logs, with the mean
seconds of each phase of an iteration (coarse and fine passes, back-projection, M-step,
outputs, ...). With
``--continue-iterations`` the aligned run is then continued in its folder, as RELION runs are
continued, with the settings of ``--continue-overrides``, and reported again.

    python scripts/bench_class3d.py --map ../shared/data/maps/aspire_70S/clean70SRibosome_vol_65p.mrc \
        --particles 4000 --snr 0.05 --iterations 25 --modes noalign align \
        [--class3d-overrides sampling.final_local_iterations=5] [--aligned-oracle]

The best aligned maps of docs/benchmarks.md (local searches at 1.875°, then 0.9375°):
``--iterations 25 --modes align --class3d-overrides sampling.final_local_iterations=5
sampling.final_angular_step_deg=1.875 sampling.final_offset_step_px=0.25
sampling.final_offset_range_px=1 job.tau2_estimate=posterior job.mask_diameter_A=250
--continue-iterations 2 --continue-overrides sampling.angular_step_deg=0.9375
sampling.local_search_deg=5 sampling.offset_step_px=0.25 sampling.offset_range_px=1
job.tau2_estimate=posterior job.mask_diameter_A=250``.

With ``--maps-only --workdir DIR`` it writes the true maps into DIR and stops, for running the
benchmark set's jobs by hand (README, "The benchmark set, step by step").

The low-SNR schedule of docs/benchmarks.md (E-step limited to 30 Å in the first iterations):
``--iterations 36 --class3d-overrides job.highres_limit_estep_A=30 job.highres_limit_estep_iterations=20``.
"""

from __future__ import annotations

import argparse
import itertools
import re
import subprocess
import sys
import tempfile
from datetime import datetime
from pathlib import Path

import numpy as np
import torch

from cryotorch.conventions import rfft3_centered
from cryotorch.io import read_mrc, read_particles, write_mrc
from cryotorch.ops.filters import crop_or_pad, lowpass_map
from cryotorch.ops.fsc import fourier_shell_correlation, resolution_at_threshold
from cryotorch.monitor.timing import device_description
from cryotorch.ops.healpix import rotation_angle_deg
from cryotorch.runtime import start_thread_pool

PIXEL, BOX = 5.0, 64


def train(*overrides: str) -> None:
    subprocess.run([sys.executable, "-m", "cryotorch.train", *overrides], check=True, capture_output=True, text=True)


def load_map(map_path: Path) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """The map in the benchmark box, its positive part, the voxel coordinates ``(x, y, z)``
    from the centre, and the centre of mass ``(3,)`` of the positive part."""
    volume = crop_or_pad(torch.as_tensor(np.array(read_mrc(map_path).data)), BOX)
    positive = volume.clamp(min=0)
    coordinate = torch.arange(BOX, dtype=torch.float32) - BOX // 2
    z, y, x = torch.meshgrid(coordinate, coordinate, coordinate, indexing="ij")
    centre_of_mass = torch.stack([(positive * x).sum(), (positive * y).sum(), (positive * z).sum()]) / positive.sum()
    return volume, positive, (x, y, z), centre_of_mass


def make_maps(map_path: Path, folder: Path) -> tuple[Path, Path, Path]:
    """Class A, class B (a ~10 %-of-mass region removed) and an empty map for the junk."""
    volume, positive, (x, y, z), centre_of_mass = load_map(map_path)
    total = positive.sum()
    centre = centre_of_mass + torch.tensor([10.0, 5.0, 0.0])
    distance = ((x - centre[0]) ** 2 + (y - centre[1]) ** 2 + (z - centre[2]) ** 2).sqrt()
    radius = next(r for r in range(2, BOX) if float(positive[distance < r].sum() / total) >= 0.1)
    class_b = volume.clone()
    class_b[distance < radius] = 0
    paths = folder / "classA.mrc", folder / "classB.mrc", folder / "junk.mrc"
    write_mrc(paths[0], volume, PIXEL)
    write_mrc(paths[1], class_b, PIXEL)
    write_mrc(paths[2], torch.zeros_like(volume), PIXEL)
    return paths


def simulate_set(maps: list[Path], folder: Path, n_particles: int, junk: float, snr: float) -> tuple[Path, np.ndarray]:
    """The benchmark's particles (one class per map, junk, realistic defocus, origins σ = 5 Å)
    in ``folder/sim``; returns the particle STAR and the true classes."""
    train("+job=simulate", f"job.maps=[{','.join(str(p) for p in maps)}]", f"job.n_particles={n_particles}", f"job.junk_fraction={junk}",
          f"job.snr={snr}", "job.origin_sigma_angstrom=5", "job.defocus_min_angstrom=8000", "job.defocus_max_angstrom=25000",
          f"hydra.run.dir={folder / 'sim'}")
    return folder / "sim" / "particles.star", read_particles(folder / "sim" / "truth.star").class_number


def oracle_classes(particles: Path, true_maps: list[Path], folder: Path) -> np.ndarray:
    """Classes from the E-step with the true maps held fixed at the true poses (3 iterations,
    so that noise, scales and class weights are learnt), written to ``folder/oracle``."""
    train("+job=class3d", f"data.particles={particles}", f"job.reference=[{','.join(str(p) for p in true_maps)}]", f"job.K={len(true_maps)}",
          "job.n_iterations=3", "job.ini_high_A=null", "job.update_references=false", "sampling.align=false", f"hydra.run.dir={folder / 'oracle'}")
    return read_particles(folder / "oracle" / "run_it003_data.star").class_number


def matched_accuracy(truth: np.ndarray, assigned: np.ndarray) -> float:
    """Fraction of particles in their true class under the best one-to-one matching of labels
    (all matchings for up to 8 labels, else greedy on the confusion matrix)."""
    _, truth_index = np.unique(truth, return_inverse=True)
    _, assigned_index = np.unique(assigned, return_inverse=True)
    size = max(truth_index.max(), assigned_index.max()) + 1
    confusion = np.zeros((size, size))
    np.add.at(confusion, (assigned_index, truth_index), 1)
    if size <= 8:
        best = max(confusion[np.arange(size), list(perm)].sum() for perm in itertools.permutations(range(size)))
    else:
        best, table = 0.0, confusion.copy()
        for _ in range(size):
            row, column = np.unravel_index(table.argmax(), table.shape)
            best += table[row, column]
            table[row, :], table[:, column] = -1, -1
    return float(best / len(truth))


def adjusted_rand_index(truth: np.ndarray, assigned: np.ndarray) -> float:
    _, truth_index = np.unique(truth, return_inverse=True)
    _, assigned_index = np.unique(assigned, return_inverse=True)
    table = np.zeros((truth_index.max() + 1, assigned_index.max() + 1))
    np.add.at(table, (truth_index, assigned_index), 1)

    def pairs(values: np.ndarray) -> float:
        return float((values * (values - 1) / 2).sum())

    index = pairs(table)
    expected = pairs(table.sum(1)) * pairs(table.sum(0)) / pairs(np.array([table.sum()]))
    maximum = 0.5 * (pairs(table.sum(1)) + pairs(table.sum(0)))
    return (index - expected) / (maximum - expected)


def class_map_fsc(out: Path, iteration: int, truth: np.ndarray, assigned: np.ndarray, true_maps: list[Path]) -> list[tuple[float, float]]:
    """For each true map (classes 1, 2, … of ``truth``) and the map of the class holding most
    of its particles: the resolution (Å) at which their FSC falls to 0.5, and their FSC at
    twice the Nyquist period (20 Å)."""
    figures = []
    for label, true_map in enumerate(true_maps, start=1):
        chosen = int(np.bincount(assigned[truth == label]).argmax())
        estimate = torch.as_tensor(np.array(read_mrc(out / f"run_it{iteration:03d}_class{chosen:03d}.mrc").data), dtype=torch.float64)
        reference = torch.as_tensor(np.array(read_mrc(true_map).data), dtype=torch.float64)
        fsc = fourier_shell_correlation(rfft3_centered(estimate), rfft3_centered(reference))
        figures.append((resolution_at_threshold(fsc, BOX, PIXEL, threshold=0.5), float(fsc[BOX // 4])))
    return figures


def junk_share(truth: np.ndarray, assigned: np.ndarray) -> float:
    """Fraction of the junk (the last true class) in the class holding most of it."""
    junk = truth == truth.max()
    return float(np.bincount(assigned[junk]).max() / max(1, int(junk.sum())))


def median_angular_error_deg(truth_star: Path, out: Path, iteration: int) -> float:
    """Median angle (degrees) between the true orientations of the real (not junk)
    particles and those of ``out``'s iteration ``iteration``."""
    true, found = read_particles(truth_star), read_particles(out / f"run_it{iteration:03d}_data.star")
    real = true.class_number < true.class_number.max()
    angles = rotation_angle_deg(torch.as_tensor(true.euler_deg[real]), torch.as_tensor(found.euler_deg[real]))
    return float(angles.median())


def seconds_per_iteration(log_path: Path) -> list[float]:
    """Wall time of each iteration in a run log: from the run's start or the previous
    iteration to its end. The time between runs that continue in one folder (the log is
    appended to) counts for none of them."""
    events = [
        (datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f"), match.group(2) != "running job")
        for line in log_path.read_text().splitlines()
        if (match := re.match(r"\[(.*?)\]\[.*\]\[INFO\] - (running job|iteration \d+:)", line))
    ]
    return [(end - start).total_seconds() for (start, _), (end, is_iteration) in zip(events, events[1:]) if is_iteration]


def phase_seconds(log_path: Path) -> dict[str, float]:
    """Mean seconds per iteration of each phase the run log's "iteration N took" lines name
    (set-up, self-fit, images, coarse pass, fine pass, E-step, back-projection, all-reduce,
    M-step, outputs)."""
    totals: dict[str, list[float]] = {}
    for line in log_path.read_text().splitlines():
        if match := re.search(r"iteration \d+ took [\d.]+ s: (.*)$", line):
            for name, seconds in re.findall(r"([\w -]+?) ([\d.]+) s(?:, |$)", match.group(1)):
                totals.setdefault(name, []).append(float(seconds))
    return {name: float(np.mean(values)) for name, values in totals.items()}


def report(label: str, folder: Path, out: Path, iteration: int, truth: np.ndarray, true_maps: list[Path], n_particles: int, aligned: bool) -> None:
    """Print the figures of the class3d run in ``out`` after ``iteration`` (times: every
    iteration its log holds; with ``aligned``, the orientation error too)."""
    result = read_particles(out / f"run_it{iteration:03d}_data.star").class_number
    times = seconds_per_iteration(out / "train.log")
    maps = ", ".join(f"{resolution:.1f} Å (FSC {fsc:.3f} at 20 Å)" for resolution, fsc in class_map_fsc(out, iteration, truth, result, true_maps))
    angles = f"median angular error {median_angular_error_deg(folder / 'sim' / 'truth.star', out, iteration):.2f}°; " if aligned else ""
    print(f"  {label}: accuracy {matched_accuracy(truth, result):.3f} (ARI {adjusted_rand_index(truth, result):.3f}); "
          f"junk in one class {junk_share(truth, result):.3f}; FSC 0.5 to the true maps at {maps}; "
          f"{angles}{np.mean(times):.1f} s/iteration, {sum(times):.0f} s total, "
          f"{1e3 * np.mean(times) / n_particles:.2f} ms per particle-iteration")
    phases = phase_seconds(out / "train.log")
    print("    mean seconds per iteration: " + ", ".join(f"{name} {seconds:.2f}" for name, seconds in phases.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--map", type=Path, required=True)
    parser.add_argument("--particles", type=int, default=4000)
    parser.add_argument("--snr", type=float, nargs="+", default=[0.05])
    parser.add_argument("--junk", type=float, default=0.2)
    parser.add_argument("--iterations", type=int, default=25)
    parser.add_argument("--modes", nargs="+", default=["noalign", "align"], choices=["noalign", "align"])
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--aligned-oracle", action="store_true", help="also run the aligned oracle (the true maps, fixed, searched as class3d searches)")
    parser.add_argument("--class3d-overrides", nargs="*", default=[], help="extra key=value settings of the class3d runs, e.g. sampling.final_local_iterations=5")
    parser.add_argument("--continue-iterations", type=int, default=0, help="then continue the aligned run in its folder for this many iterations")
    parser.add_argument("--continue-overrides", nargs="*", default=[], help="key=value settings of the continuation (instead of --class3d-overrides)")
    parser.add_argument("--maps-only", action="store_true", help="write the true maps (classA.mrc, classB.mrc, junk.mrc) into --workdir and stop")
    args = parser.parse_args()
    start_thread_pool()
    # the runs' device: compute.accelerator is auto unless an override names it
    accelerator = next((item.split("=", 1)[1] for item in args.class3d_overrides if item.startswith("compute.accelerator=")), "auto")
    device = torch.device("cuda" if accelerator == "cuda" or (accelerator == "auto" and torch.cuda.is_available()) else "cpu")
    print(f"device {device_description(device)}")
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench_class3d_"))
    work.mkdir(parents=True, exist_ok=True)
    class_a, class_b, junk = make_maps(args.map, work)
    if args.maps_only:
        print(f"true maps: {class_a}, {class_b}, {junk} ({BOX} px, {PIXEL} Å/px)")
        return
    for snr in args.snr:
        folder = work / f"snr{snr}"
        particles, truth = simulate_set([class_a, class_b], folder, args.particles, args.junk, snr)
        train("+job=reconstruct", f"data.particles={particles}", f"hydra.run.dir={folder / 'consensus'}")
        consensus = torch.as_tensor(np.array(read_mrc(folder / "consensus" / "run_class001.mrc").data))
        reference = folder / "reference40.mrc"
        write_mrc(reference, lowpass_map(consensus, 40.0, PIXEL), PIXEL)
        oracle = oracle_classes(particles, [class_a, class_b, junk], folder)
        print(f"SNR {snr}: oracle accuracy {matched_accuracy(truth, oracle):.3f} (ARI {adjusted_rand_index(truth, oracle):.3f})")
        for mode in args.modes:
            out = folder / mode
            train("+job=class3d", f"data.particles={particles}", f"job.reference={reference}", "job.K=3", f"job.n_iterations={args.iterations}",
                  f"sampling.align={'true' if mode == 'align' else 'false'}", f"hydra.run.dir={out}", *args.class3d_overrides)
            report(mode, folder, out, args.iterations, truth, [class_a, class_b], args.particles, mode == "align")
            if mode == "align" and args.continue_iterations:
                # RELION-style continuation in the same folder, with its own settings
                total = args.iterations + args.continue_iterations
                train("+job=class3d", f"data.particles={particles}", f"job.reference={reference}", "job.K=3", f"job.n_iterations={total}",
                      "sampling.align=true", f"hydra.run.dir={out}", *args.continue_overrides)
                report("align, continued", folder, out, total, truth, [class_a, class_b], args.particles, True)
        if args.aligned_oracle and "align" in args.modes:
            out = folder / "oracle_align"
            train("+job=class3d", f"data.particles={particles}", f"job.reference=[{class_a},{class_b},{junk}]", "job.K=3", f"job.n_iterations={args.iterations}",
                  "job.ini_high_A=null", "job.update_references=false", "sampling.align=true", f"hydra.run.dir={out}", *args.class3d_overrides)
            result = read_particles(out / f"run_it{args.iterations:03d}_data.star").class_number
            print(f"  aligned oracle: accuracy {matched_accuracy(truth, result):.3f} (ARI {adjusted_rand_index(truth, result):.3f}); "
                  f"junk in one class {junk_share(truth, result):.3f}; "
                  f"median angular error {median_angular_error_deg(folder / 'sim' / 'truth.star', out, args.iterations):.2f}°")


if __name__ == "__main__":
    main()
