"""Models: presets and pretrained checkpoints, their config section, and the preparations applied before training
(frozen patterns, LoRA adapters, fake-quantized linears). See README.md here."""
