"""The reference model shapes by name (`model.preset`)."""

# Shapes of the GaLore/Fira/OSD benchmark configs (vocab 32000, untied head, RMSNorm eps 1e-6, no biases).
MODEL_PRESETS: dict[str, dict] = {
    "llama_9m": dict(hidden_size=128, intermediate_size=352, num_attention_heads=4, num_hidden_layers=4),
    "llama_20m": dict(hidden_size=256, intermediate_size=688, num_attention_heads=4, num_hidden_layers=4),
    "llama_35m": dict(hidden_size=384, intermediate_size=1024, num_attention_heads=8, num_hidden_layers=6),
    "llama_60m": dict(hidden_size=512, intermediate_size=1376, num_attention_heads=8, num_hidden_layers=8),
    "llama_130m": dict(hidden_size=768, intermediate_size=2048, num_attention_heads=12, num_hidden_layers=12),
    "llama_350m": dict(hidden_size=1024, intermediate_size=2736, num_attention_heads=16, num_hidden_layers=24),
    "llama_1b": dict(hidden_size=2048, intermediate_size=5461, num_attention_heads=32, num_hidden_layers=24),
    "llama_7b": dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_hidden_layers=32,
                     max_position_embeddings=2048),
}
