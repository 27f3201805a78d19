-- System 5 of shared/MISSION.md: a reminder caller, as the application has it (a Prisma schema's
-- migration: quoted camelCase identifiers, timestamp(3) columns holding UTC, an enum status).
--
-- The application (a Prisma client) writes "Reminder" rows with the time to call in
-- "scheduledAt". A worker used to poll for due 'scheduled' reminders, place each call through the
-- voice provider's HTTP API, write the provider's call id to "externalCallId", set the status to
-- 'processing' and write a "CallLog" row; the provider's call-status callbacks
-- (POST /webhooks/call-status) then wrote another "CallLog" row and marked the reminder 'called'
-- or 'failed'. With relay, examples/system5/relay.toml does both halves on these tables as they
-- are: nothing here is relay-specific but the partial index at the end, which serves relay's claim.
--
--     scheduled --(call placed: the provider answered with its call id)--> processing
--     processing --(callback: completed)--> called
--     processing --(callback: any other final status)--> failed
--     scheduled --(the provider refused the call, or it failed every attempt)--> failed

-- CreateEnum
CREATE TYPE "ReminderStatus" AS ENUM ('scheduled', 'processing', 'called', 'failed');

-- CreateTable
CREATE TABLE "Reminder" (
    "id" SERIAL NOT NULL,
    "phoneNumber" TEXT NOT NULL,
    "message" TEXT NOT NULL,
    "scheduledAt" TIMESTAMP(3) NOT NULL,
    "status" "ReminderStatus" NOT NULL DEFAULT 'scheduled',
    "externalCallId" TEXT,
    "createdAt" TIMESTAMP(3) NOT NULL DEFAULT CURRENT_TIMESTAMP,
    "updatedAt" TIMESTAMP(3) NOT NULL,

    CONSTRAINT "Reminder_pkey" PRIMARY KEY ("id")
);

-- CreateTable
-- One row per event of a reminder's call: 'call.placed' (the provider took the call; its answer's
-- status), 'call.failed' (an attempt to place it failed: the HTTP status and error), and
-- 'call.status' (a callback from the provider: its status and the transcript).
CREATE TABLE "CallLog" (
    "id" SERIAL NOT NULL,
    "reminderId" INTEGER NOT NULL,
    "callId" TEXT,
    "event" TEXT NOT NULL,
    "status" TEXT NOT NULL,
    "httpStatus" INTEGER,
    "error" TEXT,
    "transcript" TEXT,
    "createdAt" TIMESTAMP(3) NOT NULL DEFAULT CURRENT_TIMESTAMP,

    CONSTRAINT "CallLog_pkey" PRIMARY KEY ("id")
);

-- CreateIndex
CREATE INDEX "Reminder_externalCallId_idx" ON "Reminder"("externalCallId");

-- CreateIndex
CREATE INDEX "Reminder_status_scheduledAt_idx" ON "Reminder"("status", "scheduledAt");

-- CreateIndex
CREATE INDEX "CallLog_reminderId_idx" ON "CallLog"("reminderId");

-- AddForeignKey
ALTER TABLE "CallLog" ADD CONSTRAINT "CallLog_reminderId_fkey" FOREIGN KEY ("reminderId")
    REFERENCES "Reminder"("id") ON DELETE CASCADE ON UPDATE CASCADE;

-- Added by hand to the migration (Prisma's schema cannot say it): relay's claim looks waiting
-- reminders up by key (README, "Sources: a table of yours").
CREATE INDEX "Reminder_waiting_idx" ON "Reminder"("id") WHERE "status" = 'scheduled';
