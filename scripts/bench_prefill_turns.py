"""How a long prompt shares the CPU with a stream that is decoding, for each `--prefill-chunk` (the server's
BatchScheduler in process, without HTTP): the stream's longest wait between two tokens, and the long
prompt's time to first token.

    python scripts/bench_prefill_turns.py --chunks 256,512,100000 --out bench/prefill-turns.json

A stream asks for a long story (greedy, 150 tokens); after its 20th token a request arrives to summarize
--doc-chars characters of ../shared/data/eval/wikitext2-valid.txt (each trial its own part, so no prefix is
cached). A chunk at least as long as the document's prompt prefills it at once, and the stream waits for
all of it; a shorter one prefills a chunk per decode step. Medians over --rounds trials per chunk value,
the chunk values taking turns.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import threading
import time
from datetime import date
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench_serve import git_commit, write_report  # noqa: E402
from tinychat.bench import cpu_model  # noqa: E402

DOC = ROOT.parent / "shared" / "data" / "eval" / "wikitext2-valid.txt"


def trial(scheduler, engine, text: str, n: int) -> dict:
    from tinychat.batching import DoneEvent, Job, TokenEvent
    from tinychat.sampling import SamplingParams

    story = engine.encode_chat([{"role": "user", "content": f"{n}. Write a very long story about a dragon."}])
    doc = engine.encode_chat([{"role": "user", "content": f"{n}. Summarize this text:\n{text}"}])
    times, first, done = [], [], threading.Event()

    def on_story(event):
        if isinstance(event, TokenEvent):
            times.append(time.perf_counter())
        elif isinstance(event, DoneEvent):
            done.set()

    def on_doc(event):
        if isinstance(event, TokenEvent) and not first:
            first.append(time.perf_counter())

    scheduler.submit(Job(story, SamplingParams(temperature=0, max_tokens=150), on_story))
    while len(times) < 20:
        time.sleep(0.002)
    sent = time.perf_counter()
    scheduler.submit(Job(doc, SamplingParams(temperature=0, max_tokens=4), on_doc))
    done.wait()
    gaps = [b - a for a, b in zip(times, times[1:])]
    return {"prompt_tokens": len(doc), "longest_gap_s": max(gaps), "median_gap_s": statistics.median(gaps),
            "ttft_s": first[0] - sent}


def run_chunk(engine, chunk: int, texts: list[tuple[int, str]]) -> list[dict]:
    """Trials on a scheduler whose loop runs on this thread (as the server's does), driven from another; the
    first trial warms it up (its decode steps of 1 and 2 rows are captured then) and is not returned."""
    from tinychat.batching import BatchScheduler

    scheduler = BatchScheduler(engine.model, engine.tokenizer, slots=2, max_seq=4096, prefill_chunk=chunk)
    results = []

    def drive():
        try:
            results.extend(trial(scheduler, engine, text, n) for n, text in texts)
            del results[0]
        finally:
            scheduler.close()

    threading.Thread(target=drive).start()
    scheduler.run()
    return results


def main() -> int:
    from tinychat.hub import DEFAULT_MODEL

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--chunks", default="256,512,100000", help="--prefill-chunk values (default %(default)s)")
    ap.add_argument("--doc-chars", type=int, default=6000, help="characters of the document (default %(default)s)")
    ap.add_argument("--rounds", type=int, default=3, help="trials per chunk value (default %(default)s)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("bench/prefill-turns.json"))
    args = ap.parse_args()
    chunks = [int(c) for c in args.chunks.split(",") if c.strip()]
    if not chunks or min(chunks) < 1 or args.rounds < 1 or args.doc_chars < 1:
        ap.error("--chunks must be positive integers; --rounds and --doc-chars >= 1")
    if not DOC.exists():
        raise SystemExit(f"{DOC} is missing: the benchmark reads its documents from ../shared/data")
    torch.set_num_threads(args.threads)

    from tinychat.engine import load_engine

    engine = load_engine(args.model, quiet=True)
    corpus = DOC.read_text()
    part = lambda n: (n, corpus[n * args.doc_chars:(n + 1) * args.doc_chars])  # noqa: E731
    trials = {c: [] for c in chunks}
    for r in range(args.rounds):
        for i, c in enumerate(chunks):
            n = 2 * (r * len(chunks) + i)
            trials[c] += run_chunk(engine, c, [part(n), part(n + 1)])
    summary = {c: {k: statistics.median(t[k] for t in trials[c])
                   for k in ("prompt_tokens", "longest_gap_s", "median_gap_s", "ttft_s")} for c in chunks}

    print(f"\na stream decoding when a {summary[chunks[0]]['prompt_tokens']:.0f}-token prompt arrives "
          f"(medians of {args.rounds})")
    print(f"{'--prefill-chunk':>16s}{'longest gap ms':>16s}{'median gap ms':>15s}{'prompt TTFT ms':>16s}")
    for c, row in summary.items():
        print(f"{c:16d}{row['longest_gap_s'] * 1e3:16.0f}{row['median_gap_s'] * 1e3:15.1f}{row['ttft_s'] * 1e3:16.0f}")
    report = {
        "what": "a stream's longest wait between tokens while a long prompt is prefilled, per --prefill-chunk",
        "command": "python scripts/bench_prefill_turns.py " + " ".join(sys.argv[1:]),
        "date": date.today().isoformat(),
        "machine": {"cpu_model": cpu_model(), "cores": os.cpu_count(), "arch": platform.machine(),
                    "torch": torch.__version__, "torch_threads": args.threads},
        "commit": git_commit(),
        "settings": {"model": args.model, "doc_chars": args.doc_chars, "rounds": args.rounds, "story_tokens": 150},
        "summary": summary,
        "trials": trials,
    }
    write_report(args.out, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
