"""Triton kernels and their host launch functions (installed as ``relaxedconv.kernels``)."""
