"""Triton kernels and their thin launchers (no autograd); installed as `vit_fast.kernels`."""
