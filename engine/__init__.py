"""The image engine: prompt syntax, model loading, and diffusers pipelines (the only place torch lives)."""
import os

# transformers warns at import about optional image processors we never use; keep CLI output clean.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
