"""The embedding model: real weights, unit vectors, meaning reflected in similarity."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from ray_workers.models.base import InvalidInput
from ray_workers.models.minilm import CPU_CHUNK_TEXTS, MiniLMModel


@pytest.fixture(scope="module")
def model() -> Iterator[MiniLMModel]:
    # Two threads whatever the machine: a batch's chunks run side by side.
    yield MiniLMModel(device="cpu", threads=2)


def _cosine(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True))


def test_embeddings_are_384_dimensional_unit_vectors(model: MiniLMModel) -> None:
    vectors = model.embed(["hello world", "a much longer sentence about queues and GPUs"])
    assert [len(v) for v in vectors] == [384, 384]
    for vector in vectors:
        assert abs(sum(x * x for x in vector) - 1.0) < 1e-4


def test_similar_sentences_score_higher_than_unrelated_ones(model: MiniLMModel) -> None:
    cat, kitten, stocks = model.embed(
        ["The cat sits on the mat.", "A kitten is resting on a rug.", "Stock markets fell sharply today."]
    )
    assert _cosine(cat, kitten) > _cosine(cat, stocks) + 0.2


def test_a_batch_of_jobs_splits_back_one_output_per_job(model: MiniLMModel) -> None:
    jobs = [model.prepare("one", 1), model.prepare({"texts": ["two", "three"]}, 1)]
    outputs = model.predict(jobs)
    assert [len(o["embeddings"]) for o in outputs] == [1, 2]
    # Padding inside a batch changes the last bits only.
    assert _cosine(outputs[0]["embeddings"][0], model.embed(["one"])[0]) > 0.9999


def test_a_batch_of_mixed_lengths_embeds_each_text_as_it_would_alone_in_its_order(
    model: MiniLMModel,
) -> None:
    # More texts than a CPU chunk, lengths interleaved, so sorting and chunking both matter.
    texts = [("word " * (1 + (i * 7) % 40)).strip() + f" {i}" for i in range(3 * CPU_CHUNK_TEXTS + 5)]
    batched = model.embed(texts)
    for text, vector in zip(texts, batched, strict=True):
        assert _cosine(vector, model.embed([text])[0]) > 0.99999


@pytest.mark.parametrize("bad", [{"texts": []}, {"texts": [1]}, 42, None, {"text": "x"}, ["x"] * 300])
def test_inputs_the_model_cannot_embed_are_refused(model: MiniLMModel, bad: object) -> None:
    with pytest.raises(InvalidInput):
        model.prepare(bad, 1)
