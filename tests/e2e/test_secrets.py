"""`relay` with secrets in its configuration, as a subprocess: a malformed secret stops it at
start with exit code 2 and the key named, never with a traceback, never quoting the secret; a
secret given by reference never shows in what the command prints."""

from __future__ import annotations

import base64
from pathlib import Path

from tests.support import HERMETIC_ENV, RelayProcess, raw_config, to_toml

MALFORMED = "whsec_c2hvcnQtYnV0LXZhbGlk"  # base64 of 15 bytes: too short for the spec


async def test_a_malformed_secret_exits_2_at_start_naming_the_key(tmp_path: Path) -> None:
    path = tmp_path / "relay.toml"
    source = {"kind": "outbox", "url": "https://hooks.example.com/x", "secret": MALFORMED}
    path.write_text(to_toml(raw_config("postgresql://127.0.0.1:1/none", sources={"e": source})))
    for command in ("run", "check"):
        proc = RelayProcess(path, env=HERMETIC_ENV)
        try:
            await proc.start(command)
            code = await proc.wait_exit()
        finally:
            proc.kill()
        out = proc.output()
        assert code == 2, out
        assert "sources.e.secret: decodes to 15 bytes" in out
        assert "Traceback" not in out
        assert MALFORMED not in out and MALFORMED[6:] not in out


async def test_a_secret_from_the_environment_is_not_printed_when_it_is_wrong(
    tmp_path: Path,
) -> None:
    path = tmp_path / "relay.toml"
    source = {"kind": "outbox", "url": "https://hooks.example.com/x", "secret": {"env": "HOOK"}}
    path.write_text(to_toml(raw_config("postgresql://127.0.0.1:1/none", sources={"e": source})))
    wrong = base64.b64encode(b"x" * 32).decode()  # the prefix forgotten
    proc = RelayProcess(path, env={**HERMETIC_ENV, "HOOK": wrong})
    try:
        await proc.start("check")
        code = await proc.wait_exit()
    finally:
        proc.kill()
    assert code == 2, proc.output()
    assert "sources.e.secret: does not start with 'whsec_'" in proc.output()
    assert wrong not in proc.output()
