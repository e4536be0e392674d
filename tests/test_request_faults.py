"""No request shape kills a forward: zero-length and one-token extends, batches mixing empty
and non-empty requests, prompts ending on a page boundary (every CPU backend, through the
SGLang attention backend); and the request checks the plugin adds to SGLang's tokenizer
manager (`oscar_kv.sglang.validation`)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from oscar_kv import OscarConfig
from oscar_kv.sglang.validation import RequestError, check_request

pytest.importorskip("sglang")
from kernel_cases import bf16_round, exact_causal
from test_sglang_backend import HK, HQ, PAGE, World
from test_sglang_backend import D as d

BATCHES = {
    "empty": [0],
    "empty-and-one": [0, 1],
    "one-token": [1],
    "page-boundary": [PAGE],
    "mixed": [0, PAGE, 3, 2 * PAGE - 1],
}


@pytest.mark.parametrize("backend", ["torch", "cpu", "triton"])
@pytest.mark.parametrize("name", list(BATCHES))
def test_extend_shapes_then_decode(backend, name, monkeypatch):
    monkeypatch.setenv("OSCAR_KV_BACKEND", backend)
    torch.manual_seed(3)
    lens = BATCHES[name]
    w = World(OscarConfig())
    data = [
        (
            torch.randn(n + 1, HQ, d),
            bf16_round(torch.randn(n + 1, HK, d)),
            bf16_round(torch.randn(n + 1, HK, d)),
        )
        for n in lens
    ]
    slots = [w.new_request(n + 1) for n in lens]
    q = torch.cat([x[0][:n] for x, n in zip(data, lens, strict=True)])
    k = torch.cat([x[1][:n] for x, n in zip(data, lens, strict=True)])
    v = torch.cat([x[2][:n] for x, n in zip(data, lens, strict=True)])
    out = w.forward(slots, q, k, v, lens, decode=False)
    assert out.shape == (sum(lens), HQ, d)
    off, scale = 0, 1 / math.sqrt(d)
    for (qq, kk, vv), n in zip(data, lens, strict=True):
        if n:
            ref = exact_causal(qq[:n], kk[:n], vv[:n], scale)
            torch.testing.assert_close(out[off : off + n].float(), ref, atol=2e-3, rtol=2e-3)
        off += n
    # One decode step for every request, the empty ones included (their first token).
    q1 = torch.stack([x[0][n] for x, n in zip(data, lens, strict=True)])
    k1 = torch.stack([x[1][n] for x, n in zip(data, lens, strict=True)])
    v1 = torch.stack([x[2][n] for x, n in zip(data, lens, strict=True)])
    out1 = w.forward(slots, q1, k1, v1, [1] * len(lens), decode=True)
    assert torch.isfinite(out1).all()
    for b, ((_, kk, vv), n) in enumerate(zip(data, lens, strict=True)):
        if n == 0:  # a single token attends to itself alone
            torch.testing.assert_close(out1[b].float(), vv[0].repeat_interleave(HQ // HK, 0))


VOCAB = 100


def _req(**kw):
    base = {"sampling_params": {"max_new_tokens": 4}, "return_logprob": False}
    return SimpleNamespace(**(base | kw))


@pytest.mark.parametrize(
    ("ids", "obj", "needle"),
    [
        ([], _req(), "prompt is empty"),
        ([1, -1, 5], _req(), r"input_ids\[1\] = -1"),
        ([1, 2, VOCAB], _req(), rf"input_ids\[2\] = {VOCAB}"),
        ([1, 2.5], _req(), r"input_ids\[1\] = 2.5"),
        ([1, 2], _req(sampling_params={"max_new_tokens": -3}), "max_new_tokens"),
        ([1, 2], _req(sampling_params={"max_new_tokens": 2.5}), "max_new_tokens"),
        ([1, 2], _req(return_logprob=True, logprob_start_len=2), "logprob_start_len = 2"),
        ([1, 2], _req(return_logprob=True, logprob_start_len=-5), "logprob_start_len"),
        ([1, 2], _req(return_logprob=True, top_logprobs_num=VOCAB + 1), "top_logprobs_num"),
    ],
)
def test_bad_requests_are_refused_with_the_field_named(ids, obj, needle):
    with pytest.raises(RequestError, match=needle):
        check_request(obj, ids, VOCAB)


@pytest.mark.parametrize(
    ("ids", "obj"),
    [
        ([0, VOCAB - 1], _req()),
        ([1], _req(sampling_params={"max_new_tokens": 0})),
        ([1, 2], _req(return_logprob=True, logprob_start_len=1, top_logprobs_num=VOCAB)),
        ([1, 2], _req(return_logprob=True, logprob_start_len=-1, top_logprobs_num=0)),
        (None, _req()),  # input_embeds requests carry no ids
        ([1, 10**9], _req(image_data=["x.png"])),  # media placeholders are past the vocab
    ],
)
def test_good_requests_pass(ids, obj):
    check_request(obj, ids, VOCAB)
