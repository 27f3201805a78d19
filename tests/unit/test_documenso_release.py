"""The Documenso release a database's newest applied migration names."""

from __future__ import annotations

from relay.sources.documenso_release import describe
from relay.sources.documenso_versions import RELEASES


def test_releases_are_in_migration_order_each_once() -> None:
    migrations = [m for m, _, _ in RELEASES]
    assert migrations == sorted(set(migrations))


def test_a_release_s_newest_migration_names_it() -> None:
    assert describe("20260311000000_add_organisation_template_type") == (
        "Documenso v2.8.1 (newest migration 20260311000000_add_organisation_template_type)"
    )
    # Releases that shipped no migration of their own share their predecessor's.
    assert describe("20250917042725_remove_recipient_unique_email_constraints").startswith(
        "Documenso v1.12.5 to v1.12.10 "
    )


def test_migrations_no_release_ships_are_named_as_such() -> None:
    last = RELEASES[-1]
    assert describe(last[0][:8] + "9" * 6 + "_future").startswith(
        f"Documenso newer than {last[2]} (newest migration"
    )
    assert describe("20260311000001_our_own").startswith(
        "Documenso v2.8.1 with migrations of its own (newest migration 20260311000001_our_own"
    )
    assert describe("20200101000000_init").startswith(f"Documenso older than {RELEASES[0][1]}")
    assert describe(None) == "Documenso: no migration applied (_prisma_migrations is empty)"
