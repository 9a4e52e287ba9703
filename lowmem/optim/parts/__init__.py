"""The parts an optimizer is composed of: projectors, cores, residual policies, transforms. See ../README.md."""
