"""`precision: mixed` picks bf16 only where the CPU has it natively; BERT_MLM_NO_BF16=1 acts
as a CPU without it (CI runs the `bf16` tests again so, whatever CPU it has)."""

import logging

import pytest
import torch

from bert_mlm import launch

pytestmark = pytest.mark.bf16


def test_mixed_follows_the_cpu(monkeypatch):
    monkeypatch.delenv(launch.NO_BF16_ENV, raising=False)
    native = torch.ops.mkldnn._is_mkldnn_bf16_supported()  # PyTorch's own test: AVX512 / AMX / Arm BF16
    assert launch.cpu_has_native_bf16() == native
    assert launch.precision("mixed", "cpu") == ("bf16-mixed" if native else "32-true")


@pytest.mark.parametrize("value", ["1", "true"])
def test_the_switch_makes_mixed_fp32(monkeypatch, value):
    monkeypatch.setenv(launch.NO_BF16_ENV, value)
    assert not launch.cpu_has_native_bf16()
    assert launch.precision("mixed", "cpu") == "32-true"
    assert launch.precision("32-true", "cpu") == "32-true"
    monkeypatch.setenv(launch.NO_BF16_ENV, "0")
    assert launch.cpu_has_native_bf16() == torch.ops.mkldnn._is_mkldnn_bf16_supported()


@pytest.mark.parametrize("asked", ["bf16-mixed", "16-mixed"])  # Lightning runs 16-mixed on a CPU as bf16
def test_bf16_asked_for_where_it_is_emulated_is_kept_with_a_warning(monkeypatch, caplog, asked):
    monkeypatch.setenv(launch.NO_BF16_ENV, "1")
    with caplog.at_level(logging.WARNING):
        assert launch.precision(asked, "cpu") == "bf16-mixed"
    assert "no native bf16" in caplog.text and "32-true" in caplog.text
