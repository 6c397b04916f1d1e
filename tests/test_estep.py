"""The E-step's matrix formulation against direct computations."""

from __future__ import annotations

import math

import pytest
import torch

from cryotorch.conventions import euler_deg_to_matrix, fft_frequencies_2d
from cryotorch.em.estep import CoarseProjections, PreparedBatch, ScoreProjections, SliceTable, phase_ramps, profiled_scale, score_batch, score_terms, scaled_score
from cryotorch.em.sampling import PoseGrid, build_pose_grid, translation_grid

from conftest import DEVICES, c4_average


def random_batch(b: int, n: int, generator: torch.Generator, device: str = "cpu") -> PreparedBatch:
    """``b`` particles of ``n`` random components, drawn on the CPU and moved to ``device``."""
    return PreparedBatch(
        spectra=torch.complex(torch.randn(b, n, generator=generator), torch.randn(b, n, generator=generator)).to(device),
        ctf=torch.randn(b, n, generator=generator).to(device),
        inv_sigma2=(torch.rand(b, n, generator=generator) + 0.5).to(device),
        scale=(torch.rand(b, generator=generator) + 0.5).to(device),
        prior_origin_px=torch.zeros(b, 2, device=device),
        prior_euler_deg=torch.zeros(b, 3, dtype=torch.float64, device=device),
    )


def sorted_frequencies(box: int, radius: float) -> torch.Tensor:
    """``(M, 2)`` components of a ``box`` image with 0 < |f| ≤ ``radius``, sorted by radius."""
    frequencies = fft_frequencies_2d(box).reshape(-1, 2)
    radii = frequencies.norm(dim=-1)
    order = torch.argsort(radii, stable=True)
    return frequencies[order[(radii[order] > 0) & (radii[order] <= radius)]]


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
    cross, norm, _ = score_terms(batch, ScoreProjections.of(projections), ramps, n)
    profiled = scaled_score(cross.clone(), norm, profiled_scale(cross, norm, 0.3), 0.3)
    # brute force: the scaled projection a·P scores cross·a − norm·a², minus the prior
    zero, _ = score_batch(batch, projections * 0, ramps, n)
    doubled, _ = score_batch(batch, projections * 2, ramps, n)
    cross = (4 * plain - doubled) / 2  # from s(a) = a·c − a²·n at a = 1, 2
    norm = cross - plain
    scales = torch.linspace(-1, 3, 4001)
    brute = (scales[:, None, None, None] * cross - scales[:, None, None, None] ** 2 * norm - (scales[:, None, None, None] - 1) ** 2 / (2 * 0.3**2)).amax(0)
    torch.testing.assert_close(profiled, brute, rtol=1e-4, atol=1e-2)
    assert torch.all(zero == 0)
    # a fixed scale per particle and projection is the direct scaled score
    fixed = torch.rand(2, 4, generator=generator) + 0.5
    scored, _ = score_batch(batch, projections, ramps, n, fixed, 0.3)
    direct = fixed[:, None, :] * cross - fixed[:, None, :] ** 2 * norm - (fixed[:, None, :] - 1) ** 2 / (2 * 0.3**2)
    torch.testing.assert_close(scored, direct, rtol=1e-4, atol=1e-2)


def test_pose_grid_counts_and_oversampling() -> None:
    from cryotorch.ops.healpix import oversample_orientations, rotation_angle_deg

    grid = build_pose_grid(1, 2.0, 1.0, "C1", oversampling=1)
    assert grid.n_rotations == 48 * 12  # 48 directions × 12 psi at order 1
    every = torch.arange(grid.n_rotations)
    children = grid.children_euler_deg(every)
    assert grid.n_children == 8 and children.shape[1:] == (8, 3)
    # RELION's oversampled children, computed on demand for any subset of parents
    orientations = grid.orientations
    torch.testing.assert_close(children, oversample_orientations(1, orientations.pixel_index(every), orientations.psi_index(every), 1), rtol=0, atol=0)
    torch.testing.assert_close(grid.children_euler_deg(every[[7, 3]]), children[[7, 3]], rtol=0, atol=0)
    # each direction's largest child angle, measured in chunks at one psi, is the angle over
    # the children of all its orientations
    angles = rotation_angle_deg(children.reshape(-1, 3), grid.coarse_euler_deg(every).repeat_interleave(8, dim=0)).reshape(-1, 12 * 8)
    assert grid.child_spread_deg.shape == (48,)
    torch.testing.assert_close(grid.child_spread_deg.double(), angles.amax(dim=1), rtol=0, atol=0.05)
    assert torch.all(grid.without_oversampling().child_spread_deg == 0)
    torch.testing.assert_close(grid.without_oversampling().children_euler_deg(every)[:, 0], grid.coarse_euler_deg(every))
    # the coarse angles and matrices of any subset are those of the whole grid, and each
    # orientation's viewing direction is the third row of its matrix
    matrices64 = grid.coarse_matrices64(every)
    torch.testing.assert_close(grid.coarse_matrices(every[[9, 500]]), grid.coarse_matrices(every)[[9, 500]], rtol=0, atol=0)
    torch.testing.assert_close(matrices64, euler_deg_to_matrix(grid.coarse_euler_deg(every)), rtol=0, atol=0)
    torch.testing.assert_close(grid.coarse_directions[grid.direction_of(every)], matrices64[:, 2], rtol=0, atol=1e-15)
    # its samples are the coarse pass's own matrices; it is made once per grid
    unrefined = grid.without_oversampling()
    torch.testing.assert_close(unrefined.children_matrices(every)[:, 0], grid.coarse_matrices(every), rtol=0, atol=0)
    assert unrefined is grid.without_oversampling() and unrefined.without_oversampling() is unrefined
    assert grid.coarse_shifts_px.shape[0] == translation_grid(2.0, 1.0).shape[0] == 13
    # each coarse translation's children: itself and the points half its step along +x, +y
    # and both; mirrored, along −x and −y: the same lattice of fine translations either way,
    # which holds the centre, and the mirrored grid keeps what the grid computed
    from cryotorch.em.sampling import mirror_translation_children

    offsets = torch.tensor([[0.0, 0.0], [0.5, 0.0], [0.0, 0.5], [0.5, 0.5]])
    torch.testing.assert_close(grid.fine_shifts_px - grid.coarse_shifts_px[:, None], offsets.expand(13, 4, 2))
    mirrored = mirror_translation_children(grid)
    torch.testing.assert_close(mirrored.fine_shifts_px - grid.coarse_shifts_px[:, None], -offsets.expand(13, 4, 2))
    torch.testing.assert_close(mirrored.coarse_shifts_px, grid.coarse_shifts_px)
    for each in (grid, mirrored):
        lattice = each.fine_shifts_px.reshape(-1, 2) / 0.5
        assert torch.equal(lattice, lattice.round()) and bool((lattice == 0).all(dim=1).any())
    assert mirrored.without_oversampling() is unrefined and mirrored.child_spread_deg is grid.child_spread_deg


def _alignment_problem(seed: int, healpix_order: int, n_particles: int, device: str = "cpu") -> tuple:
    """A box-16 search over two random maps on ``device``: box, frequencies, prepared volumes,
    grid (±2 px, one order of oversampling), random batch, coarse projections (20 components),
    class log priors, and the (CPU) generator for further draws."""
    from cryotorch.ops.projection import prepare_fourier_volumes

    generator = torch.Generator().manual_seed(seed)
    box = 16
    frequencies = sorted_frequencies(box, 6).to(device)
    volumes_ft = prepare_fourier_volumes(torch.randn(2, box, box, box, generator=generator).to(device))
    grid = build_pose_grid(healpix_order, 2.0, 2.0, "C1", oversampling=1, device=torch.device(device))
    batch = random_batch(n_particles, frequencies.shape[0], generator, device)
    coarse = CoarseProjections(volumes_ft, grid, frequencies[:20], box, 2**28)
    return box, frequencies, volumes_ft, grid, batch, coarse, torch.log(torch.tensor([0.4, 0.6], device=device)), generator


def _aligned_sums(budget: float) -> tuple[object, torch.Tensor]:
    """E-step of a fixed random batch on a small grid, with tables of ``budget`` bytes;
    returns the result and every slice handed back for insertion, back-projected."""
    from cryotorch.em.estep import EStepSettings, FinePassCache, expectation
    from cryotorch.ops.backprojection import insert_slices
    from cryotorch.ops.projection import prepare_fourier_volumes

    generator = torch.Generator().manual_seed(3)
    box = 16
    frequencies = sorted_frequencies(box, 6)
    # weak maps: broad posteriors over many samples, which fill the tables
    volumes_ft = prepare_fourier_volumes(0.02 * torch.randn(2, box, box, box, generator=generator))
    grid = build_pose_grid(0, 2.0, 2.0, "C1", oversampling=1)
    batch = random_batch(6, frequencies.shape[0], generator)
    settings = EStepSettings(frequencies=frequencies, n_coarse=20, box_size=box, pixel_size_angstrom=4.0, memory_budget_bytes=2e4)
    coarse = CoarseProjections(volumes_ft, grid, frequencies[:20], box, 2**28)
    cache = FinePassCache(volumes_ft, grid, frequencies, box, budget)
    result = expectation(batch, volumes_ft, coarse, grid, cache, torch.log(torch.tensor([0.4, 0.6])), 10.0, settings)
    padded = volumes_ft.shape[1]
    data = torch.zeros(2, padded, padded, padded // 2 + 1, dtype=torch.complex64)
    weight = torch.zeros(2, padded, padded, padded // 2 + 1)
    for item in result.slices + cache.drain():
        insert_slices(data[item.class_index], weight[item.class_index], item.data, item.weight, item.rotations, frequencies, box)
    return result, torch.cat([torch.view_as_real(data).flatten(), weight.flatten()])


def test_fine_pass_tables_of_any_size_give_the_same_posteriors_and_sums() -> None:
    # a roomy table is filled once; at 1e5 bytes the tables are emptied and drained on the
    # way; at 3e4 bytes a sub-batch's samples overflow them and bypass them
    roomy, roomy_sums = _aligned_sums(2**26)
    assert roomy_sums.abs().max() > 0
    for budget in (1e5, 3e4):
        small, small_sums = _aligned_sums(budget)
        torch.testing.assert_close(small.class_posterior, roomy.class_posterior)
        torch.testing.assert_close(small.best_euler_deg, roomy.best_euler_deg)
        torch.testing.assert_close(small.log_likelihood, roomy.log_likelihood)
        torch.testing.assert_close(small_sums, roomy_sums, rtol=1e-4, atol=1e-4)


def test_whole_slice_tables_back_project_what_draining_each_leaf_does() -> None:
    # two leaves of batches: their sum tables taken whole, added and inserted once give the
    # maps that draining and inserting each leaf's sums gives (up to the order of additions);
    # a table that cannot hold every fine id is not taken whole
    from cryotorch.em.estep import EStepSettings, FinePassCache, expectation
    from cryotorch.ops.backprojection import insert_slices
    from cryotorch.ops.projection import prepare_fourier_volumes

    generator = torch.Generator().manual_seed(4)
    box = 16
    frequencies = sorted_frequencies(box, 6)
    volumes_ft = prepare_fourier_volumes(0.02 * torch.randn(2, box, box, box, generator=generator))
    grid = build_pose_grid(0, 2.0, 2.0, "C1", oversampling=1)
    leaves = [random_batch(6, frequencies.shape[0], generator) for _ in range(2)]
    settings = EStepSettings(frequencies=frequencies, n_coarse=20, box_size=box, pixel_size_angstrom=4.0)
    coarse = CoarseProjections(volumes_ft, grid, frequencies[:20], box, 2**28)
    padded = volumes_ft.shape[1]

    def back_projected(whole: bool) -> torch.Tensor:
        cache = FinePassCache(volumes_ft, grid, frequencies, box, 2**26)
        assert cache.holds_every_sum
        slices, table = [], cache.empty_table()
        for batch in leaves:
            result = expectation(batch, volumes_ft, coarse, grid, cache, torch.log(torch.tensor([0.4, 0.6])), 10.0, settings)
            slices += result.slices
            if whole:
                table.add_(cache.take_table())
            else:
                slices += cache.drain()
        if whole:
            slices += cache.table_slices(table)
        data = torch.zeros(2, padded, padded, padded // 2 + 1, dtype=torch.complex64)
        weight = torch.zeros(2, padded, padded, padded // 2 + 1)
        for item in slices:
            insert_slices(data[item.class_index], weight[item.class_index], item.data, item.weight, item.rotations, frequencies, box)
        return torch.cat([torch.view_as_real(data).flatten(), weight.flatten()])

    drained = back_projected(False)
    assert drained.abs().max() > 0
    torch.testing.assert_close(back_projected(True), drained, rtol=1e-5, atol=1e-6 * float(drained.abs().max()))
    small = FinePassCache(volumes_ft, grid, frequencies, box, 1e5)
    assert not small.holds_every_sum
    with pytest.raises(ValueError, match="drain"):
        small.take_table()


def test_slice_tables_add_as_if_they_held_every_id() -> None:
    # tables of the ids their particles reached add row by row, as tables with a row for
    # every id (zeros elsewhere) add, bit for bit: overlapping, equal, disjoint and empty ids
    generator = torch.Generator().manual_seed(4)

    def table(ids: list[int]) -> SliceTable:
        index = torch.tensor(sorted(ids), dtype=torch.long)
        data = torch.view_as_complex(torch.randn(len(ids), 6, 2, generator=generator))
        return SliceTable(index, data, torch.rand(len(ids), 6, generator=generator))

    n_ids = 12
    cases = [([1, 4, 5, 9], [0, 4, 9, 11]), ([2, 3], [2, 3]), ([0, 1], [7]), ([], [3, 8]), ([5], [])]
    for left, right in cases:
        a, b = table(left), table(right)
        expected = a.dense(n_ids).add_(b.dense(n_ids))
        got = a.add_(b)
        assert torch.equal(got.ids, torch.tensor(sorted(set(left) | set(right)), dtype=torch.long))
        dense = got.dense(n_ids)
        assert torch.equal(dense.data, expected.data) and torch.equal(dense.weight, expected.weight)
        # processes add the sums only, never the ids
        assert [t.data_ptr() for t in dense.tensors()] == [dense.data.data_ptr(), dense.weight.data_ptr()]


@pytest.mark.parametrize("n_classes", [1, 2, 3])
def test_fine_pass_projections_are_the_children_of_each_pair(n_classes: int) -> None:
    # the table holds all classes of a coarse orientation; any pairs, asked in any order and
    # again, with a table that holds them all, one that is emptied on the way, and one too
    # small for a request, are the children's projections of their own class
    from cryotorch.em.estep import FinePassCache
    from cryotorch.ops.projection import extract_slices, prepare_fourier_volumes

    generator = torch.Generator().manual_seed(5)
    box = 16
    frequencies = sorted_frequencies(box, 6)
    volumes_ft = prepare_fourier_volumes(torch.randn(n_classes, box, box, box, generator=generator))
    grid = build_pose_grid(0, 2.0, 2.0, "C1", oversampling=1)
    n_sub, n = grid.n_children, frequencies.shape[0]
    requests = [(torch.randint(n_classes, (12,), generator=generator), torch.randint(grid.n_rotations, (12,), generator=generator)) for _ in range(3)]
    for budget in (2**26, 6 * n_classes * n_sub * n * 8, 2 * n_classes * n_sub * n * 8):
        cache = FinePassCache(volumes_ft, grid, frequencies, box, budget)
        for classes, rotations in requests:
            pairs = torch.unique(classes * grid.n_rotations + rotations)
            classes, rotations = pairs // grid.n_rotations, pairs % grid.n_rotations
            got = cache.projections(classes, rotations)
            for u in range(pairs.numel()):
                k, matrices = int(classes[u]), grid.children_matrices(rotations[u : u + 1]).reshape(-1, 3, 3)
                expected = extract_slices(volumes_ft[k : k + 1], matrices, frequencies, box)[0]
                torch.testing.assert_close(got[u], expected, rtol=1e-4, atol=1e-4)  # two interpolation kernels: rounding apart


def test_pass_offsets_act_on_their_own_pass() -> None:
    # the self-fit discount differs between the passes: an offset of the fine pass moves the
    # class log-odds by exactly its difference when the coarse pass keeps every sample, and
    # leaves the selection alone; one of the coarse pass only decides which samples survive
    from cryotorch.em.estep import EStepSettings, FinePassCache, PassOffsets, expectation

    box, frequencies, volumes_ft, grid, batch, coarse, log_prior, generator = _alignment_problem(6, 0, 8)
    batch.inv_sigma2 *= 1e-3  # noisy particles: both classes keep some posterior

    def run(offsets: PassOffsets | None, significance: float) -> torch.Tensor:
        settings = EStepSettings(frequencies=frequencies, n_coarse=20, box_size=box, pixel_size_angstrom=4.0, significance=significance, max_significant=100000)
        cache = FinePassCache(volumes_ft, grid, frequencies, box, 2**26)
        return expectation(batch, volumes_ft, coarse, grid, cache, log_prior, 10.0, settings, class_offset=offsets).class_posterior.double()

    def log_odds(posterior: torch.Tensor) -> torch.Tensor:
        return torch.log(posterior[:, 1]) - torch.log(posterior[:, 0])

    offset = -3 * torch.rand(8, 2, generator=generator)
    plain = run(None, 1.0)
    fine = run(PassOffsets(None, offset, offset), 1.0)
    torch.testing.assert_close(log_odds(fine), log_odds(plain) + (offset[:, 1] - offset[:, 0]).double(), rtol=0, atol=1e-3)
    # a coarse penalty far beyond the significant mass drops the class before the fine pass
    penalty = torch.zeros(8, 2)
    penalty[:, 0] = -1e4
    kept = run(None, 0.999)
    dropped = run(PassOffsets(penalty, None, None), 0.999)
    assert (kept[:, 0] > 1e-3).sum() >= 3 and (dropped[:, 0] == 0).all()
    # each pass holds a different share of the cross term: one tensor for all is refused
    settings = EStepSettings(frequencies=frequencies, n_coarse=20, box_size=box, pixel_size_angstrom=4.0)
    cache = FinePassCache(volumes_ft, grid, frequencies, box, 2**26)
    with pytest.raises(ValueError, match="PassOffsets"):
        expectation(batch, volumes_ft, coarse, grid, cache, log_prior, 10.0, settings, class_offset=offset)


def test_broad_particles_skip_oversampling_as_on_a_grid_without_it() -> None:
    # a particle with more significant coarse samples than max_significant_oversampled is
    # scored at the coarse samples themselves: exactly what a grid without oversampling gives
    # it, while the other particles of the batch keep their oversampled result
    from cryotorch.em.estep import EStepSettings, FinePassCache, expectation

    box, frequencies, volumes_ft, grid, batch, coarse, log_prior, _ = _alignment_problem(6, 0, 8)
    # half the particles are a thousand times noisier: broad posteriors
    batch.inv_sigma2[::2] *= 1e-3

    def run(limit: int | None, oversampled: bool = True) -> object:
        settings = EStepSettings(frequencies=frequencies, n_coarse=20, box_size=box, pixel_size_angstrom=4.0, max_significant_oversampled=limit)
        used = grid if oversampled else grid.without_oversampling()
        cache = FinePassCache(volumes_ft, used, frequencies, box, 2**26)
        unrefined = FinePassCache(volumes_ft, grid.without_oversampling(), frequencies, box, 2**26)
        return expectation(batch, volumes_ft, coarse, grid, cache, log_prior, 10.0, settings, unrefined_projections=unrefined)

    refined, plain = run(None), run(None, oversampled=False)
    everyone = run(0)
    torch.testing.assert_close(everyone.class_posterior, plain.class_posterior)
    torch.testing.assert_close(everyone.log_likelihood, plain.log_likelihood)
    torch.testing.assert_close(everyone.best_euler_deg, plain.best_euler_deg)
    mixed = run(10)
    kinds = []
    for i in range(8):
        for kind, reference in (("refined", refined), ("plain", plain)):
            if torch.allclose(mixed.log_likelihood[i], reference.log_likelihood[i]) and torch.allclose(mixed.class_posterior[i], reference.class_posterior[i]):
                kinds.append(kind)
                break
    assert len(kinds) == 8 and set(kinds) == {"refined", "plain"}
    # the weak (broad) particles are the ones left without oversampling
    assert all(kinds[i] == "plain" for i in range(0, 8, 2))


def test_class_scale_is_profiled_at_each_class_best_sample() -> None:
    from cryotorch.em.estep import _class_best

    generator = torch.Generator().manual_seed(4)
    b, t, k, r = 3, 5, 2, 7
    plain = torch.randn(b, t, k, r, generator=generator)
    norm = torch.rand(b, k, r, generator=generator) + 0.5
    offset_prior = -torch.rand(b, t, generator=generator)
    orientation_prior = -torch.rand(b, r, generator=generator)
    orientation_prior[:, 0] = -math.inf  # not searched
    logits = plain + offset_prior[:, :, None, None] + orientation_prior[:, None, None, :]
    best, best_cross, best_norm = _class_best(logits, norm, offset_prior, orientation_prior)
    for i in range(b):
        for c in range(k):
            shift, rotation = divmod(int(logits[i, :, c, :].argmax()), r)
            torch.testing.assert_close(best[i, c], logits[i, shift, c, rotation])
            torch.testing.assert_close(best_cross[i, c], plain[i, shift, c, rotation] + norm[i, c, rotation])
            torch.testing.assert_close(best_norm[i, c], norm[i, c, rotation])


def test_grid_perturbation_walks_deterministically_within_the_factor() -> None:
    from cryotorch.em.sampling import grid_perturbation

    values = [grid_perturbation(7, iteration, 0.5) for iteration in range(1, 30)]
    assert values == [grid_perturbation(7, iteration, 0.5) for iteration in range(1, 30)]
    assert all(-0.5 <= v < 0.5 for v in values)
    # each iteration moves by 0.25–0.5 on the circle of circumference 1
    steps = [(b - a) % 1.0 for a, b in zip([0.0, *values], values)]
    assert all(0.25 - 1e-9 <= s <= 0.5 + 1e-9 for s in steps)
    assert grid_perturbation(7, 5, 0.0) == 0.0
    assert values != [grid_perturbation(8, iteration, 0.5) for iteration in range(1, 30)]


def test_perturbed_grid_turns_every_orientation_by_the_same_rotation() -> None:
    from cryotorch.conventions import euler_deg_to_matrix
    from cryotorch.em.sampling import perturb_pose_grid
    from cryotorch.ops.healpix import rotation_angle_deg

    grid = build_pose_grid(1, 2.0, 2.0, "C1", oversampling=1)
    moved = perturb_pose_grid(grid, 0.3, 2.0)
    assert perturb_pose_grid(grid, 0.0, 2.0) is grid
    p = 0.3 * grid.coarse_step_deg
    turn = euler_deg_to_matrix(torch.tensor([p, p, p], dtype=torch.float64))
    expected_angle = rotation_angle_deg(torch.zeros(1, 3, dtype=torch.float64), torch.tensor([[p, p, p]], dtype=torch.float64))
    every = torch.arange(grid.n_rotations)
    fine_before, fine_after = grid.children_euler_deg(every).reshape(-1, 3), moved.children_euler_deg(every).reshape(-1, 3)
    for before, after in ((grid.coarse_euler_deg(every), moved.coarse_euler_deg(every)), (fine_before, fine_after)):
        torch.testing.assert_close(euler_deg_to_matrix(after.double()), euler_deg_to_matrix(before.double()) @ turn, atol=1e-5, rtol=0)
        angles = rotation_angle_deg(before.double(), after.double())
        torch.testing.assert_close(angles, expected_angle.expand_as(angles), atol=1e-3, rtol=0)
    torch.testing.assert_close(moved.coarse_matrices(every), euler_deg_to_matrix(moved.coarse_euler_deg(every)).float(), atol=1e-5, rtol=0)
    # the turned viewing directions are the third rows of the turned matrices
    torch.testing.assert_close(moved.coarse_directions[moved.direction_of(every)], moved.coarse_matrices64(every)[:, 2], atol=1e-12, rtol=0)
    torch.testing.assert_close(moved.coarse_shifts_px, grid.coarse_shifts_px + 0.6)
    torch.testing.assert_close(moved.fine_shifts_px, grid.fine_shifts_px + 0.6)
    # a turn does not move children relative to their parents
    turned_spread = moved.child_spread_deg
    torch.testing.assert_close(turned_spread, grid.child_spread_deg, rtol=0, atol=1e-3)


def test_a_fine_grid_searches_locally_without_holding_its_orientations() -> None:
    # 0.47° (order 7): 151 million coarse orientations, 1.2 billion children; the grid holds
    # its directions, and a local search and a nearest-sample query compute the few they need
    from cryotorch.em.sampling import GridSamples, local_search
    from cryotorch.ops.healpix import rotation_angle_deg
    from cryotorch.ops.rotations import random_rotations
    from cryotorch.conventions import matrix_to_euler_deg

    grid = build_pose_grid(7, 2.0, 1.0, "C1", oversampling=1)
    assert grid.n_rotations == 196_608 * 768
    priors = matrix_to_euler_deg(random_rotations(2, torch.Generator().manual_seed(4)).double())
    search = local_search(grid, priors, 0.5)
    # the oracle: every searched orientation within 3σ of its particle's prior, and the
    # nearest one a fraction of a step away
    angles = rotation_angle_deg(priors[:, None], grid.coarse_euler_deg(search.rotations)[None])  # (2, U)
    searched = torch.isfinite(search.log_prior)
    assert bool((angles[searched] <= 1.5 + 1e-6).all()) and float(angles.amin(dim=1).max()) < grid.coarse_step_deg
    torch.testing.assert_close(search.log_prior[searched], -(angles[searched] ** 2) / (2 * 0.5**2))
    poses = random_rotations(3, torch.Generator().manual_seed(5))
    nearest = GridSamples(grid).nearest(poses)
    assert float(rotation_angle_deg(matrix_to_euler_deg(poses.double()), matrix_to_euler_deg(nearest.double())).max()) < grid.coarse_step_deg / 2
    held = sum(value.numel() * value.element_size() for value in [*vars(grid).values(), *vars(grid.orientations).values()] if isinstance(value, torch.Tensor))
    assert held < 60 * grid.orientations.n_directions  # angles, pixels, directions and spreads: not O(R)


def test_nearest_orientations_and_translations_of_a_perturbed_grid() -> None:
    from cryotorch.conventions import matrix_to_euler_deg
    from cryotorch.em.sampling import GridSamples, nearest_translation_px, perturb_pose_grid
    from cryotorch.ops.healpix import rotation_angle_deg
    from cryotorch.ops.rotations import random_rotations

    grid = build_pose_grid(1, 3.0, 2.0, "C1", oversampling=1)
    current = perturb_pose_grid(grid, -0.2, 2.0)
    # the oversampled children of each coarse orientation, and the coarse orientations alone
    every = torch.arange(current.n_rotations)
    fine = current.children_matrices(every)  # (R, F, 3, 3)
    # searched by neighbourhoods (a limit of 0 samples searched whole) and whole (the default
    # for a grid this small)
    for children, samples_grid in ((fine, current), (current.coarse_matrices(every)[:, None], current.without_oversampling())):
        for whole_limit in (0, 2**19):
            samples = GridSamples(samples_grid, whole_limit)
            assert (samples.every is None) == (whole_limit == 0)
            candidate_euler = matrix_to_euler_deg(children.reshape(-1, 3, 3).double())
            poses = random_rotations(40, torch.Generator().manual_seed(3))
            nearest = samples.nearest(poses)
            # the oracle: the angle to every candidate
            closest = rotation_angle_deg(matrix_to_euler_deg(poses.double())[:, None], candidate_euler[None]).amin(dim=1)
            torch.testing.assert_close(rotation_angle_deg(matrix_to_euler_deg(poses.double()), matrix_to_euler_deg(nearest.double())), closest, rtol=0, atol=1e-3)
            # a sample is its own nearest orientation
            own = children.reshape(-1, 3, 3)[[5, children.shape[0] * children.shape[1] - 3]]
            torch.testing.assert_close(samples.nearest(own), own)
    # fine translations at step 1 px are the coarse ones (step 2 px) and those 1 px further,
    # a lattice through the centre; here all moved by -0.2 · 2 px: the nearest to the centre
    # lies at -0.4 along x and along y
    assert nearest_translation_px(grid).abs().max() == 0
    torch.testing.assert_close(nearest_translation_px(current), torch.tensor([-0.4, -0.4]))
    assert nearest_translation_px(build_pose_grid(1, 3.0, 1.0, "C1", oversampling=0)).abs().max() == 0


def test_local_search_scores_the_batch_neighbourhood_as_each_particle_alone() -> None:
    # the coarse pass of a local search scores only the orientations some particle of the
    # batch searches: a batch gives each particle what it gets scored alone (its own
    # neighbourhood only), with the best pose inside that neighbourhood
    from cryotorch.em.estep import EStepSettings, FinePassCache, expectation
    from cryotorch.ops.healpix import rotation_angle_deg

    box, frequencies, volumes_ft, grid, batch, coarse, log_prior, generator = _alignment_problem(5, 1, 5)
    batch.prior_euler_deg = grid.coarse_euler_deg(torch.randint(0, grid.n_rotations, (5,), generator=generator)) + 4.0
    settings = EStepSettings(frequencies=frequencies, n_coarse=20, box_size=box, pixel_size_angstrom=4.0, local_sigma_deg=10.0)

    def run(index: torch.Tensor) -> object:
        cache = FinePassCache(volumes_ft, grid, frequencies, box, 2**26)
        return expectation(batch.select(index), volumes_ft, coarse, grid, cache, log_prior, 10.0, settings)

    together = run(torch.arange(5))
    for i in range(5):
        alone = run(torch.tensor([i]))
        torch.testing.assert_close(alone.class_posterior[0], together.class_posterior[i], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(alone.best_euler_deg[0], together.best_euler_deg[i])
        torch.testing.assert_close(alone.log_likelihood[0], together.log_likelihood[i], rtol=1e-5, atol=1e-3)
    angles = rotation_angle_deg(together.best_euler_deg, batch.prior_euler_deg)
    assert float(angles.max()) <= 3 * 10.0 + grid.coarse_step_deg


def test_significant_sample_lists_match_their_dense_mask() -> None:
    from cryotorch.em.estep import SignificantSamples

    generator = torch.Generator().manual_seed(7)
    b, n_shifts, n_pairs, cap = 4, 5, 6, 7
    index = torch.stack([torch.randperm(n_shifts * n_pairs, generator=generator)[:cap] for _ in range(b)])
    valid = torch.rand(b, cap, generator=generator) < 0.5
    valid[:, 0] = True
    dense = torch.zeros(b, n_shifts * n_pairs, dtype=torch.bool)
    dense[valid.nonzero()[:, 0], index[valid]] = True
    dense = dense.reshape(b, n_shifts, n_pairs)
    scored = torch.tensor([4, 9, 17])  # the grid numbers of the U = 3 scored orientations of K = 2 classes
    samples = SignificantSamples(index, valid, n_pairs, scored)
    # the unions of the first 1, 2, ... particles' samples
    pairs_growth, shifts_growth = samples.union_growth(n_shifts)
    torch.testing.assert_close(pairs_growth, dense.any(dim=1).int().cummax(dim=0).values.sum(-1))
    torch.testing.assert_close(shifts_growth, dense.any(dim=2).int().cummax(dim=0).values.sum(-1))
    shift_used, pair_used, mask = samples.select(slice(1, 3)).union()
    torch.testing.assert_close(shift_used, dense[1:3].any(dim=(0, 2)).nonzero()[:, 0])
    torch.testing.assert_close(pair_used, dense[1:3].any(dim=(0, 1)).nonzero()[:, 0])
    torch.testing.assert_close(mask, dense[1:3][:, shift_used][:, :, pair_used])
    classes, rotations = samples.class_and_rotation(torch.arange(n_pairs))
    torch.testing.assert_close(classes, torch.tensor([0, 0, 0, 1, 1, 1]))
    torch.testing.assert_close(rotations, torch.tensor([4, 9, 17, 4, 9, 17]))
    # a global search: all U = 3 orientations of the grid, in order, given by their number
    classes, rotations = SignificantSamples(index, valid, n_pairs, 3).class_and_rotation(torch.arange(n_pairs))
    torch.testing.assert_close(classes, torch.tensor([0, 0, 0, 1, 1, 1]))
    torch.testing.assert_close(rotations, torch.tensor([0, 1, 2, 0, 1, 2]))


@pytest.mark.parametrize("cap", [3, 25, 500])
def test_significant_samples_are_the_smallest_set_holding_the_mass(cap: int) -> None:
    from cryotorch.em.estep import _significant, _top_logits

    generator = torch.Generator().manual_seed(3)
    b, n_shifts, n_pairs = 6, 7, 40
    logits = torch.randn(b, n_shifts, n_pairs, generator=generator) * torch.tensor([0.1, 1.0, 3.0, 10.0, 30.0, 100.0])[:, None, None]
    logits[0, :, :30] = -math.inf  # unsearched samples, as in a local search
    posterior = torch.softmax(logits.reshape(b, -1).double(), dim=-1)
    given = logits.clone()
    top, order, log_normaliser = _top_logits(given, cap)
    assert torch.equal(given, logits)
    # the normaliser: for the peaked rows (cap < 40 pairs) from the candidate pairs alone, for
    # the broad ones from the pairs whose maxima lie near the peak (at cap 3, broad rows 3
    # and 4 also hold 3 and 37 pairs far below it, which are left out)
    reference_normaliser = torch.logsumexp(logits.double().reshape(b, -1), dim=-1, keepdim=True)
    torch.testing.assert_close(log_normaliser.double(), reference_normaliser, rtol=1e-6, atol=1e-5)
    keep = _significant(top, log_normaliser, 0.999)
    # reference: a full sort of the posterior, and the fewest samples holding 99.9 % of it
    reference = torch.argsort(posterior, dim=-1, descending=True)[:, : min(cap, n_shifts * n_pairs)]
    ranked = posterior.gather(1, reference)
    torch.testing.assert_close(posterior.gather(1, order), ranked, rtol=0, atol=0)
    # the same samples in the same order; those of zero posterior tie and may come in any order
    torch.testing.assert_close(order[ranked > 0], reference[ranked > 0], rtol=0, atol=0)
    torch.testing.assert_close(keep, (ranked.cumsum(-1) - ranked) < 0.999)

@pytest.mark.parametrize("fraction", [0.5, 0.999, 1.0])
def test_significant_count_is_that_of_a_full_sort(fraction: float) -> None:
    # rows from flat to peaked, and a row of masked (zero) samples: the count of the fewest
    # samples holding the fraction, as a full sort gives it, whatever the cap above it
    from cryotorch.em.estep import _significant_count

    generator = torch.Generator().manual_seed(11)
    logits = torch.randn(7, 300, generator=generator) * torch.tensor([0.0, 0.1, 1.0, 3.0, 10.0, 30.0, 100.0])[:, None]
    logits[2, 100:] = -math.inf
    posterior = torch.softmax(logits, dim=-1)
    ranked = torch.sort(posterior, dim=-1, descending=True).values
    expected = ((ranked.cumsum(-1) - ranked) < fraction).sum(-1)
    assert expected.min() >= 1 and expected.max() > 100 and expected.unique().numel() >= 5
    torch.testing.assert_close(_significant_count(posterior, fraction, 300), expected)
    torch.testing.assert_close(_significant_count(posterior, fraction, 50), expected.clamp(max=50))
    assert _significant_count(posterior[:0], fraction, 300).numel() == 0


def test_local_search_continues_across_the_border_of_the_asymmetric_unit() -> None:
    # with C4 the grid covers rot in [-45, 45]; a particle whose prior is a symmetry mate of
    # its true pose (rot + 90) still finds that pose, as the search takes every grid pose's
    # mates into account; the plain angles would keep it at the far side of the unit
    import dataclasses

    from cryotorch.em.estep import EStepSettings, FinePassCache, expectation
    from cryotorch.ops.healpix import pairwise_rotation_angle_deg
    from cryotorch.ops.projection import extract_slices, prepare_fourier_volumes

    generator = torch.Generator().manual_seed(8)
    box = 16
    frequencies = sorted_frequencies(box, 6)
    volume = torch.randn(box, box, box, generator=generator)
    volumes_ft = prepare_fourier_volumes(c4_average(volume)[None])  # C4 about z through the centre
    grid = build_pose_grid(2, 1.0, 1.0, "C4", oversampling=1)
    euler = grid.coarse_euler_deg(torch.arange(grid.n_rotations))
    border = int(torch.argmin(euler[:, 0] + 0.01 * (euler[:, 1] - 90).abs()))
    truth = grid.children_euler_deg(torch.tensor([border]))[0, 3]  # a fine pose near rot = -45
    image = extract_slices(volumes_ft, euler_deg_to_matrix(truth[None]).float(), frequencies, box)[0]  # (1, M)
    prior = truth + torch.tensor([90.0 + 3.0, 0.0, 0.0], dtype=torch.float64)
    batch = PreparedBatch(
        spectra=image,
        ctf=torch.ones_like(image.real),
        inv_sigma2=torch.full_like(image.real, 10.0),
        scale=torch.ones(1),
        prior_origin_px=torch.zeros(1, 2),
        prior_euler_deg=prior[None],
    )
    coarse = CoarseProjections(volumes_ft, grid, frequencies[:20], box, 2**28)
    settings = EStepSettings(frequencies=frequencies, n_coarse=20, box_size=box, pixel_size_angstrom=4.0, local_sigma_deg=5.0)

    def best_angle_to_truth(search_grid: object) -> float:
        cache = FinePassCache(volumes_ft, search_grid, frequencies, box, 2**26)
        result = expectation(batch, volumes_ft, coarse, search_grid, cache, torch.zeros(1), 10.0, settings)
        return float(pairwise_rotation_angle_deg(result.best_euler_deg, truth[None], grid.symmetry_matrices)[0, 0])

    assert float(pairwise_rotation_angle_deg(prior[None], truth[None], grid.symmetry_matrices)[0, 0]) < 3.5
    assert best_angle_to_truth(grid) < 1e-3
    plain = dataclasses.replace(grid, symmetry_matrices=grid.symmetry_matrices[:1])
    assert best_angle_to_truth(plain) > 3.0


@pytest.mark.parametrize(("symmetry", "sigma_deg"), [("C1", 5.0), ("C1", 1.0), ("C4", 5.0), ("D2", 12.0)])
def test_local_search_equals_the_angles_to_every_grid_pose(symmetry: str, sigma_deg: float) -> None:
    # the search measures only candidates whose viewing direction is near a particle's; the
    # oracle measures the angle to every pose of the grid. σ = 1° is narrower than the 15°
    # grid, so that each particle searches its nearest poses and the candidates are widened
    from cryotorch.em.sampling import local_search
    from cryotorch.ops.healpix import pairwise_rotation_angle_deg

    generator = torch.Generator().manual_seed(11)
    grid = build_pose_grid(2, 1.0, 1.0, symmetry)
    span = torch.tensor([360.0, 180.0, 360.0], dtype=torch.float64)
    priors = torch.rand(6, 3, generator=generator, dtype=torch.float64) * span - torch.tensor([180.0, 0.0, 180.0], dtype=torch.float64)
    priors = torch.cat([priors, priors[:2] + 2.0])  # neighbours, as in a batch sorted by pose
    angles = pairwise_rotation_angle_deg(priors, grid.coarse_euler_deg(torch.arange(grid.n_rotations)), grid.symmetry_matrices)  # (B, R)
    searched = (angles <= 3 * sigma_deg) | (angles <= angles.amin(dim=1, keepdim=True) + grid.coarse_step_deg)
    expected = searched.any(dim=0).nonzero()[:, 0]
    local = local_search(grid, priors, sigma_deg)
    torch.testing.assert_close(local.rotations, expected, rtol=0, atol=0)
    reference = torch.where(searched, -(angles**2) / (2 * sigma_deg**2), -math.inf)[:, expected]
    torch.testing.assert_close(local.log_prior, reference, rtol=1e-12, atol=1e-12)


def test_local_search_size_estimates_the_orientations_a_particle_searches() -> None:
    from cryotorch.em.sampling import local_search, local_search_size

    generator = torch.Generator().manual_seed(12)
    grid = build_pose_grid(3, 1.0, 1.0, "C1")
    span = torch.tensor([360.0, 180.0, 360.0], dtype=torch.float64)
    priors = torch.rand(40, 3, generator=generator, dtype=torch.float64) * span
    for sigma_deg in (2.0, 5.0, 10.0):
        counts = torch.tensor([float(torch.isfinite(local_search(grid, prior[None], sigma_deg).log_prior).sum()) for prior in priors])
        assert 0.5 < local_search_size(grid, sigma_deg) / float(counts.mean()) < 2.0


def test_table_slots_map_keys_to_rows_as_a_dictionary_does() -> None:
    # the rows of a table are found through its sorted keys, not a map over every possible
    # key: against a dict, over random requests that refill, overflow and empty the table
    from cryotorch.em.estep import _TableSlots

    generator = torch.Generator().manual_seed(17)
    slots, held = _TableSlots(50, torch.device("cpu")), {}
    for _ in range(200):
        # small keys recur (found again); huge ones test the sorted search
        high = 10**12 if float(torch.rand(1, generator=generator)) < 0.3 else 120
        keys = torch.unique(torch.randint(0, high, (int(torch.randint(1, 60, (1,), generator=generator)),), generator=generator))
        keys = keys[torch.randperm(keys.numel(), generator=generator)]
        assigned = slots.assign(keys)
        if keys.numel() > 50:
            assert assigned is None
            continue
        rows, missing = assigned
        if len(held) + sum(int(k) not in held for k in keys) > 50:
            held = {}
        expected_missing = [i for i, k in enumerate(keys.tolist()) if k not in held]
        assert missing.tolist() == expected_missing
        for i in expected_missing:
            held[int(keys[i])] = len(held)
        assert rows.tolist() == [held[k] for k in keys.tolist()]
        assert slots.n_used == len(held) and torch.all(slots.keys[1:] > slots.keys[:-1])
    slots.clear()
    assert slots.n_used == 0 and torch.all(slots.find(keys) == -1)


def test_local_coarse_projections_come_from_a_bounded_table() -> None:
    # a local search's coarse projections are extracted when a batch asks for them and kept
    # in a table of a quarter of the budget; whatever the table holds, a batch gets the
    # layout of the whole grid's projections (to rounding: slice coordinates come from
    # matrix products of other shapes)
    from cryotorch.ops.projection import extract_slices, prepare_fourier_volumes

    generator = torch.Generator().manual_seed(13)
    box, n_classes = 16, 3
    frequencies = sorted_frequencies(box, 6)[:20]
    volumes_ft = prepare_fourier_volumes(torch.randn(n_classes, box, box, box, generator=generator))
    grid = build_pose_grid(1, 1.0, 1.0, "C1")
    full = ScoreProjections.of(extract_slices(volumes_ft, grid.coarse_matrices(torch.arange(grid.n_rotations)), frequencies, box))
    coarse = CoarseProjections(volumes_ft, grid, frequencies, box, 4 * 10 * n_classes * 20 * 12)
    assert coarse.slots.capacity == 10
    # new, partly held, overflowing (the table is emptied), more than the table holds
    for rotations in (torch.arange(0, 6), torch.arange(3, 9), torch.arange(20, 26), torch.arange(0, 30)):
        layout = coarse.scoring(rotations)
        torch.testing.assert_close(layout.stacked, full.stacked[:, rotations].reshape(-1, 40), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(layout.power, full.power[:, rotations].reshape(-1, 20), rtol=1e-5, atol=1e-5)
        assert coarse.slots.n_used <= coarse.slots.capacity
    (start, width, layout), *rest = coarse.pieces()
    assert (start, width, rest) == (0, grid.n_rotations, [])
    first_halves = (torch.arange(0, grid.n_rotations, 12)[:, None] + torch.arange(6)).reshape(-1)
    torch.testing.assert_close(layout.real, full.stacked[:, first_halves, :20].reshape(-1, 20), rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("symmetry", ["C1", "D2"])
def test_half_turn_pairs_score_as_the_projections_along_every_orientation(symmetry: str, device: str) -> None:
    # a projection turned by 180° in its plane is the conjugate of the unturned one (a real
    # map's transform at −k), so the scores of the half-turn layout, made from the first half
    # of each direction's psi samples, are those of the projections along all orientations
    from cryotorch.em.estep import HalfTurnProjections, coarse_logits
    from cryotorch.ops.projection import extract_slices, prepare_fourier_volumes

    generator = torch.Generator().manual_seed(15)
    box, n_classes, n = 16, 3, 20
    frequencies = sorted_frequencies(box, 6).to(device)
    volumes_ft = prepare_fourier_volumes(torch.randn(n_classes, box, box, box, generator=generator).to(device))
    grid = build_pose_grid(1, 2.0, 2.0, symmetry, device=torch.device(device))
    n_rot, n_psi = grid.n_rotations, grid.orientations.n_psi
    every = extract_slices(volumes_ft, grid.coarse_matrices(torch.arange(n_rot, device=device)), frequencies[:n], box)  # (K, R, n)
    turned = every.reshape(n_classes, -1, 2, n_psi // 2, n)
    torch.testing.assert_close(turned[:, :, 1], turned[:, :, 0].conj(), rtol=1e-4, atol=1e-4)
    assert float(turned[:, :, 0].imag.abs().mean()) > 0.1 * float(turned[:, :, 0].abs().mean())  # not trivially real
    batch = random_batch(5, frequencies.shape[0], generator, device)
    ramps = phase_ramps(grid.coarse_shifts_px, frequencies[:n], box)
    row_term = torch.randn(5, ramps.shape[0], generator=generator).to(device)
    class_term = torch.randn(5, n_classes, generator=generator).to(device)
    class_term[2, 1] = -math.inf  # a class the particle may not take
    expected, expected_norm = coarse_logits(batch, ScoreProjections.of(every).flatten(), ramps, n, row_term, class_term)
    coarse = CoarseProjections(volumes_ft, grid, frequencies[:n], box, 2**28)
    (_, _, layout), *_ = coarse.pieces()
    assert isinstance(layout, HalfTurnProjections) and layout.n_columns == n_classes * n_rot
    buffer = torch.full((5 * ramps.shape[0] * n_classes * n_rot + 7,), math.nan, device=device)
    scores, norm = coarse_logits(batch, layout, ramps, n, row_term, class_term, buffer)
    assert scores.data_ptr() == buffer.data_ptr()
    torch.testing.assert_close(norm, expected_norm, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(scores, expected, rtol=1e-4, atol=1e-3)
    assert torch.equal(torch.isinf(scores), torch.isinf(expected)) and int(torch.isinf(scores).sum()) == ramps.shape[0] * n_rot
    # on the CPU, 144 (class, direction) groups of 6: five chunks of columns, the last one partial
    assert layout.real.shape[0] // layout.n_half > 4 * (192 // layout.n_half) or symmetry == "D2" or device != "cpu"
    # and without class terms, into fresh memory
    halves, _ = coarse_logits(batch, layout, ramps, n, row_term, None)
    plain, _ = coarse_logits(batch, ScoreProjections.of(every).flatten(), ramps, n, row_term, None)
    torch.testing.assert_close(halves, plain, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("budget", [2**28, 4 * 100 * 3 * 20 * 12])
def test_global_coarse_projections_come_in_pieces_kept_only_within_the_budget(budget: float) -> None:
    # a global search's projections are kept when all fit a quarter of the budget; otherwise
    # each pass over the pieces extracts them anew, one piece at a time
    from cryotorch.ops.projection import extract_slices, prepare_fourier_volumes

    generator = torch.Generator().manual_seed(14)
    box, n_classes = 16, 3
    frequencies = sorted_frequencies(box, 6)[:20]
    volumes_ft = prepare_fourier_volumes(torch.randn(n_classes, box, box, box, generator=generator))
    grid = build_pose_grid(1, 1.0, 1.0, "C1")
    n_rot = grid.n_rotations
    full = ScoreProjections.of(extract_slices(volumes_ft, grid.coarse_matrices(torch.arange(grid.n_rotations)), frequencies, box))
    coarse = CoarseProjections(volumes_ft, grid, frequencies, box, budget)
    assert coarse.holds_all == (budget == 2**28)
    for _ in range(2):
        # pieces of whole directions (12 psi samples each), laid out by their first 6
        pieces = list(coarse.pieces(250))
        assert [(start, width) for start, width, _ in pieces] == [(0, 240), (240, 240), (480, n_rot - 480)]
        for start, width, layout in pieces:
            first_halves = (torch.arange(start, start + width, 12)[:, None] + torch.arange(6)).reshape(-1)
            torch.testing.assert_close(layout.real, full.stacked[:, first_halves, :20].reshape(-1, 20), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(layout.imag, full.stacked[:, first_halves, 20:].reshape(-1, 20), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(layout.power, full.power[:, first_halves].reshape(-1, 20), rtol=1e-5, atol=1e-5)
    again = [layout for _, _, layout in coarse.pieces(250)]
    assert all((first is second) == coarse.holds_all for (_, _, first), second in zip(pieces, again))


def test_global_search_batches_fit_the_budget() -> None:
    from cryotorch.em.estep import global_search_batches

    t, k, r, n, n_coarse = 81, 3, 36864, 2000, 629
    per_score = 16 * t * k
    # roomy: every orientation at once, as many particles as fit (at most 512)
    assert global_search_batches(t, k, 4608, n, n_coarse, 2**29, True) == (int(2**29 / (per_score * 4608 + 64 * n)), None)
    assert global_search_batches(t, k, 12, n, n_coarse, 2**29, True) == (512, None)
    # held projections, large grid: 13 particles (1,024 GEMM rows) in pieces that fit
    batch, piece = global_search_batches(t, k, r, n, n_coarse, 2**29, True)
    assert batch == 13 and piece is not None and 1 <= piece < r
    assert batch * (piece * per_score + 64 * n) <= 2**29 < batch * ((piece + 1) * per_score + 64 * n)
    # projections re-extracted by every batch: 405 particles (32,768 rows), pieces whose
    # projections fit as well
    batch, piece = global_search_batches(t, k, r, n, n_coarse, 2**29, False)
    assert batch == 405 and piece is not None
    assert batch * (piece * per_score + 64 * n) <= 2**29
    batch, piece = global_search_batches(t, k, r, n, n_coarse, 2**20, False)
    assert piece is not None and 6 * k * n_coarse * piece <= 2**20
    # a small budget takes fewer particles, not pieces of a few orientations
    batch, piece = global_search_batches(t, k, r, n, n_coarse, 2**24, False)
    assert batch == int(2**24 / (64 * n + per_score * 256)) == 14 and piece is not None and piece >= 256
    # at least one particle and one orientation, whatever the budget
    assert global_search_batches(t, k, r, n, n_coarse, 1.0, False) == (1, 1)


@pytest.mark.parametrize(
    ("scale_sigma", "local", "forced", "cap", "symmetry"),
    [(0.0, False, False, 500, "C1"), (0.3, False, False, 500, "C1"), (0.0, True, True, 5, "C1"), (0.3, True, True, 500, "C1"), (0.0, True, False, 500, "D2")],
)
@pytest.mark.parametrize("device", DEVICES)
def test_own_samples_score_as_the_union_of_a_sub_batch(scale_sigma: float, local: bool, forced: bool, cap: int, symmetry: str, device: str) -> None:
    # scoring each particle against the children of its own significant samples gives the
    # posteriors, poses and M-step sums of scoring the sub-batch against their union
    from cryotorch.em.estep import EStepResult, EStepSettings, FinePassCache, SignificantSamples, _class_mask, _coarse_pass, _fine_sub_batch, _offset_log_prior, _own_samples_sub_batch

    box, frequencies, volumes_ft, grid, batch, coarse, log_prior, generator = _alignment_problem(8, 1, 9, device)
    if symmetry != "C1":
        grid = build_pose_grid(1, 2.0, 2.0, symmetry, oversampling=1, device=torch.device(device))
        coarse = CoarseProjections(volumes_ft, grid, frequencies[:20], box, 2**28)
    batch.inv_sigma2[::3] *= 3e-3  # some broad posteriors: lists of many lengths
    settings = EStepSettings(
        frequencies=frequencies, n_coarse=20, box_size=box, pixel_size_angstrom=4.0, max_significant=cap, scale_sigma=scale_sigma, local_sigma_deg=10.0 if local else None
    )
    n_rot = grid.n_rotations
    ramps = phase_ramps(grid.coarse_shifts_px, frequencies[:20], box)
    offset_prior = _offset_log_prior(batch.prior_origin_px[:, None, :] + grid.coarse_shifts_px[None], 4.0, 10.0).float()
    mask = _class_mask(torch.randint(0, 2, (9,), generator=generator).to(device) if forced else None, 9, 2, batch.spectra.device)
    bias = torch.where(mask, log_prior[None].expand(9, -1), -math.inf).float()
    order, valid, scale = _coarse_pass(batch, lambda: coarse.pieces(None), n_rot, ramps, settings, offset_prior, None, None, bias)
    significant = SignificantSamples(order, valid, 2 * n_rot, n_rot)
    counts = valid.sum(-1)
    assert int(counts.min()) < int(counts.max()) or scale_sigma > 0  # (with the intensity every list is full)
    prior = log_prior[None].expand(9, -1).float()
    (union, union_sums), (own, own_sums) = (
        score(batch, FinePassCache(volumes_ft, grid, frequencies, box, 2**26), significant, prior, 10.0, settings, mask, scale) for score in (_fine_sub_batch, _own_samples_sub_batch)
    )
    for name in EStepResult.__dataclass_fields__:
        if name != "slices":
            # the fewest samples holding the significant mass: the two sums of the posteriors
            # round differently, which can move a sample at the cut across it
            tolerance = 1 if name == "n_significant" else 1e-4
            torch.testing.assert_close(getattr(own, name), getattr(union, name), rtol=1e-4, atol=tolerance, msg=name)
    assert torch.equal(own_sums[0], union_sums[0]) and own_sums[0].numel() > 5
    for own_sum, union_sum in zip(own_sums[1:], union_sums[1:]):
        torch.testing.assert_close(own_sum, union_sum, rtol=1e-4, atol=1e-5 * float(union_sum.abs().max()))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("scale_sigma", [0.0, 0.3])
@pytest.mark.parametrize("cap", [5, 500])
def test_a_coarse_pass_in_pieces_keeps_the_samples_of_one_in_a_piece(scale_sigma: float, cap: int, device: str) -> None:
    # scored in pieces of 48 of the 576 orientations (50 asked for, rounded down to whole
    # directions of 12 psi samples), each keeping only its best samples, the coarse pass selects the samples that one pass over all selects,
    # and so the posteriors, poses, intensities and M-step sums are the same, with every
    # class allowed or one forced
    from cryotorch.em.estep import EStepSettings, FinePassCache, expectation

    box, frequencies, volumes_ft, grid, batch, coarse, log_prior, generator = _alignment_problem(8, 1, 9, device)
    batch.inv_sigma2[::3] *= 3e-3  # some broad posteriors: many significant samples
    forced = torch.randint(0, 2, (9,), generator=generator).to(device)
    for forced_class in (None, forced):
        results = []
        for piece in (None, 50):
            settings = EStepSettings(
                frequencies=frequencies, n_coarse=20, box_size=box, pixel_size_angstrom=4.0, max_significant=cap, scale_sigma=scale_sigma, coarse_piece_rotations=piece
            )
            cache = FinePassCache(volumes_ft, grid, frequencies, box, 2**26)
            result = expectation(batch, volumes_ft, coarse, grid, cache, log_prior, 10.0, settings, forced_class)
            results.append((result, sorted((item.class_index, tuple(item.rotations.flatten().tolist())) for item in result.slices + cache.drain())))
        (whole, whole_slices), (pieces, piece_slices) = results
        assert whole.n_significant.max() > 1
        torch.testing.assert_close(pieces.class_posterior, whole.class_posterior, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(pieces.log_likelihood, whole.log_likelihood, rtol=1e-5, atol=1e-3)
        torch.testing.assert_close(pieces.best_euler_deg, whole.best_euler_deg)
        torch.testing.assert_close(pieces.best_origin_px, whole.best_origin_px)
        torch.testing.assert_close(pieces.n_significant, whole.n_significant)
        assert piece_slices == whole_slices


def test_pieces_profile_each_class_intensity_at_its_best_sample_over_all_orientations() -> None:
    # with an intensity scale the pieces first find each class's best sample over the whole
    # grid: the intensities are those profiled there, from one dense score matrix
    from cryotorch.em.estep import EStepSettings, _class_best, _coarse_pass, _offset_log_prior

    box, frequencies, volumes_ft, grid, batch, coarse, log_prior, _ = _alignment_problem(9, 1, 7)
    batch.inv_sigma2 *= 30  # sharp posteriors: no near-ties at the edge of the selection
    n_rot, n_classes = grid.n_rotations, 2
    ramps = phase_ramps(grid.coarse_shifts_px, frequencies[:20], box)
    origins = batch.prior_origin_px[:, None, :] + grid.coarse_shifts_px[None]
    offset_prior = _offset_log_prior(origins, 4.0, 10.0).float()
    layout = ScoreProjections.of(coarse._extract(torch.arange(n_rot))).flatten()
    cross, norm, _ = score_terms(batch, layout, ramps, 20)
    logits = (cross - norm).reshape(7, -1, n_classes, n_rot) + offset_prior[:, :, None, None]
    _, best_cross, best_norm = _class_best(logits, norm.reshape(7, n_classes, n_rot), offset_prior, None)
    expected = profiled_scale(best_cross, best_norm, 0.3).clamp(min=1e-3)
    assert (expected - 1).abs().max() > 0.05
    bias = log_prior[None].expand(7, -1)
    selections = []
    for piece in (None, 100):
        settings = EStepSettings(frequencies=frequencies, n_coarse=20, box_size=box, pixel_size_angstrom=4.0, scale_sigma=0.3, coarse_piece_rotations=piece)
        order, valid, scale = _coarse_pass(batch, lambda: coarse.pieces(piece), n_rot, ramps, settings, offset_prior, None, None, bias)
        assert scale is not None
        torch.testing.assert_close(scale, expected, rtol=1e-5, atol=1e-6)
        selections.append([sorted(order[i][valid[i]].tolist()) for i in range(7)])
        # every piece scored into one buffer, reused (not grown) by a second batch: the same bits
        buffers = []
        for _ in range(2):
            reused = _coarse_pass(batch, lambda: coarse.pieces(piece), n_rot, ramps, settings, offset_prior, None, None, bias, coarse.score_buffer)
            assert all(torch.equal(a, b) for a, b in zip(reused, (order, valid, scale)))
            buffers.append(coarse.score_buffer(1))
        assert buffers[0].data_ptr() == buffers[1].data_ptr()
        assert buffers[0].numel() >= 7 * ramps.shape[0] * n_classes * min(n_rot, piece or n_rot)
    assert coarse.score_buffer(buffers[0].numel() + 1).numel() > buffers[0].numel()
    assert selections[0] == selections[1]
    assert 1 < max(len(chosen) for chosen in selections[0]) < 500


def test_class_offsets_act_on_the_cross_term_at_the_profiled_intensity() -> None:
    # a class offset (the self-fit discount) is a change of the particle's cross term with the
    # class: with a profiled intensity a it enters the score as a·D, and a is profiled with it.
    # Direct oracle: the Gaussian log-likelihood maximised over a on a fine grid
    from cryotorch.em.estep import EStepSettings, expectation
    from cryotorch.ops.projection import extract_slices, prepare_fourier_volumes

    generator = torch.Generator().manual_seed(7)
    box, sigma = 16, 0.3
    frequencies = sorted_frequencies(box, 6)
    n = frequencies.shape[0]
    volumes_ft = prepare_fourier_volumes(0.05 * torch.randn(2, box, box, box, generator=generator))
    batch = random_batch(4, n, generator)
    batch.prior_euler_deg = torch.rand(4, 3, generator=generator, dtype=torch.float64) * torch.tensor([360.0, 180.0, 360.0], dtype=torch.float64)
    log_prior = torch.log(torch.tensor([0.4, 0.6]))
    offset = -20 * torch.rand(4, 2, generator=generator)
    settings = EStepSettings(frequencies=frequencies, n_coarse=n, box_size=box, pixel_size_angstrom=4.0, align=False, scale_sigma=sigma)
    result = expectation(batch, volumes_ft, None, None, None, log_prior, 10.0, settings, class_offset=offset)
    projections = extract_slices(volumes_ft, euler_deg_to_matrix(batch.prior_euler_deg).float(), frequencies, box)  # (K, B, n)
    scales = torch.linspace(-1, 3, 8001, dtype=torch.float64)
    for i in range(4):
        scores = []
        for k in range(2):
            model = (batch.scale[i] * batch.ctf[i] * projections[k, i]).to(torch.complex128)
            residual = batch.spectra[i].to(torch.complex128)[None] - scales[:, None] * model[None]
            likelihood = -0.5 * (residual.abs() ** 2 * batch.inv_sigma2[i]).sum(-1)
            scores.append((likelihood + scales * offset[i, k] - (scales - 1) ** 2 / (2 * sigma**2)).max() + log_prior[k])
        direct = torch.stack(scores)
        torch.testing.assert_close(result.class_posterior[i].double(), torch.softmax(direct, 0), rtol=1e-3, atol=1e-3)
        # rlnLogLikeliContribution: with the ‖X‖² term, as the direct likelihood has it
        torch.testing.assert_close(result.log_likelihood[i].double(), torch.logsumexp(direct, 0), rtol=1e-4, atol=1e-2)


@pytest.mark.parametrize("oversampling", [0, 1])
def test_a_grid_looks_up_the_orientations_it_would_compute(oversampling: int, monkeypatch: pytest.MonkeyPatch) -> None:
    # a small grid keeps the angles and matrices of its samples: the values of a grid too
    # large to keep them, which computes them when asked (here a limit of 0 samples)
    import cryotorch.em.sampling as sampling
    from cryotorch.em.sampling import perturb_pose_grid

    def grids() -> PoseGrid:
        return perturb_pose_grid(build_pose_grid(1, 2.0, 1.0, "D2", oversampling=oversampling), 0.3, 1.0)

    kept = grids()
    assert kept._children_table is not None and kept._coarse_table is not None  # made when first asked for
    monkeypatch.setattr(sampling, "_TABLE_ORIENTATIONS", 0)
    computed = grids()
    rows = torch.tensor([0, 7, 5, kept.n_rotations - 1, 7])
    assert computed._children_table is None and computed._coarse_table is None
    for name in ("coarse_matrices", "coarse_matrices64", "children_euler_deg", "children_matrices", "children_matrices64"):
        looked_up, made = getattr(kept, name)(rows), getattr(computed, name)(rows)
        assert looked_up.dtype == made.dtype and looked_up.shape == made.shape, name
        torch.testing.assert_close(looked_up, made, rtol=0, atol=1e-12 if made.dtype == torch.float64 else 1e-6, msg=name)
    # the float32 matrices are the float64 ones rounded; without oversampling, the coarse pass's
    torch.testing.assert_close(kept.children_matrices(rows), kept.children_matrices64(rows).float() if oversampling else kept.coarse_matrices(rows)[:, None], rtol=0, atol=1e-6)
