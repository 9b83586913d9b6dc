"use strict";
// The UI's few behaviours: draw the figures the server embedded, refresh a live run's charts,
// enable "Compare" once runs are picked. Figures are plotly JSON built on the server (charts.py).
const flordb = (() => {
  const REFRESH_MS = 1000;

  function embeddedFigures() {
    const el = document.getElementById("figures");
    return el ? JSON.parse(el.textContent) : {};
  }

  // Per run: how many points the figure stands for (before downsampling), recorded and replayed.
  function pointsOf(fig) {
    const out = {};
    for (const trace of fig.data) {
      const id = trace.meta && trace.meta.run_id;
      if (id) out[id] = (out[id] || 0) + trace.meta.points;
    }
    return out;
  }

  function draw(div, fig) {
    Plotly.react(div, fig.data, fig.layout, {responsive: true, displaylogo: false});
    div.dataset.points = JSON.stringify(pointsOf(fig));
    div.dataset.shown = String(fig.data.reduce((n, t) => n + t.x.length, 0));
  }

  function drawFigures(figures) {
    const box = document.getElementById("charts");
    if (!box) return;
    for (const [name, fig] of Object.entries(figures || embeddedFigures())) {
      let div = box.querySelector(`.chart[data-name="${CSS.escape(name)}"]`);
      if (!div) {
        div = document.createElement("div");
        div.className = "chart";
        div.dataset.name = name;
        box.appendChild(div);
      }
      draw(div, fig);
    }
  }

  function runPage() {
    drawFigures();
    const body = document.body;
    if (body.dataset.live !== "1") return;
    let refreshes = 0;
    const tick = async () => {
      try {
        const response = await fetch(`/api/run/${body.dataset.run}/figures`, {cache: "no-store"});
        if (response.ok) {
          const update = await response.json();
          drawFigures(update.figures);
          refreshes += 1;
          body.dataset.refreshes = String(refreshes);
          const status = document.getElementById("status");
          status.textContent = update.status;
          status.className = "status " + update.status;
          if (update.status !== "running") {
            body.dataset.live = "0";
            return;
          }
        }
      } catch (error) {
        // The server is restarting or gone for a moment: the next tick tries again.
      }
      setTimeout(tick, REFRESH_MS);
    };
    setTimeout(tick, REFRESH_MS);
  }

  function pickRuns() {
    const boxes = [...document.querySelectorAll("input.pick")];
    const button = document.getElementById("compare");
    const update = () => { button.disabled = boxes.filter((b) => b.checked).length < 2; };
    boxes.forEach((b) => b.addEventListener("change", update));
    update();
  }

  return {drawFigures, runPage, pickRuns};
})();
