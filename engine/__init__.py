"""The image engine: prompt syntax, model loading, and diffusers pipelines (the only place torch lives)."""
