"""The model-level eval (`oscar_kv.eval`: methods, caches, perplexity, passkey, chat, attribution,
report, cli) on a tiny random Llama with a character tokenizer (no GGUF needed)."""

from __future__ import annotations

import csv

import pytest
import torch

from oscar_kv import OscarConfig
from oscar_kv.cache import Bf16Cache, OscarCache, OscarLayer
from oscar_kv.eval.attribution import token_attribution, write_attribution
from oscar_kv.eval.caches import ExactHalfLayer, RowsCache, WindowLayer
from oscar_kv.eval.chat import chat_agreement
from oscar_kv.eval.cli import build_parser, run
from oscar_kv.eval.methods import PAPER_FAMILIES, all_methods, select
from oscar_kv.eval.passkey import NEEDLE_NEW_TOKENS, needle_trials
from oscar_kv.eval.perplexity import chunked_nll, perplexity
from oscar_kv.eval.report import PPL_COLUMNS
from oscar_kv.eval.texts import encode, make_chats
from test_cache import _prompt, tiny_llama

EOS = 2


class CharTokenizer:
    """Characters as ids (mod 125, + 3); the chat markers are single special ids."""

    eos_token_id = EOS

    def __init__(self):
        self.specials = {"<|im_end|>": EOS, "<|im_start|>": 1}

    def _ids(self, text: str) -> list[int]:
        out, i = [], 0
        while i < len(text):
            for s, t in self.specials.items():
                if text.startswith(s, i):
                    out.append(t)
                    i += len(s)
                    break
            else:
                out.append(3 + ord(text[i]) % 125)
                i += 1
        return out

    def __call__(self, text, add_special_tokens=False, return_tensors="pt"):
        return {"input_ids": torch.tensor([self._ids(text)])}

    def decode(self, ids, skip_special_tokens=False):
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else ids
        return "".join(chr(i - 3) if i >= 3 else "" for i in ids)

    def convert_tokens_to_ids(self, token: str) -> int:
        return self.specials[token]

    def apply_chat_template(self, messages, add_generation_prompt=True, **kwargs):
        text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
        text += "<|im_start|>assistant\n" if add_generation_prompt else ""
        return {"input_ids": torch.tensor([self._ids(text)])}


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


def _methods(*labels):
    return select(all_methods(), labels)


def test_bytes_per_token_smollm2_shape():
    m = {x.label: x for x in all_methods()}
    assert m["bf16"].bytes_per_token(3, 64) == 768
    assert m["oscar-2b-g32-token"].bytes_per_token(3, 64) == 148
    assert m["oscar-2b-g32-head"].bytes_per_token(3, 64) == 156
    assert m["kivi-2b-g32-none"].bytes_per_token(3, 64) == 144
    assert m["oscar-2b-g128-token"].bytes_per_token(3, 64) == 130
    assert m["oscar-4b-g32-token"].bytes_per_token(3, 64) == 244
    assert m["oscar-2b-g128-token-v16"].bytes_per_token(3, 64) == 154
    # The sink page's extra 4-bit bytes spread over the context; a wider window likewise.
    sink = m["oscar-2b-g32-token+sink4"]
    assert sink.bytes_per_token(3, 64, 2048) == pytest.approx(148 + (244 - 148) / 16)
    win = m["oscar-2b-g32-token+win256"]
    assert win.bytes_per_token(3, 64, 2048) == pytest.approx(148 + (768 - 148) * 128 / 2048)
    paper = [x.label for x in all_methods() if x.is_paper]
    assert "bf16" in paper and "oscar-2b-g32-token+sink4" not in paper
    assert {x.family for x in all_methods() if x.is_paper} <= set(PAPER_FAMILIES)


def test_select_rejects_unknown():
    with pytest.raises(ValueError, match="unknown methods"):
        select(all_methods(), ["oscar-3b"])


def test_method_cache_equals_oscar_cache(model):
    ids = _prompt(300)
    cfg = OscarConfig(bits=2)
    (m,) = _methods(cfg.label)
    a = chunked_nll(model, ids, m.make_cache(model.config))
    b = chunked_nll(model, ids, OscarCache(cfg, model.config))
    assert torch.equal(a, b)
    c = chunked_nll(model, ids, Bf16Cache(model.config))
    assert not torch.allclose(a, c)  # the quantized pages change later chunks


def test_chunked_bf16_nll_equals_one_forward(model):
    ids = _prompt(300)
    nll = chunked_nll(model, ids, Bf16Cache(model.config))
    with torch.no_grad():
        logits = model(input_ids=ids, past_key_values=Bf16Cache(model.config)).logits[0]
    ref = -torch.log_softmax(logits[:-1], -1).gather(1, ids[0, 1:, None])[:, 0]
    assert nll.shape == (299,)
    torch.testing.assert_close(nll, ref, atol=1e-4, rtol=1e-4)


def test_rows_cache_rows_equal_separate_caches(model):
    methods = _methods(
        "bf16", "kivi-2b-g32-none", "oscar-2b-g32-token+sink4", "oscar-2b-g32-token+win256"
    )
    ids = _prompt(330)
    rows = RowsCache(methods, model.config)
    singles = [m.make_cache(model.config) for m in methods]
    with torch.no_grad():
        for a, b in ((0, 200), (200, 260), (260, 330)):
            batch = model(
                input_ids=ids[:, a:b].expand(len(methods), -1), past_key_values=rows
            ).logits
            for i, cache in enumerate(singles):
                one = model(input_ids=ids[:, a:b], past_key_values=cache).logits[0]
                torch.testing.assert_close(batch[i], one, atol=2e-4, rtol=1e-4)
    assert rows.get_seq_length() == 330
    assert [rows.row_kv_bytes(i) for i in range(len(methods))] == [c.kv_bytes() for c in singles]


def test_exact_half_layer_keeps_one_half_exact():
    torch.manual_seed(1)
    k, v = torch.randn(2, 1, 2, 300, 32).unbind(0)
    plain = OscarLayer(OscarConfig(bits=2))
    plain.update(k, v)
    for part in ("k", "v"):
        layer = ExactHalfLayer(OscarConfig(bits=2), part)
        layer.update(k[:, :, :200], v[:, :, :200])
        layer.update(k[:, :, 200:], v[:, :, 200:])
        exact, other = (k, "v_pages") if part == "k" else (v, "k_pages")
        pages = layer.k_pages if part == "k" else layer.v_pages
        torch.testing.assert_close(pages, exact[:, :, :256].bfloat16().float())
        torch.testing.assert_close(getattr(layer, other), getattr(plain, other))
    with pytest.raises(ValueError, match="part"):
        ExactHalfLayer(OscarConfig(), "q")


def test_window_layer_keeps_an_extra_page_exact():
    layer = WindowLayer(OscarConfig(bits=2), window=128)
    k = torch.randn(1, 2, 255, 32)
    layer.update(k, k)
    assert layer.num_pages() == 0 and layer.tail_length() == 255
    layer.update(k[:, :, :1], k[:, :, :1])
    assert layer.num_pages() == 1 and layer.tail_length() == 128
    torch.testing.assert_close(layer.keys[:, :, -1:].float(), k[:, :, :1].bfloat16().float())


def test_needle_bf16_row_equals_plain_generate(model):
    tok = CharTokenizer()
    methods = _methods("bf16", "oscar-2b-g32-token")
    hay = "The cat sat on the mat. It was a sunny day. " * 60
    trials = needle_trials(model, tok, methods, [600], [0.0, 0.5, 1.0], [0], hay)
    assert [(t.length, t.depth) for t in trials] == [(600, 0.0), (600, 0.5), (600, 1.0)]
    assert trials[0].position == 0 < trials[1].position < trials[2].position
    for t in trials:
        assert set(t.answers) == {"bf16", "oscar-2b-g32-token"} and len(t.key) == 5
        assert t.ids.shape[0] <= 600
        assert f"The secret passkey is {t.key}." in tok.decode(t.ids)
        # The shared-prefix bf16 prefill answers like one plain prefill of the whole prompt.
        ids = t.ids[None]
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            past_key_values=Bf16Cache(model.config),
            max_new_tokens=NEEDLE_NEW_TOKENS,
            do_sample=False,
            pad_token_id=EOS,
        )
        assert tok.decode(out[0, ids.shape[1] :]) == t.answers["bf16"]


def test_chat_agreement_bf16_row_is_the_reference(model):
    tok = CharTokenizer()
    methods = _methods("bf16", "kivi-2b-g32-none", "oscar-2b-g32-token")
    system, questions = make_chats(1, turns=2)[0]
    turns = chat_agreement(model, tok, methods, system[:400], questions, max_new_tokens=6)
    assert [t.turn for t in turns] == [1, 2]
    assert turns[1].prompt_tokens > turns[0].prompt_tokens > 128
    for t in turns:
        ref = t.answers["bf16"]
        assert 1 <= len(ref) <= 6
        # Teacher-forced on its own answer, the bf16 row predicts it (chunked vs one-token
        # forwards differ by float rounding only).
        assert t.teacher_forced["bf16"] >= len(ref) - 1


def test_make_chats_are_long_and_deterministic():
    chats = make_chats(20, turns=3)
    assert len(chats) == 20 and chats == make_chats(20, turns=3)
    assert all(len(qs) == 3 and len(s) > 1000 for s, qs in chats)
    assert len({s for s, _ in chats}) == 20


def test_run_writes_every_output(tmp_path, model):
    tok = CharTokenizer()
    args = build_parser().parse_args(
        [
            "--out", str(tmp_path), "--methods", "bf16,kivi-2b-g32-none,oscar-2b-g32-token",
            "--ppl-tokens", "260", "--long-tokens", "300", "--contexts", "256,300",
            "--needle-methods", "bf16,oscar-2b-g32-token", "--needle-lengths", "600",
            "--needle-depths", "0,1", "--agree-methods", "bf16,oscar-2b-g32-token",
            "--chats", "1", "--turns", "2", "--max-new-tokens", "4", "--no-progress",
        ]
    )  # fmt: skip
    assert run(args, load=lambda: (model, tok)) == 0
    names = {p.name for p in tmp_path.iterdir()}
    assert {"ppl.csv", "ppl_all.csv", "ppl_by_page.csv", "pareto.png", "needle.csv"} <= names
    assert {"needle_bf16.png", "agreement.csv", "summary.md", "ppl_vs_context.png"} <= names
    with (tmp_path / "ppl.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0]) == PPL_COLUMNS
    got = {(r["method"], r["context"]) for r in rows}
    # bf16 and oscar-2 run 300 tokens (long methods), KIVI-2 is long too by default.
    assert ("bf16", "300") in got and ("oscar", "256") in got and ("kivi", "300") in got
    (tmp_path / "pareto.png").unlink()
    before = (tmp_path / "summary.md").read_text()
    agree_csv = (tmp_path / "agreement.csv").read_text()
    assert run(build_parser().parse_args(["--out", str(tmp_path), "--sections", "report"])) == 0
    assert (tmp_path / "pareto.png").is_file()
    # Rebuilt from the CSVs: the same report (the notes aside), the CSVs untouched.
    assert (tmp_path / "agreement.csv").read_text() == agree_csv
    after = (tmp_path / "summary.md").read_text()
    assert after.split("## Perplexity")[1] == before.split("## Perplexity")[1]
    bf16 = next(r for r in rows if r["method"] == "bf16")
    assert bf16["bits"] == "16" and float(bf16["bytes_per_token"]) == 4 * 2 * 32


@pytest.mark.slow
def test_smollm2_oscar2_close_to_bf16_and_better_than_kivi2():
    from oscar_kv.eval.smollm2 import english_text, load_model

    model, tok = load_model(progress=False)
    ids = encode(tok, english_text(6000))[None, :512]
    res = {
        m.label: perplexity(model, ids, m, 512).ppl(512)
        for m in _methods("bf16", "kivi-2b-g32-none", "oscar-2b-g32-token")
    }
    assert res["oscar-2b-g32-token"] < res["kivi-2b-g32-none"]
    assert res["oscar-2b-g32-token"] < 1.06 * res["bf16"]


def test_token_attribution_and_report(tmp_path):
    g = torch.Generator().manual_seed(0)
    layers = [
        {"q": torch.randn(384, 4, 32, generator=g), "k": torch.randn(384, 2, 32, generator=g),
         "v": torch.randn(384, 2, 32, generator=g)}
        for _ in range(2)
    ]  # fmt: skip
    two = token_attribution(layers, OscarConfig(bits=2), queries=64)
    four = token_attribution(layers, OscarConfig(bits=4), queries=64)
    assert [r["layer"] for r in two] == [0, 1]
    for a, b in zip(two, four, strict=True):
        assert 0 < a["mass_token0"] < a["mass_page0"] < 1
        assert b["out_err"] < a["out_err"]
        assert a["out_err_k_only"] < a["out_err"] and a["out_err_v_only"] < a["out_err"]
        assert a["out_err_page0_exact"] < a["out_err"]
    write_attribution(tmp_path, {"oscar-2": two, "oscar-4": four}, 384, 64)
    assert (tmp_path / "attribution_layers.png").is_file()
    text = (tmp_path / "attribution.md").read_text()
    assert "| oscar-2 |" in text and "page 0 exact" in text
    assert len((tmp_path / "attribution_layers.csv").read_text().splitlines()) == 5
