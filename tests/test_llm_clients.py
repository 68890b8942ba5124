"""The worker's provider client: a connection per thread, calls cut from another thread,
an optional bound on calls in flight. The real `openai` SDK against the fake provider."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx2
import openai
import pytest

from swarm_workers.agent.clients import LLMClient
from swarm_workers.config import LLMSettings, load_settings
from swarm_workers.localfleet import FakeProvider, ProcessGroup, start_fake_llm
from swarm_workers.worker import _warn_short_of_connections

from .conftest import wait_until


@pytest.fixture
def slow() -> Iterator[FakeProvider]:
    with ProcessGroup() as group:
        yield start_fake_llm(group, "--latency-ms", "3000")


def _ask(client: openai.OpenAI, timeout: float | None = None) -> float:
    """One chat completion; returns how long it took."""
    started = time.monotonic()
    client.chat.completions.create(
        model="fake-gpt",
        messages=[{"role": "user", "content": "hello"}],
        timeout=timeout if timeout is not None else openai.NOT_GIVEN,
    )
    return time.monotonic() - started


def test_a_cut_ends_that_threads_call_and_no_other(slow: FakeProvider) -> None:
    llm = LLMClient(LLMSettings(base_url=slow.base_url), threads=2)
    cutters: list[Callable[[], None]] = []

    def ask_cuttably() -> float:
        cutters.append(llm.cutter())  # what a task's deadline calls when it is stopped
        return _ask(llm.openai)

    try:
        with ThreadPoolExecutor(2) as pool:
            doomed = pool.submit(ask_cuttably)
            spared = pool.submit(_ask, llm.openai)
            wait_until(lambda: slow.stats()["requests"] >= 2, 10, "both calls to reach it")
            cut_at = time.monotonic()
            cutters[0]()
            with pytest.raises(openai.APIConnectionError):
                doomed.result(timeout=10)
            ended_after_cut = time.monotonic() - cut_at
            took = spared.result(timeout=10)  # the other thread's call is untouched
        assert ended_after_cut < took
    finally:
        llm.close()


def test_each_thread_keeps_its_own_connection(fake_llm: FakeProvider) -> None:
    llm = LLMClient(LLMSettings(base_url=fake_llm.base_url), threads=3)
    try:
        with ThreadPoolExecutor(3) as pool:
            barrier = threading.Barrier(3)

            def three_calls() -> int:
                barrier.wait()
                for _ in range(3):
                    _ask(llm.openai)
                return threading.get_ident()

            idents = [f.result(timeout=30) for f in [pool.submit(three_calls) for _ in range(3)]]
        sockets = llm.transport._backend.latest
        assert sorted(sockets) == sorted(idents)  # one socket per thread, kept alive
        assert len({s.getsockname() for s in sockets.values()}) == 3
    finally:
        llm.close()


def test_max_connections_below_the_threads_bounds_calls_in_flight(slow: FakeProvider) -> None:
    llm = LLMClient(LLMSettings(base_url=slow.base_url, max_connections=1), threads=2)
    assert llm.transport.limit == 1
    try:
        with ThreadPoolExecutor(2) as pool:
            first = pool.submit(_ask, llm.openai)
            wait_until(lambda: slow.stats()["requests"] >= 1, 10, "the first call to reach it")
            waiting = pool.submit(
                lambda: llm.openai.chat.completions.create(
                    model="fake-gpt",
                    messages=[{"role": "user", "content": "me too"}],
                    timeout=httpx2.Timeout(30, pool=0.2),
                )
            )
            with pytest.raises(openai.APITimeoutError):
                waiting.result(timeout=10)
            first.result(timeout=10)
        assert slow.stats()["requests"] == 1  # the second never left the process
        _ask(llm.openai)  # the slot came back when the first response closed
    finally:
        llm.close()


def test_the_worker_warns_when_max_connections_holds_calls_back(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level("WARNING", logger="swarm_workers.worker"):
        _warn_short_of_connections(load_settings(None, llm={"max_connections": 512}), 1000)
        _warn_short_of_connections(load_settings(None, llm={"max_connections": 64}), 64)
        _warn_short_of_connections(load_settings(None), 1000)
    assert [r.getMessage() for r in caplog.records] == [
        "llm.max_connections = 512 for 1000 pool threads: up to 488 model calls will wait "
        "for a connection; unset it to have one per thread"
    ]
