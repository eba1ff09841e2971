"""onerec_prod.model."""
