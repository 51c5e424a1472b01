// The sandbox page's terminal (corral /ui): xterm.js (vendored, static/xterm.mjs)
// on a websocket to this server's /ui/sandboxes/{id}/terminal, which relays the
// box's PTY. The box's output is hostile: it goes only to term.write(), which
// draws it as terminal cells (text nodes), never as HTML. Links in it are not
// followed (linkHandler below), and nothing it prints reaches this page's DOM
// otherwise.
import { Terminal } from "./xterm.mjs";

const section = document.getElementById("terminal-section");
const meta = (name) => document.querySelector(`meta[name="${name}"]`).content;

// The page's CSP lets a <style> element apply only with this response's nonce;
// xterm.js makes a few (theme colours, cell size): stamp them as they are made.
const nonce = meta("corral-style-nonce");
const createElement = Document.prototype.createElement;
Document.prototype.createElement = function (name, options) {
  const element = createElement.call(this, name, options);
  if (String(name).toLowerCase() === "style") element.setAttribute("nonce", nonce);
  return element;
};

if (section) {
  const open = document.getElementById("terminal-open");
  const status = document.getElementById("terminal-status");
  const box = document.getElementById("terminal");
  let socket = null;
  let term = null;

  const say = (text) => { status.textContent = text; };

  open.addEventListener("click", () => {
    if (socket) {
      socket.close();
      return;
    }
    box.replaceChildren();
    term = new Terminal({
      cols: 100, rows: 28, convertEol: false, scrollback: 2000, fontSize: 13,
      // a link printed by the box (OSC 8) is never opened: it is text
      linkHandler: { activate: () => {}, allowNonHttpProtocols: false },
    });
    term.open(box);
    const url = new URL(section.dataset.src, window.location.href);
    url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
    socket = new WebSocket(url);
    socket.binaryType = "arraybuffer";
    const encoder = new TextEncoder();
    socket.addEventListener("open", () => {
      socket.send(JSON.stringify({ csrf: meta("corral-csrf"), cols: term.cols, rows: term.rows }));
      say("connected");
      open.textContent = "Close the shell";
      term.focus();
    });
    socket.addEventListener("message", (event) => {
      if (typeof event.data === "string") {
        const msg = JSON.parse(event.data);
        if ("exit_code" in msg) say(`exited (${msg.exit_code})`);
        return;
      }
      term.write(new Uint8Array(event.data));
    });
    socket.addEventListener("close", (event) => {
      if (status.textContent === "connected" || status.textContent === "connecting") {
        say(event.reason ? `closed: ${event.reason}` : "closed");
      }
      open.textContent = "Open a shell";
      socket = null;
    });
    term.onData((data) => {
      if (socket && socket.readyState === WebSocket.OPEN) socket.send(encoder.encode(data));
    });
    term.onBinary((data) => {
      if (socket && socket.readyState === WebSocket.OPEN) {
        socket.send(Uint8Array.from(data, (c) => c.charCodeAt(0)));
      }
    });
    term.onResize(({ cols, rows }) => {
      if (socket && socket.readyState === WebSocket.OPEN) {
        socket.send(JSON.stringify({ resize: [cols, rows] }));
      }
    });
    say("connecting");
  });
}
