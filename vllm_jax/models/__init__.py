"""Model components and assembled systems (Linen, pure-functional)."""
