"""Documenso's webhook payload (a document's, or a template's), field for field as the
Documenso version that wrote the rows would send it (docs/research/documenso-payloads.md has
the evidence, tag by tag).

The trigger captures the document, its meta and its recipients as rows (relay.documenso_payload
in sql/triggers/documenso_documents.sql); this module maps them the way Documenso's
mapDocumentToWebhookDocumentPayload / mapEnvelopeToWebhookDocumentPayload and its zod schema do.
zod (v3) emits keys in the schema's order and drops the others, so the key lists below are the
wire order. The version shows in the rows themselves, each shape change having come with a
migration: "Envelope" instead of "Document" (v1.13.0), "DocumentMeta"."allowDictateNextSigner"
(v1.10.0), "Recipient"."expiresAt" (v2.7.0), "Envelope"."signatureLevel" (v2.13.0). So a
Documenso upgraded while relay runs gets its new shape from the first event after, and an event
captured before keeps the shape of the Documenso that wrote it.

Supported: v1.9.0 to v2.17.0. Before v1.9.0 Documenso sent Prisma's rows unparsed, with a
different subset per event; those versions get the v1.9 shape."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import orjson

_DOCUMENT = (
    "id",
    "envelopeId",
    "externalId",
    "userId",
    "authOptions",
    "formValues",
    "visibility",
    "title",
    "status",
    "documentDataId",
    "createdAt",
    "updatedAt",
    "completedAt",
    "deletedAt",
    "teamId",
    "templateId",
    "source",
    "documentMeta",
    "recipients",
    "Recipient",
)
_META = (
    "id",
    "subject",
    "message",
    "timezone",
    "password",
    "dateFormat",
    "redirectUrl",
    "signingOrder",
    "allowDictateNextSigner",
    "typedSignatureEnabled",
    "uploadSignatureEnabled",
    "drawSignatureEnabled",
    "language",
    "distributionMethod",
    "emailSettings",
)
_RECIPIENT = (
    "id",
    "envelopeId",
    "documentId",
    "templateId",
    "email",
    "name",
    "token",
    "documentDeletedAt",
    "expired",
    "expiresAt",
    "expirationNotifiedAt",
    "signedAt",
    "authOptions",
    "signingOrder",
    "rejectionReason",
    "role",
    "readStatus",
    "signingStatus",
    "sendStatus",
)


def _without(keys: tuple[str, ...], *dropped: str) -> tuple[str, ...]:
    return tuple(k for k in keys if k not in dropped)


# v1.9.0 - v1.12.x ("Document"): documentDataId; meta with password, and from v1.10.0 the
# three signature settings; recipients with `expired`.
LEGACY_DOCUMENT = _without(_DOCUMENT, "envelopeId")
LEGACY_META = _without(
    _META, "allowDictateNextSigner", "uploadSignatureEnabled", "drawSignatureEnabled"
)
LEGACY_META_V1_10 = _META
LEGACY_RECIPIENT = _without(_RECIPIENT, "envelopeId", "expiresAt", "expirationNotifiedAt")
# v1.13.0 - v2.12.x ("Envelope"): no documentDataId, no meta password; v2.7.0 replaced the
# recipients' `expired` by expiresAt and expirationNotifiedAt.
ENVELOPE_DOCUMENT = _without(_DOCUMENT, "envelopeId", "documentDataId")
ENVELOPE_META = _without(_META, "password")
ENVELOPE_RECIPIENT = LEGACY_RECIPIENT
ENVELOPE_RECIPIENT_V2_7 = _without(_RECIPIENT, "envelopeId", "expired")
# v2.13.0 on: envelopeId after id, on the document and on each recipient.
ENVELOPE_DOCUMENT_V2_13 = _without(_DOCUMENT, "documentDataId")
ENVELOPE_RECIPIENT_V2_13 = _without(_RECIPIENT, "expired")

_DATES = frozenset(
    (
        "createdAt",
        "updatedAt",
        "completedAt",
        "deletedAt",
        "documentDeletedAt",
        "expired",
        "expiresAt",
        "expirationNotifiedAt",
        "signedAt",
    )
)
# Documenso's mappers override these whatever the row holds ("Not sure why is optional in the
# prisma schema"), since v1.9.0.
_META_FIXED = {"timezone": "Etc/UTC", "dateFormat": "yyyy-MM-dd hh:mm a"}


def iso(value: Any) -> Any:
    """A timestamp(3) without time zone holding UTC, as JavaScript's toISOString() writes it."""
    if not isinstance(value, str):
        return value
    moment = datetime.fromisoformat(value)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def _pick(row: dict[str, Any], keys: tuple[str, ...], values: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for key in keys:
        value = values[key] if key in values else row.get(key)
        out[key] = iso(value) if key in _DATES else value
    return out


def payload(capture: dict[str, Any]) -> dict[str, Any]:
    """Documenso's payload for a captured document ({"capture": 1, "id", "envelopeId",
    "document", "meta", "recipients"}, rows as to_jsonb made them)."""
    document: dict[str, Any] = capture["document"]
    meta: dict[str, Any] | None = capture["meta"]
    number = capture["id"]
    envelope_id = capture["envelopeId"]
    if envelope_id is None:
        document_keys = LEGACY_DOCUMENT
        meta_keys = LEGACY_META_V1_10 if meta and "allowDictateNextSigner" in meta else LEGACY_META
        recipient_keys = LEGACY_RECIPIENT
    elif "signatureLevel" in document:
        document_keys, meta_keys = ENVELOPE_DOCUMENT_V2_13, ENVELOPE_META
        recipient_keys = ENVELOPE_RECIPIENT_V2_13
    else:
        document_keys, meta_keys = ENVELOPE_DOCUMENT, ENVELOPE_META
        recipients = capture["recipients"]
        recipient_keys = (
            ENVELOPE_RECIPIENT_V2_7
            if recipients and "expiresAt" in recipients[0]
            else ENVELOPE_RECIPIENT
        )
    # On "Envelope" a recipient's documentId and templateId are computed: the envelope's number,
    # under the name of its type (a template's events carry the template, TEMPLATE_* from v2.8.1).
    computed: dict[str, Any] = {}
    if envelope_id is not None:
        template = document.get("type") == "TEMPLATE"
        computed = {
            "envelopeId": envelope_id,
            "documentId": None if template else number,
            "templateId": number if template else None,
        }
    recipients = [_pick(r, recipient_keys, computed) for r in capture["recipients"]]
    return _pick(
        document,
        document_keys,
        {
            "id": number,
            "envelopeId": envelope_id,
            "documentMeta": None if meta is None else _pick(meta, meta_keys, _META_FIXED),
            "recipients": recipients,
            "Recipient": recipients,
        },
    )


def body(text: str) -> bytes:
    """The payload's JSON: mapped from a capture, or as stored (an event recorded with a
    minimal payload after an error, or by an earlier relay version)."""
    stored = orjson.loads(text)
    if isinstance(stored, dict) and stored.get("capture") == 1:
        return orjson.dumps(payload(stored))
    return text.encode()
