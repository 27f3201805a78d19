"""Regenerate tests/fixtures/documenso/ from a clone of Documenso's repository:

    python tools/documenso_migrations.py /path/to/documenso/.git [--until v2.17.0]

(a bare mirror works too: pass its git directory). The tests build Documenso's schema by
replaying Documenso's own Prisma migrations (tests/integration/documenso_migrations.py), and a
fresh clone of relay has no Documenso repository, so the migrations are copied here once:

- `<migration_name>.sql`: `packages/prisma/migrations/<migration_name>/migration.sql`, byte for
  byte, for every migration shipped by any release up to `--until` (default: the newest release
  tag). Nothing is reformatted: Prisma's checksum in `_prisma_migrations` is the file's sha256.
- `releases.json`: for each release tag (vX.Y.Z, release candidates left out) up to `--until`,
  in version order, the migrations it ships: "adds" lists those its predecessor in this file did
  not ship, so a release ships the union of its own "adds" and every earlier release's; "newest"
  is the newest name it ships (what relay's release detection reads), "count" how many it ships.

The delta form keeps the file small and is exact only because no release drops a migration its
predecessor shipped; this script checks that, and that no migration's content differs between
two releases (Documenso edited a few migrations on its main branch, but always before the first
release that shipped them). If either check ever fails, the fixture layout (one file per
migration, one content per name) no longer fits and the script stops rather than pick one.

The files are Documenso's (github.com/documenso/documenso, AGPL-3.0) and are used unchanged, as
test fixtures only; see tests/fixtures/documenso/README.md."""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

MIGRATIONS = "packages/prisma/migrations"
RELEASE = re.compile(r"v(\d+)\.(\d+)\.(\d+)")
MIGRATION = re.compile(r"\d{14}_\w+")  # Prisma's <timestamp>_<name>; not migration_lock.toml
OUT = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "documenso"


def git(gitdir: str, *args: str) -> bytes:
    return subprocess.run(
        ["git", f"--git-dir={gitdir}", *args], check=True, capture_output=True
    ).stdout


def version(tag: str) -> tuple[int, ...]:
    m = RELEASE.fullmatch(tag)
    assert m is not None
    return tuple(int(p) for p in m.groups())


def migrations_at(gitdir: str, tag: str) -> dict[str, str]:
    """Migration name -> blob id of its migration.sql, as release `tag` ships them."""
    try:
        listing = git(gitdir, "ls-tree", "-r", f"{tag}:{MIGRATIONS}").decode()
    except subprocess.CalledProcessError:
        return {}  # releases before Prisma Migrate have no migrations folder
    found: dict[str, str] = {}
    for line in listing.splitlines():
        meta, path = line.split("\t", 1)
        directory, _, filename = path.partition("/")
        if filename == "migration.sql" and MIGRATION.fullmatch(directory):
            found[directory] = meta.split()[2]
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("gitdir", help="Documenso's git directory (a clone's .git, or a mirror)")
    parser.add_argument("--until", help="newest release to include (default: the newest tag)")
    parser.add_argument("--out", type=Path, default=OUT, help=f"output folder (default {OUT})")
    args = parser.parse_args()

    tags = sorted(
        (t for t in git(args.gitdir, "tag").decode().split() if RELEASE.fullmatch(t)), key=version
    )
    if args.until:
        if args.until not in tags:
            sys.exit(f"no release tag {args.until!r} in {args.gitdir}")
        tags = [t for t in tags if version(t) <= version(args.until)]

    blobs: dict[str, dict[str, str]] = {}  # migration -> blob id -> first release shipping it
    releases: dict[str, dict[str, object]] = {}
    shipped: set[str] = set()  # what the previous release in the file ships
    for tag in tags:
        at = migrations_at(args.gitdir, tag)
        if not at:
            continue
        if dropped := shipped - at.keys():
            sys.exit(
                f"{tag} no longer ships {sorted(dropped)}: releases.json's deltas cannot say so"
            )
        for name, blob in at.items():
            blobs.setdefault(name, {}).setdefault(blob, tag)
        releases[tag] = {
            "newest": max(at),
            "count": len(at),
            "adds": sorted(at.keys() - shipped),
        }
        shipped = set(at)

    if edited := {name: firsts for name, firsts in blobs.items() if len(firsts) > 1}:
        sys.exit(f"migrations whose content differs between releases: {edited}")

    args.out.mkdir(parents=True, exist_ok=True)
    for stale in args.out.glob("*.sql"):
        if stale.stem not in blobs:
            stale.unlink()
    for name, firsts in sorted(blobs.items()):
        (blob,) = firsts
        (args.out / f"{name}.sql").write_bytes(git(args.gitdir, "cat-file", "blob", blob))
    document = {
        "source": "https://github.com/documenso/documenso",
        "generated_by": "tools/documenso_migrations.py",
        "format": (
            "releases in version order; a release ships its own 'adds' and every earlier "
            "release's; 'newest' is the newest migration it ships, 'count' how many it ships"
        ),
        "releases": releases,
    }
    (args.out / "releases.json").write_text(json.dumps(document, indent=1) + "\n")
    print(
        f"{len(blobs)} migrations, {len(releases)} releases ({tags[0]}..{tags[-1]}) -> {args.out}"
    )


if __name__ == "__main__":
    main()
