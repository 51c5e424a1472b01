// The JavaScript code context of corral: one persistent vm context per process.
// Reads one JSON request a line ({"code", "timeout_ms"}) and answers with the
// driver's events (stream, result, error, done), one JSON object a line.
"use strict";
const vm = require("vm");
const util = require("util");
const readline = require("readline");

function emit(event) {
  process.stdout.write(JSON.stringify(event) + "\n");
}

function capture(name) {
  return (...args) => emit({ event: "stream", name, text: util.format(...args) + "\n" });
}

const sandboxConsole = {
  log: capture("stdout"),
  info: capture("stdout"),
  debug: capture("stdout"),
  warn: capture("stderr"),
  error: capture("stderr"),
};
const context = vm.createContext({
  console: sandboxConsole,
  require,
  process,
  Buffer,
  setTimeout,
  clearTimeout,
  setInterval,
  clearInterval,
  URL,
  TextEncoder,
  TextDecoder,
});
let count = 0;

async function run(request) {
  count += 1;
  try {
    const options = { filename: `cell-${count}` };
    if (request.timeout_ms) options.timeout = request.timeout_ms;
    let value = vm.runInContext(request.code, context, options);
    if (value && typeof value.then === "function") value = await value;
    if (value !== undefined) {
      emit({
        event: "result",
        main: true,
        data: { "text/plain": util.inspect(value, { depth: 4, colors: false }) },
      });
    }
    emit({ event: "done", count, status: "ok", restarted: false });
  } catch (err) {
    const timedOut = err && err.code === "ERR_SCRIPT_EXECUTION_TIMEOUT";
    emit({
      event: "error",
      name: timedOut ? "TimeoutError" : (err && err.name) || "Error",
      value: (err && err.message) || String(err),
      traceback: String((err && err.stack) || err).split("\n"),
    });
    emit({ event: "done", count, status: timedOut ? "timeout" : "error", restarted: false });
  }
}

let queue = Promise.resolve();
readline.createInterface({ input: process.stdin }).on("line", (line) => {
  const request = JSON.parse(line);
  queue = queue.then(() => run(request));
});
