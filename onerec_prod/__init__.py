"""onerec-prod: the daily pipeline of a reasoning generative recommender (OneRec-Think)."""

__version__ = "0.1.0"
