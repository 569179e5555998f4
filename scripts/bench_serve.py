"""`tinychat serve` against in-process generation, and its throughput with concurrent clients.

    python scripts/bench_serve.py --rounds 3 --out bench/serve.json

1. Overhead of the server for one client: a streaming chat completion (raw SSE over httpx, or the `openai`
   client with --client openai), greedy, --max-tokens tokens, against tinychat.generate.stream_generate of
   the same messages in this process (same model, same SamplingParams, a cache reused across runs as the
   server reuses its rows). Time to first token is from just before the request is sent (before templating
   and tokenizing, in process) to the first non-empty text; decode tok/s counts the tokens after that one up
   to the last. Each run's system message begins with its own number, so no run finds its prompt in the
   prefix cache (the few template tokens every prompt shares aside: reported as cached tokens).
2. Throughput: 1, 4 and 8 (--clients) threads, each streaming its own prompt with the same --max-tokens,
   started together; total tok/s is every completion token over the wall time from the first request sent
   to the last stream finished.

3. The decode step alone for each client count's batch size (replayed as the server replays it, all rows at
   the prompt's length plus half the reply): n x step(1) / step(n) is the most n clients can gain before
   prefill, sampling and HTTP take their share, so it tells the model's arithmetic from the server's overhead.

Each round runs the in-process generation, then (with the server process idle until then, never computing
at the same time) each client count; rounds alternate so that this machine's drift hits both sides alike.
Medians over rounds. The server gets --threads torch threads (OMP_NUM_THREADS), as does this process.
A round during which other processes used the CPU (from /proc/stat, less this process and the server) is
discarded and run again, and kept in the JSON under discarded_rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import date
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tinychat.bench import cpu_model  # noqa: E402
from tinychat.server import STREAM_INTERVAL  # noqa: E402

TOPICS = ["a lighthouse keeper who finds a message in a bottle", "a dragon who is afraid of heights",
          "two rival bakers in a small mountain village", "a robot learning to paint",
          "a girl who can talk to the wind", "the last train across a frozen desert",
          "an old map that leads to a forgotten library", "a cat who becomes mayor of a city",
          "a musician who loses her voice", "a sailor lost in a storm",
          "a clockmaker who can stop time", "a boy who plants a tree on the moon"]


def messages(run: int, topic: str) -> list[dict]:
    """A prompt no earlier run shares beyond the template's first tokens: the run number leads the system
    message. Asks for a long story, so greedy decoding does not stop before max_tokens."""
    return [{"role": "system", "content": f"{run}. You are a storyteller who writes long, detailed stories."},
            {"role": "user", "content": f"Write a very long story (at least 1000 words) about {topic}. "
                                        "Describe every scene in detail."}]


# ---------------------------------------------------------------------------------------------- in process


def in_process(engine, cache, params, msgs: list[dict]) -> dict:
    from tinychat.generate import stream_generate

    t0 = time.perf_counter()
    prompt = engine.encode_chat(msgs)
    first = None
    n_first = 0
    for response in stream_generate(engine.model, engine.tokenizer, prompt, params, cache=cache,
                                    decoder=engine.decoder):
        if first is None and response.text:
            first, n_first = time.perf_counter(), response.stats.generated_tokens
        if response.finish_reason is not None:
            end = time.perf_counter()
            stats = response.stats
            break
    return record(t0, first, end, end, n_first, stats.generated_tokens, len(prompt),
                  len(prompt) - stats.prefilled_tokens, response.finish_reason)


def record(sent: float, first: float | None, last: float, done: float, n_first: int, tokens: int, prompt: int,
           cached: int, finish: str) -> dict:
    first = first if first is not None else last
    decode = last - first
    after = tokens - n_first
    return {"ttft_s": first - sent, "decode_tps": after / decode if after > 0 and decode > 0 else 0.0,
            "total_s": done - sent, "completion_tokens": tokens, "prompt_tokens": prompt, "cached_tokens": cached,
            "finish_reason": finish, "sent": sent, "done": done}


def step_ms(engine, sizes: list[int], position: int, repeats: int = 30, timings: int = 9) -> dict[int, float]:
    """The decode step alone for each batch size (ms; median of `timings` timings of `repeats` steps, the sizes
    taking turns so that this machine's drift hits them alike): every row at `position` after random prompt
    tokens, replayed as the server replays it (a captured step where the model allows, else eager).
    n x step(1) / step(n) bounds the n-client speedup before any prefill, sampling or HTTP: the server cannot
    beat its own decode step."""
    from tinychat.cache import CacheRows
    from tinychat.cuda_graph import step_class

    model, steps = engine.model, {}
    g = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for n in sizes:
            rows = CacheRows(model.make_cache(position + 2, batch=n), 0, n)
            prompt = torch.randint(100, engine.tokenizer.vocab_size, (n, position), generator=g)
            model.run(prompt, torch.arange(position).expand(n, position).contiguous(), rows, last_only=True)
            tokens = torch.randint(100, engine.tokenizer.vocab_size, (n,), generator=g)
            positions = torch.full((n,), position, dtype=torch.long)
            kind = step_class(model, rows)
            captured = kind(model, rows, positions, tokens) if kind is not None else None
            steps[n] = (lambda c=captured, t=tokens, p=positions: c.replay(t, p)) if captured else (
                lambda t=tokens, p=positions, r=rows: model.decode_step(t, p, r))
            steps[n]()
        times = {n: [] for n in sizes}
        for _ in range(timings):
            for n, step in steps.items():
                t0 = time.perf_counter()
                for _ in range(repeats):
                    step()
                times[n].append((time.perf_counter() - t0) / repeats * 1000)
    return {n: statistics.median(t) for n, t in times.items()}


# ---------------------------------------------------------------------------------------------- the server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, args, log):
        import httpx

        self.url = f"http://127.0.0.1:{args.port}"
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
        cmd = [sys.executable, "-m", "tinychat", "serve", "--port", str(args.port), "--model", args.model,
               "--slots", str(args.slots), "--max-context", str(args.max_context),
               "--stream-interval", str(args.stream_interval)]
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        deadline = time.time() + 300
        while time.time() < deadline:
            if self.proc.poll() is not None:
                log.seek(0)
                raise SystemExit(f"the server exited ({self.proc.returncode}): {log.read().decode()[-2000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.3)
        else:
            self.stop()
            raise SystemExit("the server did not answer /health within 300 s")
        self.model_id = httpx.get(self.url + "/v1/models", timeout=10).json()["data"][0]["id"]

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def stream_httpx(server: Server, client, body: dict) -> dict:
    """One streaming chat completion over raw SSE: times of the request, first text, finish chunk, [DONE]."""
    sent = time.perf_counter()
    first = last = None
    usage, finish = None, None
    with client.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                break
            chunk = json.loads(data)
            if chunk.get("usage"):
                usage = chunk["usage"]
            for choice in chunk.get("choices", []):
                if choice["delta"].get("content") and first is None:
                    first = time.perf_counter()
                if choice.get("finish_reason"):
                    finish, last = choice["finish_reason"], time.perf_counter()
    return finish_record(sent, first, last, time.perf_counter(), usage, finish)


def stream_openai(server: Server, client, body: dict) -> dict:
    """The same through the official openai client."""
    sent = time.perf_counter()
    first = last = None
    usage, finish = None, None
    for chunk in client.chat.completions.create(**body):
        if chunk.usage:
            usage = chunk.usage.model_dump()
        for choice in chunk.choices:
            if choice.delta.content and first is None:
                first = time.perf_counter()
            if choice.finish_reason:
                finish, last = choice.finish_reason, time.perf_counter()
    return finish_record(sent, first, last, time.perf_counter(), usage, finish)


def finish_record(sent, first, last, done, usage, finish) -> dict:
    if usage is None:
        raise SystemExit("the stream carried no usage chunk (stream_options.include_usage)")
    last = last if last is not None else done
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
    # the first text comes with the first token: tinychat emits a chunk for every token that shows text
    return record(sent, first, last, done, 1, usage["completion_tokens"], usage["prompt_tokens"], cached, finish)


def make_client(kind: str, server: Server):
    if kind == "openai":
        import openai

        return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=600)
    import httpx

    return httpx.Client(timeout=600)


def concurrent(server: Server, kind: str, clients: list, bodies: list[dict]) -> dict:
    """len(bodies) streams at once, one thread and one client (connection) each, released together."""
    stream = stream_openai if kind == "openai" else stream_httpx
    results: list[dict | BaseException] = [None] * len(bodies)
    barrier = threading.Barrier(len(bodies))

    def work(i: int) -> None:
        try:
            barrier.wait()
            results[i] = stream(server, clients[i], bodies[i])
        except BaseException as e:  # noqa: BLE001 - reported below, on the main thread
            results[i] = e

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for r in results:
        if isinstance(r, BaseException):
            raise SystemExit(f"a client failed: {type(r).__name__}: {r}")
    wall = max(r["done"] for r in results) - min(r["sent"] for r in results)
    tokens = sum(r["completion_tokens"] for r in results)
    return {"clients": len(bodies), "wall_s": wall, "completion_tokens": tokens, "total_tps": tokens / wall,
            "streams": results}


def body_for(server: Server, msgs: list[dict], max_tokens: int) -> dict:
    return {"model": server.model_id, "messages": msgs, "max_tokens": max_tokens, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}


class OtherLoad:
    """CPU time that processes other than this one and the server used while a measurement ran, in cores
    (busy jiffies of the whole machine from /proc/stat minus ours), so a disturbed measurement shows."""

    def __init__(self, pids: list[int]):
        self.pids = pids
        self.tick = os.sysconf("SC_CLK_TCK")

    def _read(self) -> tuple[float, float, float]:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
        busy = sum(int(x) for i, x in enumerate(fields) if i not in (3, 4))  # all but idle and iowait
        ours = 0
        for pid in self.pids:
            stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            ours += int(stat[11]) + int(stat[12])  # utime, stime
        return busy / self.tick, ours / self.tick, time.perf_counter()

    def measure(self, fn, *a):
        try:
            b0, o0, t0 = self._read()
        except (OSError, ValueError, IndexError):
            return fn(*a)
        result = fn(*a)
        b1, o1, t1 = self._read()
        result["other_cores"] = max(0.0, ((b1 - b0) - (o1 - o0)) / (t1 - t0))
        return result


# ---------------------------------------------------------------------------------------------- the report


def median(xs) -> float:
    return statistics.median(xs) if xs else float("nan")




def write_report(path: Path, report: dict) -> None:
    from tinychat.atomic import write_text

    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, json.dumps(report, indent=2) + "\n", "--out")  # whole or not at all
    print(f"wrote {path}")


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "--no-optional-locks", "status", "--porcelain", "--untracked-files=no"],
                               cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
        return out.stdout.strip() + (" (with uncommitted changes)" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def overhead(server_value: float, local_value: float) -> float:
    """Extra time in percent: server_value and local_value are times (bigger is slower)."""
    return (server_value / local_value - 1) * 100


def summarize(rounds: list[dict], counts: list[int]) -> dict:
    local = [r["in_process"] for r in rounds]
    served = [r["server"][1]["streams"][0] for r in rounds if 1 in r["server"]]
    s = {"in_process": {k: median([x[k] for x in local]) for k in ("ttft_s", "decode_tps", "total_s")},
         "server": {k: median([x[k] for x in served]) for k in ("ttft_s", "decode_tps", "total_s")}}
    if served:
        s["overhead_pct"] = {
            "ttft": overhead(s["server"]["ttft_s"], s["in_process"]["ttft_s"]),
            "decode": overhead(1 / s["server"]["decode_tps"], 1 / s["in_process"]["decode_tps"]),
            "total": overhead(s["server"]["total_s"], s["in_process"]["total_s"]),
            # the same, run by run (each round's server run against its own in-process run)
            "total_per_round": [overhead(b["total_s"], a["total_s"]) for a, b in zip(local, served)],
        }
    s["clients"] = {}
    for c in counts:
        runs = [r["server"][c] for r in rounds]
        streams = [x for run in runs for x in run["streams"]]
        s["clients"][c] = {"total_tps": median([run["total_tps"] for run in runs]),
                           "wall_s": median([run["wall_s"] for run in runs]),
                           "ttft_s_median": median([x["ttft_s"] for x in streams]),
                           "ttft_s_max": median([max(x["ttft_s"] for x in run["streams"]) for run in runs]),
                           "per_stream_decode_tps": median([x["decode_tps"] for x in streams])}
    if 1 in s["clients"]:
        for c in counts:
            s["clients"][c]["vs_1"] = s["clients"][c]["total_tps"] / s["clients"][1]["total_tps"]
    return s


def print_table(s: dict, args) -> None:
    print(f"\n{args.max_tokens} tokens, greedy, {args.threads} torch threads, {args.rounds} rounds (medians), "
          f"client: {args.client}, server --stream-interval {args.stream_interval}")
    print(f"{'one stream':24s}{'TTFT ms':>10s}{'decode tok/s':>14s}{'total s':>10s}")
    for name, key in (("in process", "in_process"), ("server", "server")):
        row = s[key]
        print(f"{name:24s}{row['ttft_s'] * 1e3:10.1f}{row['decode_tps']:14.1f}{row['total_s']:10.2f}")
    if "overhead_pct" in s:
        o = s["overhead_pct"]
        print(f"{'server overhead %':24s}{o['ttft']:10.1f}{o['decode']:14.1f}{o['total']:10.1f}")
    print(f"\n{'clients':>8s}{'total tok/s':>13s}{'vs 1':>7s}{'wall s':>8s}{'TTFT ms med/max':>17s}"
          f"{'tok/s per stream':>18s}")
    for c, row in s["clients"].items():
        print(f"{c:8d}{row['total_tps']:13.1f}{row.get('vs_1', float('nan')):6.2f}x{row['wall_s']:8.2f}"
              f"{row['ttft_s_median'] * 1e3:9.0f}/{row['ttft_s_max'] * 1e3:<7.0f}{row['per_stream_decode_tps']:18.1f}")
    steps = s.get("decode_step_ms", {})
    if steps:
        one = steps.get(1)
        print(f"\ndecode step alone, rows at position {s['decode_step_position']} (n x step(1) / step(n): the most n "
              "clients could gain):")
        for n, ms in steps.items():
            print(f"{n:8d} rows {ms:7.2f} ms" + (f"  {n * one / ms:5.2f}x" if one else ""))


def clean(run: dict) -> dict:
    """A stream's record for the JSON (absolute clock readings dropped)."""
    return {k: v for k, v in run.items() if k not in ("sent", "done")}


def round_json(r: dict) -> dict:
    return {"in_process": clean(r["in_process"]),
            "server": {c: {**{k: v for k, v in run.items() if k != "streams"},
                           "streams": [clean(x) for x in run["streams"]]} for c, run in r["server"].items()}}


def one_round(args, counts, engine, cache, params, server, clients, load, run_no: int) -> dict:
    """The in-process generation, then each client count through the server; prompts numbered from run_no."""
    topic = run_no % len(TOPICS)
    local = load.measure(in_process, engine, cache, params, messages(run_no, TOPICS[topic]))
    served = {}
    for c in counts:
        bodies = []
        for i in range(c):
            run_no += 1
            bodies.append(body_for(server, messages(run_no, TOPICS[(topic + i) % len(TOPICS)]), args.max_tokens))
        served[c] = load.measure(concurrent, server, args.client, clients[:c], bodies)
    return {"in_process": local, "server": served}


def main() -> int:
    from tinychat.hub import DEFAULT_MODEL

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=DEFAULT_MODEL, help="model to serve (default %(default)s, AWQ w4)")
    ap.add_argument("--max-tokens", type=int, default=128, help="tokens per reply (default %(default)s)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds; medians are reported (default %(default)s)")
    ap.add_argument("--clients", default="1,4,8", help="concurrent client counts (default %(default)s)")
    ap.add_argument("--port", type=int, default=0, help="server port (default: a free one)")
    ap.add_argument("--slots", type=int, default=8, help="server --slots (default %(default)s)")
    ap.add_argument("--max-context", type=int, default=4096, help="server --max-context (default %(default)s)")
    ap.add_argument("--stream-interval", type=float, default=STREAM_INTERVAL,
                    help="server --stream-interval (default %(default)s; 0: a chunk per token)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads, here and in the server (default 2)")
    ap.add_argument("--client", default="httpx", choices=["httpx", "openai"],
                    help="raw SSE over httpx (default) or the official openai client")
    ap.add_argument("--max-other-cores", type=float, default=0.1,
                    help="a round during which other processes kept more than this many cores busy on average "
                         "(in any of its measurements) is discarded and rerun (default %(default)s)")
    ap.add_argument("--out", type=Path, default=Path("bench/serve.json"), help="JSON results (default %(default)s)")
    args = ap.parse_args()
    counts = sorted({int(c) for c in args.clients.split(",") if c.strip()})
    if not counts or counts[0] < 1 or args.rounds < 1 or args.max_tokens < 2 or args.threads < 1:
        ap.error("--clients must be positive integers; --rounds, --threads >= 1; --max-tokens >= 2")
    if counts[-1] > args.slots:
        print(f"note: {counts[-1]} clients > {args.slots} slots: some requests wait for a slot", file=sys.stderr)
    args.port = args.port or free_port()
    torch.set_num_threads(args.threads)

    from tinychat.engine import load_engine
    from tinychat.sampling import SamplingParams

    engine = load_engine(args.model, quiet=True)
    cache = engine.model.make_cache(args.max_context)
    params = SamplingParams(temperature=0.0, top_p=1.0, max_tokens=args.max_tokens)  # what the request asks
    in_process(engine, cache, params, messages(-1, "warming up"))

    run_no = 0
    rounds, discarded = [], []
    with tempfile.TemporaryFile() as log:
        server = Server(args, log)
        clients = [make_client(args.client, server) for _ in range(counts[-1])]
        load = OtherLoad([os.getpid(), server.proc.pid])
        try:
            # warm-up: a first request and every batch size, so one-off costs land in no measurement
            concurrent(server, args.client, clients[:counts[-1]],
                       [body_for(server, messages(-2 - i, TOPICS[i % len(TOPICS)]), 16)
                        for i in range(counts[-1])])
            attempt = 0
            while len(rounds) < args.rounds:
                attempt += 1
                if attempt > 3 * args.rounds:
                    raise SystemExit(f"other processes kept using the CPU: {len(discarded)} rounds discarded "
                                     f"(--max-other-cores {args.max_other_cores}); run it on a quiet machine")
                first = run_no + 1
                run_no += 1 + sum(counts)
                result = one_round(args, counts, engine, cache, params, server, clients, load, first)
                busy = max([result["in_process"].get("other_cores", 0)]
                           + [run.get("other_cores", 0) for run in result["server"].values()])
                one = result["server"].get(1, {}).get("streams", [None])[0]
                print(f"round {attempt}: in process {result['in_process']['decode_tps']:.1f} tok/s"
                      + (f", server {one['decode_tps']:.1f} tok/s" if one else "")
                      + "".join(f", {c} clients {result['server'][c]['total_tps']:.1f}" for c in counts)
                      + (f"; other processes used {busy:.2f} cores: discarded" if busy > args.max_other_cores
                         else ""), file=sys.stderr)
                (discarded if busy > args.max_other_cores else rounds).append(result)
        finally:
            for client in clients:
                client.close()
            server.stop()

    short = [x for r in rounds for x in [r["in_process"]] + [s for c in counts for s in r["server"][c]["streams"]]
             if x["completion_tokens"] != args.max_tokens]
    if short:
        print(f"warning: {len(short)} replies stopped before {args.max_tokens} tokens", file=sys.stderr)
    if discarded:
        print(f"note: {len(discarded)} rounds discarded and rerun: other processes used more than "
              f"{args.max_other_cores} cores during them", file=sys.stderr)
    s = summarize(rounds, counts)
    # the rows' positions in the measured streams: the prompt and about half the reply
    position = int(statistics.median(x["prompt_tokens"] for r in rounds for x in [r["in_process"]])) \
        + args.max_tokens // 2
    s["decode_step_ms"] = step_ms(engine, counts, position)
    s["decode_step_position"] = position
    print_table(s, args)

    report = {
        "what": "tinychat serve vs in-process generation (one stream), and total tok/s with concurrent streams",
        "command": "python scripts/bench_serve.py " + " ".join(sys.argv[1:]),
        "date": date.today().isoformat(),
        "machine": {"cpu_model": cpu_model(), "cores": os.cpu_count(), "arch": platform.machine(),
                    "torch": torch.__version__, "torch_threads": args.threads, "python": platform.python_version()},
        "commit": git_commit(),
        "settings": {"model": args.model, "max_tokens": args.max_tokens, "rounds": args.rounds, "clients": counts,
                     "slots": args.slots, "max_context": args.max_context, "client": args.client,
                     "stream_interval": args.stream_interval,
                     "sampling": "greedy (temperature 0)"},
        "summary": s,
        "short_replies": len(short),
        "discarded_rounds": [round_json(r) for r in discarded],
        "rounds": [round_json(r) for r in rounds],
    }
    write_report(args.out, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
