"""Benchmark Fourier slice extraction (projection) and insertion (back-projection).

Prints slices per second at each box size, peak memory, the ratio to torch-fourier-slice
measured in the same run on the same device, and the achieved memory traffic of the trilinear
gathers/scatters over the device's copy bandwidth (``clone`` of a large tensor).

    python scripts/bench_ops.py --device cpu --boxes 64 128 --n-slices 2000
"""

from __future__ import annotations

import argparse
import platform
import resource
import time
from collections.abc import Callable

import torch
from torch_fourier_slice import backproject_2d_to_3d, project_3d_to_2d

from cryotorch.conventions import fft_frequencies_2d
from cryotorch.data.phantom import blob_phantom
from cryotorch.ops.backprojection import insert_slices, reconstruct_from_sums, symmetrize_hermitian_plane
from cryotorch.ops.projection import extract_slices, padded_box_size, prepare_fourier_volumes, project_volumes
from cryotorch.ops.rotations import random_rotations


def timed(function: Callable[[], object], device: torch.device, repeats: int = 3) -> float:
    """Best wall time of ``repeats`` calls after one warm-up, in seconds."""
    function()
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        function()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def copy_bandwidth(device: torch.device) -> float:
    """Bytes per second of a large tensor copy (read + write)."""
    source = torch.empty(64 * 2**20, dtype=torch.float32, device=device)
    seconds = timed(lambda: source.clone(), device)
    return 2 * source.numel() * 4 / seconds


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory so far: CUDA allocator peak, or the process's maximum resident set on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bench_box(box: int, n_slices: int, device: torch.device, bandwidth: float) -> None:
    volume = blob_phantom(box, 2.0, seed=0).to(device)
    rotations = random_rotations(n_slices, torch.Generator().manual_seed(0)).float().to(device)
    frequencies = fft_frequencies_2d(box, device).reshape(-1, 2)
    frequencies = frequencies[frequencies.norm(dim=-1) <= box // 2]
    n_freq = frequencies.shape[0]
    volume_ft = prepare_fourier_volumes(volume[None])
    padded = padded_box_size(box, 2.0)

    extract_s = timed(lambda: extract_slices(volume_ft, rotations, frequencies, box), device)
    ours_full_s = timed(lambda: project_volumes(volume[None], rotations, real_space=True), device)
    theirs_full_s = timed(lambda: project_3d_to_2d(volume, rotations.transpose(1, 2), pad_factor=2.0), device)
    # each sample reads 8 complex64 neighbours and writes one complex64 value
    gather_bytes = n_slices * n_freq * (8 * 8 + 8)

    slices = extract_slices(volume_ft, rotations, frequencies, box)[0]
    weights = torch.ones(n_freq, device=device)

    def insert() -> None:
        data = torch.zeros(padded, padded, padded // 2 + 1, dtype=torch.complex64, device=device)
        weight = torch.zeros(padded, padded, padded // 2 + 1, device=device)
        insert_slices(data, weight, slices, weights, rotations, frequencies, box)

    def insert_and_reconstruct() -> None:
        data = torch.zeros(padded, padded, padded // 2 + 1, dtype=torch.complex64, device=device)
        weight = torch.zeros(padded, padded, padded // 2 + 1, device=device)
        insert_slices(data, weight, slices, weights, rotations, frequencies, box)
        reconstruct_from_sums(symmetrize_hermitian_plane(data, True), symmetrize_hermitian_plane(weight, False), box, 1e-3)

    images = project_volumes(volume[None], rotations, real_space=True)[0]
    insert_s = timed(insert, device)
    ours_back_s = timed(insert_and_reconstruct, device)
    theirs_back_s = timed(lambda: backproject_2d_to_3d(images, rotations.transpose(1, 2), pad_factor=2.0), device)
    # each sample read-modify-writes 8 neighbours of data (complex64) and weight (float32)
    scatter_bytes = n_slices * n_freq * 8 * 2 * (8 + 4)

    print(f"box {box}: {n_slices} slices, {n_freq} Fourier components each")
    print(f"  projection   extract {n_slices / extract_s:10.0f} slices/s  ({gather_bytes / extract_s / bandwidth:.2f} of copy bandwidth)")
    print(f"               full    {n_slices / ours_full_s:10.0f} slices/s  vs torch-fourier-slice {n_slices / theirs_full_s:10.0f} slices/s  (ratio {theirs_full_s / ours_full_s:.2f})")
    print(f"  backprojection insert {n_slices / insert_s:9.0f} slices/s  ({scatter_bytes / insert_s / bandwidth:.2f} of copy bandwidth)")
    print(f"               + reconstruct {n_slices / ours_back_s:6.0f} slices/s  vs torch-fourier-slice {n_slices / theirs_back_s:10.0f} slices/s  (ratio {theirs_back_s / ours_back_s:.2f})")
    print(f"  peak memory {peak_memory_mb(device):.0f} MiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--boxes", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--n-slices", type=int, default=1000)
    args = parser.parse_args()
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    bandwidth = copy_bandwidth(device)
    print(f"device {device} ({name}), torch {torch.__version__}; copy bandwidth {bandwidth / 1e9:.1f} GB/s")
    for box in args.boxes:
        bench_box(box, args.n_slices, device, bandwidth)


if __name__ == "__main__":
    main()
