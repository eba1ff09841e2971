"""onerec_prod.samples."""
