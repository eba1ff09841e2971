"""onerec_prod.sid."""
