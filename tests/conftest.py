"""Shared fixtures: configs built from inline YAML and clients driving create_app."""

from __future__ import annotations

import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient

from aioserver import create_app, load_config

TESTS = Path(__file__).parent
PYTHON = sys.executable

ClientFactory = Callable[[str], Awaitable[TestClient]]


@pytest.fixture
def make_client(aiohttp_client) -> ClientFactory:  # type: ignore[no-untyped-def]
    """Start the whole service on a config given as inline YAML."""

    async def factory(yaml_text: str) -> TestClient:
        return await aiohttp_client(create_app(load_config(yaml_text)))

    return factory
