// Graphile Worker as a peer in relay's bench (bench/run.py, `--only graphile`).
//
// `node runner.cjs` runs one Graphile Worker (library mode, `run()`) on DATABASE_URL with the
// task in tasks/ and the `worker` options given as JSON in BENCH_GRAPHILE_PRESET (the bench's
// GRAPHILE_SETTINGS: Graphile Worker's documented performance preset). Prints `ready` on stdout
// once its LISTEN connection is listening, then runs until SIGTERM/SIGINT, on which Graphile
// Worker shuts down gracefully (its own signal handling).
//
// `node runner.cjs --schema-only` installs Graphile Worker's schema by its own migrations and exits.
// Graphile Worker logs (to stderr) as it does by default, less a line per completed job when
// NO_LOG_SUCCESS=1, as its own performance test runs it.
"use strict";

const { EventEmitter } = require("node:events");
const path = require("node:path");
const { Logger, run, runMigrations } = require("graphile-worker");

// Graphile Worker's default log lines, on stderr (stdout carries only `ready`).
const logger = new Logger((scope) => (level, message) => {
  if (level === "debug" && !process.env.GRAPHILE_LOGGER_DEBUG) return;
  const where = scope.workerId ? `(${scope.workerId})` : "";
  process.stderr.write(`[${scope.label || "core"}${where}] ${level.toUpperCase()}: ${message}\n`);
});

const settings = JSON.parse(process.env.BENCH_GRAPHILE_PRESET || "{}");
const events = new EventEmitter();
const preset = {
  worker: {
    connectionString: process.env.DATABASE_URL,
    taskDirectory: path.join(__dirname, "tasks"),
    crontabFile: path.join(__dirname, "crontab"), // none: no cron
    ...settings,
    logger,
    events,
  },
};

async function main() {
  if (process.argv.includes("--schema-only")) {
    await runMigrations({ preset });
    return;
  }
  let ready = false;
  events.on("pool:listen:success", ({ client }) => {
    // Graphile Worker sends its LISTEN on this client right after the event: a query queued
    // behind it answers once the LISTEN is in place.
    setImmediate(() => {
      client.query("select 1").then(() => {
        if (!ready) {
          ready = true;
          process.stdout.write("ready\n");
        }
      }, () => {});
    });
  });
  const runner = await run({ preset });
  await runner.promise;
}

main().catch((err) => {
  console.error(err);
  process.exit(1);
});
