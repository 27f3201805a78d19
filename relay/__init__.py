"""relay: a Postgres LISTEN/NOTIFY event relay (distribution `pg-relay`)."""

from importlib import metadata

DISTRIBUTION = "pg-relay"

try:
    __version__ = metadata.version(DISTRIBUTION)
except metadata.PackageNotFoundError:  # run from a checkout that was never installed
    __version__ = "0+unknown"
