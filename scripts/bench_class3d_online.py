"""class3d_online benchmarks: accuracy against the oracle, and E-step throughput.

``accuracy``: builds a ``+job=simulate`` set from the 70S map (5 Å/px, box 64) with six
classes that each differ from the map in one compact region holding ~5 % of its mass
(classes 1-3: the region removed; classes 4-6: the region moved by 4 voxels), plus junk;
true poses. Then runs

- the oracle: the E-step with the TRUE maps (and an empty map for the junk) held fixed at the
  true poses (``+job=class3d job.update_references=false sampling.align=false``, 3
  iterations so that noise and class weights are learnt), the best this likelihood can do;
- ``+job=class3d_online`` with a focus mask over the variable regions and no maps given,

and prints class accuracy (labels matched), ARI and the mean class ESS of both.

``speed``: particles × classes per second of one online-EM minibatch update (E-step and
back-projection) at box 64 and 128, K = 10 and 100, with the bytes of images and projections
moved per second over this device's measured copy bandwidth, and the extrapolated time for
1.2 M particles × 100 classes at box 128.

    python scripts/bench_class3d_online.py accuracy --map ../shared/data/maps/aspire_70S/clean70SRibosome_vol_65p.mrc \\
        --particles 20000 --snr 0.05 0.2
    python scripts/bench_class3d_online.py speed --device cuda
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench_class3d import BOX, PIXEL, adjusted_rand_index, load_map, matched_accuracy, oracle_classes, seconds_per_iteration, simulate_set, train
from cryotorch.io import read_particles, write_mrc
from cryotorch.monitor.timing import device_description
from cryotorch.ops.filters import raised_cosine
from cryotorch.runtime import start_thread_pool


def make_maps(map_path: Path, folder: Path, n_variants: int = 6, mass_fraction: float = 0.05) -> tuple[list[Path], Path, Path]:
    """Variant maps (a region removed or moved), an empty map, and a soft focus mask over
    every variable region."""
    volume, positive, (x, y, z), centre_of_mass = load_map(map_path)
    total = positive.sum()
    directions = torch.tensor([[1.0, 0, 0], [-1.0, 0, 0], [0, 1.0, 0], [0, -1.0, 0], [0, 0, 1.0], [0, 0, -1.0]])
    paths, focus = [], torch.zeros_like(volume)
    for index in range(n_variants):
        centre = centre_of_mass + 11.0 * directions[index % len(directions)]
        distance = ((x - centre[0]) ** 2 + (y - centre[1]) ** 2 + (z - centre[2]) ** 2).sqrt()
        radius = next(r for r in np.arange(2.0, BOX, 0.5) if float(positive[distance < r].sum() / total) >= mass_fraction)
        region = distance < radius
        variant = volume.clone()
        variant[region] = 0
        if index >= n_variants // 2:
            # moved: the region's density reappears 4 voxels further out
            step = [int(v) for v in (4 * directions[index % len(directions)]).tolist()]
            moved = torch.roll(torch.where(region, volume, torch.zeros_like(volume)), shifts=(step[2], step[1], step[0]), dims=(0, 1, 2))
            variant = variant + moved
            region = region | (moved != 0)
            distance = torch.minimum(distance, torch.roll(distance, shifts=(step[2], step[1], step[0]), dims=(0, 1, 2)))
        focus = torch.maximum(focus, raised_cosine(distance, float(radius) + 2.0, 4.0))
        paths.append(folder / f"class{index + 1}.mrc")
        write_mrc(paths[-1], variant, PIXEL)
    write_mrc(folder / "junk.mrc", torch.zeros_like(volume), PIXEL)
    write_mrc(folder / "focus.mrc", focus, PIXEL)
    return paths, folder / "junk.mrc", folder / "focus.mrc"


def mean_class_ess(run: Path) -> float:
    """Mean per-particle class ESS 1/Σp² of a run's last iteration (kept in its checkpoint)."""
    return float(torch.load(run / "run_checkpoint.pt", weights_only=True)["particles"]["class_ess"].mean())


def accuracy(args: argparse.Namespace) -> None:
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench_class3d_online_"))
    work.mkdir(parents=True, exist_ok=True)
    maps, junk, focus = make_maps(args.map, work)
    k_true = len(maps) + 1
    for snr in args.snr:
        folder = work / f"snr{snr}"
        particles, truth = simulate_set(maps, folder, args.particles, args.junk, snr)
        oracle = oracle_classes(particles, [*maps, junk], folder)
        print(f"SNR {snr}: oracle accuracy {matched_accuracy(truth, oracle):.3f} (ARI {adjusted_rand_index(truth, oracle):.3f}), "
              f"mean class ESS {mean_class_ess(folder / 'oracle'):.2f}", flush=True)
        out = folder / "online"
        train("+job=class3d_online", f"data.particles={particles}", f"job.K={k_true}", f"job.focus_mask={focus}", *args.overrides, f"hydra.run.dir={out}")
        last = sorted(out.glob("run_it*_data.star"))[-1]
        result = read_particles(last).class_number
        times = seconds_per_iteration(out / "train.log")
        print(f"  class3d_online ({last.name}): accuracy {matched_accuracy(truth, result):.3f} (ARI {adjusted_rand_index(truth, result):.3f}), "
              f"mean class ESS {mean_class_ess(out):.2f}; {sum(times):.0f} s in all", flush=True)


def copy_bandwidth(device: torch.device) -> float:
    """Bytes per second of a large device-to-device copy (read + write)."""
    source = torch.empty(2**26, dtype=torch.float32, device=device)
    target = torch.empty_like(source)
    for _ in range(2):
        target.copy_(source)
    synchronise(device)
    start = time.perf_counter()
    repeats = 10
    for _ in range(repeats):
        target.copy_(source)
    synchronise(device)
    return 2 * source.numel() * 4 * repeats / (time.perf_counter() - start)


def synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def speed(args: argparse.Namespace) -> None:
    from cryotorch.em.estep import EStepSettings, PreparedBatch, expectation
    from cryotorch.em.mstep import SufficientStatistics
    from cryotorch.conventions import fft_frequencies_2d
    from cryotorch.ops.projection import prepare_fourier_volumes
    from cryotorch.ops.rotations import random_rotations
    from cryotorch.conventions import matrix_to_euler_deg

    device = torch.device(args.device)
    bandwidth = copy_bandwidth(device)
    print(f"device {device_description(device)}; copy bandwidth {bandwidth / 1e9:.1f} GB/s")
    generator = torch.Generator().manual_seed(0)
    for box in args.boxes:
        frequencies = fft_frequencies_2d(box, device).reshape(-1, 2)
        radii = frequencies.norm(dim=-1)
        order = torch.argsort(radii, stable=True)
        frequencies = frequencies[order[(radii[order] > 0) & (radii[order] <= box // 2)]]
        n = frequencies.shape[0]
        for k in args.classes:
            volumes_ft = prepare_fourier_volumes(torch.randn(k, box, box, box, generator=generator).to(device), 1.0)
            b = max(1, int(args.batch_bytes // ((k + 4) * n * 16)))
            batch = PreparedBatch(
                spectra=torch.randn(b, n, dtype=torch.complex64, generator=generator).to(device),
                ctf=torch.rand(b, n, generator=generator).to(device),
                inv_sigma2=torch.ones(b, n, device=device),
                scale=torch.ones(b, device=device),
                prior_origin_px=torch.zeros(b, 2, device=device),
                prior_euler_deg=matrix_to_euler_deg(random_rotations(b, generator)).to(device),
            )
            settings = EStepSettings(frequencies=frequencies, n_coarse=n, box_size=box, pixel_size_angstrom=1.0, align=False, memory_budget_bytes=args.batch_bytes)
            stats = SufficientStatistics.zeros(k, box, 1, box // 2 + 1, device)
            prior = torch.full((k,), -float(np.log(k)), device=device)

            def step() -> None:
                result = expectation(batch, volumes_ft, None, None, None, prior, 10.0, settings)
                stats.insert(result.slices, frequencies, box, args.batch_bytes)

            step()
            synchronise(device)
            start = time.perf_counter()
            for _ in range(args.repeats):
                step()
            synchronise(device)
            seconds = (time.perf_counter() - start) / args.repeats
            rate = b * k / seconds
            # bytes: images (complex) + CTF + 1/σ² read once, K projections written and read
            moved = b * n * (8 + 4 + 4) + 2 * b * k * n * 8
            print(f"box {box}, K {k}: {b} particles per batch, {rate:,.0f} particles·classes/s, "
                  f"{moved / seconds / bandwidth:.2f} of copy bandwidth (E-step + all-class back-projection)")
            if box == 128 and k == 100:
                hours = 1.2e6 * 100 / rate / 3600
                print(f"  extrapolated: 1.2 M particles × 100 classes at box 128, one full pass {hours:.2f} h; "
                      f"{args.passes} passes (online epochs + full-batch iterations) {args.passes * hours:.1f} h (CryoSPARC: 8.5 h)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    accuracy_parser = commands.add_parser("accuracy")
    accuracy_parser.add_argument("--map", type=Path, required=True)
    accuracy_parser.add_argument("--particles", type=int, default=20000)
    accuracy_parser.add_argument("--snr", type=float, nargs="+", default=[0.05, 0.2])
    accuracy_parser.add_argument("--junk", type=float, default=0.1)
    accuracy_parser.add_argument("--workdir", type=Path, default=None)
    accuracy_parser.add_argument("overrides", nargs="*", help="extra class3d_online overrides, e.g. job.init_mode=pca")
    speed_parser = commands.add_parser("speed")
    speed_parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    speed_parser.add_argument("--boxes", type=int, nargs="+", default=[64, 128])
    speed_parser.add_argument("--classes", type=int, nargs="+", default=[10, 100])
    speed_parser.add_argument("--batch-bytes", type=float, default=2**29)
    speed_parser.add_argument("--repeats", type=int, default=3)
    speed_parser.add_argument("--passes", type=int, default=10)
    args = parser.parse_args()
    start_thread_pool()
    accuracy(args) if args.command == "accuracy" else speed(args)


if __name__ == "__main__":
    main()
