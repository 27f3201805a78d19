"""relay.secretbox: the documented layout, key rotation, every way a value or a key can be wrong,
and that no error ever carries a key, a ciphertext or a plaintext."""

from __future__ import annotations

import base64
import dataclasses
import io
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from relay import secretbox
from relay.readers import ConfigError
from relay.secretbox import Keyring, SecretError

WHERE = "sources.partners.secret_encryption"
K1 = bytes(range(32))
K1_B64 = base64.b64encode(K1).decode()
K2 = bytes(range(100, 132))
K2_B64 = base64.b64encode(K2).decode()
PLAIN = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
# Pinned: rows encrypted today must decrypt after any change to this module. Key K1, nonce bytes
# 100..111, plaintext PLAIN.
VECTOR = (
    "relay:v1:k1:ZGVmZ2hpamtsbW5vP3OtAxq2G_h1M2aa4iIhpDOwUn3hOaM2n5jgGKHqynrYiAyhH2VESQrzTLisGJP7"
    "ISaYMu6F"
)
RING = Keyring(WHERE, {"k1": K1, "k2": K2})


def reason(text: str, ring: Keyring = RING) -> str:
    with pytest.raises(SecretError) as info:
        secretbox.decrypt(ring, text)
    assert str(info.value) == info.value.reason
    return info.value.reason


def config_error(data: Any, env: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        secretbox.parse(WHERE, data, env or {})
    return str(info.value)


def by_hand(key_id: str, key: bytes, plaintext: bytes, nonce: bytes, pad: bool = False) -> str:
    """The README's recipe, written from the documented layout with AESGCM itself: what an
    application not using relay.secretbox would do."""
    header = f"relay:v1:{key_id}"
    data = base64.urlsafe_b64encode(nonce + AESGCM(key).encrypt(nonce, plaintext, header.encode()))
    return f"{header}:{(data if pad else data.rstrip(b'=')).decode()}"


# -- the scheme ---------------------------------------------------------------------------------


def test_the_pinned_vector_encrypts_and_decrypts() -> None:
    assert secretbox.encrypt("k1", K1, PLAIN, nonce=bytes(range(100, 112))) == VECTOR
    assert secretbox.decrypt(RING, VECTOR) == PLAIN


def test_the_layout_is_the_documented_one() -> None:
    nonce = os.urandom(12)
    text = secretbox.encrypt("k2", K2, PLAIN, nonce=nonce)
    prefix, version, key_id, data = text.split(":")
    assert (prefix, version, key_id) == ("relay", "v1", "k2")
    assert "=" not in data and "+" not in data and "/" not in data
    raw = base64.urlsafe_b64decode(data + "=" * (-len(data) % 4))
    assert raw[:12] == nonce
    assert len(raw) == 12 + len(PLAIN.encode()) + 16
    assert AESGCM(K2).decrypt(nonce, raw[12:], b"relay:v1:k2") == PLAIN.encode()
    assert text == by_hand("k2", K2, PLAIN.encode(), nonce)


def test_a_value_made_by_another_aes_gcm_library_following_the_layout_decrypts() -> None:
    made = by_hand("k1", K1, "über-secret ✓".encode(), os.urandom(12))
    assert secretbox.decrypt(RING, made) == "über-secret ✓"


def test_padding_and_surrounding_whitespace_are_accepted() -> None:
    padded = by_hand("k1", K1, b"abcd", bytes(12), pad=True)
    assert padded.endswith("=")
    assert secretbox.decrypt(RING, padded) == "abcd"
    assert secretbox.decrypt(RING, f"  {VECTOR}\n") == PLAIN


def test_each_encryption_draws_a_new_nonce() -> None:
    texts = {secretbox.encrypt("k1", K1, PLAIN) for _ in range(50)}
    assert len(texts) == 50
    assert {secretbox.decrypt(RING, t) for t in texts} == {PLAIN}


@pytest.mark.parametrize("plaintext", ["x", "", "ü" * 5000, "line\nbreak:colon"])
def test_round_trip(plaintext: str) -> None:
    assert secretbox.decrypt(RING, secretbox.encrypt("k2", K2, plaintext)) == plaintext


# -- rotation -----------------------------------------------------------------------------------


def test_rows_under_either_key_decrypt_while_rotating() -> None:
    old = secretbox.encrypt("k1", K1, "old-secret")
    new = secretbox.encrypt("k2", K2, "new-secret")
    assert secretbox.decrypt(RING, old) == "old-secret"
    assert secretbox.decrypt(RING, new) == "new-secret"
    after = Keyring(WHERE, {"k2": K2})
    assert secretbox.decrypt(after, new) == "new-secret"
    assert reason(old, after) == (f"key id 'k1' is not in {WHERE}.keys (it has k2); add it")


def test_an_unknown_key_id_is_named_with_the_keys_there_are() -> None:
    text = secretbox.encrypt("k0", K1, PLAIN)
    assert reason(text) == f"key id 'k0' is not in {WHERE}.keys (it has k1, k2); add it"


def test_the_same_key_under_another_id_does_not_decrypt() -> None:
    # The key id is authenticated: relabelling a value fails even when the key is the same.
    ring = Keyring(WHERE, {"k1": K1, "alias": K1})
    relabelled = VECTOR.replace("relay:v1:k1:", "relay:v1:alias:")
    assert "does not decrypt with key 'alias'" in reason(relabelled, ring)


# -- values that cannot be decrypted -----------------------------------------------------------


def test_every_altered_byte_is_detected() -> None:
    data = VECTOR.split(":")[3]
    raw = base64.urlsafe_b64decode(data + "==")
    for i in range(len(raw)):
        altered = bytearray(raw)
        altered[i] ^= 0x01
        text = "relay:v1:k1:" + base64.urlsafe_b64encode(bytes(altered)).decode().rstrip("=")
        assert "was altered or corrupted" in reason(text), i


def test_a_wrong_key_under_the_right_id_says_to_check_the_key() -> None:
    ring = Keyring(WHERE, {"k1": K2})
    assert reason(VECTOR, ring) == (
        f"the value does not decrypt with key 'k1' from {WHERE}.keys: it was altered or "
        "corrupted, or that key is not the one it was encrypted with; check the key's variable, "
        "or encrypt the value again"
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", "the value is empty"),
        ("   ", "the value is empty"),
        (PLAIN, "is not relay-encrypted text"),
        ("relay", "is not relay-encrypted text"),
        ("Relay:v1:k1:AAAA", "is not relay-encrypted text"),
        ("relay:v2:k1:AAAA", "in format 'v2', which this relay does not read (it reads v1)"),
        ("relay::k1:AAAA", "in format (not shown)"),
        ("relay:v1", "has 2 ':'-separated parts, not 4"),
        ("relay:v1:k1", "has 3 ':'-separated parts, not 4"),
        (VECTOR + ":extra", "has 5 ':'-separated parts, not 4"),
        ("relay:v1:k 1:AAAA", "key id is not 1 to 64 letters"),
        ("relay:v1::AAAA", "key id is not 1 to 64 letters"),
        ("relay:v1:k1:" + "A" * 10 + "+/", "after key id 'k1' is not base64url"),
        ("relay:v1:k1:AAAA=AAA", "after key id 'k1' is not base64url"),
        ("relay:v1:k1:A", "after key id 'k1' is not base64url"),
        ("relay:v1:k1:", "is 0 bytes, shorter than a nonce and a tag (28)"),
        (VECTOR[: len("relay:v1:k1:") + 24], "is 18 bytes, shorter than a nonce and a tag"),
        (VECTOR[:-4], "was altered or corrupted"),
        (VECTOR[:-1], "was altered or corrupted"),
    ],
)
def test_malformed_values_say_what_is_wrong(text: str, expected: str) -> None:
    assert expected in reason(text)


def test_plaintext_that_is_not_utf8_is_refused() -> None:
    text = by_hand("k1", K1, b"\xff\xfe", bytes(12))
    assert "to bytes that are not UTF-8 text" in reason(text)


def test_an_unknown_version_that_is_not_a_plain_word_is_not_shown() -> None:
    got = reason(f"relay:{PLAIN}:k1:AAAA")
    assert PLAIN not in got and "(not shown)" in got


def test_no_reason_holds_a_key_the_data_or_the_plaintext() -> None:
    data = VECTOR.split(":")[3]
    wrong_key = Keyring(WHERE, {"k1": K2})
    texts = [
        VECTOR[:-4],
        VECTOR[:-1],
        VECTOR[:40],
        VECTOR[:41],
        VECTOR.replace("relay:v1:k1", "relay:v1:k9"),
        VECTOR.replace("relay:v1:", "relay:v3:"),
        VECTOR + "!",
        VECTOR + ":x",
        PLAIN,
        f"relay:{PLAIN}",
        f"relay:v1:{PLAIN[:20]}+:{data}",
    ]
    reasons = [reason(t) for t in texts] + [reason(VECTOR, wrong_key)]
    forbidden = [K1_B64, K2_B64, data, data[:16], PLAIN, PLAIN[6:], repr(K1), K1.hex(), K2.hex()]
    for got in reasons:
        for secret in forbidden:
            assert secret not in got, got


# -- encrypt's arguments --------------------------------------------------------------------------


@pytest.mark.parametrize("key_id", ["", "k:1", "k 1", "k" * 65, "ключ"])
def test_encrypt_refuses_a_key_id_that_cannot_be_read_back(key_id: str) -> None:
    with pytest.raises(ValueError, match="is not 1 to 64 letters"):
        secretbox.encrypt(key_id, K1, PLAIN)


def test_encrypt_accepts_the_longest_key_id() -> None:
    key_id = "a-Z_9" * 12 + "abcd"
    assert len(key_id) == 64
    ring = Keyring(WHERE, {key_id: K1})
    assert secretbox.decrypt(ring, secretbox.encrypt(key_id, K1, PLAIN)) == PLAIN


@pytest.mark.parametrize("length", [0, 16, 24, 31, 33])
def test_encrypt_refuses_a_key_that_is_not_32_bytes(length: int) -> None:
    with pytest.raises(ValueError, match=f"a key is 32 bytes, got {length}"):
        secretbox.encrypt("k1", bytes(length), PLAIN)


@pytest.mark.parametrize("length", [0, 8, 11, 13, 16])
def test_encrypt_refuses_a_nonce_that_is_not_12_bytes(length: int) -> None:
    with pytest.raises(ValueError, match=f"a nonce is 12 bytes, got {length}"):
        secretbox.encrypt("k1", K1, PLAIN, nonce=bytes(length))


# -- the keyring ----------------------------------------------------------------------------------


def test_the_keyring_shows_its_ids_never_its_keys() -> None:
    shown = repr(RING)
    assert shown == f"Keyring(where={WHERE!r}, ids=('k1', 'k2'))"
    assert str(RING) == shown
    for secret in (K1_B64, K2_B64, repr(K1), K1.hex()):
        assert secret not in shown


def test_the_keyring_is_frozen_and_copies_its_keys() -> None:
    keys = {"k1": K1}
    ring = Keyring(WHERE, keys)
    keys["k2"] = K2
    assert ring.ids == ("k1",)
    with pytest.raises(dataclasses.FrozenInstanceError):
        ring.where = "elsewhere"  # type: ignore[misc]
    with pytest.raises(TypeError):
        ring.keys["k3"] = K2  # type: ignore[index]
    assert ring == Keyring(WHERE, {"k1": K1})
    assert ring != Keyring(WHERE, {"k1": K2})
    assert hash(ring) == hash(Keyring(WHERE, {"k1": K1}))  # a Source holding it stays hashable


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        ({}, "needs at least one key"),
        ({"k1": bytes(16)}, "keys.k1: a key is 32 bytes"),
        ({"k1": "x" * 32}, "keys.k1: a key is 32 bytes"),
        ({"k:1": K1}, "is not 1 to 64 letters"),
    ],
)
def test_a_keyring_built_directly_is_checked(keys: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Keyring(WHERE, keys)


# -- configuration ------------------------------------------------------------------------------


def test_parse_reads_keys_from_the_environment_and_files(tmp_path: Path) -> None:
    path = tmp_path / "k1"
    path.write_text(K1_B64 + "\n")
    ring = secretbox.parse(
        WHERE,
        {"keys": {"k2": {"env": "K2"}, "k1": {"file": str(path)}}},
        {"K2": K2_B64},
    )
    assert ring == Keyring(WHERE, {"k1": K1, "k2": K2})
    assert ring.ids == ("k1", "k2")
    assert secretbox.decrypt(ring, VECTOR) == PLAIN


@pytest.mark.parametrize(
    "text",
    [
        K1_B64,
        K1_B64.rstrip("="),
        base64.urlsafe_b64encode(K1).decode(),
        f"  {K1_B64[:20]}\n{K1_B64[20:]} ",
        # A key whose base64 has '+' or '/' in the URL-safe alphabet.
        base64.urlsafe_b64encode(bytes([0xFB, 0xFF] * 16)).decode(),
    ],
)
def test_parse_accepts_either_base64_alphabet_with_or_without_padding(text: str) -> None:
    ring = secretbox.parse(WHERE, {"keys": {"k1": {"env": "K"}}}, {"K": text})
    assert ring.keys["k1"] == base64.urlsafe_b64decode(text.strip().replace("\n", "") + "==")


def test_parse_accepts_a_key_written_in_the_file() -> None:
    assert secretbox.parse(WHERE, {"keys": {"k1": K1_B64}}, {}).keys["k1"] == K1


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ("k1", f"{WHERE}: expected a table like keys = "),
        ({}, f"{WHERE}.keys: expected at least one key by id"),
        ({"keys": {}}, f"{WHERE}.keys: expected at least one key by id"),
        ({"keys": [K1_B64]}, f"{WHERE}.keys: expected at least one key by id"),
        ({"keys": {"k1": {"env": "K1"}}, "key": "x"}, f"{WHERE}.key: unknown key"),
        ({"keys": {"k:1": {"env": "K1"}}}, f"{WHERE}.keys: key id 'k:1' is not 1 to 64"),
        ({"keys": {"": {"env": "K1"}}}, f"{WHERE}.keys: key id '' is not 1 to 64"),
        ({"keys": {"k1": 32}}, f"{WHERE}.keys.k1: expected {{ env = "),
        ({"keys": {"k1": {"envv": "K1"}}}, f"{WHERE}.keys.k1: expected a string, {{ env"),
        (
            {"keys": {"k1": {"env": "UNSET"}}},
            f"{WHERE}.keys.k1: the environment variable UNSET is not set or empty",
        ),
        (
            {"keys": {"k1": {"file": "/nonexistent/relay-key"}}},
            f"{WHERE}.keys.k1: cannot read /nonexistent/relay-key",
        ),
    ],
)
def test_parse_errors_name_the_key(data: Any, expected: str) -> None:
    assert config_error(data).startswith(expected)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("not base64!", "not valid base64"),
        (K1_B64[:-2] + "*=", "not valid base64"),
        ("+" + K1_B64[1:-1] + "-", "not valid base64"),  # two alphabets at once
        (base64.b64encode(bytes(16)).decode(), "decodes to 16 bytes, not 32"),
        (base64.b64encode(bytes(33)).decode(), "decodes to 33 bytes, not 32"),
        ("whsec_" + K1_B64, "not valid base64"),
    ],
)
def test_a_key_that_is_not_32_bytes_of_base64_is_refused_unquoted(text: str, expected: str) -> None:
    got = config_error(
        {"keys": {"k2": {"env": "K"}, "k1": {"env": "BAD"}}}, {"BAD": text, "K": K2_B64}
    )
    assert got.startswith(f"{WHERE}.keys.k1: {expected}")
    assert "make one with: python -m relay.secretbox keygen" in got
    assert text not in got and text.strip("=")[:8] not in got
    assert K2_B64 not in got


# -- the command line -----------------------------------------------------------------------------


def run(
    argv: list[str], stdin: bytes = b"", env: dict[str, str] | None = None
) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = secretbox.main(
        argv,
        env={"RELAY_SECRET_KEY": K1_B64} if env is None else env,
        stdin=io.BytesIO(stdin),
        stdout=out,
        stderr=err,
    )
    return code, out.getvalue(), err.getvalue()


def test_cli_encrypts_stdin_with_the_key_from_the_environment() -> None:
    code, out, err = run(["encrypt", "--key-id", "k1"], PLAIN.encode() + b"\n")
    assert (code, err) == (0, "")
    assert out.startswith("relay:v1:k1:") and out.endswith("\n") and out.count("\n") == 1
    assert secretbox.decrypt(RING, out) == PLAIN


@pytest.mark.parametrize(
    ("stdin", "plaintext"),
    [
        (b"abc", "abc"),
        (b"abc\n", "abc"),
        (b"abc\r\n", "abc"),
        (b"abc\n\n", "abc\n"),
        (b" a ", " a "),
    ],
)
def test_cli_drops_one_trailing_line_break_only(stdin: bytes, plaintext: str) -> None:
    code, out, _ = run(["encrypt", "--key-id", "k1"], stdin)
    assert code == 0
    assert secretbox.decrypt(RING, out) == plaintext


@pytest.mark.parametrize(
    ("argv", "stdin", "env", "expected"),
    [
        (["encrypt", "--key-id", "k:1"], b"x", None, "--key-id: expected 1 to 64 letters"),
        (["encrypt", "--key-id", "k1"], b"x", {}, "RELAY_SECRET_KEY is not set"),
        (["encrypt", "--key-id", "k1"], b"x", {"RELAY_SECRET_KEY": ""}, "is not set"),
        (
            ["encrypt", "--key-id", "k1"],
            b"x",
            {"RELAY_SECRET_KEY": base64.b64encode(bytes(16)).decode()},
            "RELAY_SECRET_KEY: decodes to 16 bytes, not 32",
        ),
        (
            ["encrypt", "--key-id", "k1"],
            b"x",
            {"RELAY_SECRET_KEY": "secret-but-not-base64!"},
            "RELAY_SECRET_KEY: not valid base64",
        ),
        (["encrypt", "--key-id", "k1"], b"", None, "stdin is empty"),
        (["encrypt", "--key-id", "k1"], b"\n", None, "stdin is empty"),
        (["encrypt", "--key-id", "k1"], b"\xff", None, "stdin is not UTF-8 text"),
    ],
)
def test_cli_problems_exit_2_and_say_why(
    argv: list[str], stdin: bytes, env: dict[str, str] | None, expected: str
) -> None:
    code, out, err = run(argv, stdin, env)
    assert (code, out) == (2, "")
    assert err.startswith("relay.secretbox encrypt: ") and expected in err
    assert "secret-but-not-base64" not in err and K1_B64 not in err


def test_cli_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        run(["encrypt"])
    assert info.value.code == 2
    assert "--key-id" in capsys.readouterr().err


def test_cli_keygen_prints_a_new_32_byte_key() -> None:
    keys = set()
    for _ in range(3):
        code, out, err = run(["keygen"], env={})
        assert (code, err) == (0, "")
        keys.add(out)
        assert len(base64.b64decode(out.strip(), validate=True)) == 32
    assert len(keys) == 3


def test_python_m_relay_secretbox_runs() -> None:
    env = {**os.environ, "RELAY_SECRET_KEY": K2_B64}
    done = subprocess.run(
        [sys.executable, "-m", "relay.secretbox", "encrypt", "--key-id", "k2"],
        input=b"from-a-pipe\n",
        capture_output=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert secretbox.decrypt(RING, done.stdout.decode()) == "from-a-pipe"
    refused = subprocess.run(
        [sys.executable, "-m", "relay.secretbox", "encrypt", "--key-id", "k2"],
        input=b"x",
        capture_output=True,
        env={k: v for k, v in os.environ.items() if k != "RELAY_SECRET_KEY"},
        timeout=60,
        check=False,
    )
    assert refused.returncode == 2
    assert b"RELAY_SECRET_KEY is not set" in refused.stderr
