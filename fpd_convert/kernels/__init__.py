"""Fast TT row lookups: Triton kernels for GPUs, a prefix-sharing path for CPUs.

Every path here computes what :func:`fpd_convert.kernels.reference.tt_rows` (the
plain PyTorch reference) computes, values and core gradients; the layer picks one
(see :mod:`fpd_convert.layers.tt_lookup`).
"""
