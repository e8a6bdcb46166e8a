import logging

import datasets
import pytest
from huggingface_hub import constants

from bert_mlm import corpus
from bert_mlm.errors import UserError
from bert_mlm.hub import hub_reachable
from bert_mlm.pretrained import load_tokenizer


@pytest.fixture
def no_network(monkeypatch):
    """Online settings (conftest turns the hub off for every test) with a hub that cannot be reached."""
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "https://hub.invalid")  # .invalid never resolves
    for proxy in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(proxy, raising=False)
    hub_reachable.cache_clear()
    yield
    hub_reachable.cache_clear()


def test_unreachable_hub_fails_at_once_from_the_local_cache(no_network, caplog):
    with caplog.at_level(logging.WARNING), pytest.raises(UserError, match="unreachable and its local cache"):
        load_tokenizer("no-such-org/no-such-bert")
    assert constants.HF_HUB_OFFLINE and datasets.config.HF_HUB_OFFLINE  # the cache only, from now on
    assert "hub.invalid) is unreachable" in caplog.text
    assert "Retrying" not in caplog.text  # huggingface_hub's half-minute of retries per file


def test_unreachable_hub_dataset_names_the_cache(no_network, tmp_path):
    with pytest.raises(UserError, match=r"from the local cache \(the hub is unreachable\)"):
        corpus.hub("no-such-org/no-such-corpus", None, str(tmp_path))


def test_a_proxy_is_left_to_judge(no_network, monkeypatch):
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.invalid:3128")
    assert hub_reachable() and not constants.HF_HUB_OFFLINE
