"""Think-Ahead serving: offline prefixes (``precompute``), backends and the online service.

Heavy modules (torch, transformers, vLLM, FastAPI) are imported inside functions.
"""
