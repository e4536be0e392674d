"""Scale-out: two ``--kv-quant oscar`` CPU workers behind SGLang's own router (sglang-router 0.3.2).

Two real ``sglang.launch_server --kv-quant oscar`` processes (SmolLM2-135M GGUF, started
together) and ``python -m sglang_router.launch_router --policy cache_aware`` in front of them.
Each worker logs every finished request as JSON (``--log-requests-format json``), so the
worker that served a response is read from the worker's own log: a chat response's ``id`` is
the worker's request id. What is checked (docs/scale-out.md):

- several multi-turn conversations, run concurrently, are spread over both workers; every
  turn of one conversation lands on the same worker, and from the second turn on that worker
  serves at least the previous turn's whole 128-token pages from its own prefix cache (the
  ``cached_tokens`` the client sees is the one the worker logged);
- the router's view agrees with the workers': both listed healthy with no request in flight,
  its per-worker success counts equal the requests each worker logged, and after a
  ``/flush_cache`` through the router each worker's pool-state line shows nothing locked or
  leaked, every residual page free and at least the conversations' prompt pages cached;
- killing one worker mid-run fails only requests bound for it: the survivor's in-flight and
  later requests all succeed, the dead worker's requests fail with a 5xx that names its URL
  until the router's circuit breaker for it opens, after which the router sends them to the
  survivor (what 0.3.2 does; its health check, every 60 s by default, has not marked the
  dead worker unhealthy by then).
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

requests = pytest.importorskip("requests")

from oscar_kv.eval.texts import LIBRARY_SYSTEM_LONG
from oscar_kv.sglang._testing import INSTALL_HINT
from oscar_kv.sglang.server import (
    CACHE_DIR,
    SGLangServer,
    free_port,
    smollm2_model,
    stop_process_group,
)

pytestmark = pytest.mark.slow

ROUTER_VERSION = "0.3.2"
try:
    import sglang  # noqa: F401
except ImportError:  # pragma: no cover - the install script installs it
    pytest.skip(INSTALL_HINT, allow_module_level=True)
try:
    _installed = importlib.metadata.version("sglang-router")
except importlib.metadata.PackageNotFoundError:  # pragma: no cover
    pytest.skip(
        f'sglang-router is not installed: pip install "oscar-kv[router]" '
        f"(sglang-router=={ROUTER_VERSION})",
        allow_module_level=True,
    )
if _installed != ROUTER_VERSION:  # pragma: no cover - the checks below are 0.3.2's behaviour
    pytest.skip(f"sglang-router {_installed} installed; these checks are for {ROUTER_VERSION}",
                allow_module_level=True)  # fmt: skip

LIBRARY = LIBRARY_SYSTEM_LONG
QUESTIONS = [
    "When does it open on Saturday?",
    "How many books can I borrow?",
    "What is the late fee?",
    "Is there wifi?",
    "When does the book club meet?",
    "Can I borrow a laptop?",
    "Where is the reading room?",
    "Is it open on Sunday?",
    "Where are the picture books?",
    "How long can I keep a book?",
]
CONVERSATIONS = 4
TURNS = 3
PAGE = 128
MAX_RUNNING = 4
START_TIMEOUT = float(os.environ.get("OSCAR_E2E_START_TIMEOUT", "1200"))
# Finished requests as one JSON object per line (rid, request metadata, meta_info).
LOG_REQUESTS = ["--log-requests", "--log-requests-level", "0", "--log-requests-format", "json"]


def _system(c: int) -> str:
    # Each conversation starts differently, so the router's tree sees no common prefix
    # between conversations, and the workers share no page between them either.
    return f"Conversation {c} of the router test. " + LIBRARY * 3


@dataclass
class Router:
    """One ``sglang_router.launch_router`` process (own process group, log to a file)."""

    worker_urls: list[str]
    port: int = 0
    metrics_port: int = 0
    log_path: Path | None = None
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        return [
            sys.executable, "-m", "sglang_router.launch_router",
            "--worker-urls", *self.worker_urls,
            "--policy", "cache_aware",
            "--host", "127.0.0.1", "--port", str(self.port),
            "--prometheus-host", "127.0.0.1", "--prometheus-port", str(self.metrics_port),
            "--worker-startup-check-interval", "1",
        ]  # fmt: skip

    def start(self, timeout_s: float = 120.0) -> Router:
        self.port = self.port or free_port()
        self.metrics_port = self.metrics_port or free_port()
        self.log_path = CACHE_DIR / f"router-{self.port}.log"
        log = open(self.log_path, "w")  # noqa: SIM115 - owned by the child for its lifetime
        self.proc = subprocess.Popen(
            self.command(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        log.close()
        # "Router ready" comes before the workers are registered (in the background): wait
        # until /readiness counts both.
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"router exited:\n{self.log_tail()}"
            try:
                r = requests.get(self.url + "/readiness", timeout=5)
                if r.status_code == 200 and r.json().get("healthy_workers") == len(
                    self.worker_urls
                ):
                    return self
            except (requests.RequestException, ValueError):
                pass
            time.sleep(0.5)
        raise AssertionError(f"router not ready after {timeout_s:.0f} s\n{self.log_tail()}")

    def workers(self) -> dict[str, dict]:
        """The router's worker list, by URL."""
        r = requests.get(self.url + "/workers", timeout=30)
        assert r.status_code == 200, r.text
        return {w["url"]: w for w in r.json()["workers"]}

    def metric(self, name: str, **labels: str) -> float:
        """One sample of the router's Prometheus metrics (0 when absent)."""
        text = requests.get(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=30).text
        for m in re.finditer(rf"^{name}\{{([^}}]*)\}} (\S+)$", text, re.MULTILINE):
            got = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1)))
            if all(got.get(k) == v for k, v in labels.items()):
                return float(m.group(2))
        return 0.0

    def log_tail(self, lines: int = 40) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path else ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self) -> None:
        stop_process_group(self.proc)
        self.proc = None


@dataclass
class Cluster:
    workers: list[SGLangServer]
    router: Router
    # (conversation, turn) -> the response record, filled by the `conversations` fixture
    turns: dict[tuple[int, int], dict] = field(default_factory=dict)
    messages: dict[int, list[dict]] = field(default_factory=dict)

    def served_by(self, rid: str) -> list[int]:
        """Indices of the workers whose log has the finished request ``rid``."""
        return [i for i, w in enumerate(self.workers) if rid in finished(w)]


@pytest.fixture(scope="module")
def cluster():
    model = smollm2_model()
    workers = [
        SGLangServer(
            model,
            kv_quant="oscar",
            max_total_tokens=8192,
            max_running_requests=MAX_RUNNING,
            context_length=2048,
            extra_args=LOG_REQUESTS,
            env={"SGLANG_ENABLE_STRICT_MEM_CHECK_DURING_IDLE": "1"},
        )
        for _ in range(2)
    ]
    router = None
    t0 = time.monotonic()
    try:
        for w in workers:  # both start-ups overlap
            w.start()
        for w in workers:
            w.wait_ready(START_TIMEOUT)
        router = Router([w.url for w in workers]).start()
        print(f"[router-e2e] workers ready in {[round(w.ready_s) for w in workers]} s, "
              f"router in front after {time.monotonic() - t0:.0f} s")  # fmt: skip
        yield Cluster(workers, router)
    finally:
        if router is not None:
            router.stop()
        for w in workers:
            w.stop()


def finished(server: SGLangServer) -> dict[str, dict]:
    """The worker's finished requests from its log: rid -> meta_info."""
    out = {}
    for line in server.log_text().splitlines():
        start = line.find('{"timestamp"')
        if start < 0 or '"request.finished"' not in line:
            continue
        record = json.loads(line[start:])
        out[record["rid"]] = record["out"]["meta_info"]
    return out


def chat(url: str, messages: list[dict], max_tokens: int, **extra) -> dict:
    """One chat turn through ``url``: status, body, id, usage (no exception on errors)."""
    body = {"model": "default", "messages": messages, "max_tokens": max_tokens,
            "temperature": 0} | extra  # fmt: skip
    try:
        r = requests.post(url + "/v1/chat/completions", json=body, timeout=600)
    except requests.RequestException as e:
        return {"status": None, "text": repr(e)}
    out = {"status": r.status_code, "text": r.text}
    if r.status_code == 200:
        j = r.json()
        out |= {"id": j["id"], "usage": j["usage"],
                "answer": j["choices"][0]["message"]["content"]}  # fmt: skip
    return out


def _cached(rec: dict) -> int:
    return int((rec["usage"].get("prompt_tokens_details") or {}).get("cached_tokens") or 0)


@pytest.fixture(scope="module")
def conversations(cluster):
    """CONVERSATIONS conversations of TURNS turns each, one thread per conversation (started
    0.5 s apart, so each new one arrives while the others are in flight), through the router."""
    errors: list[str] = []

    def run(c: int) -> None:
        msgs = [{"role": "system", "content": _system(c)}]
        for t in range(TURNS):
            msgs.append({"role": "user", "content": QUESTIONS[t]})
            rec = chat(cluster.router.url, msgs, max_tokens=24)
            cluster.turns[(c, t)] = rec
            if rec["status"] != 200:
                errors.append(f"conversation {c} turn {t}: {rec['status']} {rec['text'][:500]}")
                return
            msgs.append({"role": "assistant", "content": rec["answer"]})
        cluster.messages[c] = msgs

    t0 = time.monotonic()
    threads = [threading.Thread(target=run, args=(c,)) for c in range(CONVERSATIONS)]
    for th in threads:
        th.start()
        time.sleep(0.5)
    for th in threads:
        th.join(1200)
    assert not errors, errors
    print(f"[router-e2e] {CONVERSATIONS} conversations x {TURNS} turns in "
          f"{time.monotonic() - t0:.0f} s")  # fmt: skip
    return cluster


def _owners(cluster: Cluster) -> dict[int, int]:
    """Conversation -> the one worker that served all of its turns (asserted)."""
    owners = {}
    for c in range(CONVERSATIONS):
        served = [cluster.served_by(cluster.turns[(c, t)]["id"]) for t in range(TURNS)]
        assert all(len(s) == 1 for s in served), (c, served)  # each turn served exactly once
        assert len({s[0] for s in served}) == 1, f"conversation {c} moved: {served}"
        owners[c] = served[0][0]
    return owners


def test_turns_stick_to_one_worker_and_hit_its_cache(conversations):
    cluster = conversations
    owners = _owners(cluster)
    print(f"[router-e2e] conversation -> worker: {owners}")
    assert set(owners.values()) == {0, 1}, f"all conversations on one worker: {owners}"
    for c, w in owners.items():
        logged = finished(cluster.workers[w])
        for t in range(TURNS):
            rec = cluster.turns[(c, t)]
            cached, prompt = _cached(rec), rec["usage"]["prompt_tokens"]
            # The client's count is the serving worker's own.
            assert logged[rec["id"]]["cached_tokens"] == cached, (c, t, logged[rec["id"]])
            assert cached <= prompt, (c, t, cached, prompt)
            if t == 0:
                assert prompt > 2 * PAGE and cached == 0, (c, t, rec["usage"])
            else:
                # At least the previous turn's whole pages, from this worker's own tree (a
                # finished history's bf16 tail may add the rest of its last page).
                prev = cluster.turns[(c, t - 1)]["usage"]["prompt_tokens"]
                assert cached >= prev // PAGE * PAGE >= 2 * PAGE, (c, t, cached, prev)


def test_router_view_agrees_with_the_workers(conversations):
    cluster = conversations
    router = cluster.router
    owners = _owners(cluster)
    listed = router.workers()
    assert sorted(listed) == sorted(w.url for w in cluster.workers), listed
    for i, w in enumerate(cluster.workers):
        entry = listed[w.url]
        assert entry["is_healthy"] and entry["load"] == 0, entry
        ours = [rec["id"] for (c, _), rec in cluster.turns.items() if owners[c] == i]
        successes = router.metric("smg_worker_cb_outcomes_total", worker=w.url, outcome="success")
        assert successes == len(ours), (w.url, successes, len(ours))

    r = requests.post(router.url + "/flush_cache", timeout=120)
    assert r.status_code == 200, r.text
    for i, w in enumerate(cluster.workers):
        state = _wait_for_flush(w)
        assert state["locked"] == 0 and state["leaked"] == 0, (w.url, state)
        start = _pool_states(w.log_text())[0]
        assert state["free"] + state["evictable"] == start["total"], (w.url, state, start)
        # The pages the router's tree attributes to this worker are in this worker's tree.
        last = [cluster.turns[(c, TURNS - 1)]["usage"]["prompt_tokens"]
                for c, o in owners.items() if o == i]  # fmt: skip
        assert state["evictable"] >= sum(p // PAGE * PAGE for p in last), (w.url, state, last)
        total, free, held, cached = _residual_at_flush(w)
        # Finished histories' tails stay cached in residual pages until the flush.
        assert held == 0 and free + cached == total == MAX_RUNNING, (w.url, free, held, cached)


def _pool_states(log: str) -> list[dict[str, int | str]]:
    """The `OscarRadixCache` pool-state lines (one at start, one per flush)."""
    out = []
    for m in re.finditer(r"oscar-kv pool state at (\w+): ([a-z= 0-9-]+) \(tokens\)", log):
        fields = dict(kv.split("=") for kv in m.group(2).split())
        out.append({"when": m.group(1)} | {k: int(v) for k, v in fields.items()})
    return out


def _wait_for_flush(server: SGLangServer, timeout_s: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        states = _pool_states(server.log_text())
        if states and states[-1]["when"] == "flush":
            return states[-1]
        assert time.monotonic() < deadline, f"no flush pool state\n{server.log_tail(40)}"
        time.sleep(1)


def _residual_at_flush(server: SGLangServer) -> tuple[int, int, int, int]:
    """The last residual-page line at a flush: total, free, held, cached."""
    found = re.findall(
        r"oscar-kv residual pages at flush: total=(\d+) free=(\d+) held=(\d+) cached=(\d+)",
        server.log_text(),
    )
    assert found, f"no residual-page line at flush in {server.url}'s log"
    total, free, held, cached = map(int, found[-1])
    return total, free, held, cached


def test_zz_killing_one_worker_fails_only_its_requests(conversations):
    cluster = conversations
    router = cluster.router
    owners = _owners(cluster)
    victim, survivor = 1, 0
    dead, alive = cluster.workers[victim], cluster.workers[survivor]
    mine = {c: w == victim for c, w in owners.items()}  # conversation bound for the victim?
    msgs = {c: list(m) for c, m in cluster.messages.items()}
    turn = TURNS

    # 1. One long request per conversation in flight on both workers; kill the victim.
    inflight: dict[int, dict] = {}

    def long_turn(c: int) -> None:
        m = msgs[c] + [{"role": "user", "content": QUESTIONS[turn]}]
        inflight[c] = chat(router.url, m, max_tokens=96, ignore_eos=True)

    threads = [threading.Thread(target=long_turn, args=(c,)) for c in range(CONVERSATIONS)]
    for th in threads:
        th.start()
    deadline = time.monotonic() + 120
    while min(e["load"] for e in router.workers().values()) < 1:
        assert time.monotonic() < deadline, router.workers()
        time.sleep(0.2)
    time.sleep(1.0)  # into the decode of the victim's requests
    assert dead.alive()
    os.killpg(dead.proc.pid, signal.SIGKILL)
    killed_at = time.monotonic()
    for th in threads:
        th.join(600)
    for c, rec in inflight.items():
        if mine[c]:
            # Failed, naming the dead worker (or retried onto the survivor once the breaker
            # opened: then the survivor served it).
            if rec["status"] == 200:
                assert cluster.served_by(rec["id"]) == [survivor], (c, rec)
            else:
                assert rec["status"] and rec["status"] >= 500, (c, rec)
                assert dead.url in rec["text"] and alive.url not in rec["text"], (c, rec)
        else:
            assert rec["status"] == 200, (c, rec)
            assert rec["usage"]["completion_tokens"] == 96, rec["usage"]
            assert cluster.served_by(rec["id"]) == [survivor], (c, rec)
    print(f"[router-e2e] in flight at the kill: "
          f"{ {c: r['status'] for c, r in inflight.items()} } (victim's: "
          f"{[c for c in mine if mine[c]]})")  # fmt: skip

    # 2. New turns after the kill, conversation by conversation, a few rounds.
    history: dict[int, list[dict]] = {c: [] for c in range(CONVERSATIONS)}
    for rnd in range(6):
        for c in range(CONVERSATIONS):
            m = msgs[c] + [{"role": "user", "content": QUESTIONS[turn + 1 + rnd]}]
            rec = chat(router.url, m, max_tokens=8)
            history[c].append(rec)
            if rec["status"] == 200:
                msgs[c] = m + [{"role": "assistant", "content": rec["answer"]}]
        rerouted = all(h[-1]["status"] == 200 for c, h in history.items() if mine[c])
        if rerouted and rnd >= 1:
            break
    failures = {c: sum(r["status"] != 200 for r in h) for c, h in history.items()}
    print(
        f"[router-e2e] after the kill ({time.monotonic() - killed_at:.0f} s): failed "
        f"requests per conversation {failures}; router's view "
        f"{ {u: (e['is_healthy'], e['load']) for u, e in router.workers().items()} }"
    )
    for c, h in history.items():
        if not mine[c]:
            # The survivor's conversations never notice, and keep hitting its cache.
            assert all(r["status"] == 200 for r in h), (c, h)
            assert all(cluster.served_by(r["id"]) == [survivor] for r in h), c
            assert all(_cached(r) >= 2 * PAGE for r in h), [r["usage"] for r in h]
            continue
        ok = [i for i, r in enumerate(h) if r["status"] == 200]
        assert ok, f"conversation {c} never rerouted to the survivor: {h}"
        first = ok[0]
        # Errors only before the first success, each naming the dead worker; from then on
        # every turn is the survivor's (no page of this conversation there at first: at most
        # a finished history's tail inside the first page, the chat template's opening).
        for r in h[:first]:
            assert r["status"] and r["status"] >= 500, r
            assert dead.url in r["text"] and alive.url not in r["text"], r
        assert all(r["status"] == 200 for r in h[first:]), h
        assert all(cluster.served_by(r["id"]) == [survivor] for r in h[first:]), c
        assert _cached(h[first]) < PAGE, h[first]["usage"]
        if len(h) > first + 1:
            assert _cached(h[first + 1]) >= 2 * PAGE, h[first + 1]["usage"]
    # The router routes around the dead worker by its circuit breaker, not its health check.
    assert router.metric("smg_worker_cb_state", worker=dead.url) == 1  # open
    assert router.metric("smg_worker_cb_state", worker=alive.url) == 0  # closed

    # 3. The survivor is idle and clean.
    assert alive.alive(), alive.log_tail()
    before = len(_pool_states(alive.log_text()))
    r = requests.post(alive.url + "/flush_cache", timeout=120)
    assert r.status_code == 200, r.text
    deadline = time.monotonic() + 60
    while len(_pool_states(alive.log_text())) == before:
        assert time.monotonic() < deadline, alive.log_tail(40)
        time.sleep(1)
    state = _pool_states(alive.log_text())[-1]
    assert state["when"] == "flush" and state["locked"] == 0 and state["leaked"] == 0, state
    total, free, held, cached = _residual_at_flush(alive)
    assert held == 0 and free + cached == total == MAX_RUNNING, (total, free, held, cached)
    log = alive.log_text()
    for bad in ("memory leak detected", "double free", "use-after-free", "Traceback"):
        assert bad not in log, f"{bad!r} in the survivor's log:\n{alive.log_tail(80)}"
