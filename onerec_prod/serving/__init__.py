"""onerec_prod.serving."""
