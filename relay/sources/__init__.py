"""The kinds of source, one module each; the pipeline reaches them only through `Kind`.

Adding a kind is adding a module that implements relay.sources.base.Kind and registering it here.
"""

from __future__ import annotations

from relay.sources import documenso_documents, documenso_jobs, functions, outbox, table
from relay.sources.base import Kind, ParseContext

KINDS: dict[str, Kind] = {
    k.name: k
    for k in (
        outbox.KIND,
        documenso_documents.KIND,
        documenso_jobs.KIND,
        table.KIND,
        functions.KIND,
    )
}

__all__ = ["KINDS", "Kind", "ParseContext"]
