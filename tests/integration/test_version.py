"""relay names its version: `relay --version`, `python -m relay --version`, and the User-Agent
of every delivery (overridable with http.user_agent)."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import relay
from tests.support import Receiver, insert_rows, install, make_config, running


async def output_of(*args: str) -> str:
    proc = await asyncio.create_subprocess_exec(
        *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, out
    return out.decode().strip()


async def test_the_command_and_the_module_say_the_installed_version() -> None:
    assert relay.__version__ != "0+unknown"  # installed (make install), so it knows
    expected = f"relay {relay.__version__} (pg-relay)"
    assert await output_of(sys.executable, "-m", "relay", "--version") == expected
    script = str(Path(sys.executable).with_name("relay"))
    assert await output_of(script, "--version") == expected


async def test_deliveries_carry_the_version_in_their_user_agent(
    db: str, receiver: Receiver
) -> None:
    config = make_config(db)
    await install(config)
    async with running(config):
        await insert_rows(db, receiver.url, 1)
        await receiver.wait_count(1)
    assert receiver.received[0].headers["User-Agent"] == f"relay/{relay.__version__}"
