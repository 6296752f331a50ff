"""The profile summary of `task bench -- --only profile`: py-spy's raw stacks read into
our own functions by inclusive share and any function by self share."""

from __future__ import annotations

import pytest

from bench.python_profile import function_of, summarise

MAIN = "<module> (ingress/__main__.py:36)"
RAW = "\n".join(
    [
        f"{MAIN};submit_job (ingress/app.py:105);_publish (ingress/job_submission.py:183);"
        "StreamWriter.write (asyncio/streams.py:343) 6",
        f"{MAIN};submit_job (ingress/app.py:76);check_callback_url (policies/callback_guard.py:210) 2",
        f"{MAIN};Connection.__writer (aiormq/connection.py:834);StreamWriter.write (asyncio/streams.py:3) 2",
    ]
)


@pytest.mark.parametrize(
    ("frame", "function"),
    [
        ("submit_job (ingress/app.py:105)", "submit_job (ingress/app.py)"),
        (
            "UserCallableWrapper.__init__.<locals>.run (ray/serve/replica.py:3746)",
            "UserCallableWrapper.__init__.<locals>.run (ray/serve/replica.py)",
        ),
        ("consumer (aio_pika/queue.py)", "consumer (aio_pika/queue.py)"),
        ("<unknown>", "<unknown>"),
    ],
)
def test_a_frame_is_named_by_its_function_and_file_without_the_line(frame: str, function: str) -> None:
    assert function_of(frame) == function


def test_given_raw_stacks_then_own_code_is_ranked_inclusive_and_any_code_by_self_share() -> None:
    profile = summarise(RAW)

    assert profile.samples == 10
    # Lines of one function count together; the entry point (__main__) is on every sample, left out.
    assert profile.own_inclusive == [
        ("submit_job (ingress/app.py)", 0.8),
        ("_publish (ingress/job_submission.py)", 0.6),
        ("check_callback_url (policies/callback_guard.py)", 0.2),
    ]
    assert profile.self_share == [
        ("StreamWriter.write (asyncio/streams.py)", 0.8),
        ("check_callback_url (policies/callback_guard.py)", 0.2),
    ]


def test_a_recursive_function_counts_once_per_sample() -> None:
    profile = summarise("f (wire/a.py:1);f (wire/a.py:2);f (wire/a.py:3) 4\ng (wire/b.py:9) 4\n")

    assert profile.own_inclusive == [("f (wire/a.py)", 0.5), ("g (wire/b.py)", 0.5)]


def test_top_n_cuts_both_lists_and_an_empty_profile_has_no_shares() -> None:
    assert len(summarise(RAW, top_n=1).own_inclusive) == 1
    assert len(summarise(RAW, top_n=1).self_share) == 1
    empty = summarise("\nnot a sample line\n")
    assert (empty.samples, empty.own_inclusive, empty.self_share) == (0, [], [])
