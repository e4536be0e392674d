"""``OscarConfig(sink_bits=...)``: a sequence's first page at a higher width (or exact)."""

from __future__ import annotations

import pytest
import torch

from oscar_kv import OscarConfig
from oscar_kv.cache import OscarLayer
from oscar_kv.layout import PageLayout
from oscar_kv.ref import dequantize_kv, quantize_kv


def test_config_validation_label_and_halves():
    cfg = OscarConfig(bits=2, sink_bits=4)
    assert cfg.label == "oscar-2b-g32-token+sink4"
    assert cfg.page_config == OscarConfig(bits=2)
    assert cfg.sink_config == OscarConfig(bits=4)
    assert OscarConfig(bits=2, sink_bits=16).sink_config is None
    assert OscarConfig().uniform_pages and not cfg.uniform_pages
    for bad in (2, 3, 8):
        with pytest.raises(ValueError, match="sink_bits"):
            OscarConfig(bits=2, sink_bits=bad)
    with pytest.raises(ValueError, match="sink_bits"):
        OscarConfig(bits=4, sink_bits=4)


def test_uniform_page_holders_refuse_sink_configs():
    cfg = OscarConfig(bits=2, sink_bits=4)
    x = torch.randn(128, 2, 64)
    with pytest.raises(ValueError, match="quantize_kv holds pages of one width"):
        quantize_kv(x, x, cfg)
    with pytest.raises(ValueError, match="the paged pool holds pages of one width"):
        PageLayout.of(cfg, 2, 64)


@pytest.mark.parametrize("sink_bits", [4, 16])
def test_first_page_at_sink_width_rest_at_bits_chunked(sink_bits):
    torch.manual_seed(0)
    k, v = torch.randn(2, 1, 2, 300, 32).unbind(0)
    cfg = OscarConfig(bits=2, sink_bits=sink_bits)
    layer = OscarLayer(cfg)
    for a, b in ((0, 100), (100, 129), (129, 300)):  # crosses both page ends mid-chunk
        layer.update(k[:, :, a:b], v[:, :, a:b])
    assert layer.num_pages() == 2 and layer.tail_length() == 44
    kb = k[0].transpose(0, 1).to(torch.bfloat16)
    vb = v[0].transpose(0, 1).to(torch.bfloat16)
    rest = quantize_kv(kb[128:256], vb[128:256], OscarConfig(bits=2))
    if sink_bits == 16:
        k_sink, sink_bytes = kb[:128].float(), 2 * 128 * 2 * 32 * 2
    else:
        sink = quantize_kv(kb[:128], vb[:128], OscarConfig(bits=4))
        k_sink, sink_bytes = dequantize_kv(sink)[0], sink.nbytes
    torch.testing.assert_close(layer.k_pages[0, :, :128], k_sink.transpose(0, 1))
    torch.testing.assert_close(layer.k_pages[0, :, 128:], dequantize_kv(rest)[0].transpose(0, 1))
    assert layer.kv_bytes() == sink_bytes + rest.nbytes + 2 * 44 * 2 * 32 * 2
    # the point of the option: the first page is closer to the input than at 2 bits
    plain = OscarLayer(OscarConfig(bits=2))
    plain.update(k, v)
    exact = kb[:128].float().transpose(0, 1)
    err_sink = (layer.k_pages[0, :, :128] - exact).norm()
    err_plain = (plain.k_pages[0, :, :128] - exact).norm()
    assert err_sink < 0.5 * err_plain
