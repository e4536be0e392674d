"""--kv-quant flags, validation messages and the capacity plan; no SGLang needed."""

from __future__ import annotations

import argparse
import json

import pytest

from oscar_kv import plan
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
