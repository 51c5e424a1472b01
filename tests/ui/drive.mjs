// Drives Debian's headless chromium through a real `corral serve` (tests/test_ui.py).
// Input: one JSON argument {url, key, mine, theirs, shots}; output: one JSON line of
// what the browser saw. pytest makes the assertions.
import { chromium } from "playwright-core";

const cfg = JSON.parse(process.argv[2]);
const browser = await chromium.launch({
  executablePath: process.env.CORRAL_CHROMIUM || "/usr/bin/chromium",
  args: [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--no-first-run", "--disable-sync",
  ],
});
const out = { requests: [], dialogs: [], console: [] };
try {
  const page = await browser.newPage({ viewport: { width: 1280, height: 900 } });
  page.on("request", (r) => out.requests.push(r.url()));
  page.on("dialog", async (d) => { out.dialogs.push(d.message()); await d.dismiss(); });
  page.on("console", (m) => out.console.push(m.text()));
  const text = async (sel) => (await page.locator(sel).innerText()).trim();
  const xss = () => page.evaluate(() => ({
    flag: window.__corral_xss === undefined ? null : window.__corral_xss,
    // the sandbox page's own two (static/usage.js, static/terminal.js) excepted
    scripts: document.querySelectorAll('script:not([src="/ui/static/usage.js"]):not([src="/ui/static/terminal.js"])').length,
    imgs: document.querySelectorAll("img").length,
  }));

  // not logged in: the login form
  await page.goto(`${cfg.url}/ui/sandboxes`);
  out.login_url = page.url();
  await page.fill("input[name=key]", "crl_nope_nope");
  await page.click("button[type=submit]");
  out.bad_login = await page.locator("#login-error").count();
  await page.fill("input[name=key]", cfg.key);
  await Promise.all([page.waitForURL("**/ui/sandboxes"), page.click("button[type=submit]")]);
  out.cookies = (await page.context().cookies()).map((c) => ({
    name: c.name, httpOnly: c.httpOnly, sameSite: c.sameSite, path: c.path,
  }));
  out.script_cookie = await page.evaluate(() => document.cookie);

  out.list = await text("#sandboxes");
  out.list_xss = await xss();
  await page.goto(`${cfg.url}/ui/sandboxes?state=running`);
  out.list_running = await text("#sandboxes");
  await page.goto(`${cfg.url}/ui/sandboxes?metadata=${encodeURIComponent("team=blue")}`);
  out.list_blue = await text("#sandboxes");

  const theirs = await page.goto(`${cfg.url}/ui/sandboxes/${cfg.theirs}`);
  out.theirs_status = theirs.status();
  out.theirs_text = await text("main");

  const mine = await page.goto(`${cfg.url}/ui/sandboxes/${cfg.mine}`);
  out.mine_status = mine.status();
  out.csp = mine.headers()["content-security-policy"];
  out.state = await text("#state");
  out.runs = await text("#runs");
  out.network = await text("#network");
  out.metadata = await text("#metadata");
  out.policy = await text("#policy");
  out.sandbox_xss = await xss();
  await page.screenshot({ path: `${cfg.shots}/ui-sandbox.png`, fullPage: false });

  await page.goto(`${cfg.url}/ui/sandboxes/${cfg.mine}/files`);
  out.files = await text("#files");
  out.files_xss = await xss();

  // a host the rules do not name waits for an answer: deny it from the page
  for (let i = 0; i < 100; i++) {
    await page.goto(`${cfg.url}/ui/approvals`);
    if ((await page.locator("table.approvals").count()) > 0) break;
    await page.waitForTimeout(200);
  }
  out.approvals = await text("main");
  await Promise.all([
    page.waitForURL("**/ui/approvals"),
    page.click("table.approvals button[value=false]"),
  ]);
  out.approvals_after = await text("main");
  await page.goto(`${cfg.url}/ui/sandboxes/${cfg.asking}`);
  out.asking_network = await text("#network");

  await page.goto(`${cfg.url}/ui/sandboxes/${cfg.mine}`);
  out.expires_before = await text("#expires");
  await page.fill("input[name=timeout_s]", "3000");
  await Promise.all([page.waitForURL(`**/ui/sandboxes/${cfg.mine}`), page.click("#extend")]);
  out.expires_after = await text("#expires");
  await Promise.all([page.waitForURL(`**/ui/sandboxes/${cfg.mine}`), page.click("#kill")]);
  out.state_after = await text("#state");
  out.end_reason = await text("#end-reason");

  await page.goto(`${cfg.url}/ui/sandboxes/${cfg.mine}/files`);
  out.files_ended = await text("#files");

  await page.goto(`${cfg.url}/ui/overview`);
  out.overview = await text("main");
  await page.screenshot({ path: `${cfg.shots}/ui-overview.png`, fullPage: false });
  await page.goto(`${cfg.url}/ui/sandboxes`);
  await page.screenshot({ path: `${cfg.shots}/ui-sandboxes.png`, fullPage: false });
  await page.goto(`${cfg.url}/ui/key`);
  out.key_page = await text("#quota");
} finally {
  await browser.close();
}
process.stdout.write(JSON.stringify(out) + "\n");
