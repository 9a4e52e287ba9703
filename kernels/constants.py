"""Numbers the kernels compile in and the optimizer's torch path uses too, defined once below both."""

# A quantization block of zeros divides by this, not by 0 (its codes then decode to 0 * map = 0). Encode and
# decode both floor the scale, so a block whose absmax is below the floor still decodes to what was stored; the
# floor sits far below any second moment a gradient makes (a 1e-8 gradient gives 1e-16 x (1 - beta2)).
SCALE_FLOOR = 1e-30
