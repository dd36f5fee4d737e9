"""Shared test set-up. No test may reach the network: the hub is switched off before anything imports it."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

# Tiny random reference configs trip transformers' token-id sanity warnings; they say nothing about us.
transformers.logging.set_verbosity_error()


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
