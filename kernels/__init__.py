"""Triton kernels for the projected and quantized optimizer updates, each beside a pure-torch reference of the
same math and a dispatcher (Triton on CUDA, the reference elsewhere)."""
