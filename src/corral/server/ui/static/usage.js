// Redraws the sandbox page's usage charts (corral /ui). Reads only
// /ui/sandboxes/{id}/usage.json from this server; writes only attributes and
// textContent of the charts the server drew (no HTML is ever parsed here).
"use strict";
(function () {
  const section = document.getElementById("usage");
  if (!section) return;
  const src = section.dataset.src;
  const EVERY_MS = 2000;

  function draw(data) {
    for (const chart of data.charts) {
      const figure = document.getElementById("usage-" + chart.name);
      if (!figure) continue;
      figure.querySelector("polyline").setAttribute("points", chart.points);
      figure.querySelector(".value").textContent = chart.label;
      figure.querySelector(".limit").textContent = "of " + chart.limit;
      figure.dataset.last = chart.last === null ? "" : String(chart.last);
    }
    section.dataset.state = data.state;
  }

  async function tick() {
    try {
      const reply = await fetch(src, { credentials: "same-origin", cache: "no-store" });
      if (!reply.ok) return; // logged out, or the sandbox is gone: keep the last picture
      const data = await reply.json();
      draw(data);
      if (data.state !== "running") return; // its series stopped: nothing more to draw
    } catch (_err) {
      // the server restarts or the network blips: try again at the next tick
    }
    setTimeout(tick, EVERY_MS);
  }
  if (section.dataset.state === "running") setTimeout(tick, EVERY_MS);
})();
