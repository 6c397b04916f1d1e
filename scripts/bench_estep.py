"""Benchmark the E-step's scoring GEMMs against the device's own matrix-multiply rate.

Scores B particles × T translations against K classes × R orientations over M Fourier
components (the coarse pass of class3d) and prints the achieved FLOP/s of the whole scoring
step (phase ramps, CTF/σ² weighting, cross-term and norm GEMMs) over the FLOP/s of a plain
``torch.matmul`` of the same shape, and over a large square ``torch.matmul``, both measured in
the same run on the same device and dtype.

    python scripts/bench_estep.py --device cpu --box 64 --order 2 --classes 3
"""

from __future__ import annotations

import argparse

import torch

from cryotorch.conventions import fft_frequencies_2d
from cryotorch.data.phantom import blob_phantom
from cryotorch.em.estep import PreparedBatch, phase_ramps, score_batch
from cryotorch.em.sampling import build_pose_grid
from cryotorch.monitor.timing import best_wall_time, device_description
from cryotorch.ops.projection import extract_slices, prepare_fourier_volumes
from cryotorch.runtime import start_thread_pool


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--box", type=int, default=64)
    parser.add_argument("--radius", type=int, default=16, help="Fourier radius (shells) scored")
    parser.add_argument("--order", type=int, default=2, help="HEALPix order of the orientations")
    parser.add_argument("--classes", type=int, default=3)
    parser.add_argument("--particles", type=int, default=64)
    parser.add_argument("--offset-range", type=float, default=5.0)
    parser.add_argument("--offset-step", type=float, default=2.0)
    args = parser.parse_args()
    start_thread_pool()
    device = torch.device(args.device)
    box = args.box
    grid = build_pose_grid(args.order, args.offset_range, args.offset_step, "C1", 1, device)
    frequencies = fft_frequencies_2d(box, device).reshape(-1, 2)
    radius = frequencies.norm(dim=-1)
    frequencies = frequencies[(radius > 0) & (radius <= args.radius)]
    n_components = frequencies.shape[0]
    volumes = torch.stack([blob_phantom(box, 3.0, seed=s) for s in range(args.classes)]).to(device)
    projections = extract_slices(prepare_fourier_volumes(volumes), grid.coarse_matrices(torch.arange(grid.n_rotations, device=device)), frequencies, box)
    projections = projections.reshape(-1, n_components)  # (K·R, M)
    generator = torch.Generator().manual_seed(0)
    b = args.particles
    spectra = torch.complex(torch.randn(b, n_components, generator=generator), torch.randn(b, n_components, generator=generator)).to(device)
    batch = PreparedBatch(
        spectra=spectra,
        ctf=torch.rand(b, n_components, generator=generator).to(device),
        inv_sigma2=torch.ones(b, n_components, device=device),
        scale=torch.ones(b, device=device),
        prior_origin_px=torch.zeros(b, 2, device=device),
        prior_euler_deg=torch.zeros(b, 3, dtype=torch.float64, device=device),
    )
    ramps = phase_ramps(grid.coarse_shifts_px, frequencies, box)
    n_shifts, n_columns = ramps.shape[0], projections.shape[0]
    flops = 2.0 * (b * n_shifts) * (2 * n_components) * n_columns + 2.0 * b * n_components * n_columns
    score_s = best_wall_time(lambda: score_batch(batch, projections, ramps, n_components), device)
    left = torch.randn(b * n_shifts, 2 * n_components, device=device)
    right = torch.randn(2 * n_components, n_columns, device=device)
    same_shape_s = best_wall_time(lambda: left @ right, device)
    square = torch.randn(2048, 2048, device=device)
    square_s = best_wall_time(lambda: square @ square, device)
    same_shape_rate = 2.0 * left.shape[0] * left.shape[1] * right.shape[1] / same_shape_s
    peak_rate = 2.0 * 2048**3 / square_s
    rate = flops / score_s
    print(f"device {device_description(device)}, float32")
    print(f"{b} particles × {n_shifts} translations × {args.classes} classes × {grid.n_rotations} orientations, {n_components} components")
    print(f"E-step scoring: {score_s * 1e3:.1f} ms, {rate / 1e9:.1f} GFLOP/s, {b / score_s:.0f} particles/s")
    print(f"torch.matmul same shape: {same_shape_rate / 1e9:.1f} GFLOP/s; 2048² square: {peak_rate / 1e9:.1f} GFLOP/s")
    print(f"ratio to same-shape matmul {rate / same_shape_rate:.2f}, to square matmul {rate / peak_rate:.2f}")


if __name__ == "__main__":
    main()
