"""Pure tensor functions (CPU and CUDA): Fourier slices, CTF, filters, FSC, rotations, sampling.

Import from the submodules: :mod:`~cryotorch.ops.projection`,
:mod:`~cryotorch.ops.backprojection`, :mod:`~cryotorch.ops.ctf`, :mod:`~cryotorch.ops.fourier`,
:mod:`~cryotorch.ops.filters`, :mod:`~cryotorch.ops.fsc`, :mod:`~cryotorch.ops.rotations`,
:mod:`~cryotorch.ops.healpix`, :mod:`~cryotorch.ops.symmetry`.
"""
