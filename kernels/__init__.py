"""Triton kernels, one file per op; installed as covfast.kernels."""
