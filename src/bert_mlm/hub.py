"""Whether the Hugging Face hub can be reached, asked once before the first hub name loads."""

import functools
import logging
import os
import socket
from urllib.parse import urlparse

import datasets
from huggingface_hub import constants

log = logging.getLogger(__name__)
PROXIES = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")


@functools.cache
def hub_reachable() -> bool:
    """False on a machine without network (a cluster's compute node): the hub's names then
    load from the local cache only, as with HF_HUB_OFFLINE=1, and a missing one fails at once
    rather than after huggingface_hub's half-minute of retries and warnings per file."""
    if constants.HF_HUB_OFFLINE:
        return False
    if any(os.environ.get(name) for name in PROXIES):
        return True  # only the proxy can tell; leave it to huggingface_hub
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout=5).close()
    except OSError as err:
        log.warning(f"the Hugging Face hub ({url.hostname}) is unreachable ({err}): using its local cache only")
        constants.HF_HUB_OFFLINE = datasets.config.HF_HUB_OFFLINE = True
        return False
    return True
