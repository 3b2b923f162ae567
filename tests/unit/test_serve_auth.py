"""API keys of the server (kubetune.trainer.serve.auth): parsing the Secret's value and matching."""

from __future__ import annotations

import pytest

from kubetune.errors import InvalidInputError
from kubetune.trainer.serve.auth import API_KEY_ENV, api_keys_from_env, key_matches

pytestmark = pytest.mark.unit


def test_unset_means_no_authentication() -> None:
    assert api_keys_from_env({}) == ()


def test_several_keys_for_rotation() -> None:
    assert api_keys_from_env({API_KEY_ENV: "sk-a,\nsk-b  sk-c\n"}) == (b"sk-a", b"sk-b", b"sk-c")


def test_a_set_but_empty_value_is_an_error_not_an_open_server() -> None:
    with pytest.raises(InvalidInputError, match="holds no API key"):
        api_keys_from_env({API_KEY_ENV: " ,\n"})


def test_only_an_exact_key_matches() -> None:
    keys = (b"sk-a", b"sk-b")
    assert key_matches(b"sk-b", keys)
    assert not key_matches(b"sk-", keys)
    assert not key_matches(b"sk-bb", keys)
    assert not key_matches("sk-é".encode(), keys)
