"""onerec_prod.train."""
