"""ml_collections configs: one per system and size (`get_config(arg)`)."""
