// The sandbox page's live usage charts and terminal in Debian's headless chromium
// (tests/test_ui.py). Input: one JSON argument {url, key, other, box, theirs, shots};
// output: one JSON line of what the browser saw. pytest makes the assertions.
import { chromium } from "playwright-core";

const cfg = JSON.parse(process.argv[2]);
const browser = await chromium.launch({
  executablePath: process.env.CORRAL_CHROMIUM || "/usr/bin/chromium",
  args: [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--no-first-run", "--disable-sync",
  ],
});
const out = { requests: [], dialogs: [], console: [], popups: 0 };
const api = (path, body) => fetch(`${cfg.url}${path}`, {
  method: "POST",
  headers: { Authorization: `Bearer ${cfg.key}`, "Content-Type": "application/json" },
  body: JSON.stringify(body),
});

async function login(context, key) {
  const page = await context.newPage();
  await page.goto(`${cfg.url}/ui/login`);
  await page.fill("input[name=key]", key);
  await Promise.all([page.waitForURL("**/ui/sandboxes"), page.click("button[type=submit]")]);
  return page;
}

try {
  const context = await browser.newContext({ viewport: { width: 1280, height: 1000 } });
  // CSP violations, recorded from before any page script runs
  await context.addInitScript(() => {
    window.__violations = [];
    document.addEventListener("securitypolicyviolation", (e) => {
      window.__violations.push(`${e.effectiveDirective} ${e.blockedURI}`);
    });
  });
  const page = await login(context, cfg.key);
  context.on("page", () => { out.popups += 1; });  // a window the box's output opened
  page.on("request", (r) => out.requests.push(r.url()));
  page.on("dialog", async (d) => { out.dialogs.push(d.message()); await d.dismiss(); });
  page.on("console", (m) => out.console.push(m.text()));
  const last = (name) => page.locator(`#usage-${name}`).getAttribute("data-last");
  const charts = () => page.evaluate(() => [...document.querySelectorAll("#usage figure")].map(
    (f) => ({ id: f.id, points: f.querySelector("polyline").getAttribute("points").split(" ").length,
      value: f.querySelector(".value").textContent })));

  await page.goto(`${cfg.url}/ui/sandboxes/${cfg.box}`);
  // the charts are drawn, then fill as the series grows; idle first
  await page.waitForFunction(() => Number(document.querySelector("#usage-pids").dataset.last) > 0,
    null, { timeout: 30000 });
  out.charts_idle = await charts();
  out.cpu_idle = Number(await last("cpu"));
  out.memory_idle = Number(await last("memory"));
  // now the box burns a core and takes 96 MiB: the page redraws by itself
  const started = await api(`/v1/sandboxes/${cfg.box}/commands`, {
    command: "python3 -c 'import time; x = bytearray(96 << 20); x[::4096] = b\"1\" * len(x[::4096]);"
      + " t = time.time()\nwhile time.time() - t < 40: pass'",
    background: true,
  });
  out.burn_status = started.status;
  await page.waitForFunction((before) => {
    const cpu = Number(document.querySelector("#usage-cpu").dataset.last);
    const mem = Number(document.querySelector("#usage-memory").dataset.last);
    return cpu > 50 && mem > before + (64 << 20);
  }, out.memory_idle, { timeout: 90000, polling: 500 });
  out.charts_busy = await charts();
  out.cpu_busy = Number(await last("cpu"));
  out.memory_busy = Number(await last("memory"));

  // the terminal: a shell in the box, typed into
  await page.click("#terminal-open");
  await page.waitForFunction(() => document.querySelector("#terminal-status").textContent === "connected");
  const screen = () => page.locator("#terminal .xterm-rows").innerText();
  const waitScreen = async (needle) => {
    for (let i = 0; i < 150; i++) {
      if ((await screen()).includes(needle)) return true;
      await page.waitForTimeout(200);
    }
    return false;
  };
  out.prompt_seen = await waitScreen("$ ");  // the shell is ready for input
  await page.keyboard.type("echo corral-$((6*7))-ok\n");
  out.echo_seen = await waitScreen("corral-42-ok");
  // hostile output: HTML, a script, a terminal title and a javascript: link (OSC 8)
  await page.keyboard.type(
    "printf '%s\\n' '<img src=x onerror=window.__corral_xss=1><script>window.__corral_xss=2</script>'; "
    + "printf '\\033]0;<img src=x onerror=window.__corral_xss=3>\\007'; "
    + "printf '\\033]8;;javascript:window.__corral_xss=4\\033\\\\click-here\\033]8;;\\033\\\\\\n'; "
    + "echo done-$((1+1))\n");
  out.payload_seen = await waitScreen("done-2");
  out.screen = await screen();
  const link = page.locator("#terminal .xterm-rows span", { hasText: "click-here" }).last();
  out.link_drawn = await link.count();
  if (out.link_drawn) {  // the mouse over the link (xterm's screen takes the events), then a click
    const at = await link.boundingBox();
    await page.mouse.move(at.x + at.width / 2, at.y + at.height / 2);
    await page.waitForTimeout(300);
    await page.mouse.click(at.x + at.width / 2, at.y + at.height / 2);
  }
  await page.waitForTimeout(500);
  out.terminal_xss = await page.evaluate(() => ({
    flag: window.__corral_xss === undefined ? null : window.__corral_xss,
    scripts: [...document.querySelectorAll("script")].map((s) => s.getAttribute("src")),
    imgs: document.querySelectorAll("img").length,
    title: document.title,
  }));
  await page.screenshot({ path: `${cfg.shots}/ui-terminal.png`, fullPage: false });
  // leaving the shell: the page closes the socket (the server kills the shell)
  await page.click("#terminal-open");
  await page.waitForFunction(() => document.querySelector("#terminal-status").textContent.startsWith("closed"));
  out.violations = await page.evaluate(() => window.__violations);

  // a second key, logged in beside: neither the page nor the terminal of the first key's box
  const otherContext = await browser.newContext();
  const other = await login(otherContext, cfg.other);
  const theirs = await other.goto(`${cfg.url}/ui/sandboxes/${cfg.box}`);
  out.other_status = theirs.status();
  // from the second key's own sandbox page (whose CSP lets its script connect here)
  await other.goto(`${cfg.url}/ui/sandboxes/${cfg.theirs}`);
  out.other_ws = await other.evaluate(async ({ box }) => {
    const url = new URL(`/ui/sandboxes/${box}/terminal`, window.location.href);
    url.protocol = "ws:";
    const socket = new WebSocket(url);
    socket.binaryType = "arraybuffer";
    let received = 0;
    return await new Promise((resolve) => {
      socket.addEventListener("open", () => socket.send(JSON.stringify({ csrf: "", cols: 80, rows: 24 })));
      socket.addEventListener("message", () => { received += 1; });
      socket.addEventListener("close", (e) => resolve({ code: e.code, reason: e.reason, received }));
    });
  }, { box: cfg.box });
  // with its own page's CSRF token too: the box is not the key's
  out.other_ws_token = await other.evaluate(async ({ box }) => {
    const token = document.querySelector('meta[name="corral-csrf"]').content;
    const url = new URL(`/ui/sandboxes/${box}/terminal`, window.location.href);
    url.protocol = "ws:";
    const socket = new WebSocket(url);
    let received = 0;
    return await new Promise((resolve) => {
      socket.addEventListener("open", () => socket.send(JSON.stringify({ csrf: token, cols: 80, rows: 24 })));
      socket.addEventListener("message", () => { received += 1; });
      socket.addEventListener("close", (e) => resolve({ code: e.code, reason: e.reason, received }));
    });
  }, { box: cfg.box });
} finally {
  await browser.close();
}
process.stdout.write(JSON.stringify(out) + "\n");
