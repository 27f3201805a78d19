// The bench's Graphile Worker task: POST the job's payload as JSON to its url, as relay does for
// a row of webhook_delivery_queue (same headers, unsigned as relay is without a secret), with a
// keep-alive agent of at most `concurrentJobs` sockets and relay's default http.timeout (10 s) for
// the whole request. A non-2xx answer or a timeout throws, so Graphile Worker retries the job
// (attempts count as relay's do).
"use strict";

const http = require("node:http");

const TIMEOUT_MS = 10_000;
const agent = new http.Agent({
  keepAlive: true,
  maxSockets: Number(process.env.BENCH_GRAPHILE_SOCKETS) || 24,
});

module.exports = (payload, helpers) =>
  new Promise((resolve, reject) => {
    const { job } = helpers;
    const body = Buffer.from(JSON.stringify(payload.payload));
    const req = http.request(payload.url, {
      method: "POST",
      agent,
      headers: {
        "content-type": "application/json",
        "content-length": body.length,
        "webhook-id": `deliveries_${job.id}`,
        "webhook-timestamp": String(Math.floor(Date.now() / 1000)),
        "relay-attempt": String(job.attempts),
      },
    });
    const timer = setTimeout(
      () => req.destroy(new Error(`timed out after ${TIMEOUT_MS} ms`)),
      TIMEOUT_MS,
    );
    req.on("response", (res) => {
      res.on("data", () => {});
      res.on("end", () => {
        clearTimeout(timer);
        if (res.statusCode >= 200 && res.statusCode < 300) resolve();
        else reject(new Error(`HTTP ${res.statusCode}`));
      });
      res.on("error", (err) => {
        clearTimeout(timer);
        reject(err);
      });
    });
    req.on("error", (err) => {
      clearTimeout(timer);
      reject(err);
    });
    req.end(body);
  });
