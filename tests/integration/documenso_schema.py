"""Documenso's tables as the tests need them, a subset of what Documenso's own migrations make
(test_documenso_schema_matches.py checks each column against them, replayed):
the current "Envelope" shape (v1.13 and later) and the legacy "Document" shape (v1.12 and
earlier). Enum labels are in install-history order on purpose; relay must compare them as text."""

ENUMS = """
CREATE TYPE "DocumentStatus" AS ENUM ('DRAFT', 'PENDING', 'COMPLETED', 'REJECTED', 'CANCELLED');
CREATE TYPE "DocumentSource" AS ENUM ('DOCUMENT', 'TEMPLATE', 'TEMPLATE_DIRECT_LINK');
CREATE TYPE "DocumentVisibility" AS ENUM ('EVERYONE', 'MANAGER_AND_ABOVE', 'ADMIN');
CREATE TYPE "RecipientRole" AS ENUM ('CC', 'SIGNER', 'VIEWER', 'APPROVER', 'ASSISTANT');
CREATE TYPE "ReadStatus" AS ENUM ('NOT_OPENED', 'OPENED');
CREATE TYPE "SigningStatus" AS ENUM ('NOT_SIGNED', 'SIGNED', 'REJECTED');
CREATE TYPE "SendStatus" AS ENUM ('NOT_SENT', 'SENT');
CREATE TYPE "DocumentSigningOrder" AS ENUM ('PARALLEL', 'SEQUENTIAL');
CREATE TYPE "DocumentDistributionMethod" AS ENUM ('EMAIL', 'NONE');
"""

DOCUMENT_META = """
CREATE TABLE "DocumentMeta" (
    "id" text PRIMARY KEY,
    "subject" text, "message" text, "timezone" text DEFAULT 'Etc/UTC',
    "dateFormat" text DEFAULT 'yyyy-MM-dd hh:mm a', "redirectUrl" text,
    "signingOrder" "DocumentSigningOrder" NOT NULL DEFAULT 'PARALLEL',
    "language" text NOT NULL DEFAULT 'en',
    "typedSignatureEnabled" boolean NOT NULL DEFAULT true,
    "distributionMethod" "DocumentDistributionMethod" NOT NULL DEFAULT 'EMAIL',
    "emailSettings" jsonb
    {extra}
);
"""

ENVELOPE = (
    ENUMS
    + """
CREATE TYPE "EnvelopeType" AS ENUM ('DOCUMENT', 'TEMPLATE');
"""
    + DOCUMENT_META.format(extra="")
    + """
CREATE TABLE "Envelope" (
    "id" text PRIMARY KEY,
    "secondaryId" text NOT NULL UNIQUE,
    "externalId" text,
    "type" "EnvelopeType" NOT NULL,
    "createdAt" timestamp(3) NOT NULL DEFAULT CURRENT_TIMESTAMP,
    "updatedAt" timestamp(3) NOT NULL,
    "completedAt" timestamp(3),
    "deletedAt" timestamp(3),
    "title" text NOT NULL,
    "status" "DocumentStatus" NOT NULL DEFAULT 'DRAFT',
    "source" "DocumentSource" NOT NULL,
    "internalVersion" integer NOT NULL,
    "authOptions" jsonb,
    "formValues" jsonb,
    "visibility" "DocumentVisibility" NOT NULL DEFAULT 'EVERYONE',
    "templateId" integer,
    "userId" integer NOT NULL,
    "teamId" integer NOT NULL,
    "documentMetaId" text NOT NULL UNIQUE REFERENCES "DocumentMeta" ("id"),
    -- v2.13.0's column (Documenso dropped its default after the backfill; kept here so the
    -- tests' inserts stay short).
    "signatureLevel" text NOT NULL DEFAULT 'SES'
);
CREATE TABLE "DocumentAuditLog" (
    "id" text PRIMARY KEY,
    "createdAt" timestamp(3) NOT NULL DEFAULT CURRENT_TIMESTAMP,
    "type" text NOT NULL,
    "data" jsonb NOT NULL,
    "envelopeId" text REFERENCES "Envelope" ("id") ON DELETE SET NULL
);
CREATE INDEX "DocumentAuditLog_envelopeId_idx" ON "DocumentAuditLog" ("envelopeId");
CREATE TABLE "Recipient" (
    "id" serial PRIMARY KEY,
    "envelopeId" text NOT NULL REFERENCES "Envelope" ("id") ON DELETE CASCADE,
    "email" varchar(255) NOT NULL,
    "name" varchar(255) NOT NULL DEFAULT '',
    "token" text NOT NULL,
    "documentDeletedAt" timestamp(3),
    "expiresAt" timestamp(3),
    "expirationNotifiedAt" timestamp(3),
    "signedAt" timestamp(3),
    "authOptions" jsonb,
    "signingOrder" integer,
    "rejectionReason" text,
    "role" "RecipientRole" NOT NULL DEFAULT 'SIGNER',
    "readStatus" "ReadStatus" NOT NULL DEFAULT 'NOT_OPENED',
    "signingStatus" "SigningStatus" NOT NULL DEFAULT 'NOT_SIGNED',
    "sendStatus" "SendStatus" NOT NULL DEFAULT 'NOT_SENT'
);
"""
)

LEGACY_DOCUMENT = (
    ENUMS
    + """
CREATE TABLE "Document" (
    "id" serial PRIMARY KEY,
    "userId" integer NOT NULL,
    "title" text NOT NULL,
    "status" "DocumentStatus" NOT NULL DEFAULT 'DRAFT',
    "createdAt" timestamp(3) NOT NULL DEFAULT now(),
    "updatedAt" timestamp(3) NOT NULL DEFAULT now(),
    "documentDataId" text NOT NULL UNIQUE,
    "completedAt" timestamp(3),
    "deletedAt" timestamp(3),
    "teamId" integer NOT NULL,
    "authOptions" jsonb,
    "formValues" jsonb,
    "source" "DocumentSource" NOT NULL,
    "templateId" integer,
    "externalId" text,
    "visibility" "DocumentVisibility" NOT NULL DEFAULT 'EVERYONE'
);
"""
    + DOCUMENT_META.format(
        extra=', "documentId" integer NOT NULL UNIQUE '
        'REFERENCES "Document" ("id") ON DELETE CASCADE'
    )
    + """
CREATE TABLE "Recipient" (
    "id" serial PRIMARY KEY,
    "documentId" integer REFERENCES "Document" ("id") ON DELETE CASCADE,
    "templateId" integer,
    "email" varchar(255) NOT NULL,
    "name" varchar(255) NOT NULL DEFAULT '',
    "token" text NOT NULL,
    "signedAt" timestamp(3),
    "role" "RecipientRole" NOT NULL DEFAULT 'SIGNER',
    "readStatus" "ReadStatus" NOT NULL DEFAULT 'NOT_OPENED',
    "signingStatus" "SigningStatus" NOT NULL DEFAULT 'NOT_SIGNED',
    "sendStatus" "SendStatus" NOT NULL DEFAULT 'NOT_SENT'
);
"""
)

JOBS = """
CREATE TYPE "BackgroundJobStatus" AS ENUM ('PENDING', 'PROCESSING', 'COMPLETED', 'FAILED');
CREATE TABLE "BackgroundJob" (
    "id" text PRIMARY KEY,
    "status" "BackgroundJobStatus" NOT NULL DEFAULT 'PENDING',
    "retried" integer NOT NULL DEFAULT 0,
    "maxRetries" integer NOT NULL DEFAULT 3,
    "jobId" text NOT NULL,
    "name" text NOT NULL,
    "version" text NOT NULL,
    "submittedAt" timestamp(3) NOT NULL DEFAULT CURRENT_TIMESTAMP,
    "lastRetriedAt" timestamp(3),
    "completedAt" timestamp(3),
    "updatedAt" timestamp(3) NOT NULL,
    "payload" jsonb
);
"""

WEBHOOKS = """
CREATE TYPE "WebhookTriggerEvents" AS ENUM (
    'DOCUMENT_CREATED', 'DOCUMENT_SIGNED', 'DOCUMENT_SENT', 'DOCUMENT_OPENED',
    'DOCUMENT_COMPLETED', 'DOCUMENT_REJECTED', 'DOCUMENT_CANCELLED', 'RECIPIENT_EXPIRED',
    'DOCUMENT_RECIPIENT_COMPLETED', 'DOCUMENT_REMINDER_SENT', 'TEMPLATE_CREATED',
    'TEMPLATE_UPDATED', 'TEMPLATE_DELETED', 'TEMPLATE_USED');
CREATE TYPE "WebhookCallStatus" AS ENUM ('SUCCESS', 'FAILED');
CREATE TABLE "Webhook" (
    "id" text PRIMARY KEY,
    "webhookUrl" text NOT NULL,
    "eventTriggers" "WebhookTriggerEvents"[],
    "secret" text,
    "enabled" boolean NOT NULL DEFAULT true,
    "createdAt" timestamp(3) NOT NULL DEFAULT CURRENT_TIMESTAMP,
    "updatedAt" timestamp(3) NOT NULL DEFAULT CURRENT_TIMESTAMP,
    "userId" integer NOT NULL,
    "teamId" integer NOT NULL
);
CREATE TABLE "WebhookCall" (
    "id" text PRIMARY KEY,
    "status" "WebhookCallStatus" NOT NULL,
    "url" text NOT NULL,
    "requestBody" jsonb NOT NULL,
    "responseCode" integer NOT NULL,
    "responseHeaders" jsonb,
    "responseBody" jsonb,
    "createdAt" timestamp(3) NOT NULL DEFAULT CURRENT_TIMESTAMP,
    "webhookId" text NOT NULL REFERENCES "Webhook" ("id") ON DELETE CASCADE,
    "event" "WebhookTriggerEvents" NOT NULL
);
"""
