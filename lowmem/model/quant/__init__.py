"""Fake-quantized (QAT) linear layers: the quantizers (fake) and the layers that use them (linear)."""
