"""Distributed training: launch, DDP with full or projected gradient sync, and DeepSpeed ZeRO with every lowmem
optimizer (matrix rules on one owner rank per weight)."""
