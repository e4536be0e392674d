"""End to end: a real ``sglang.launch_server --kv-quant oscar`` process on 127.0.0.1, real clients.

One server for the module (SmolLM2-135M GGUF; on CPU without a GPU), started with SGLang's
strict idle memory check (``SGLANG_ENABLE_STRICT_MEM_CHECK_DURING_IDLE=1``: a leaked page or
request slot kills the scheduler, and every later test fails). The fault tests run before
`test_zz_no_leak_after_everything`, which waits for the server to go idle and then checks
the pool and the prefix tree are back to their idle sizes.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

requests = pytest.importorskip("requests")
pytest.importorskip("openai")

from oscar_kv.eval.texts import LIBRARY_SYSTEM
from oscar_kv.sglang._testing import INSTALL_HINT
from oscar_kv.sglang.server import SGLangServer, smollm2_model

try:
    import sglang  # noqa: F401
except ImportError:  # pragma: no cover - the test script installs it
    pytest.skip(INSTALL_HINT, allow_module_level=True)

SYSTEM = LIBRARY_SYSTEM
CONTEXT = 2048


@pytest.fixture(scope="module")
def server():
    s = SGLangServer(
        smollm2_model(),
        kv_quant="oscar",
        max_total_tokens=8192,
        max_running_requests=8,
        context_length=CONTEXT,
        env={"SGLANG_ENABLE_STRICT_MEM_CHECK_DURING_IDLE": "1"},
    )
    s.start()
    try:
        s.wait_ready(float(os.environ.get("OSCAR_E2E_START_TIMEOUT", "600")))
        yield s
    finally:
        s.stop()


def _post(server, path: str, body: dict, **kw) -> requests.Response:
    return requests.post(server.url + path, json=body, timeout=300, **kw)


def _chat(server, messages: list[dict], max_tokens: int = 16, **extra) -> dict:
    r = _post(
        server,
        "/v1/chat/completions",
        {"model": "default", "messages": messages, "max_tokens": max_tokens, "temperature": 0}
        | extra,
    )
    assert r.status_code == 200, r.text
    return r.json()


def test_start_up_log_reports_capacity_and_backends(server):
    log = server.log_text()
    assert "cell size 4440 B/token vs bf16 23040 B/token" in log  # 30 layers x 3 heads x D=64
    assert "impl=OscarRadixCache" in log
    assert "rope_is_neox_style=false" in log
    assert server.ready_s < 600


def test_short_prompt_matches_transformers_exactly(server):
    """Under 128 tokens everything is in the request's exact tail, so the server must produce
    transformers' own greedy tokens: this checks the GGUF weights (dense after load), the
    rotary fix for llama.cpp's Q/K order and the attention backend's exact path together."""
    import torch

    from oscar_kv.eval.smollm2 import load_model
    from oscar_kv.eval.texts import chat_ids

    model, tok = load_model(progress=False)
    ids = chat_ids(tok, [{"role": "user", "content": "What is the capital of France? Why?"}])
    with torch.no_grad():
        ref = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=40, do_sample=False
        )[0, ids.shape[1] :].tolist()
    assert ids.shape[1] + len(ref) < 128
    body = {
        "input_ids": ids[0].tolist(),
        "sampling_params": {"max_new_tokens": 40, "temperature": 0},
    }
    r = _post(server, "/generate", body)
    assert r.status_code == 200, r.text
    got = tok(r.json()["text"], add_special_tokens=False)["input_ids"]
    want = tok(tok.decode(ref, skip_special_tokens=True), add_special_tokens=False)["input_ids"]
    assert got == want, (tok.decode(got), tok.decode(want))


def test_openai_chat_stream_equals_non_stream(server):
    from openai import OpenAI

    client = OpenAI(base_url=server.url + "/v1", api_key="none")
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Hi!"}]
    # Both from an empty cache: the second would otherwise find the first's history in the
    # cache, and a prompt served from 2-bit pages may answer otherwise than one prefilled
    # from scratch (docs/prefix-sharing.md).
    assert _post(server, "/flush_cache", {}).status_code == 200
    whole = client.chat.completions.create(
        model="default", messages=messages, max_tokens=24, temperature=0
    )
    text = whole.choices[0].message.content
    assert text and whole.usage.completion_tokens > 0
    parts = []
    assert _post(server, "/flush_cache", {}).status_code == 200
    for chunk in client.chat.completions.create(
        model="default", messages=messages, max_tokens=24, temperature=0, stream=True
    ):
        parts.extend(c.delta.content or "" for c in chunk.choices)
    assert "".join(parts) == text


def test_cached_tokens_grow_across_turns(server):
    """Each turn hits the previous turn's whole history (prompt + answer, less the last
    answer token, whose KV is never computed, or all of it when the answer ended with the
    end-of-turn token the template writes back), not only its whole 128-token pages, as
    SGLang's own token-granular cache does: the packed pages and the bf16 tail."""
    messages = [{"role": "system", "content": SYSTEM * 3}]
    cached, prompts, answers = [], [], []
    for q in ("When does it open on Saturday?", "How many books can I borrow?", "Late fee?"):
        messages.append({"role": "user", "content": q})
        out = _chat(server, messages, max_tokens=24)
        messages.append({"role": "assistant", "content": out["choices"][0]["message"]["content"]})
        prompts.append(out["usage"]["prompt_tokens"])
        answers.append(out["usage"]["completion_tokens"])
        cached.append(out["usage"]["prompt_tokens_details"]["cached_tokens"])
    assert prompts[0] > 256
    for i in (1, 2):
        history = prompts[i - 1] + answers[i - 1]
        assert history - 1 <= cached[i] <= history, (cached, prompts, answers)
    assert any(c % 128 for c in cached[1:]), cached  # more than whole pages


def test_frontend_program_multi_turn_and_fork(server):
    import sglang as sgl

    @sgl.function
    def library(s, questions):
        s += sgl.system(SYSTEM)
        s += sgl.user(questions[0])
        s += sgl.assistant(sgl.gen("first", max_tokens=16, temperature=0))
        forks = s.fork(2)
        for f, q in zip(forks, questions[1:], strict=True):
            f += sgl.user(q)
            f += sgl.assistant(sgl.gen("answer", max_tokens=16, temperature=0))
        s["forked"] = [f["answer"] for f in forks]

    backend = sgl.RuntimeEndpoint(server.url)
    state = library.run(
        questions=["When do you close on weekdays?", "Is it open on Sunday?", "Late fee?"],
        backend=backend,
    )
    assert state["first"].strip()
    assert len(state["forked"]) == 2 and all(a.strip() for a in state["forked"])
    # The forks' prompts share the system turn and the first answer: cached pages.
    meta = state.get_meta_info("answer")
    assert meta is None or meta.get("cached_tokens", 128) >= 128


def test_sixteen_concurrent_clients(server):
    def one(i: int) -> int:
        msgs = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": f"Q{i}?"}]
        return _chat(server, msgs, max_tokens=8)["usage"]["completion_tokens"]

    with ThreadPoolExecutor(16) as pool:
        counts = list(pool.map(one, range(16)))
    assert len(counts) == 16 and all(0 < c <= 8 for c in counts)


def test_client_disconnects_mid_stream(server):
    body = {
        "model": "default",
        "messages": [{"role": "user", "content": "Count from one to one hundred in words."}],
        "max_tokens": 200,
        "temperature": 0,
        "stream": True,
    }
    with requests.post(
        server.url + "/v1/chat/completions", json=body, stream=True, timeout=300
    ) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        got = [next(lines) for _ in range(3)]
        assert any(line.startswith(b"data:") for line in got)
    # the connection is closed; the server keeps serving
    assert _chat(server, [{"role": "user", "content": "Hello"}], max_tokens=4)["choices"]


def test_request_aborted(server):
    """Aborted once it has streamed its first token (not after a fixed sleep, which a slow
    machine could outlast before the request even starts)."""
    rid = "oscar-abort-test"
    started = threading.Event()
    chunks: list[dict] = []
    errors: list[str] = []

    def run() -> None:
        body = {
            "text": "Write a long essay about libraries.",
            "rid": rid,
            "stream": True,
            "sampling_params": {"max_new_tokens": 400, "temperature": 0, "ignore_eos": True},
        }
        with requests.post(server.url + "/generate", json=body, stream=True, timeout=300) as r:
            for line in r.iter_lines():
                if not line.startswith(b"data:") or line == b"data: [DONE]":
                    continue
                payload = json.loads(line[len(b"data:") :])
                if "error" in payload:
                    errors.append(json.dumps(payload))
                else:
                    chunks.append(payload)
                started.set()

    t = threading.Thread(target=run)
    t.start()
    assert started.wait(120), "the request never produced a token"
    a = _post(server, "/abort_request", {"rid": rid})
    t.join(300)
    assert a.status_code == 200, a.text
    assert not t.is_alive()
    if errors:
        assert "abort" in errors[-1].lower(), errors
    else:
        info = chunks[-1]["meta_info"]
        assert info["finish_reason"]["type"] == "abort", info["finish_reason"]
        assert info["completion_tokens"] < 400


def test_prompt_longer_than_context_is_rejected(server):
    r = _post(server, "/v1/completions", {"model": "default", "prompt": "word " * (CONTEXT + 200)})
    assert r.status_code == 400, r.text
    assert "context" in r.text.lower() or "length" in r.text.lower(), r.text


def test_malformed_json_is_rejected(server):
    r = requests.post(
        server.url + "/v1/chat/completions",
        data=b'{"model": "default", "messages": [',
        headers={"Content-Type": "application/json"},
        timeout=60,
    )
    assert r.status_code in (400, 422), r.text
    assert "json" in r.text.lower() or "decode" in r.text.lower(), r.text


@pytest.mark.parametrize("max_tokens", [-5, 10**9])
def test_bad_max_tokens(server, max_tokens):
    r = _post(
        server,
        "/v1/chat/completions",
        {
            "model": "default",
            "messages": [{"role": "user", "content": "Hi"}],
            "max_tokens": max_tokens,
        },
    )
    if r.status_code == 200:  # a huge value may be clamped to the context; it must finish
        assert r.json()["usage"]["completion_tokens"] <= CONTEXT
    else:
        assert r.status_code in (400, 422), r.text
        assert "max_tokens" in r.text or "max_new_tokens" in r.text or "token" in r.text, r.text


BAD_BODIES = {
    "empty prompt": {"text": ""},
    "empty prompt in a batch": {"text": ["", "Hello"]},
    "empty input_ids": {"input_ids": []},
    "negative token id": {"input_ids": [1, -1, 5]},
    "token id past the vocabulary": {"input_ids": [1, 10**6, 5]},
    "negative max_new_tokens": {"text": "Hi", "sampling_params": {"max_new_tokens": -3}},
    "logprob_start_len past the prompt": {
        "text": "Hi", "return_logprob": True, "logprob_start_len": 1000,
    },
    "top_logprobs_num past the vocabulary": {
        "text": "Hi", "return_logprob": True, "top_logprobs_num": 10**6,
    },
}  # fmt: skip


@pytest.mark.parametrize("name", list(BAD_BODIES))
def test_bad_request_is_refused_and_server_lives(server, name):
    """Each of these made a scheduler raise (the empty prompts under --kv-quant oscar; the ids
    with SGLang's own cache too) and took the server down; now a 400 that names the field."""
    body = BAD_BODIES[name] | {"sampling_params": {"max_new_tokens": 4, "temperature": 0}}
    if "sampling_params" in BAD_BODIES[name]:
        body["sampling_params"] = BAD_BODIES[name]["sampling_params"]
    r = _post(server, "/generate", body)
    assert r.status_code == 400, (name, r.status_code, r.text)
    assert server.alive(), server.log_tail()
    assert _chat(server, [{"role": "user", "content": "Hello"}], max_tokens=2)["choices"]


GREEDY = [{"role": "user", "content": "Name three colours of the rainbow."}]  # < 128 tokens


def _soak_one(url: str, i: int) -> str:
    """One request of the soak's mix; returns its kind and outcome."""
    kind = i % 10
    try:
        if kind in (0, 1, 2, 3):  # valid, short
            body = {
                "text": f"Request {i}: say a word.",
                "sampling_params": {"max_new_tokens": 2 + i % 3, "temperature": 0},
            }
            r = requests.post(url + "/generate", json=body, timeout=300)
            return f"valid:{r.status_code}"
        if kind == 4:  # malformed JSON
            r = requests.post(
                url + "/generate", data=b'{"text": ', timeout=60,
                headers={"Content-Type": "application/json"},
            )  # fmt: skip
            return f"malformed:{r.status_code}"
        if kind == 5:  # one of the bodies that used to kill a scheduler
            name = list(BAD_BODIES)[i % len(BAD_BODIES)]
            r = requests.post(url + "/generate", json=BAD_BODIES[name], timeout=60)
            return f"bad:{r.status_code}"
        if kind == 6:  # oversized
            body = {"text": "word " * (CONTEXT + 100), "sampling_params": {"max_new_tokens": 2}}
            r = requests.post(url + "/generate", json=body, timeout=60)
            return f"oversized:{r.status_code}"
        if kind == 7:  # disconnect after the first streamed chunk
            body = {
                "text": f"Count slowly {i}.", "stream": True,
                "sampling_params": {"max_new_tokens": 64, "ignore_eos": True},
            }  # fmt: skip
            with requests.post(url + "/generate", json=body, stream=True, timeout=300) as r:
                next(r.iter_lines(), None)
            return "disconnected:ok"
        if kind == 8:  # aborted by rid while it runs
            rid = f"soak-{i}"
            body = {"text": f"Tell a story {i}.", "rid": rid,
                    "sampling_params": {"max_new_tokens": 64, "ignore_eos": True}}  # fmt: skip
            t = threading.Thread(
                target=lambda: requests.post(url + "/generate", json=body, timeout=300)
            )
            t.start()
            time.sleep(0.2)
            requests.post(url + "/abort_request", json={"rid": rid}, timeout=60)
            t.join(300)
            return "aborted:ok"
        body = {"messages": [{"role": "user", "content": ""}], "model": "default",
                "max_tokens": 2}  # fmt: skip
        r = requests.post(url + "/v1/chat/completions", json=body, timeout=60)
        return f"empty-chat:{r.status_code}"
    except requests.RequestException as e:
        return f"kind{kind}:error:{type(e).__name__}"


def soak(url: str, n: int = 240, clients: int = 8) -> dict[str, int]:
    """``n`` mixed requests from ``clients`` concurrent clients; counts of kind:outcome."""
    with ThreadPoolExecutor(clients) as pool:
        outcomes = list(pool.map(lambda i: _soak_one(url, i), range(n)))
    counts: dict[str, int] = {}
    for o in outcomes:
        counts[o] = counts.get(o, 0) + 1
    return counts


def test_fault_soak(server):
    """A few hundred mixed requests (valid, malformed, aborted, disconnected, oversized,
    empty) from 8 clients: the server lives, nothing it answers is a 5xx, and a fixed greedy
    prompt gets the same answer before and after (the leak check follows in zz). Both answers
    are cold prefills (cache flushed first): an answer served from the 2-bit pages of an
    earlier request may differ from a cold one (docs/prefix-sharing.md)."""
    assert _post(server, "/flush_cache", {}).status_code == 200
    before = _chat(server, GREEDY, max_tokens=16)["choices"][0]["message"]["content"]
    counts = soak(server.url)
    assert server.alive(), server.log_tail()
    assert not [k for k in counts if "error" in k or k.endswith(":500")], counts
    assert counts.get("valid:200", 0) == 96, counts
    deadline = time.monotonic() + 120
    while _post(server, "/flush_cache", {}).status_code != 200:  # busy until aborts drain
        assert time.monotonic() < deadline, "cache never flushable after the soak"
        time.sleep(2)
    after = _chat(server, GREEDY, max_tokens=16)["choices"][0]["message"]["content"]
    assert after == before


def _pool_states(log: str) -> list[dict[str, int]]:
    """The `OscarRadixCache` pool-state lines (one at start, one per flush)."""
    out = []
    for m in re.finditer(r"oscar-kv pool state at (\w+): ([a-z= 0-9-]+) \(tokens\)", log):
        fields = dict(kv.split("=") for kv in m.group(2).split())
        out.append({"when": m.group(1)} | {k: int(v) for k, v in fields.items()})
    return out


def test_zz_no_leak_after_everything(server):
    """After the faults: the server is up, and once every request has finished and the
    prefix cache is flushed, each pool slot is free or held by the tree, none locked or lost."""
    assert server.alive(), server.log_tail()
    assert _chat(server, [{"role": "user", "content": "Still there?"}], max_tokens=4)
    deadline = time.monotonic() + 120
    while True:  # /flush_cache refuses while requests are running or queued
        r = _post(server, "/flush_cache", {})
        if r.status_code == 200:
            break
        assert time.monotonic() < deadline, f"cache never flushable (still busy): {r.text}"
        time.sleep(2)
    time.sleep(1)
    assert server.alive(), server.log_tail()
    log = server.log_text()
    for bad in ("memory leak detected", "double free", "use-after-free", "Traceback"):
        assert bad not in log, f"{bad!r} in the server log:\n{server.log_tail(80)}"
    states = _pool_states(log)
    assert states and states[0]["when"] == "start", states
    start, flushed = states[0], states[-1]
    assert flushed["when"] == "flush", states
    assert flushed["locked"] == 0 and flushed["leaked"] == 0, flushed
    assert flushed["free"] + flushed["evictable"] == start["free"] == start["total"], states
    residual = re.findall(
        r"oscar-kv residual pages at flush: total=(\d+) free=(\d+) held=(\d+) cached=(\d+)",
        log,
    )
    assert residual, "no residual-page line at flush"
    total, free, held, cached = map(int, residual[-1])
    # --max-running-requests 8; finished histories' tails stay cached until the flush.
    assert held == 0 and free + cached == total == 8, residual[-1]


def _tiny_llama(path) -> str:
    """A 2-layer Llama config (4 q heads, 2 KV heads, D=64) with SmolLM2's tokenizer; served
    with random weights (``--load-format dummy``), since the one real model here has 3 KV heads
    and cannot be split over 2 ranks."""
    import shutil

    from transformers import LlamaConfig

    cfg = LlamaConfig(
        vocab_size=49152,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
    )
    cfg.architectures = ["LlamaForCausalLM"]
    cfg.save_pretrained(path)
    tok = smollm2_model().tokenizer_path
    for f in os.listdir(tok):
        shutil.copy(os.path.join(tok, f), path)
    return str(path)


def test_tensor_parallel_2_on_cpu(tmp_path_factory):
    """--tp 2 over gloo on CPU: each rank holds one of the two KV heads, its token norm is over
    that head alone (capacity line per rank), pages are shared across requests on both ranks,
    and nothing leaks."""
    from oscar_kv.sglang.server import ServedModel

    model = ServedModel(_tiny_llama(tmp_path_factory.mktemp("tiny-llama")))
    s = SGLangServer(
        model,
        kv_quant="oscar",
        max_total_tokens=4096,
        max_running_requests=4,
        extra_args=["--tp", "2", "--load-format", "dummy"],
        env={
            "SGLANG_CPU_OMP_THREADS_BIND": "0|1",
            "SGLANG_ENABLE_STRICT_MEM_CHECK_DURING_IDLE": "1",
        },
    )
    with s:
        prompt = "word " * 300
        outs = []
        for suffix in ("", " again"):
            body = {
                "text": prompt + suffix,
                "sampling_params": {"max_new_tokens": 8, "temperature": 0},
            }
            r = requests.post(s.url + "/generate", json=body, timeout=300)
            assert r.status_code == 200, r.text
            outs.append(r.json()["meta_info"])
        # The second prompt shares the first's 300-odd tokens: two whole pages and the rest
        # from the first request's bf16 tail.
        assert outs[0]["cached_tokens"] == 0 and outs[1]["cached_tokens"] > 256, outs
        assert _post(s, "/flush_cache", {}).status_code == 200
        time.sleep(1)
        log = s.log_text()
    assert "2 layers x 1 KV heads (per rank, tp=2)" in log
    for rank in ("TP0", "TP1"):
        states = _pool_states("\n".join(x for x in log.splitlines() if f" {rank}]" in x))
        assert [st["when"] for st in states] == ["start", "flush"], (rank, states)
        assert states[-1]["locked"] == 0 and states[-1]["leaked"] == 0, (rank, states)
        assert states[-1]["evictable"] == 256, (rank, states)
