"""Benchmark Fourier slice extraction (projection) and insertion (back-projection).

Prints slices per second at each box size, peak memory, the ratio to torch-fourier-slice
measured in the same run on the same device, and the achieved memory traffic of the trilinear
gathers/scatters over the device's copy bandwidth (``clone`` of a large tensor).

    python scripts/bench_ops.py --device cpu --boxes 64 128 --n-slices 2000
"""

from __future__ import annotations

import argparse
import resource

import torch
from torch_fourier_slice import backproject_2d_to_3d, project_3d_to_2d

from cryotorch.conventions import fft_frequencies_2d
from cryotorch.data.phantom import blob_phantom
from cryotorch.monitor.timing import best_wall_time, device_description
from cryotorch.ops.backprojection import insert_slices, reconstruct_from_sums, symmetrize_hermitian_plane
from cryotorch.ops.projection import extract_slices, padded_box_size, prepare_fourier_volumes, project_volumes
from cryotorch.ops.rotations import random_rotations
from cryotorch.runtime import start_thread_pool


def copy_bandwidth(device: torch.device) -> float:
    """Bytes per second of a large tensor copy (read + write)."""
    source = torch.empty(64 * 2**20, dtype=torch.float32, device=device)
    seconds = best_wall_time(lambda: source.clone(), device)
    return 2 * source.numel() * 4 / seconds


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory so far: CUDA allocator peak, or the process's maximum resident set on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bench_ours(box: int, n_slices: int, device: torch.device, bandwidth: float) -> dict[str, float]:
    """Slices per second of cryotorch's projection and back-projection at one box size."""
    volume = blob_phantom(box, 2.0, seed=0).to(device)
    rotations = random_rotations(n_slices, torch.Generator().manual_seed(0)).float().to(device)
    frequencies = fft_frequencies_2d(box, device).reshape(-1, 2)
    frequencies = frequencies[frequencies.norm(dim=-1) <= box // 2]
    n_freq = frequencies.shape[0]
    volume_ft = prepare_fourier_volumes(volume[None])
    padded = padded_box_size(box, 2.0)
    slices = extract_slices(volume_ft, rotations, frequencies, box)[0]
    weights = torch.ones(n_freq, device=device)

    def insert(reconstruct: bool) -> None:
        data = torch.zeros(padded, padded, padded // 2 + 1, dtype=torch.complex64, device=device)
        weight = torch.zeros(padded, padded, padded // 2 + 1, device=device)
        insert_slices(data, weight, slices, weights, rotations, frequencies, box)
        if reconstruct:
            reconstruct_from_sums(symmetrize_hermitian_plane(data, True), symmetrize_hermitian_plane(weight, False), box, 1e-3)

    extract_s = best_wall_time(lambda: extract_slices(volume_ft, rotations, frequencies, box), device)
    insert_s = best_wall_time(lambda: insert(False), device)
    # each sample gathers 8 complex64 neighbours and writes one complex64 value; insertion
    # read-modify-writes 8 neighbours of data (complex64) and weight (float32)
    return {
        "n_freq": n_freq,
        "extract": n_slices / extract_s,
        "extract_bw": n_slices * n_freq * (8 * 8 + 8) / extract_s / bandwidth,
        "project": n_slices / best_wall_time(lambda: project_volumes(volume[None], rotations, real_space=True), device),
        "insert": n_slices / insert_s,
        "insert_bw": n_slices * n_freq * 8 * 2 * (8 + 4) / insert_s / bandwidth,
        "backproject": n_slices / best_wall_time(lambda: insert(True), device),
        "peak_mb": peak_memory_mb(device),
    }


def bench_reference(box: int, n_slices: int, device: torch.device) -> dict[str, float]:
    """Slices per second of torch-fourier-slice on the same volumes and rotations."""
    volume = blob_phantom(box, 2.0, seed=0).to(device)
    rotations = random_rotations(n_slices, torch.Generator().manual_seed(0)).float().to(device)
    # torch-fourier-slice rotates slice coordinates into the volume: its matrix is our Aᵀ
    matrices = rotations.transpose(1, 2)
    images = project_3d_to_2d(volume, matrices, pad_factor=2.0)
    return {
        "project": n_slices / best_wall_time(lambda: project_3d_to_2d(volume, matrices, pad_factor=2.0), device),
        "backproject": n_slices / best_wall_time(lambda: backproject_2d_to_3d(images, matrices, pad_factor=2.0), device),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--boxes", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--n-slices", type=int, default=1000)
    args = parser.parse_args()
    start_thread_pool()
    device = torch.device(args.device)
    bandwidth = copy_bandwidth(device)
    print(f"device {device_description(device)}; copy bandwidth {bandwidth / 1e9:.1f} GB/s")
    # ours first, so that the peak memory reported is ours, not the reference's
    ours = {box: bench_ours(box, args.n_slices, device, bandwidth) for box in args.boxes}
    reference = {box: bench_reference(box, args.n_slices, device) for box in args.boxes}
    for box in args.boxes:
        o, r = ours[box], reference[box]
        print(f"box {box}: {args.n_slices} slices, {o['n_freq']} Fourier components each; peak memory so far {o['peak_mb']:.0f} MiB")
        print(f"  extract slices        {o['extract']:9.0f} slices/s  ({o['extract_bw']:.2f} of copy bandwidth)")
        print(f"  project to images     {o['project']:9.0f} slices/s  torch-fourier-slice {r['project']:8.0f}  (ours ×{o['project'] / r['project']:.1f})")
        print(f"  insert slices         {o['insert']:9.0f} slices/s  ({o['insert_bw']:.2f} of copy bandwidth)")
        print(f"  insert + reconstruct  {o['backproject']:9.0f} slices/s  torch-fourier-slice {r['backproject']:8.0f}  (ours ×{o['backproject'] / r['backproject']:.1f})")


if __name__ == "__main__":
    main()
