"""Data: the data and tokenizer config sections, sources (a registry), packing into batches, instruction formats,
the tokenizer. See README.md here."""
