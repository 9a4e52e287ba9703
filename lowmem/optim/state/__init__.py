"""How optimizer state is stored: fp32, bf16, or block-quantized 8-bit and 4-bit maps. See ../README.md."""
