"""`python -m oscar_kv eval`: model-level quality of the quantized KV cache on SmolLM2-135M.

Three measurements, each with the cache quantized exactly as in serving (128-token pages
quantized when full, bf16 tail, pages dequantized by the reference for attention):

Perplexity
    Real English prose (the Python reference documentation shipped as ``pydoc_data`` with every
    Python install, `oscar_kv.eval.smollm2.english_text`) is fed through the model in 128-token
    chunks cut at page boundaries, so every token attends to the already-quantized pages before
    its own page plus the exact tokens of its own page: what a one-token decode step sees. The
    perplexity "at context L" is that of the first L tokens of one long document (one run per
    method gives every shorter context as a prefix).

Passkey retrieval (needle in a haystack)
    A chat prompt holds prose with a sentence "The secret passkey is NNNNN." at a depth of
    0..100% and then asks for the passkey; the answer is greedy and scored by exact match of
    the number. The document is prefilled once in bf16 (as a serving extend would, one forward
    attending to itself exactly), its pages are then quantized by each method, and the question
    is an extend over those quantized pages followed by greedy decoding: the document-in-the-
    prefix-cache situation. The bf16 prefill is shared by every method and, across depths, by
    the common haystack prefix.

Multi-turn agreement
    Chats with a system prompt of procedurally generated facts (> 2 pages) and several short
    questions about them. At every turn all methods see the same (bf16) conversation so far and
    answer greedily; an answer agrees when its tokens equal the bf16 answer's. Mean common-prefix
    length and teacher-forced top-1 agreement on the bf16 answer tokens are reported too. The
    methods run as the rows of one batch (`RowsCache`), each row with its own cache.

Methods: bf16, KIVI, rotation-only, direct scaling and OScaR from `OscarConfig`, transformers'
own `QuantizedCache` (quanto backend, per-token groups of 64 channels, residual 128) when
`optimum-quanto` is installed, and the beyond-the-paper variants (`OscarConfig.sink_bits`: the
first page at higher precision; `Method.window`: a wider bf16 window).
"""

from __future__ import annotations

import argparse
import copy
import csv
import math
import random
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from oscar_kv import _needs_extra
from oscar_kv.config import BLOCK_TOKENS, OscarConfig
from oscar_kv.eval import pyplot

with _needs_extra("eval", "oscar_kv.eval.quality (`python -m oscar_kv eval`)"):
    from transformers.cache_utils import Cache, DynamicLayer

    from oscar_kv.cache import Bf16Layer, OscarLayer

RESULTS_DIR = Path("benches/results/quality")
PAPER_FAMILIES = ("bf16", "kivi", "rotation-only", "direct-scaling", "oscar")
PPL_COLUMNS = ("method", "bits", "k_group", "norm", "context", "ppl", "bytes_per_token")


# ---------------------------------------------------------------------------------------------
# Methods and the cache layers they build
# ---------------------------------------------------------------------------------------------


def _page_bytes(config: OscarConfig, kv_heads: int, head_dim: int) -> int:
    from oscar_kv.ref import quantize_kv

    z = torch.zeros(BLOCK_TOKENS, kv_heads, head_dim)
    return quantize_kv(z, z, config).page_nbytes


@dataclass(frozen=True)
class Method:
    """One compared KV cache: its label, family and how to build a cache layer.

    config: the quantizer (None: the bf16 cache or quanto).
    quanto_bits: transformers' `QuantizedCache` with the quanto backend at these bits.
    window: beyond the paper: tokens kept in bf16 beyond the 128-token tail (0 or 128), i.e. a
        page is quantized only once ``128 + window`` newer tokens follow its start.
    exact: attribution only, not a storage format: "k" or "v" keeps that half of every page
        exact (bf16) while the other half is quantized by ``config``.
    """

    label: str
    family: str
    bits: int
    config: OscarConfig | None = None
    quanto_bits: int | None = None
    window: int = 0
    exact: str = ""

    @property
    def k_group(self) -> int | None:
        return None if self.config is None else self.config.k_group

    @property
    def norm(self) -> str:
        return "none" if self.config is None else self.config.norm

    @property
    def is_paper(self) -> bool:
        """A configuration of the paper's comparison (a row of ppl.csv)."""
        return (
            self.family in PAPER_FAMILIES
            and (self.config is None or self.config.sink_bits is None)
            and self.window == 0
            and not self.exact
            and (self.config is None or self.config.v_group == 32)
        )

    def make_layer(self) -> Any:
        if self.quanto_bits is not None:
            from transformers.cache_utils import QuantoQuantizedLayer

            return QuantoQuantizedLayer(nbits=self.quanto_bits, residual_length=BLOCK_TOKENS)
        if self.config is None:
            return Bf16Layer()
        if self.window:
            return WindowLayer(self.config, self.window)
        if self.exact:
            return ExactHalfLayer(self.config, self.exact)
        return OscarLayer(self.config)

    def make_cache(self, model_config: Any) -> Cache:
        layers = model_config.get_text_config(decoder=True).num_hidden_layers
        return LayersCache([self.make_layer() for _ in range(layers)])

    def bytes_per_token(self, kv_heads: int, head_dim: int, context: int | None = None) -> float:
        """Bytes per token per layer of a full cache: ``page_nbytes / 128`` for a paged method.

        With ``context`` given, the beyond-the-paper variants count what they hold at that
        context on top of full pages: the sink page's extra bytes and the extra bf16 window,
        spread over the context.
        """
        bf16 = 4 * kv_heads * head_dim
        if self.config is None and self.quanto_bits is None:
            return float(bf16)
        if self.quanto_bits is not None:
            # Per (token, head, 64 channels) an fp32 scale and shift (the model runs in fp32),
            # for K and for V, plus the codes.
            codes = 2 * kv_heads * head_dim * self.quanto_bits / 8
            return codes + 2 * 2 * 4 * kv_heads * math.ceil(head_dim / 64)
        page = _page_bytes(self.config.page_config, kv_heads, head_dim) / BLOCK_TOKENS
        if context is None or context < BLOCK_TOKENS:
            return page
        extra = 0.0
        if self.config.sink_bits is not None:
            sink_cfg = self.config.sink_config
            if sink_cfg is None:  # kept exact
                sink = float(bf16)
            else:
                sink = _page_bytes(sink_cfg, kv_heads, head_dim) / BLOCK_TOKENS
            extra += (sink - page) * BLOCK_TOKENS / context
        if self.window:
            extra += (bf16 - page) * min(self.window, context) / context
        return page + extra


def paper_methods(k_groups: Sequence[int] = (32, 128)) -> list[Method]:
    """The issue's comparison: bf16, KIVI-2/4, rotation-only-2, direct-scaling-2, OScaR-2 (token
    and head norm), OScaR-4, at K group 32 and (2-bit KIVI/OScaR) 128."""
    cfgs = [OscarConfig.kivi(2), OscarConfig.kivi(4)]
    cfgs += [OscarConfig.rotation_only(2), OscarConfig.direct_scaling(2)]
    cfgs += [OscarConfig(bits=2), OscarConfig(bits=2, norm="head"), OscarConfig(bits=4)]
    for g in k_groups:
        if g != 32:
            cfgs += [OscarConfig.kivi(2, g), OscarConfig(bits=2, k_group=g)]
    out = [Method("bf16", "bf16", 16)]
    out += [Method(c.label, c.method, c.bits, config=c) for c in cfgs]
    return out


def quanto_methods() -> list[Method]:
    """transformers' `QuantizedCache` (quanto backend) at 2 and 4 bits, if it can run here."""
    try:
        import optimum.quanto  # noqa: F401
    except ImportError:
        return []
    return [Method(f"quanto-{b}b", "quanto", b, quanto_bits=b) for b in (2, 4)]


def _config_method(config: OscarConfig) -> Method:
    return Method(config.label, config.method, config.bits, config=config)


def variant_methods() -> list[Method]:
    """Beyond the paper: ideas that could beat OScaR-2 at (about) its bytes per token."""
    base = OscarConfig(bits=2)
    g128 = OscarConfig(bits=2, k_group=128)
    g128v16 = OscarConfig(bits=2, k_group=128, v_group=16)
    vg16 = OscarConfig(bits=2, v_group=16)
    return [
        _config_method(replace(base, sink_bits=4)),
        _config_method(replace(g128, sink_bits=4)),
        Method(f"{g128v16.label}-v16", "oscar", 2, config=g128v16),
        Method(f"{base.label}+win256", "oscar", 2, config=base, window=BLOCK_TOKENS),
        _config_method(replace(base, sink_bits=16)),
        Method(f"{vg16.label}-v16", "oscar", 2, config=vg16),
    ]


def analysis_methods() -> list[Method]:
    """Attribution runs (not storage formats): OScaR-2 / KIVI-2 with exact K or exact V."""
    out = []
    for cfg in (OscarConfig(bits=2), OscarConfig.kivi(2)):
        for part in ("k", "v"):
            out.append(Method(f"{cfg.label}:exact-{part}", "analysis", 2, config=cfg, exact=part))
    return out


def all_methods() -> list[Method]:
    return paper_methods() + quanto_methods() + variant_methods() + analysis_methods()


def select(methods: Sequence[Method], labels: Sequence[str]) -> list[Method]:
    """The methods named by ``labels``; quanto labels are dropped when quanto is unavailable."""
    by_label = {m.label: m for m in methods}
    if not quanto_methods():
        labels = [x for x in labels if not x.startswith("quanto-")]
    missing = [x for x in labels if x not in by_label]
    if missing:
        raise ValueError(f"unknown methods {missing}; known: {sorted(by_label)}")
    return [by_label[x] for x in labels]


class ExactHalfLayer(OscarLayer):
    """Attribution: an `OscarLayer` whose pages keep K (``part="k"``) or V exact (bf16)."""

    def __init__(self, config: OscarConfig, part: str, **kwargs: Any):
        super().__init__(config, **kwargs)
        if part not in ("k", "v"):
            raise ValueError(f"part must be 'k' or 'v', got {part!r}")
        self.part = part

    def _flush_full_pages(self) -> None:
        full = (self.keys.shape[-2] // BLOCK_TOKENS) * BLOCK_TOKENS
        if full == 0:
            return
        exact = (self.keys if self.part == "k" else self.values)[:, :, :full].float()
        super()._flush_full_pages()
        pages = self.k_pages if self.part == "k" else self.v_pages
        pages[:, :, pages.shape[-2] - full :] = exact


class WindowLayer(OscarLayer):
    """`OscarLayer` that keeps ``window`` more tokens in bf16: the tail holds window..window+127."""

    def __init__(self, config: OscarConfig, window: int, **kwargs: Any):
        super().__init__(config, **kwargs)
        self.window = window

    def _flush_full_pages(self) -> None:
        if self.keys.shape[-2] < BLOCK_TOKENS + self.window:
            return
        keep_k = self.keys[:, :, -self.window :]
        keep_v = self.values[:, :, -self.window :]
        self.keys = self.keys[:, :, : -self.window]
        self.values = self.values[:, :, : -self.window]
        super()._flush_full_pages()
        self.keys = torch.cat([self.keys, keep_k], dim=-2)
        self.values = torch.cat([self.values, keep_v], dim=-2)


def _tensor_nbytes(t: Any) -> int:
    """Storage bytes of a tensor or of a quanto tensor subclass (its inner tensors)."""
    if type(t) is torch.Tensor or not hasattr(t, "__tensor_flatten__"):
        return t.numel() * t.element_size()
    names, _ = t.__tensor_flatten__()
    return sum(_tensor_nbytes(getattr(t, n)) for n in names)


def layer_kv_bytes(layer: Any) -> int:
    """Bytes a cache layer holds (packed pages / quanto tensors + bf16 tail)."""
    if hasattr(layer, "kv_bytes"):
        return layer.kv_bytes()
    total = 0
    for name in ("_quantized_keys", "_quantized_values", "keys", "values"):
        t = getattr(layer, name, None)
        if isinstance(t, torch.Tensor):
            total += _tensor_nbytes(t)
    return total


class LayersCache(Cache):
    """A transformers `Cache` over given layer objects (one per decoder layer)."""

    def __init__(self, layers: list[Any]):
        super().__init__(layers=layers)

    def kv_bytes(self) -> int:
        return sum(layer_kv_bytes(layer) for layer in self.layers)


class RowsLayer(DynamicLayer):
    """One decoder layer of `RowsCache`: batch row i is stored by its own layer ``rows[i]``."""

    is_croppable = False

    def __init__(self, rows: list[Any]):
        super().__init__()
        self.rows = rows

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if key_states.shape[0] != len(self.rows):
            raise ValueError(
                f"key_states has batch size {key_states.shape[0]}, the cache has "
                f"{len(self.rows)} rows"
            )
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        outs = [
            row.update(key_states[i : i + 1], value_states[i : i + 1], *args, **kwargs)
            for i, row in enumerate(self.rows)
        ]
        dtype = key_states.dtype
        keys = torch.cat([k.to(dtype) for k, _ in outs], dim=0)
        values = torch.cat([v.to(dtype) for _, v in outs], dim=0)
        return keys, values

    def get_seq_length(self) -> int:
        return self.rows[0].get_seq_length()

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0


class RowsCache(Cache):
    """A batch whose row i is cached by method ``methods[i]``: all methods in one forward.

    Every row must hold the same number of tokens (the rows are fed the same-length inputs).
    """

    def __init__(self, methods: Sequence[Method], model_config: Any):
        n = model_config.get_text_config(decoder=True).num_hidden_layers
        self.methods = list(methods)
        super().__init__(layers=[RowsLayer([m.make_layer() for m in methods]) for _ in range(n)])

    def row_kv_bytes(self, row: int) -> int:
        return sum(layer_kv_bytes(layer.rows[row]) for layer in self.layers)

    def load(self, kv: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Store precomputed per-layer K/V ([1, H, T, D], e.g. a bf16 prefill) in every row."""
        rows = len(self.methods)
        for layer, (k, v) in zip(self.layers, kv, strict=True):
            # fp32 like the model's own K/V (the bf16 rows round them again)
            layer.update(k.float().expand(rows, -1, -1, -1), v.float().expand(rows, -1, -1, -1))


# ---------------------------------------------------------------------------------------------
# Perplexity
# ---------------------------------------------------------------------------------------------


@dataclass
class PplResult:
    method: Method
    nll: torch.Tensor  # [tokens - 1] negative log-likelihood of tokens 1..T-1
    seconds: float
    kv_bytes: int  # bytes held at the end of the run, all layers

    def ppl(self, context: int) -> float:
        return math.exp(self.nll[: context - 1].double().mean().item())


def chunked_nll(
    model: Any, ids: torch.Tensor, cache: Cache, chunk: int = BLOCK_TOKENS, bar: Any = None
) -> torch.Tensor:
    """Per-token NLL of ``ids`` [1, T] fed through ``cache`` in ``chunk``-token forwards.

    Chunks start at multiples of ``chunk``; with chunk = 128 every token attends to the quantized
    pages before its page and exactly to the tokens of its own page, as in one-token decoding.
    """
    total = ids.shape[1]
    out = []
    with torch.no_grad():
        for a in range(0, total, chunk):
            b = min(total, a + chunk)
            logits = model(input_ids=ids[:, a:b], past_key_values=cache, use_cache=True).logits
            logp = torch.log_softmax(logits[0].float(), dim=-1)
            targets = ids[0, a + 1 : b + 1]
            out.append(-logp[: targets.shape[0]].gather(1, targets[:, None])[:, 0])
            if bar is not None:
                bar.update(b - a)
    return torch.cat(out)


def perplexity(
    model: Any, ids: torch.Tensor, method: Method, tokens: int, bar: Any = None
) -> PplResult:
    cache = method.make_cache(model.config)
    t0 = time.perf_counter()
    nll = chunked_nll(model, ids[:, :tokens], cache, bar=bar)
    return PplResult(method, nll, time.perf_counter() - t0, cache.kv_bytes())


# ---------------------------------------------------------------------------------------------
# Passkey retrieval
# ---------------------------------------------------------------------------------------------

NEEDLE_HEAD = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
    "Read the following text and remember the secret passkey hidden in it.\n\n"
)
NEEDLE = " The secret passkey is {key}. Remember it: the secret passkey is {key}. "
NEEDLE_QUESTION = (
    "\n\nWhat is the secret passkey? Answer with the number.<|im_end|>\n"
    "<|im_start|>assistant\nThe secret passkey is"
)
NEEDLE_NEW_TOKENS = 7


@dataclass
class NeedleTrial:
    length: int
    depth: float
    seed: int
    key: str
    position: int = 0  # haystack tokens before the needle
    ids: torch.Tensor | None = None  # the prompt's token ids (document + question)
    answers: dict[str, str] = field(default_factory=dict)

    def correct(self, label: str) -> bool:
        found = re.search(r"\d+", self.answers.get(label, ""))
        return found is not None and found.group(0) == self.key


def _encode(tokenizer: Any, text: str) -> torch.Tensor:
    return tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"][0]


def _bf16_extend(
    model: Any, cache: Cache, ids: torch.Tensor, chunk: int = 1024
) -> torch.Tensor | None:
    """Feed ``ids`` [T] into a bf16 cache in chunks; return the last position's logits."""
    logits = None
    with torch.no_grad():
        for a in range(0, ids.shape[0], chunk):
            logits = model(
                input_ids=ids[None, a : a + chunk],
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=1,
            ).logits[0, -1]
    return logits


def _cache_kv(cache: Cache, upto: int | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(layer.keys[:, :, :upto], layer.values[:, :, :upto]) for layer in cache.layers]


def _bf16_cache_from(model: Any, kv: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> Cache:
    cache = Method("bf16", "bf16", 16).make_cache(model.config)
    for layer, (k, v) in zip(cache.layers, kv, strict=True):
        layer.update(k, v)
    return cache


def needle_trials(
    model: Any,
    tokenizer: Any,
    methods: Sequence[Method],
    lengths: Sequence[int],
    depths: Sequence[float],
    seeds: Sequence[int],
    haystack: str,
    bar: Any = None,
) -> list[NeedleTrial]:
    """Run the passkey grid; every method answers every (length, depth, seed).

    Per seed the haystack prefix is prefilled once in bf16 and shared by all trials: a trial
    extends the prefix cache up to its needle, then through the needle and the rest of its
    document, then quantizes that document once per method and asks the question in one batch.
    """
    head = _encode(tokenizer, NEEDLE_HEAD)
    question = _encode(tokenizer, NEEDLE_QUESTION)
    hay_all = _encode(tokenizer, haystack)
    trials = []
    for seed in seeds:
        rng = random.Random(seed)
        offset = rng.randrange(0, max(1, hay_all.shape[0] - 2 * max(lengths)))
        hay = hay_all[offset:]
        keys = {(L, d): str(rng.randint(10000, 99999)) for L in lengths for d in depths}
        # Needles go at sentence starts: after a token that ends with ". ".
        ends = [
            i + 1
            for i in range(min(hay.shape[0], max(lengths)))
            if tokenizer.decode(hay[i : i + 1]).rstrip().endswith(".")
        ]
        plan = []
        for L in lengths:
            for d in depths:
                needle = _encode(tokenizer, NEEDLE.format(key=keys[L, d]))
                h = L - head.shape[0] - needle.shape[0] - question.shape[0]
                target = round(d * h)
                p = min([0, *ends], key=lambda e, t=target, h=h: (e > h, abs(e - t)))
                plan.append((p, L, d, needle, h))
        plan.sort(key=lambda x: x[0])
        prefix = Method("bf16", "bf16", 16).make_cache(model.config)
        _bf16_extend(model, prefix, head)
        done = 0
        for p, L, d, needle, h in plan:
            if p > done:
                _bf16_extend(model, prefix, hay[done:p])
                done = p
            cache = _bf16_cache_from(model, _cache_kv(prefix, head.shape[0] + p))
            doc_rest = torch.cat([needle, hay[p:h]])
            _bf16_extend(model, cache, doc_rest)
            doc = torch.cat([head, hay[:p], doc_rest])
            rows = RowsCache(methods, model.config)
            rows.load(_cache_kv(cache))
            ids = torch.cat([doc, question])[None].expand(len(methods), -1)
            with torch.no_grad():
                out = model.generate(
                    ids,
                    attention_mask=torch.ones_like(ids),
                    past_key_values=rows,
                    max_new_tokens=NEEDLE_NEW_TOKENS,
                    do_sample=False,
                    pad_token_id=tokenizer.eos_token_id,
                )
            trial = NeedleTrial(L, d, seed, keys[L, d], p, ids[0].clone())
            for i, m in enumerate(methods):
                trial.answers[m.label] = tokenizer.decode(
                    out[i, ids.shape[1] :], skip_special_tokens=True
                )
            trials.append(trial)
            if bar is not None:
                bar.update(1)
    return trials


# ---------------------------------------------------------------------------------------------
# Multi-turn agreement
# ---------------------------------------------------------------------------------------------

_PLACES = [
    ("library", "Harbor Street Library"),
    ("hotel", "Blue Pine Hotel"),
    ("clinic", "Riverside Dental Clinic"),
    ("bakery", "Golden Crust Bakery"),
    ("gym", "Summit Fitness Club"),
    ("museum", "Museum of Old Maps"),
    ("school", "Maple Grove Music School"),
    ("garage", "Northside Car Repair"),
    ("cafe", "Little Owl Cafe"),
    ("bookshop", "Lantern Bookshop"),
]
_NAMES = ["Maria Lopez", "Tom Becker", "Aisha Khan", "Liam Walsh", "Yuki Tanaka", "Omar Haddad"]
_NAMES += ["Nina Petrova", "Sam Carter", "Elena Rossi", "David Chen", "Grace Miller", "Ravi Patel"]
_COLORS = ["red", "green", "blue", "yellow", "orange", "purple", "white", "black"]
_WORDS = ["sunflower", "harbor", "maple", "comet", "violet", "granite", "falcon", "meadow"]
_WORDS += ["lantern", "cobalt", "willow", "saffron"]
_DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday"]


def make_chats(n: int, turns: int = 2, seed: int = 0) -> list[tuple[str, list[str]]]:
    """``n`` chats: a system prompt of ~12 random facts (~300 tokens) and ``turns`` questions."""
    rng = random.Random(seed)
    chats = []
    for i in range(n):
        kind, place = _PLACES[i % len(_PLACES)]
        f = {
            "open": rng.randint(6, 10),
            "close": rng.randint(4, 10),
            "manager": rng.choice(_NAMES),
            "password": rng.choice(_WORDS) + str(rng.randint(10, 99)),
            "floor": rng.randint(2, 9),
            "room": rng.choice(_COLORS),
            "phone": rng.randint(100, 999),
            "year": rng.randint(1900, 2015),
            "day": rng.choice(_DAYS),
            "parking": rng.randint(5, 90),
            "price": rng.randint(3, 60),
            "staff": rng.randint(4, 40),
        }
        facts = [
            (f"It opens at {f['open']} am and closes at {f['close']} pm every weekday.",
             "What time does it open in the morning?"),
            (f"The manager is {f['manager']}, who has worked here for many years.",
             "Who is the manager?"),
            (f"The Wi-Fi password is {f['password']}, and it is the same in every room.",
             "What is the Wi-Fi password?"),
            (f"The meeting room is on floor {f['floor']}, next to the elevators.",
             "On which floor is the meeting room?"),
            (f"The main door is painted {f['room']}, so visitors can find it easily.",
             "What color is the main door?"),
            (f"The phone extension for the front desk is {f['phone']}.",
             "What is the phone extension of the front desk?"),
            (f"The {kind} was founded in {f['year']} by two friends.",
             f"In which year was the {kind} founded?"),
            (f"Every {f['day']} the staff holds a short meeting in the morning.",
             "On which day does the staff meet?"),
            (f"There are {f['parking']} parking spaces behind the building.",
             "How many parking spaces are there?"),
            (f"A monthly membership costs {f['price']} dollars.",
             "How much does a monthly membership cost?"),
            (f"The {kind} has {f['staff']} people on its staff.",
             "How many people work on the staff?"),
        ]  # fmt: skip
        rng.shuffle(facts)
        system = (
            f"You are the friendly assistant of the {place}, a {kind} in a small town. Visitors "
            "ask you short questions and you answer briefly and politely, using only the facts "
            "below. If you do not know something, say so. Facts: "
            + " ".join(s for s, _ in facts)
            + f" The {place} is proud to serve the town, and the staff is always happy to help "
            "visitors with any question they may have about the services offered here. Please "
            "keep every answer to one short sentence, do not invent new facts, and do not repeat "
            "the question back to the visitor; when a visitor greets you, greet them back warmly "
            "before answering, and thank them for visiting at the end of the conversation."
        )
        questions = [q for _, q in facts[:turns]]
        chats.append((system, questions))
    return chats


@dataclass
class TurnResult:
    chat: int
    turn: int
    prompt_tokens: int
    answers: dict[str, list[int]]  # per method label, truncated after the first EOS
    teacher_forced: dict[str, int]  # top-1 matches on the bf16 answer's tokens


def _truncate(tokens: list[int], eos: int) -> list[int]:
    return tokens[: tokens.index(eos) + 1] if eos in tokens else tokens


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _page_chunks(start: int, end: int) -> list[tuple[int, int]]:
    out, a = [], start
    while a < end:
        b = min(end, (a // BLOCK_TOKENS + 1) * BLOCK_TOKENS)
        out.append((a, b))
        a = b
    return out


def chat_agreement(
    model: Any,
    tokenizer: Any,
    methods: Sequence[Method],
    system: str,
    questions: Sequence[str],
    max_new_tokens: int = 24,
    chat_index: int = 0,
) -> list[TurnResult]:
    """One chat: at every turn each method answers the same bf16 conversation so far.

    ``methods[0]`` must be bf16 (the reference). The first prompt is prefilled once in bf16 and
    stored in every row (a serving prefill attends to itself exactly; its pages are quantized
    afterwards), so the first answer token of turn 1 is shared. From then on the rows run in
    one batch: the reference answer is fed in chunks cut at page boundaries (what decoding it
    would see, and its teacher-forced top-1 predictions), the next user message as one extend.
    """
    from oscar_kv.eval.smollm2 import chat_ids

    if methods[0].config is not None or methods[0].quanto_bits is not None:
        raise ValueError("methods[0] must be the bf16 reference")
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    rows = len(methods)
    conv = chat_ids(tokenizer, [{"role": "system", "content": system},
                                {"role": "user", "content": questions[0]}])[0]  # fmt: skip
    prefill = Method("bf16", "bf16", 16).make_cache(model.config)
    first_logits = _bf16_extend(model, prefill, conv, chunk=conv.shape[0])
    cache = RowsCache(methods, model.config)
    cache.load(_cache_kv(prefill))
    first = first_logits.argmax(-1).expand(rows).clone()
    results = []
    for t, _ in enumerate(questions):
        fork = copy.deepcopy(cache)
        ids = torch.cat([conv[None].expand(rows, -1), first[:, None]], dim=1)
        with torch.no_grad():
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                past_key_values=fork,
                max_new_tokens=max_new_tokens - 1,
                do_sample=False,
                eos_token_id=eos,
                pad_token_id=eos,
            )
        answers = {
            m.label: _truncate(out[i, conv.shape[0] :].tolist(), eos) for i, m in enumerate(methods)
        }
        ref = answers[methods[0].label]
        ref_closed = ref if ref[-1] == eos else [*ref, eos]
        # Teacher-forced: feed the reference answer to every row, page-aligned.
        start = conv.shape[0]
        full = torch.cat([conv, torch.tensor(ref_closed)])
        preds = [first.tolist()]
        with torch.no_grad():
            for a, b in _page_chunks(start, full.shape[0]):
                chunk = full[None, a:b].expand(rows, -1)
                logits = model(input_ids=chunk, past_key_values=cache, use_cache=True).logits
                preds += logits.argmax(-1).transpose(0, 1).tolist()
        tf = {
            m.label: sum(preds[j][i] == ref[j] for j in range(len(ref)))
            for i, m in enumerate(methods)
        }
        results.append(TurnResult(chat_index, t + 1, conv.shape[0], answers, tf))
        if t + 1 == len(questions):
            break
        suffix = _encode(
            tokenizer,
            f"\n<|im_start|>user\n{questions[t + 1]}<|im_end|>\n<|im_start|>assistant\n",
        )
        with torch.no_grad():
            logits = model(
                input_ids=suffix[None].expand(rows, -1),
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=1,
            ).logits
        first = logits[:, -1].argmax(-1)
        conv = torch.cat([full, suffix])
    return results


# ---------------------------------------------------------------------------------------------
# Attribution on captured K/V (the fidelity harness's per-layer view): which layers, which tokens
# ---------------------------------------------------------------------------------------------


def token_attribution(
    layers: Sequence[dict[str, torch.Tensor]], config: OscarConfig, queries: int = 256
) -> list[dict[str, float]]:
    """Per layer: attention mass of the last ``queries`` positions on token 0 and on page 0, and
    the relative attention-output error with every page quantized, with page 0 kept exact, with
    only K quantized (V exact) and with only V quantized (K exact)."""
    from oscar_kv.eval.fidelity import exact_attention, rel
    from oscar_kv.ref import dequantize_kv, quantize_kv

    rows = []
    for i, layer in enumerate(layers):
        q, k, v = layer["q"][-queries:], layer["k"], layer["v"]
        exact = exact_attention(q, k, v)
        k_hat, v_hat = dequantize_kv(quantize_kv(k, v, config))
        k0, v0 = k_hat.clone(), v_hat.clone()
        k0[:BLOCK_TOKENS], v0[:BLOCK_TOKENS] = k[:BLOCK_TOKENS], v[:BLOCK_TOKENS]
        group = q.shape[1] // k.shape[1]
        logits = torch.einsum("qhd,thd->hqt", q, k.repeat_interleave(group, 1))
        visible = torch.ones(q.shape[0], k.shape[0], dtype=torch.bool).tril(k.shape[0] - q.shape[0])
        probs = torch.softmax(
            (logits / math.sqrt(q.shape[2])).masked_fill(~visible, float("-inf")), -1
        )
        rows.append({
            "layer": i,
            "mass_token0": probs[..., 0].mean().item(),
            "mass_page0": probs[..., :BLOCK_TOKENS].sum(-1).mean().item(),
            "out_err": rel(exact_attention(q, k_hat, v_hat), exact),
            "out_err_page0_exact": rel(exact_attention(q, k0, v0), exact),
            "out_err_k_only": rel(exact_attention(q, k_hat, v), exact),
            "out_err_v_only": rel(exact_attention(q, k, v_hat), exact),
        })  # fmt: skip
    return rows


def write_attribution(
    out: Path, results: dict[str, list[dict[str, float]]], tokens: int, queries: int
) -> None:
    plt = pyplot()

    keys = ("mass_token0", "mass_page0", "out_err", "out_err_page0_exact", "out_err_k_only",
            "out_err_v_only")  # fmt: skip
    rows = [[lab, r["layer"], *(f"{r[k]:.4f}" for k in keys)] for lab, rs in results.items()
            for r in rs]  # fmt: skip
    _write_csv(out / "attribution_layers.csv", ("method", "layer", *keys), rows)
    lines = [
        "# Where the 2-bit error comes from (SmolLM2, captured post-RoPE Q/K/V)",
        "",
        (
            f"{tokens} tokens of pydoc prose, every full page quantized, the last {queries} positions "
            "as queries (the fidelity harness's setting); relative error of the attention output "
            "per layer, averaged over layers (worst layer in brackets)."
        ),
        "",
        "| method | all pages | page 0 exact | K only (V exact) | V only (K exact) |",
        "|---|---|---|---|---|",
    ]
    for lab, rs in results.items():
        cells = []
        for k in keys[2:]:
            vals = [r[k] for r in rs]
            worst = max(range(len(vals)), key=vals.__getitem__)
            cells.append(f"{sum(vals) / len(vals):.3f} ({vals[worst]:.2f} @L{worst})")
        lines.append(f"| {lab} | " + " | ".join(cells) + " |")
    first = next(iter(results.values()))
    m0 = sum(r["mass_token0"] for r in first) / len(first)
    p0 = sum(r["mass_page0"] for r in first) / len(first)
    lines += ["", (f"Attention mass of the queries on token 0: {m0:.1%} on average over layers; "
              f"on page 0 (tokens 0-127): {p0:.1%}."), ""]  # fmt: skip
    (out / "attribution.md").write_text("\n".join(lines) + "\n")
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, (lab, rs) in zip(axes, results.items(), strict=False):
        x = [r["layer"] for r in rs]
        for k in keys[2:]:
            ax.plot(x, [r[k] for r in rs], marker=".", label=k)
        ax.plot(x, [r["mass_page0"] for r in rs], "k:", label="attention mass on page 0")
        ax.set_title(lab, fontsize=9)
        ax.set_xlabel("layer")
        ax.set_ylim(0, 1)
        ax.legend(fontsize=6)
    axes[0].set_ylabel("relative attention-output error")
    fig.tight_layout()
    fig.savefig(out / "attribution_layers.png", dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# Reports: CSV, markdown, plots
# ---------------------------------------------------------------------------------------------


def _write_csv(path: Path, header: Sequence[str], rows: list[Sequence[Any]]) -> None:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def write_ppl(
    out: Path, results: list[PplResult], contexts: Sequence[int], kv_heads: int, head_dim: int
) -> list[dict[str, Any]]:
    """ppl.csv (paper methods, the issue's columns), ppl_all.csv and ppl_by_page.csv."""
    table = []
    for r in results:
        m = r.method
        for c in contexts:
            if c - 1 > r.nll.shape[0]:
                continue
            table.append({
                "label": m.label, "family": m.family, "method": m.family, "bits": m.bits,
                "k_group": "" if m.k_group is None else m.k_group, "norm": m.norm,
                "context": c, "ppl": r.ppl(c),
                "bytes_per_token": m.bytes_per_token(kv_heads, head_dim, c),
                "paper": m.is_paper, "seconds": r.seconds,
            })  # fmt: skip
    paper = [t for t in table if t["paper"]]
    _write_csv(
        out / "ppl.csv",
        PPL_COLUMNS,
        [[t[k] if k != "ppl" else f"{t['ppl']:.4f}" for k in PPL_COLUMNS] for t in paper],
    )
    cols = ("label", "family", "bits", "k_group", "norm", "context", "ppl", "bytes_per_token")
    _write_csv(
        out / "ppl_all.csv",
        (*cols, "run_seconds"),
        [[*(t[k] for k in cols), f"{t['seconds']:.1f}"] for t in table],
    )
    by_page = []
    for r in results:
        nll = r.nll
        for a in range(0, nll.shape[0], BLOCK_TOKENS):
            by_page.append([r.method.label, a, f"{nll[a : a + BLOCK_TOKENS].mean().item():.5f}"])
    _write_csv(out / "ppl_by_page.csv", ("label", "page_start", "mean_nll"), by_page)
    return table


def write_needle(
    out: Path, trials: list[NeedleTrial], methods: Sequence[Method]
) -> dict[str, float]:
    rows = []
    for t in trials:
        for m in methods:
            rows.append([m.label, t.length, t.depth, t.seed, t.key,
                         t.answers[m.label].strip(), int(t.correct(m.label))])  # fmt: skip
    _write_csv(out / "needle.csv", ("label", "length", "depth", "seed", "key", "answer",
                                    "correct"), rows)  # fmt: skip
    acc = {m.label: sum(t.correct(m.label) for t in trials) / max(1, len(trials)) for m in methods}
    for m in methods:
        plot_needle(out / f"needle_{m.label}.png", trials, m.label, acc[m.label])
    return acc


def write_agreement(
    out: Path,
    turns: list[TurnResult],
    methods: Sequence[Method],
    kv_heads: int,
    head_dim: int,
) -> dict[str, dict[str, float]]:
    ref = methods[0].label
    rows, summary = [], {}
    for m in methods:
        same = prefix = tf = total = 0
        for t in turns:
            a, r = t.answers[m.label], t.answers[ref]
            cp = common_prefix(a, r)
            rows.append([m.label, t.chat, t.turn, t.prompt_tokens, int(a == r), cp, len(r),
                         len(a), t.teacher_forced[m.label]])  # fmt: skip
            same += a == r
            prefix += cp
            tf += t.teacher_forced[m.label]
            total += len(r)
        n = max(1, len(turns))
        summary[m.label] = {
            "turns": len(turns),
            "agreement": same / n,
            "mean_common_prefix": prefix / n,
            "mean_ref_tokens": total / n,
            "teacher_forced_top1": tf / max(1, total),
            # Full-page bytes at each turn's prompt length (the sink/window extras included).
            "bytes_per_token": sum(
                m.bytes_per_token(kv_heads, head_dim, t.prompt_tokens) for t in turns
            )
            / n,
        }
    header = ("label", "chat", "turn", "prompt_tokens", "identical", "common_prefix",
              "bf16_tokens", "tokens", "teacher_forced_matches")  # fmt: skip
    _write_csv(out / "agreement.csv", header, rows)
    return summary


def plot_needle(path: Path, trials: list[NeedleTrial], label: str, accuracy: float) -> None:
    plt = pyplot()

    lengths = sorted({t.length for t in trials})
    depths = sorted({t.depth for t in trials})
    grid = torch.zeros(len(depths), len(lengths))
    count = torch.zeros_like(grid)
    for t in trials:
        i, j = depths.index(t.depth), lengths.index(t.length)
        grid[i, j] += t.correct(label)
        count[i, j] += 1
    grid = grid / count.clamp(min=1)
    fig, ax = plt.subplots(figsize=(1.2 + 1.1 * len(lengths), 1.0 + 0.5 * len(depths)))
    ax.imshow(grid.numpy(), cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(len(lengths)), [f"{n // 1024}K" if n >= 1024 else str(n) for n in lengths])
    ax.set_yticks(range(len(depths)), [f"{round(100 * d)}%" for d in depths])
    for i in range(len(depths)):
        for j in range(len(lengths)):
            ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=8)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth")
    ax.set_title(f"{label}: passkey accuracy {accuracy:.0%}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_contexts(path: Path, table: list[dict[str, Any]]) -> None:
    """Perplexity increase over bf16 vs context for the paper's methods (prefixes of one
    document)."""
    plt = pyplot()

    bf16 = {t["context"]: t["ppl"] for t in table if t["label"] == "bf16"}
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    labels = [x for x in dict.fromkeys(t["label"] for t in table if t["paper"]) if x != "bf16"]
    for lab in labels:
        pts = sorted(
            (t["context"], 100 * (t["ppl"] / bf16[t["context"]] - 1))
            for t in table
            if t["label"] == lab and t["context"] in bf16
        )
        style = "-" if lab in DEFAULT_LONG else ":"
        ax.plot([c for c, _ in pts], [p for _, p in pts], style, marker="o", ms=3,
                label=short_label(lab))  # fmt: skip
    ax.set_xscale("log", base=2)
    ax.set_yscale("symlog", linthresh=10)
    ax.axhline(0, color="black", lw=0.5)
    ax.set_xlabel("context (tokens; perplexity of the first N tokens of one document)")
    ax.set_ylabel("perplexity increase over bf16 (%, symlog)")
    ax.set_title("SmolLM2-135M, pydoc prose: cost of the quantized cache vs context", fontsize=10)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def short_label(label: str) -> str:
    """``oscar-2b-g32-token+sink4`` -> ``oscar-2+sink4``; g32/token defaults dropped."""
    for a, b in (("-2b", "-2"), ("-4b", "-4"), ("-g32", ""), ("-token", ""), ("-none", ""),
                 ("-g128", " g128"), ("-head", " head"), ("direct-scaling", "DS"),
                 ("rotation-only", "rot-only")):  # fmt: skip
        label = label.replace(a, b)
    return label


def plot_pareto(path: Path, table: list[dict[str, Any]], context: int) -> None:
    """Perplexity vs bytes per token at ``context`` (all methods, and a zoom on 2-4 bits), with
    the Pareto front."""
    plt = pyplot()

    pts = [t for t in table if t["context"] == context and t["family"] != "analysis"]
    if not pts:
        return
    colors = {"bf16": "black", "kivi": "tab:red", "rotation-only": "tab:orange",
              "direct-scaling": "tab:purple", "oscar": "tab:blue", "quanto": "tab:gray"}  # fmt: skip
    pts = sorted(pts, key=lambda x: (x["bytes_per_token"], x["ppl"]))
    front, best = [], float("inf")
    for t in pts:
        if t["ppl"] < best:
            front.append(t)
            best = t["ppl"]
    bf16 = next((t["ppl"] for t in pts if t["family"] == "bf16"), None)
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.2), gridspec_kw={"width_ratios": [1, 1.4]})
    for zoom, ax in enumerate(axes):
        shown = pts
        if zoom:
            lo, hi = 120, 260
            top = (bf16 or min(t["ppl"] for t in pts)) * 1.22
            shown = [t for t in pts if lo <= t["bytes_per_token"] <= hi and t["ppl"] <= top]
        for n, t in enumerate(shown):
            marker = "o" if t["paper"] else ("s" if t["family"] == "quanto" else "*")
            ax.scatter(t["bytes_per_token"], t["ppl"], color=colors.get(t["family"], "green"),
                       marker=marker, s=70 if marker == "*" else 30, zorder=3)  # fmt: skip
            if zoom or t["paper"] or t["family"] == "quanto":
                dy = (4, -10)[n % 2] if zoom else 3
                ax.annotate(short_label(t["label"]), (t["bytes_per_token"], t["ppl"]),
                            fontsize=7, xytext=(4, dy), textcoords="offset points")  # fmt: skip
        fx = [t for t in front if t in shown]
        ax.plot([t["bytes_per_token"] for t in fx], [t["ppl"] for t in fx], "k--", lw=0.8,
                zorder=2, label="Pareto front")  # fmt: skip
        if bf16:
            ax.axhline(bf16, color="black", lw=0.5, ls=":", label="bf16")
        if zoom:
            above = [t for t in pts if lo <= t["bytes_per_token"] <= hi and t["ppl"] > top]
            for k, t in enumerate(above):  # off the zoom: listed under the top edge
                ax.annotate(f"\u2191 {short_label(t['label'])} ({t['bytes_per_token']:.0f} B): "
                            f"{t['ppl']:.1f}", (lo, top), xytext=(6, -12 - 11 * k),
                            textcoords="offset points", fontsize=7,
                            color=colors.get(t["family"], "green"))  # fmt: skip
            ax.set_ylim(top=top)
            ax.set_xlim(lo, hi)
            ax.set_title("zoom: 2-4 bits (stars: beyond the paper)", fontsize=9)
            ax.set_xlabel("KV bytes per token per layer")
        else:
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_title("all methods (log-log)", fontsize=9)
            ax.set_xlabel("KV bytes per token per layer (log)")
        ax.set_ylabel(f"perplexity of the first {context} tokens")
        ax.legend(fontsize=7)
    fig.suptitle(f"SmolLM2-135M on pydoc prose, {context}-token context: quality vs KV bytes",
                 fontsize=10)  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def common_context(table: list[dict[str, Any]]) -> int:
    """The longest context every method of ``table`` ran."""
    labels = {t["label"] for t in table}
    return min(max(t["context"] for t in table if t["label"] == x) for x in labels)


def draw_ppl_plots(out: Path, table: list[dict[str, Any]]) -> None:
    """pareto.png at the longest context every method ran, and ppl_vs_context.png."""
    plot_pareto(out / "pareto.png", table, common_context(table))
    plot_contexts(out / "ppl_vs_context.png", table)


def run_notes() -> list[str]:
    notes = [
        (
            "Cache: `OscarCache` semantics (bf16 tail, 128-token pages quantized when full, "
            "reference dequantization); CPU, fp32 model, 1 thread."
        ),
        (
            "Text: `pydoc_data.topics` (the Python reference documentation, the one English "
            "prose corpus found in a registry package on these machines)."
        ),
        (
            "Where the error comes from (per layer, K vs V, page 0): `python -m oscar_kv eval "
            "--sections attribution` writes attribution.md."
        ),
    ]
    if not quanto_methods():
        notes.append("transformers `QuantizedCache` (quanto): optimum-quanto is not installed.")
    return notes


def rebuild_summary(out: Path) -> None:
    """Redraw the ppl plots and rewrite summary.md from the CSVs in ``out`` (no model).

    Timings and the model's KV shape are taken over from the existing summary.md.
    """
    old = (out / "summary.md").read_text() if (out / "summary.md").is_file() else ""
    shape = re.search(r"H_kv=(\d+), D=(\d+)", old)
    kv_heads, head_dim = (int(shape[1]), int(shape[2])) if shape else (3, 64)
    table = load_ppl_table(out / "ppl_all.csv") if (out / "ppl_all.csv").is_file() else []
    if table:
        draw_ppl_plots(out, table)
    by_label = {m.label: m for m in all_methods()}
    needle_acc, needle_info = None, ""
    if (out / "needle.csv").is_file():
        with (out / "needle.csv").open() as f:
            rows = list(csv.DictReader(f))
        hits: dict[str, list[int]] = {}
        for r in rows:
            hits.setdefault(r["label"], []).append(int(r["correct"]))
        needle_acc = {k: sum(v) / len(v) for k, v in hits.items()}
        lengths = sorted({int(r["length"]) for r in rows})
        depths = sorted({float(r["depth"]) for r in rows})
        seeds = sorted({int(r["seed"]) for r in rows})
        needle_info = needle_text(len(next(iter(hits.values()))), lengths, depths, seeds)
    agreement, agreement_info = None, ""
    if (out / "agreement.csv").is_file():
        with (out / "agreement.csv").open() as f:
            rows = list(csv.DictReader(f))
        labels = list(dict.fromkeys(r["label"] for r in rows))
        turns = []
        for key in dict.fromkeys((r["chat"], r["turn"]) for r in rows):
            these = {r["label"]: r for r in rows if (r["chat"], r["turn"]) == key}
            ref = these[labels[0]]
            answers, tf = {}, {}
            for lab, r in these.items():
                # Token lists are not stored: equal answers are the bf16 answer; others share
                # the common prefix and then differ.
                n_ref, cp = int(ref["bf16_tokens"]), int(r["common_prefix"])
                same = r["identical"] == "1"
                answers[lab] = list(range(n_ref)) if same else [*range(cp), -1]
                tf[lab] = int(r["teacher_forced_matches"])
            answers[labels[0]] = list(range(int(ref["bf16_tokens"])))
            turns.append(TurnResult(int(key[0]), int(key[1]), int(ref["prompt_tokens"]),
                                    answers, tf))  # fmt: skip
        agreement = write_agreement(out, turns, [by_label[x] for x in labels], kv_heads, head_dim)
        # write_agreement rewrote agreement.csv from the reconstruction: restore the rows.
        with (out / "agreement.csv").open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
        for lab, r in agreement.items():
            mine = [x for x in rows if x["label"] == lab]
            r["mean_common_prefix"] = sum(int(x["common_prefix"]) for x in mine) / len(mine)
        chats = len({r["chat"] for r in rows})
        per_chat = len(turns) // max(1, chats)
        prompt = sum(t.prompt_tokens for t in turns) / max(1, len(turns))
        new_tokens = max(int(r["tokens"]) for r in rows)
        agreement_info = agreement_text(chats, per_chat, new_tokens, prompt)
    timings: dict[str, float] = {}
    for name, sec in re.findall(r"^- (.+): (\d+) s$", old, flags=re.MULTILINE):
        timings[name] = float(sec)
    write_summary(out, kv_heads, head_dim, table, needle_acc, needle_info, agreement,
                  agreement_info, timings, run_notes())  # fmt: skip


def needle_text(trials: int, lengths: Sequence[int], depths: Sequence[float],
                seeds: Sequence[int]) -> str:  # fmt: skip
    return (
        f"{trials} trials: lengths {list(lengths)}, depths {list(depths)}, seeds {list(seeds)}; "
        "greedy, exact match of the 5-digit passkey. Document prefilled in bf16 then quantized "
        "per method; question and answer attend to the quantized pages. Heatmaps: "
        "needle_<method>.png."
    )


def agreement_text(chats: int, turns: int, new_tokens: int, prompt: float) -> str:
    return (
        f"{chats} chats x {turns} turns, greedy, up to {new_tokens} tokens per answer, mean "
        f"prompt {prompt:.0f} tokens; each turn answered on the same bf16 conversation so far "
        "(per-turn agreement, no compounding drift). B/token: full-page bytes at the prompt "
        "length (a 4-bit first page weighs more in short chats)."
    )


def load_ppl_table(path: Path) -> list[dict[str, Any]]:
    """Rows of a written ppl_all.csv, in the form `plot_pareto` / `plot_contexts` take."""
    paper = {m.label for m in all_methods() if m.is_paper}
    with path.open() as f:
        rows = list(csv.DictReader(f))
    return [
        {**r, "context": int(r["context"]), "ppl": float(r["ppl"]),
         "bytes_per_token": float(r["bytes_per_token"]), "paper": r["label"] in paper}
        for r in rows
    ]  # fmt: skip


def write_summary(
    out: Path,
    kv_heads: int,
    head_dim: int,
    table: list[dict[str, Any]],
    needle_acc: dict[str, float] | None,
    needle_info: str,
    agreement: dict[str, dict[str, float]] | None,
    agreement_info: str,
    timings: dict[str, float],
    notes: list[str],
) -> None:
    lines = ["# Model-level quality (SmolLM2-135M-Instruct, CPU)", ""]
    lines += notes + [""]
    if table:
        contexts = sorted({t["context"] for t in table})
        labels = list(dict.fromkeys(t["label"] for t in table))
        ppl = {(t["label"], t["context"]): t for t in table}
        bf16 = {c: ppl[("bf16", c)]["ppl"] for c in contexts if ("bf16", c) in ppl}
        lines += [
            "## Perplexity (pydoc_data prose, cache quantized page by page as in serving)",
            "",
        ]
        lines += [
            (
                f"Bytes per token per layer (H_kv={kv_heads}, D={head_dim}; bf16 = "
                f"{4 * kv_heads * head_dim}); in brackets the change vs bf16 at the same context. "
                "`+sink4`/`+sink16`: first page at 4 bits / bf16; `+win256`: one more page kept "
                "in bf16 (bytes include the extra at that context); `-v16`: V groups of 16 "
                "channels; `quanto-*`: transformers QuantizedCache (fp32 scales: the model runs "
                "in fp32); `:exact-k`/`:exact-v`: attribution runs, that half of every page exact."
            ),
            "",
        ]
        head = (
            f"| method | B/token @{common_context(table)} | "
            + " | ".join(f"ppl@{c}" for c in contexts)
            + " |"
        )
        lines += [head, "|---|---|" + "---|" * len(contexts)]
        for lab in labels:
            cells = []
            bpt = next(
                t["bytes_per_token"]
                for t in table
                if t["label"] == lab and t["context"] == common_context(table)
            )
            for c in contexts:
                t = ppl.get((lab, c))
                if t is None:
                    cells.append("")
                elif lab == "bf16" or c not in bf16:
                    cells.append(f"{t['ppl']:.3f}")
                else:
                    cells.append(f"{t['ppl']:.3f} ({100 * (t['ppl'] / bf16[c] - 1):+.1f}%)")
            lines.append(f"| {lab} | {bpt:.1f} | " + " | ".join(cells) + " |")
        lines += [""]
    if needle_acc is not None:
        lines += ["## Passkey retrieval", "", needle_info, ""]
        lines += ["| method | accuracy |", "|---|---|"]
        lines += [f"| {k} | {v:.1%} |" for k, v in needle_acc.items()] + [""]
    if agreement is not None:
        lines += ["## Multi-turn agreement with the bf16 answers", "", agreement_info, ""]
        lines += [
            (
                "| method | B/token | turns | identical answers | mean common prefix (tokens) "
                "| mean bf16 answer tokens | teacher-forced top-1 |"
            ),
            "|---|---|---|---|---|---|---|",
        ]
        for k, s in agreement.items():
            lines.append(
                f"| {k} | {s['bytes_per_token']:.0f} | {s['turns']} | {s['agreement']:.1%} | "
                f"{s['mean_common_prefix']:.1f} | "
                f"{s['mean_ref_tokens']:.1f} | {s['teacher_forced_top1']:.1%} |"
            )
        lines += [""]
    lines += ["## Run", ""]
    lines += [f"- {k}: {v:.0f} s" for k, v in timings.items()]
    (out / "summary.md").write_text("\n".join(lines) + "\n")


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------

DEFAULT_LONG = ("bf16", "kivi-2b-g32-none", "oscar-2b-g32-token")
DEFAULT_NEEDLE = ("bf16", "kivi-2b-g32-none", "kivi-4b-g32-none", "oscar-2b-g32-token",
                  "oscar-4b-g32-token", "quanto-2b", "oscar-2b-g32-token+sink4")  # fmt: skip
DEFAULT_AGREE = ("bf16", "kivi-2b-g32-none", "oscar-2b-g32-token", "oscar-4b-g32-token",
                 "oscar-2b-g32-token+sink4")  # fmt: skip


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x]


def _floats(s: str) -> list[float]:
    return [float(x) for x in s.split(",") if x]


def _labels(s: str) -> list[str]:
    return [x for x in s.split(",") if x]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m oscar_kv eval",
        description="Perplexity, passkey retrieval and multi-turn agreement of every KV cache "
        "method on SmolLM2-135M-Instruct (CPU). Writes CSV, PNG and summary.md.",
    )
    p.add_argument("--out", type=Path, default=RESULTS_DIR, help=f"default {RESULTS_DIR}")
    p.add_argument(
        "--sections",
        default="ppl,needle,agreement",
        help="comma list of ppl, needle, agreement, attribution (per-layer error on captured "
        "K/V, written to attribution.md; not in summary.md); `report` alone redraws the plots "
        "and rewrites summary.md from --out's CSVs",
    )
    p.add_argument("--methods", default="", help="ppl methods (labels, default: all)")
    p.add_argument("--ppl-tokens", type=int, default=2048, help="tokens per ppl run (all methods)")
    p.add_argument("--long-tokens", type=int, default=8192, help="tokens for --long-methods")
    p.add_argument("--long-methods", default=",".join(DEFAULT_LONG))
    p.add_argument("--contexts", default="512,1024,2048,4096,8192",
                   help="reported ppl contexts (prefixes of the runs)")  # fmt: skip
    p.add_argument("--needle-methods", default=",".join(DEFAULT_NEEDLE))
    p.add_argument("--needle-lengths", default="1024,2048,4096")
    p.add_argument("--needle-depths", default="0,0.25,0.5,0.75,1")
    p.add_argument("--needle-seeds", default="0")
    p.add_argument("--agree-methods", default=",".join(DEFAULT_AGREE))
    p.add_argument("--chats", type=int, default=20)
    p.add_argument("--turns", type=int, default=2)
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--threads", type=int, default=1, help="torch threads (0: torch default)")
    p.add_argument("--no-progress", action="store_true")
    return p


def run(args: argparse.Namespace, load: Callable[[], tuple[Any, Any]] | None = None) -> int:
    from tqdm.auto import tqdm

    from oscar_kv.eval.smollm2 import english_text, load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    sections = set(_labels(args.sections))
    unknown = sections - {"ppl", "needle", "agreement", "attribution", "report"}
    if sections == {"report"}:  # plots and summary.md again from the CSVs, no model
        rebuild_summary(args.out)
        return 0
    if unknown:
        raise SystemExit(f"--sections: unknown {sorted(unknown)}")
    quiet = args.no_progress
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    wall0 = time.perf_counter()
    t0 = time.perf_counter()
    model, tokenizer = load() if load else load_model(progress=not quiet)
    timings["model load"] = time.perf_counter() - t0
    text_cfg = model.config.get_text_config(decoder=True)
    kv_heads = text_cfg.num_key_value_heads
    head_dim = getattr(text_cfg, "head_dim", None) or text_cfg.hidden_size // (
        text_cfg.num_attention_heads
    )
    methods = all_methods()
    notes = run_notes()
    table: list[dict[str, Any]] = []
    needle_acc = agreement = None
    needle_info = agreement_info = ""

    if "ppl" in sections:
        t0 = time.perf_counter()
        chosen = select(methods, _labels(args.methods)) if args.methods else methods
        long = set(_labels(args.long_methods))
        plan = [(m, args.long_tokens if m.label in long else args.ppl_tokens) for m in chosen]
        need = max(n for _, n in plan)
        ids = _encode(tokenizer, english_text(need * 6))[None, :need]
        if ids.shape[1] < need:
            raise SystemExit(f"only {ids.shape[1]} tokens of text for {need}")
        results = []
        with tqdm(total=sum(n for _, n in plan), desc="perplexity", unit="tok",
                  disable=quiet) as bar:  # fmt: skip
            for m, n in plan:
                bar.set_postfix_str(m.label)
                results.append(perplexity(model, ids, m, n, bar=bar))
        contexts = [c for c in _ints(args.contexts) if c <= need]
        table = write_ppl(out, results, contexts, kv_heads, head_dim)
        draw_ppl_plots(out, table)
        timings["perplexity"] = time.perf_counter() - t0

    if "needle" in sections:
        t0 = time.perf_counter()
        nm = select(methods, _labels(args.needle_methods))
        lengths, depths = _ints(args.needle_lengths), _floats(args.needle_depths)
        seeds = _ints(args.needle_seeds)
        hay = english_text(400_000)[200_000:]
        with tqdm(total=len(lengths) * len(depths) * len(seeds), desc="passkey",
                  unit="trial", disable=quiet) as bar:  # fmt: skip
            trials = needle_trials(model, tokenizer, nm, lengths, depths, seeds, hay, bar=bar)
        needle_acc = write_needle(out, trials, nm)
        needle_info = needle_text(len(trials), lengths, depths, seeds)
        timings["passkey"] = time.perf_counter() - t0

    if "agreement" in sections:
        t0 = time.perf_counter()
        am = select(methods, _labels(args.agree_methods))
        turns: list[TurnResult] = []
        chats = make_chats(args.chats, args.turns)
        with tqdm(total=len(chats), desc="chats", unit="chat", disable=quiet) as bar:
            for i, (system, questions) in enumerate(chats):
                turns += chat_agreement(
                    model, tokenizer, am, system, questions, args.max_new_tokens, chat_index=i
                )
                bar.update(1)
        agreement = write_agreement(out, turns, am, kv_heads, head_dim)
        prompt = sum(t.prompt_tokens for t in turns) / max(1, len(turns))
        agreement_info = agreement_text(len(chats), args.turns, args.max_new_tokens, prompt)
        timings["agreement"] = time.perf_counter() - t0

    if "attribution" in sections:
        from oscar_kv.eval.smollm2 import capture_qkv

        t0 = time.perf_counter()
        tokens, queries = 2048, 256
        layers = capture_qkv(model, tokenizer, english_text(tokens * 8), max_tokens=tokens)
        cfgs = (OscarConfig(bits=2), OscarConfig.kivi(2))
        write_attribution(
            out, {c.label: token_attribution(layers, c, queries) for c in cfgs}, tokens, queries
        )
        timings["attribution"] = time.perf_counter() - t0

    timings["total wall"] = time.perf_counter() - wall0
    if not sections & {"ppl", "needle", "agreement"}:
        return 0
    write_summary(
        out,
        kv_heads,
        head_dim,
        table,
        needle_acc,
        needle_info,
        agreement,
        agreement_info,
        timings,
        notes,
    )
    if not quiet:
        print((out / "summary.md").read_text())
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run(args)


if __name__ == "__main__":
    raise SystemExit(main())
