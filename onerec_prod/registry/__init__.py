"""onerec_prod.registry."""
