// phalanx run report: draws each stage's timeline with plotly.js and pages through the
// instance tables. Everything it shows comes from the JSON model embedded in the page; the
// numbers were computed by phalanx, this script only lays them out.
(function () {
  "use strict";
  const began = performance.now();
  const model = JSON.parse(document.getElementById("phalanx-data").textContent);
  const COLOURS = {
    committed: "#2e7d32",
    retried: "#f0a500",
    failed: "#c62828",
    superseded: "#9e9e9e",
    interrupted: "#7b1fa2",
    running: "#1565c0",
  };
  const PAGE = 50;

  function seconds(value) {
    if (value < 1) return (value * 1000).toFixed(0) + " ms";
    if (value < 60) return value.toFixed(2) + " s";
    return Math.floor(value / 60) + " min " + (value % 60).toFixed(1) + " s";
  }

  function hover(stage, i) {
    const t = stage.timeline;
    const category = model.categories[t.category[i]];
    return (
      stage.name + " / " + t.keys[t.key[i]] + "<br>attempt " + t.attempt[i] +
      (t.backup[i] ? " (speculative backup)" : "") + " · " + category + "<br>" +
      seconds(t.duration[i]) + " from " + seconds(t.start[i])
    );
  }

  // One bar per attempt: a horizontal bar trace per category, one element per bar.
  function barTraces(stage) {
    const t = stage.timeline;
    return model.categories.map(function (category, c) {
      const picked = [];
      for (let i = 0; i < t.category.length; i++) if (t.category[i] === c) picked.push(i);
      return {
        type: "bar",
        orientation: "h",
        name: category + " (" + picked.length + ")",
        base: picked.map((i) => t.start[i]),
        x: picked.map((i) => Math.max(t.duration[i], 0.0005)),
        y: picked.map((i) => t.lane[i]),
        text: picked.map((i) => hover(stage, i)),
        textposition: "none",
        hovertemplate: "%{text}<extra></extra>",
        width: 0.8,
        marker: {
          color: COLOURS[category],
          line: { color: picked.map((i) => (t.backup[i] ? "#111" : COLOURS[category])),
                  width: picked.map((i) => (t.backup[i] ? 1.5 : 0)) },
          pattern: { shape: picked.map((i) => (t.backup[i] ? "/" : "")) },
        },
        visible: picked.length ? true : "legendonly",
        showlegend: picked.length > 0,
      };
    });
  }

  // Many attempts: the slots are drawn as one picture (a heatmap of slot by time, each cell
  // coloured by the attempt that held the slot then), so the page holds a handful of
  // elements however many attempts there were. Hovering a cell names its attempt.
  const COLUMNS = 1200;
  function compactTraces(stage, lanes) {
    const t = stage.timeline;
    const step = Math.max(model.run.wall_s, 0.001) / COLUMNS;
    const z = [], text = [];
    for (let lane = 0; lane < lanes; lane++) {
      z.push(new Array(COLUMNS).fill(null));
      text.push(new Array(COLUMNS).fill(""));
    }
    const counts = model.categories.map(() => 0);
    for (let i = 0; i < t.category.length; i++) {
      counts[t.category[i]]++;
      const first = Math.min(COLUMNS - 1, Math.floor(t.start[i] / step));
      const last = Math.min(COLUMNS - 1, Math.max(first, Math.ceil((t.start[i] + t.duration[i]) / step) - 1));
      const label = hover(stage, i);
      for (let column = first; column <= last; column++) {
        // Where two attempts share a cell, the one that did not commit shows.
        const held = z[t.lane[i]][column];
        if (held === null || held === 0) {
          z[t.lane[i]][column] = t.category[i];
          text[t.lane[i]][column] = label;
        }
      }
    }
    const n = model.categories.length;
    const scale = [];
    model.categories.forEach(function (category, c) {
      scale.push([c / n, COLOURS[category]], [(c + 1) / n, COLOURS[category]]);
    });
    const traces = [{
      type: "heatmap",
      z: z,
      text: text,
      x0: step / 2,
      dx: step,
      y0: 0,
      dy: 1,
      zmin: -0.5,
      zmax: n - 0.5,
      colorscale: scale,
      showscale: false,
      hoverongaps: false,
      hovertemplate: "%{text}<extra></extra>",
      showlegend: false,
    }];
    // The legend: one entry per category, with how many attempts it holds.
    model.categories.forEach(function (category, c) {
      if (!counts[c]) return;
      traces.push({ type: "scatter", mode: "markers", x: [null], y: [null],
                    name: category + " (" + counts[c] + ")",
                    marker: { color: COLOURS[category], symbol: "square", size: 10 } });
    });
    return traces;
  }

  function drawTimeline(element, stage) {
    const t = stage.timeline;
    const lanes = Math.max(1, t.lanes);
    const compact = t.mode === "compact";
    const height = compact
      ? Math.min(620, Math.max(220, lanes * 4 + 110))
      : Math.min(700, Math.max(180, lanes * 22 + 110));
    const end = Math.max(model.run.wall_s, 0.001);
    const shapes = [];
    const annotations = [];
    if (stage.ended !== null) {
      shapes.push({ type: "line", xref: "x", yref: "paper", x0: stage.ended, x1: stage.ended,
                    y0: 0, y1: 1, line: { color: "#111", width: 2, dash: "dash" } });
      annotations.push({ x: stage.ended, y: 1, xref: "x", yref: "paper", yanchor: "bottom",
                         xanchor: "right", text: "barrier ", showarrow: false,
                         font: { size: 11 } });
    }
    if (stage.started !== null) {
      shapes.push({ type: "line", xref: "x", yref: "paper", x0: stage.started, x1: stage.started,
                    y0: 0, y1: 1, line: { color: "#8893a2", width: 1, dash: "dot" } });
    }
    const layout = {
      height: height,
      margin: { l: 56, r: 16, t: 36, b: 40 },
      barmode: "overlay",
      bargap: 0.2,
      hovermode: "closest",
      showlegend: true,
      legend: { orientation: "h", y: -0.18 },
      xaxis: { title: { text: "seconds since the run started" }, range: [0, end * 1.01],
               zeroline: false },
      yaxis: { title: { text: "slot" }, autorange: "reversed", zeroline: false,
               range: [lanes - 0.5, -0.5], dtick: lanes > 30 ? undefined : 1 },
      shapes: shapes,
      annotations: annotations,
    };
    const traces = compact ? compactTraces(stage, lanes) : barTraces(stage);
    return Plotly.newPlot(element, traces, layout, { displaylogo: false, responsive: true });
  }

  // The instance table: a page of rows at a time, filtered by key and status.
  function instanceTable(holder, stage) {
    const table = stage.table;
    const order = table.key.map((_, i) => i);
    let shown = order;
    let page = 0;
    holder.innerHTML =
      '<div class="pager"><input type="search" placeholder="filter by key" aria-label="filter">' +
      '<select aria-label="status"><option value="">every status</option>' +
      "<option>committed</option><option>cached</option><option>failed</option>" +
      "<option>skipped</option></select>" +
      '<select aria-label="order"><option value="key">by key</option>' +
      '<option value="slow">slowest first</option></select>' +
      '<button type="button" data-step="-1">previous</button>' +
      '<span class="where"></span><button type="button" data-step="1">next</button></div>' +
      "<table><thead><tr><th>Key</th><th>Status</th><th class='num'>Attempts</th>" +
      "<th class='num'>Time</th><th class='num'>Cost</th><th>Cause or reason</th></tr></thead>" +
      "<tbody></tbody></table>";
    const [filter, status, sort] = holder.querySelectorAll("input, select");
    const body = holder.querySelector("tbody");
    const where = holder.querySelector(".where");

    function cell(text, cls) {
      const td = document.createElement("td");
      td.textContent = text;
      if (cls) td.className = cls;
      return td;
    }

    function draw() {
      const pages = Math.max(1, Math.ceil(shown.length / PAGE));
      page = Math.min(Math.max(page, 0), pages - 1);
      body.replaceChildren();
      for (const i of shown.slice(page * PAGE, (page + 1) * PAGE)) {
        const tr = document.createElement("tr");
        tr.append(
          cell(table.key[i]),
          cell(table.status[i], "status-cell-" + table.status[i]),
          cell(String(table.attempts[i]), "num"),
          cell(seconds(table.duration[i]), "num"),
          cell("$" + table.cost[i].toFixed(4), "num"),
          cell(table.why[i]),
        );
        body.append(tr);
      }
      where.textContent =
        "page " + (page + 1) + " of " + pages + " · " + shown.length + " of " + order.length;
    }

    function refilter() {
      const text = filter.value.toLowerCase();
      const wanted = status.value;
      shown = order.filter(
        (i) => (!wanted || table.status[i] === wanted) &&
               (!text || table.key[i].toLowerCase().includes(text)),
      );
      if (sort.value === "slow") shown.sort((a, b) => table.duration[b] - table.duration[a]);
      page = 0;
      draw();
    }

    filter.addEventListener("input", refilter);
    status.addEventListener("change", refilter);
    sort.addEventListener("change", refilter);
    holder.querySelectorAll("button").forEach((button) =>
      button.addEventListener("click", function () {
        page += Number(button.dataset.step);
        draw();
      }),
    );
    draw();
  }

  const drawing = [];
  model.stages.forEach(function (stage, index) {
    const element = document.getElementById("timeline-" + index);
    if (element) drawing.push(drawTimeline(element, stage));
    const holder = document.querySelector('.instances[data-stage-index="' + index + '"]');
    if (holder) instanceTable(holder, stage);
  });
  Promise.all(drawing).then(
    function () {
      document.documentElement.dataset.renderMs = String(Math.round(performance.now() - began));
      document.documentElement.dataset.ready = "1";
    },
    function (error) {
      document.documentElement.dataset.ready = "error";
      document.documentElement.dataset.error = String(error);
    },
  );
})();
