"""The image engine: prompt syntax, model loading, and diffusers pipelines (the only place torch lives)."""
import os

# transformers warns at import about optional image processors we never use; keep CLI output clean.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# Progress bars of the model hub client would garble logs and `--json` output.
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
