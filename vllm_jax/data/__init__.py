"""Media decoding, tokenization and conversation templates, data pipelines."""
