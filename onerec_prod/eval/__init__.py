"""onerec_prod.eval."""
