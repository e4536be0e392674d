"""``python -m sglang.launch_server --model-path <.gguf> --kv-quant oscar --device cpu``: one flag.

1. Argument rewriting through SGLang's own ``prepare_server_args`` with the plugin's hooks
   applied by SGLang's HookRegistry: what ``--device cpu`` implies under ``--kv-quant oscar``
   (tokenizer from the GGUF, float32, no grammar backend, no decode graph,
   ``SGLANG_USE_CPU_ENGINE=1`` for the processes SGLang spawns, the CPU stand-ins here), that
   a value the user typed is never replaced (``--dtype auto`` included), and that a launch
   without ``--kv-quant`` gets exactly the ServerArgs SGLang alone would build, with the
   environment and the import system untouched.
2. The tokenizer cache (`oscar_kv.sglang.cpu.tokenizer`) on the real SmolLM2 file.
3. Live servers (slow): the one-flag command itself answering a chat request, and the same
   command with ``--kv-quant-bits 4``, ``--kv-quant-k-group 128`` and
   ``--kv-quant-sink-bits 4`` serving a greedy
   request whose prompt crosses a 128-token page.
"""

from __future__ import annotations

import argparse
import os
import sys
import types
from pathlib import Path

import pytest

from oscar_kv.eval.texts import LIBRARY_SYSTEM_LONG
from oscar_kv.sglang.args import (
    CPU_ENGINE_VAR,
    ENV_VAR,
    KVQuantError,
    cpu_defaults,
    cpu_engine_env,
)
from oscar_kv.sglang.cpu import tokenizer as cpu_tokenizer

ONE_FLAG = ["--kv-quant", "oscar", "--device", "cpu"]
# The variables the hooks may write; each test starts without them.
TOUCHED_VARS = (ENV_VAR, CPU_ENGINE_VAR, "OMP_NUM_THREADS", "OSCAR_KV_CPU_BOOT")


def _smollm2_gguf() -> str:
    smollm2 = pytest.importorskip("oscar_kv.eval.smollm2")
    try:
        return str(smollm2.gguf_path())
    except FileNotFoundError as e:
        pytest.skip(f"SmolLM2 GGUF not available: {e}")


# ------------------------------------------------------------------------ pure functions
def test_cpu_defaults_only_for_cpu_and_only_unset_fields():
    assert cpu_defaults({"device": None}) == {}
    assert cpu_defaults({"device": "cuda", "dtype": "auto"}) == {}
    everything = {"dtype": "float32", "grammar_backend": "none",
                  "cuda_graph_backend_decode": "disabled"}  # fmt: skip
    assert cpu_defaults({"device": "cpu"}) == everything
    assert cpu_defaults({"device": "cpu", "dtype": "auto", "grammar_backend": None}) == everything
    user = {"device": "cpu", "dtype": "bfloat16", "grammar_backend": "xgrammar",
            "cuda_graph_backend_decode": "full"}  # fmt: skip
    assert cpu_defaults(user) == {}
    # A typed default value is the user's too, when the command line says it was typed.
    assert "dtype" not in cpu_defaults({"device": "cpu", "dtype": "auto"}, explicit={"dtype"})


def test_cpu_engine_env():
    assert cpu_engine_env({}) == {CPU_ENGINE_VAR: "1"}
    assert cpu_engine_env({CPU_ENGINE_VAR: "1"}) == {}
    with pytest.raises(KVQuantError) as e:
        cpu_engine_env({CPU_ENGINE_VAR: "0"})
    assert f"{CPU_ENGINE_VAR}=1" in str(e.value) and "'0'" in str(e.value)


def test_tokenizer_cache_key_and_place(tmp_path):
    f = tmp_path / "m.gguf"
    f.write_bytes(b"GGUF" + bytes(60))
    d = cpu_tokenizer.tokenizer_dir_for(f, tmp_path / "cache")
    assert d.parent == tmp_path / "cache" / "tokenizers" and d.name.startswith("m-")
    assert cpu_tokenizer.tokenizer_dir_for(f, tmp_path / "cache") == d  # stable
    os.utime(f, ns=(1_000_000_000, 1_000_000_000))
    assert cpu_tokenizer.tokenizer_dir_for(f, tmp_path / "cache") != d  # a replaced file
    # The default root is the user's cache, never the installed package.
    import oscar_kv

    package = Path(oscar_kv.__file__).resolve().parent
    assert package not in cpu_tokenizer.tokenizer_dir_for(f).resolve().parents
    assert not cpu_tokenizer.has_sidecar_tokenizer(f)
    (tmp_path / "tokenizer_config.json").write_text("{}")
    assert cpu_tokenizer.has_sidecar_tokenizer(f)


def test_tokenizer_built_from_the_real_gguf_is_transformers_own():
    """The cached directory loads as the tokenizer transformers builds from the GGUF file,
    with its chat template; `smollm2_model` hands out the same directory."""
    from transformers import AutoTokenizer

    from oscar_kv.sglang.server import smollm2_model

    gguf = Path(_smollm2_gguf())
    d = cpu_tokenizer.gguf_tokenizer_dir(gguf)
    assert (d / "tokenizer_config.json").is_file()
    assert smollm2_model().tokenizer_path == str(d)
    assert cpu_tokenizer.gguf_tokenizer_dir(gguf) == d  # cached: no second build
    saved = AutoTokenizer.from_pretrained(str(d))
    direct = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    text = "The Harbor Street Library opens at 9 am. Ça va? 12 books, 25 cents."
    assert saved(text)["input_ids"] == direct(text)["input_ids"]
    chat = [{"role": "user", "content": "Hi"}]
    assert saved.apply_chat_template(chat, tokenize=False) == direct.apply_chat_template(
        chat, tokenize=False
    )


# ------------------------------------------------------------------ SGLang's argument hooks
@pytest.fixture
def hooks(monkeypatch):
    """SGLang's ServerArgs with the plugin's hooks applied by its own HookRegistry; the
    environment and the import system restored afterwards; `boot.activate` recorded (the
    stand-ins are not installed into the test process)."""
    sg = pytest.importorskip("oscar_kv.sglang._testing")
    try:
        sg.import_sglang_cache()
    except ImportError as e:  # pragma: no cover - depends on the machine
        pytest.skip(f"sglang not installed: {e}")
    from sglang.srt.plugins.hook_registry import HookRegistry

    from oscar_kv.sglang import plugin
    from oscar_kv.sglang.cpu import boot

    plugin.register()
    HookRegistry.apply_hooks()
    saved_env = dict(os.environ)
    saved_path = list(sys.meta_path)
    for var in TOUCHED_VARS:
        os.environ.pop(var, None)
    calls: list[int] = []
    monkeypatch.setattr(boot, "activate", lambda: calls.append(1) or ["sgl_kernel"])
    try:
        yield types.SimpleNamespace(plugin=plugin, activate_calls=calls)
    finally:
        os.environ.clear()
        os.environ.update(saved_env)
        sys.meta_path[:] = saved_path


@pytest.fixture
def fake_tokenizer(monkeypatch, tmp_path):
    """`gguf_tokenizer_dir` without transformers: a directory per file, and the calls."""
    calls: list[str] = []

    def build(gguf, root=None):
        calls.append(str(gguf))
        d = cpu_tokenizer.tokenizer_dir_for(gguf, tmp_path / "cache")
        d.mkdir(parents=True, exist_ok=True)
        (d / "tokenizer_config.json").write_text("{}")
        return d

    monkeypatch.setattr(cpu_tokenizer, "gguf_tokenizer_dir", build)
    build.calls = calls
    build.root = tmp_path / "cache"
    return build


def _prepare(argv):
    from sglang.srt.server_args import prepare_server_args

    return prepare_server_args(argv)


def test_one_flag_implies_the_cpu_settings(hooks, fake_tokenizer):
    gguf = _smollm2_gguf()
    sa = _prepare(["--model-path", gguf, *ONE_FLAG])
    want_tok = str(cpu_tokenizer.tokenizer_dir_for(gguf, fake_tokenizer.root))
    assert sa.tokenizer_path == want_tok and fake_tokenizer.calls == [gguf]
    assert sa.dtype == "float32"
    assert sa.grammar_backend == "none"
    assert sa.cuda_graph_backend_decode == "disabled"
    assert sa.cuda_graph_backend_prefill == "disabled"
    assert sa.page_size == 128 and sa.attention_backend == "oscar"
    assert '"rope_is_neox_style": false' in sa.json_model_override_args
    # The processes SGLang spawns inherit the CPU switch; this one got the stand-ins.
    assert os.environ[CPU_ENGINE_VAR] == "1"
    assert ENV_VAR in os.environ
    assert hooks.activate_calls == [1]


@pytest.mark.parametrize(
    ("flags", "field", "value"),
    [
        (["--dtype", "auto"], "dtype", "auto"),  # SGLang's default, typed: kept
        (["--dtype", "bfloat16"], "dtype", "bfloat16"),
        (["--grammar-backend", "xgrammar"], "grammar_backend", "xgrammar"),
        (["--cuda-graph-backend-decode", "full"], "cuda_graph_backend_decode", "full"),
        (["--cuda-graph-backend-prefill", "breakable"], "cuda_graph_backend_prefill",
         "breakable"),
        (["--tokenizer-path", "/somewhere/tok"], "tokenizer_path", "/somewhere/tok"),
        (["--max-total-tokens", "4096"], "max_total_tokens", 4096),
    ],
)  # fmt: skip
def test_a_value_the_user_set_is_never_overridden(hooks, fake_tokenizer, flags, field, value):
    gguf = _smollm2_gguf()
    sa = _prepare(["--model-path", gguf, *ONE_FLAG, *flags])
    assert getattr(sa, field) == value
    implied = {"dtype": "float32", "grammar_backend": "none",
               "cuda_graph_backend_decode": "disabled"}  # fmt: skip
    for other, default in implied.items():  # the rest still implied
        if other != field:
            assert getattr(sa, other) == default, other
    if field == "tokenizer_path":
        assert fake_tokenizer.calls == []


@pytest.mark.parametrize("spelling", [["--dtype=auto"], ["--dtyp", "auto"]])
def test_equals_and_abbreviated_spellings_count_as_typed(hooks, fake_tokenizer, spelling):
    sa = _prepare(["--model-path", _smollm2_gguf(), *ONE_FLAG, *spelling])
    assert sa.dtype == "auto" and sa.grammar_backend == "none"


def test_a_gguf_with_its_tokenizer_beside_it_is_left_to_sglang(hooks, fake_tokenizer, tmp_path):
    from test_sglang_args import LLAMA_GGUF, write_gguf

    f = tmp_path / "tiny.gguf"
    write_gguf(f, "llama", {**LLAMA_GGUF, "attention.key_length": 64})
    (tmp_path / "tokenizer_config.json").write_text("{}")
    sa = _prepare(["--model-path", str(f), *ONE_FLAG])
    assert sa.tokenizer_path is None and fake_tokenizer.calls == []
    assert sa.dtype == "float32"


def test_an_unreadable_gguf_tokenizer_is_one_message(hooks, tmp_path):
    from test_sglang_args import LLAMA_GGUF, write_gguf

    f = tmp_path / "tiny.gguf"  # metadata only: transformers cannot build a tokenizer
    write_gguf(f, "llama", {**LLAMA_GGUF, "attention.key_length": 64})
    os.environ["OSCAR_KV_CACHE"] = str(tmp_path / "cache")
    with pytest.raises(KVQuantError) as e:
        _prepare(["--model-path", str(f), *ONE_FLAG])
    assert "pass --tokenizer-path" in str(e.value)
    assert CPU_ENGINE_VAR not in os.environ and hooks.activate_calls == []


def test_a_refused_model_is_refused_before_any_cpu_setup(hooks, fake_tokenizer, tmp_path):
    from test_sglang_args import LLAMA_GGUF, write_gguf

    f = tmp_path / "tiny.gguf"
    write_gguf(f, "llama", {**LLAMA_GGUF, "attention.key_length": 96})
    with pytest.raises(KVQuantError, match="head_dim=96"):
        _prepare(["--model-path", str(f), *ONE_FLAG])
    assert fake_tokenizer.calls == [] and hooks.activate_calls == []
    assert CPU_ENGINE_VAR not in os.environ


def test_a_conflicting_cpu_switch_is_one_message(hooks, fake_tokenizer):
    os.environ[CPU_ENGINE_VAR] = "0"
    with pytest.raises(KVQuantError, match=f"{CPU_ENGINE_VAR}=1"):
        _prepare(["--model-path", _smollm2_gguf(), *ONE_FLAG])


def test_kv_quant_without_device_cpu_implies_nothing_for_cpu(hooks, fake_tokenizer, tmp_path):
    from test_sglang_args import model_dir

    path = model_dir(tmp_path, head_dim=64, hidden_size=512)
    sa = _prepare(["--model-path", path, "--kv-quant", "oscar"])
    assert sa.dtype == "auto" and sa.grammar_backend is None
    assert sa.cuda_graph_backend_decode is None and sa.tokenizer_path is None
    assert CPU_ENGINE_VAR not in os.environ and hooks.activate_calls == []


def _record(cls, obj) -> dict:
    """The record's fields, as SGLang's ``from_cli_args`` enumerates them."""
    from sglang.srt.arg_groups.arg_utils import record_fields

    return {f.name: getattr(obj, f.name) for f in record_fields(cls) if hasattr(obj, f.name)}


@pytest.mark.parametrize(
    "extra",
    [[], ["--dtype", "auto"], ["--grammar-backend", "xgrammar"], ["--kv-quant", "none"]],
    ids=["bare", "dtype-auto", "grammar", "kv-quant-none"],
)
def test_without_kv_quant_nothing_changes(hooks, fake_tokenizer, extra):
    """The ServerArgs a launch without --kv-quant gets is the one SGLang builds from the same
    parse without the plugin; the parse itself, the environment and sys.meta_path are as
    before; no tokenizer is built and no stand-in installed."""
    from sglang.srt.server_args import ServerArgs

    gguf = _smollm2_gguf()  # a Llama GGUF: the rotary fix would rewrite its override args
    argv = ["--model-path", gguf, "--device", "cpu", *extra]
    env_before, path_before = dict(os.environ), list(sys.meta_path)

    parser = argparse.ArgumentParser()
    ServerArgs.add_cli_args(parser)  # hooked: adds the --kv-quant flags
    ns = parser.parse_args(argv)
    parsed = dict(vars(ns))
    assert not hasattr(ns, "_oscar_kv_explicit")
    sa = ServerArgs.from_cli_args(ns)
    assert dict(vars(ns)) == parsed  # the Namespace is not rewritten
    alone = ServerArgs(**{k: v for k, v in parsed.items() if k in _record(ServerArgs, sa)})
    assert _record(ServerArgs, sa) == _record(ServerArgs, alone)
    assert sa.json_model_override_args == alone.json_model_override_args
    # Through prepare_server_args (SGLang's entry) too.
    sa2 = _prepare(argv)
    assert _record(ServerArgs, sa2) == _record(ServerArgs, alone)

    assert dict(os.environ) == env_before
    assert sys.meta_path == path_before
    assert fake_tokenizer.calls == [] and hooks.activate_calls == []


def test_the_cpu_kit_switched_on_by_the_user_keeps_only_the_rotary_fix(hooks, fake_tokenizer):
    """``SGLANG_USE_CPU_ENGINE=1`` set by the user without --kv-quant (SGLang's own cache on
    CPU, the benchmarks' baseline): the Llama GGUF rotary fix applies, nothing else."""
    os.environ[CPU_ENGINE_VAR] = "1"
    sa = _prepare(["--model-path", _smollm2_gguf(), "--device", "cpu"])
    assert sa.json_model_override_args == '{"rope_is_neox_style": false}'
    assert sa.dtype == "auto" and sa.grammar_backend is None and sa.tokenizer_path is None
    assert fake_tokenizer.calls == [] and hooks.activate_calls == []


def test_engine_kwargs_get_the_same_cpu_settings(hooks, fake_tokenizer, monkeypatch):
    import sglang

    calls = []
    monkeypatch.setattr(sglang, "Engine", lambda **kw: calls.append(kw))
    gguf = _smollm2_gguf()
    hooks.plugin.engine(model_path=gguf, kv_quant="oscar", device="cpu")
    hooks.plugin.engine(model_path=gguf, kv_quant="oscar", device="cpu", dtype="auto",
                 tokenizer_path="/t")  # fmt: skip
    first, second = calls
    assert first["dtype"] == "float32" and first["grammar_backend"] == "none"
    assert first["cuda_graph_backend_decode"] == "disabled"
    assert first["tokenizer_path"] == str(
        cpu_tokenizer.tokenizer_dir_for(gguf, fake_tokenizer.root)
    )
    assert second["dtype"] == "auto" and second["tokenizer_path"] == "/t"
    assert os.environ[CPU_ENGINE_VAR] == "1"


# ------------------------------------------------------------------------ live servers (slow)
requests = pytest.importorskip("requests")

LIBRARY = LIBRARY_SYSTEM_LONG
SMALL_POOL = ["--max-total-tokens", "4096"]
# The option servers report cached tokens (their second request checks the cache hit).
REPORT = ["--enable-cache-report"]
VARIANTS = {"one-flag": [], "bits-4": ["--kv-quant-bits", "4", *REPORT],
            "k-group-128": ["--kv-quant-k-group", "128", *REPORT],
            "sink-4": ["--kv-quant-sink-bits", "4", *REPORT]}  # fmt: skip


@pytest.fixture(scope="module")
def live_servers():
    """The one-flag command, and it with --kv-quant-bits 4 / --kv-quant-k-group 128, started
    together (their start-ups overlap) in an environment without SGLANG_USE_CPU_ENGINE."""
    from oscar_kv.sglang._testing import INSTALL_HINT

    try:
        import sglang  # noqa: F401
    except ImportError:  # pragma: no cover
        pytest.skip(INSTALL_HINT)
    from oscar_kv.sglang.server import ServedModel, SGLangServer

    gguf = _smollm2_gguf()
    servers = {
        name: SGLangServer(
            ServedModel(gguf),
            raw_args=["--model-path", gguf, *ONE_FLAG, *SMALL_POOL, *extra],
        )
        for name, extra in VARIANTS.items()
    }
    timeout = float(os.environ.get("OSCAR_E2E_START_TIMEOUT", "1200"))
    try:
        for s in servers.values():
            s.start()
        for s in servers.values():
            s.wait_ready(timeout)
        yield servers
    finally:
        for s in servers.values():
            s.stop()


def _chat(server, content: str, *, system: str | None = None, max_tokens: int = 32) -> dict:
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": content}
    ]
    body = {"model": "default", "messages": messages, "max_tokens": max_tokens, "temperature": 0}
    r = requests.post(server.url + "/v1/chat/completions", json=body, timeout=600)
    assert r.status_code == 200, f"{r.status_code} {r.text}\n{server.log_tail(60)}"
    return r.json()


@pytest.mark.slow
def test_one_flag_command_answers_a_chat(live_servers):
    s = live_servers["one-flag"]
    assert s.command()[1:] == ["-m", "sglang.launch_server", "--model-path",
                               s.model.model_path, *ONE_FLAG, *SMALL_POOL,
                               "--port", str(s.port)]  # fmt: skip
    assert CPU_ENGINE_VAR not in s.environment()
    out = _chat(s, "What is the capital of France?")
    answer = out["choices"][0]["message"]["content"]
    print(f"one-flag: {answer!r} (ready in {s.ready_s:.0f} s)")
    assert "Paris" in answer, out
    log = s.log_text()
    assert "oscar-kv: --device cpu: --dtype float32 --grammar-backend none" in log
    assert f"{CPU_ENGINE_VAR}=1 for every SGLang process" in log
    assert "oscar-2b-g32-token cell size 4440 B/token" in log
    assert "rope_is_neox_style=false" in log


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "label"),
    [
        ("bits-4", "oscar-4b-g32-token"),
        ("k-group-128", "oscar-2b-g128-token"),
        ("sink-4", "oscar-2b-g32-token+sink4"),
    ],
)
def test_kv_quant_option_serves_across_a_page(live_servers, name, label):
    """A greedy request whose prompt alone fills a 128-token page (so that page is packed with
    the option's format before the answer is decoded) gets a sensible answer."""
    s = live_servers[name]
    out = _chat(s, "On Saturdays, at what time does the library open?", system=LIBRARY)
    usage = out["usage"]
    assert usage["prompt_tokens"] > 128, usage
    answer = out["choices"][0]["message"]["content"]
    print(f"{name}: {answer!r} ({usage['prompt_tokens']} prompt tokens)")
    assert usage["completion_tokens"] > 0 and "10" in answer, answer
    assert f"{label} cell size" in s.log_text()
    # again: the packed first page (for sink-4: the 4-bit sink page) now comes from the cache
    again = _chat(s, "On Saturdays, at what time does the library open?", system=LIBRARY)
    cached = again["usage"].get("prompt_tokens_details") or {}
    assert (cached.get("cached_tokens") or 0) >= 128, again["usage"]
    assert "10" in again["choices"][0]["message"]["content"], again
