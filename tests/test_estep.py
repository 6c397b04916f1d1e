"""The E-step's matrix formulation against direct computations."""

from __future__ import annotations

import torch

from cryotorch.conventions import fft_frequencies_2d
from cryotorch.em.estep import PreparedBatch, phase_ramps, score_batch
from cryotorch.em.sampling import build_pose_grid, translation_grid


def random_batch(b: int, n: int, generator: torch.Generator) -> PreparedBatch:
    return PreparedBatch(
        spectra=torch.complex(torch.randn(b, n, generator=generator), torch.randn(b, n, generator=generator)),
        ctf=torch.randn(b, n, generator=generator),
        inv_sigma2=torch.rand(b, n, generator=generator) + 0.5,
        scale=torch.rand(b, generator=generator) + 0.5,
        prior_origin_px=torch.zeros(b, 2),
        prior_euler_deg=torch.zeros(b, 3, dtype=torch.float64),
    )


def test_scores_equal_the_gaussian_log_likelihood_up_to_the_image_norm() -> None:
    generator = torch.Generator().manual_seed(0)
    box = 16
    frequencies = fft_frequencies_2d(box).reshape(-1, 2)[1:40]
    n = frequencies.shape[0]
    batch = random_batch(3, n, generator)
    projections = torch.complex(torch.randn(5, n, generator=generator), torch.randn(5, n, generator=generator))
    shifts = torch.tensor([[0.0, 0.0], [1.5, -2.0]])
    scores, _ = score_batch(batch, projections, phase_ramps(shifts, frequencies, box), n)
    for i in range(3):
        for t in range(2):
            shifted = batch.spectra[i] * torch.exp(-2j * torch.pi / box * (frequencies @ shifts[t]))
            for c in range(5):
                residual = shifted - batch.scale[i] * batch.ctf[i] * projections[c]
                direct = -0.5 * (residual.abs() ** 2 * batch.inv_sigma2[i]).sum() + 0.5 * (shifted.abs() ** 2 * batch.inv_sigma2[i]).sum()
                torch.testing.assert_close(scores[i, t, c], direct, rtol=1e-4, atol=1e-3)


def test_profiled_intensity_scale_is_the_maximum_over_scales() -> None:
    generator = torch.Generator().manual_seed(1)
    n = 30
    batch = random_batch(2, n, generator)
    projections = torch.complex(torch.randn(4, n, generator=generator), torch.randn(4, n, generator=generator))
    ramps = torch.ones(1, n, dtype=torch.complex64)
    plain, _ = score_batch(batch, projections, ramps, n)
    profiled, _ = score_batch(batch, projections, ramps, n, scale_sigma=0.3)
    # brute force: the scaled projection a·P scores cross·a − norm·a², minus the prior
    zero, _ = score_batch(batch, projections * 0, ramps, n)
    doubled, _ = score_batch(batch, projections * 2, ramps, n)
    cross = (4 * plain - doubled) / 2  # from s(a) = a·c − a²·n at a = 1, 2
    norm = cross - plain
    scales = torch.linspace(-1, 3, 4001)
    brute = (scales[:, None, None, None] * cross - scales[:, None, None, None] ** 2 * norm - (scales[:, None, None, None] - 1) ** 2 / (2 * 0.3**2)).amax(0)
    torch.testing.assert_close(profiled, brute, rtol=1e-4, atol=1e-2)
    assert torch.all(zero == 0)


def test_pose_grid_counts_and_oversampling() -> None:
    grid = build_pose_grid(1, 2.0, 1.0, "C1", oversampling=1)
    assert grid.coarse_rotations.shape[0] == 48 * 12  # 48 directions × 12 psi at order 1
    assert grid.fine_euler_deg.shape[1:] == (8, 3)
    assert grid.coarse_shifts_px.shape[0] == translation_grid(2.0, 1.0).shape[0] == 13
    torch.testing.assert_close(grid.fine_shifts_px.mean(dim=1), grid.coarse_shifts_px)
