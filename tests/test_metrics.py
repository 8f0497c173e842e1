"""MFU accounting: the peak table keyed by real device_kind strings, null MFU for an
unknown device, a measured CPU peak, MFU never above 1, the untied head counted once."""

import dataclasses
import json
import logging

import pytest

from gptjax import metrics, model
from gptjax.config import ModelConfig

# device_kind as jax reports it on the hardware (and libtpu's topologies: test_tpu.py).
KINDS = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,
    "NVIDIA H100 80GB HBM3": 989e12,
    "NVIDIA A100-SXM4-80GB": 312e12,
}


@pytest.mark.parametrize("kind", KINDS)
def test_peak_by_exact_device_kind(kind):
    assert metrics.peak_for_kind(kind) == KINDS[kind]


def test_v5p_is_not_v5e():
    # "TPU v5" (v5p) must not match "TPU v5 lite" (v5e) or vice versa.
    assert metrics.device_info("TPU v5").hbm_bytes == 95 * 2**30
    assert metrics.device_info("TPU v5 lite").hbm_bytes == 16 * 2**30
    assert metrics.device_info("v5p") == metrics.device_info("TPU v5")


def test_unknown_kind_warns_once_and_mfu_is_null(caplog, tmp_path):
    with caplog.at_level(logging.WARNING, logger="gptjax.metrics"):
        assert metrics.peak_for_kind("TPU v9 quantum") is None
        assert metrics.peak_for_kind("TPU v9 quantum") is None
    assert sum("TPU v9 quantum" in r.message for r in caplog.records) == 1
    assert metrics.mfu(1e6, 1e9, None) is None
    writer = metrics.MetricsWriter(tmp_path)
    writer.write(1, {"loss": 2.0, "mfu": None})
    writer.close()
    assert json.loads((tmp_path / "metrics.jsonl").read_text())["mfu"] is None


def test_cpu_peak_is_measured_and_mfu_capped():
    import jax

    from gptjax import sharding
    from gptjax.config import MeshConfig

    with jax.set_mesh(sharding.make_mesh(MeshConfig(8, 1, 1))):  # as the trainer asks
        peak = metrics.peak_flops_total()  # the test backend is the CPU
    assert peak == metrics.cpu_peak_flops() > 1e8
    assert metrics.mfu(1e9, 1e9, peak) == 1.0  # a run "faster than peak" reads 100%
    assert 0 < metrics.mfu(1.0, 1e6, peak) < 1


def test_untied_head_counted_once():
    tied = ModelConfig(vocab_size=512, seq_len=64, n_layer=2, d_model=64, n_head=4)
    untied = dataclasses.replace(tied, tie_embeddings=False)
    head = tied.d_model * tied.padded_vocab
    assert model.non_embedding_params(untied) == model.non_embedding_params(tied) + head
    # Same matmuls either way: 6 (N + D V) for tied, 6 N (N holding the head) untied.
    assert model.flops_per_token(untied) == model.flops_per_token(tied)
