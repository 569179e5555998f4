"""How the server hands a request's events from the scheduler thread to its HTTP handler (EventRelay) and
renders a run of them as stream chunks (Reply.chunks): a stream sends its first text at once, then holds
the tokens sampled within --stream-interval and sends them as one chunk, and its end goes out at once."""

import asyncio
import threading
import time

from tinychat.batching import DoneEvent, TokenEvent
from tinychat.openai_api import GenerationRequest, Reply
from tinychat.sampling import SamplingParams
from tinychat.server import EventRelay


class Client:
    def __init__(self):
        self.gone = False

    async def is_disconnected(self) -> bool:
        return self.gone


class Job:
    def __init__(self):
        self.cancelled = False

    def cancel(self):
        self.cancelled = True


def run(coroutine_fn):
    return asyncio.run(coroutine_fn())


def test_held_tokens_come_as_one_batch_and_the_end_cuts_the_wait_short():
    async def main():
        relay = EventRelay(Client())
        relay.watch(Job())
        loop = asyncio.get_running_loop()
        threading.Thread(target=relay.emit, args=(TokenEvent("a", 1),)).start()
        assert [e.text for e in await relay.next_events()] == ["a"]  # nothing to wait for: at once

        def produce():
            for i in range(5):
                relay.emit(TokenEvent(str(i), i))
            time.sleep(0.3)
            relay.emit(DoneEvent("length", 3, 6))

        threading.Thread(target=produce).start()
        t0 = loop.time()
        batch = await relay.next_events(not_before=t0 + 30)
        elapsed = loop.time() - t0
        assert [e.text for e in batch[:-1]] == ["0", "1", "2", "3", "4"] and batch[-1].finish_reason == "length"
        assert 0.25 < elapsed < 10  # held past the five tokens, released by the end, not after 30 s
        relay.close()

    run(main)


def test_tokens_wait_for_the_interval():
    async def main():
        relay = EventRelay(Client())
        relay.watch(Job())
        loop = asyncio.get_running_loop()
        relay.emit(TokenEvent("x", 1))
        t0 = loop.time()
        batch = await relay.next_events(not_before=t0 + 0.3)
        assert [e.text for e in batch] == ["x"] and loop.time() - t0 >= 0.29
        relay.close()

    run(main)


def test_a_client_that_leaves_ends_the_relay_and_cancels_its_job():
    async def main():
        client, job = Client(), Job()
        relay = EventRelay(client)
        relay.watch(job)
        asyncio.get_running_loop().call_later(0.05, setattr, client, "gone", True)
        assert await relay.next_events() is None  # no event ever came: the watcher ends the wait
        assert job.cancelled
        relay.close()

    run(main)


class Tokenizer:
    def decode(self, ids, skip_special_tokens=False):
        return "".join(f"<{i}>" for i in ids)


def reply(chat: bool, logprobs: int | None) -> Reply:
    request = GenerationRequest(chat=chat, prompt_ids=[1, 2], params=SamplingParams(), stop=[], stream=True,
                                include_usage=True, logprobs=logprobs)
    return Reply(request, "m", Tokenizer())


def test_a_run_of_tokens_is_one_chunk_with_every_logprob():
    r = reply(chat=True, logprobs=1)
    events = [TokenEvent("Hel", 5, -0.5, [(5, -0.5)]), TokenEvent("", 6, -1.0, [(6, -1.0)]),
              TokenEvent("lo", 7, -0.25, [(7, -0.25)])]
    (chunk,) = r.chunks(events)
    assert chunk["choices"][0]["delta"] == {"content": "Hello"}
    assert [e["token"] for e in chunk["choices"][0]["logprobs"]["content"]] == ["<5>", "<6>", "<7>"]
    end = r.chunks([TokenEvent("!", 8, -0.1, [(8, -0.1)]), DoneEvent("stop", 2, 4)])
    assert [c["choices"][0]["delta"] if c["choices"] else None for c in end] == [{"content": "!"}, {}, None]
    assert end[1]["choices"][0]["finish_reason"] == "stop" and end[2]["usage"]["completion_tokens"] == 4


def test_completion_chunks_continue_the_text_offsets():
    r = reply(chat=False, logprobs=0)
    first = r.chunks([TokenEvent("a", 10, -0.1, []), TokenEvent("b", 11, -0.2, [])])[0]
    second = r.chunks([TokenEvent("c", 12, -0.3, [])])[0]
    assert first["choices"][0]["text"] == "ab" and first["choices"][0]["logprobs"]["text_offset"] == [0, 4]
    assert second["choices"][0]["logprobs"]["text_offset"] == [8]


def test_tokens_without_text_or_logprobs_make_no_chunk():
    r = reply(chat=True, logprobs=None)
    assert r.chunks([TokenEvent("", 3), TokenEvent("", 4)]) == []
    assert r.chunks([TokenEvent("x", 5)])[0]["choices"][0]["delta"] == {"content": "x"}
