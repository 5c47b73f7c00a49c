// Ramp's own small script: the browser's time zone for the server, confirmation dialogs, ticking
// "time in step" clocks, keeping live regions calm while someone reads or confirms, and the rollout
// charts (Chart.js from npm, data from the page and the series endpoint).
(function () {
  "use strict";

  // Remember the browser's time zone so the server renders times in it (config/timezone.py).
  try {
    var tz = Intl.DateTimeFormat().resolvedOptions().timeZone;
    // Zone names (Europe/Paris, Etc/GMT+5) are cookie-safe as they are; the server reads them verbatim.
    if (tz && /^[A-Za-z0-9_+\-\/]+$/.test(tz) && ("; " + document.cookie + ";").indexOf("; tz=" + tz + ";") === -1) {
      document.cookie = "tz=" + tz + "; path=/; max-age=31536000; samesite=lax";
    }
  } catch (e) { /* very old browsers: times stay in UTC */ }

  // --- elapsed clocks ----------------------------------------------------------------------------
  function elapsedText(seconds) {
    seconds = Math.max(0, Math.floor(seconds));
    if (seconds < 60) return seconds + " s";
    if (seconds < 3600) return Math.floor(seconds / 60) + " min " + String(seconds % 60).padStart(2, "0") + " s";
    if (seconds < 86400) return Math.floor(seconds / 3600) + " h " + String(Math.floor(seconds % 3600 / 60)).padStart(2, "0") + " min";
    return Math.floor(seconds / 86400) + " d " + Math.floor(seconds % 86400 / 3600) + " h";
  }
  function tickClocks() {
    var now = Date.now();
    document.querySelectorAll("time[data-elapsed-since]").forEach(function (el) {
      var t = Date.parse(el.getAttribute("datetime"));
      if (!isNaN(t)) {
        el.textContent = elapsedText((now - t) / 1000);
        el.title = "since " + new Date(t).toLocaleString();
      }
    });
  }

  // --- confirmation dialogs ----------------------------------------------------------------------
  document.addEventListener("click", function (event) {
    var opener = event.target.closest("[data-open-dialog]");
    if (opener) {
      var dialog = document.getElementById(opener.getAttribute("data-open-dialog"));
      if (dialog && typeof dialog.showModal === "function") {
        dialog.showModal();
        var first = dialog.querySelector("textarea, input:not([type=hidden]), button");
        if (first) first.focus();
      }
      return;
    }
    var closer = event.target.closest("[data-close-dialog]");
    if (closer) {
      var open = closer.closest("dialog");
      if (open) open.close();
    }
  });
  // The account menu closes on a click elsewhere or on Escape, like any menu.
  document.addEventListener("click", function (event) {
    document.querySelectorAll("details.account-menu[open]").forEach(function (menu) {
      if (!menu.contains(event.target)) menu.open = false;
    });
  });
  document.addEventListener("keydown", function (event) {
    if (event.key !== "Escape") return;
    document.querySelectorAll("details.account-menu[open]").forEach(function (menu) {
      menu.open = false;
      var summary = menu.querySelector("summary");
      if (summary) summary.focus();
    });
  });
  // One click, one request: a second click while the first POST is on its way does nothing.
  document.addEventListener("submit", function (event) {
    var form = event.target;
    if (form.closest("dialog")) {
      form.querySelectorAll("button[type=submit]").forEach(function (b) { b.disabled = true; });
    }
  });

  // --- live regions ------------------------------------------------------------------------------
  var openDetails = [];
  document.addEventListener("htmx:beforeRequest", function (event) {
    var elt = event.detail && event.detail.elt;
    // Nothing is swapped under an open confirmation or an open account menu.
    if (elt && elt.classList && elt.classList.contains("live") && document.querySelector("dialog[open]")) {
      event.preventDefault();
    }
  });
  document.addEventListener("htmx:beforeSwap", function (event) {
    var target = event.detail && event.detail.target;
    // A poll that left before a dialog opened must not replace the dialog under the person's hands.
    if (target && target.querySelector && target.querySelector("dialog[open]")) {
      event.detail.shouldSwap = false;
      return;
    }
    openDetails = target ? Array.prototype.map.call(target.querySelectorAll("details[open][id]"), function (d) { return d.id; }) : [];
  });
  document.addEventListener("htmx:afterSettle", function () {
    openDetails.forEach(function (id) {
      var d = document.getElementById(id);
      if (d) d.open = true;
    });
    openDetails = [];
    tickClocks();
    refreshCharts();
  });

  // --- charts ------------------------------------------------------------------------------------
  var COLORS = { baseline: "#5b6b8c", candidate: "#d9700b" };
  var DECISION = { safe: "#23a152", win: "#23a152", breach: "#d63a2f", loss: "#d63a2f", undecided: "#e39a14" };
  var state = { looks: [], charts: [], checkCharts: [], url: null, loading: false };

  function label(look) {
    return new Date(look.t).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: "2-digit" });
  }

  function armChart(canvas) {
    var keys = canvas.getAttribute("data-arm-chart").split(",");
    var datasets = [];
    keys.forEach(function (key, i) {
      ["baseline", "candidate"].forEach(function (arm) {
        datasets.push({
          label: arm + (keys.length > 1 ? " " + key.split("_")[1] : ""),
          data: [], borderColor: COLORS[arm], backgroundColor: COLORS[arm], borderWidth: 2, pointRadius: 0,
          borderDash: i > 0 ? [6, 4] : [], tension: 0.15, spanGaps: false,
          _arm: arm, _key: key
        });
      });
    });
    return new window.Chart(canvas, {
      type: "line",
      data: { labels: [], datasets: datasets },
      options: baseOptions(canvas.getAttribute("data-unit"))
    });
  }

  function checkChart(canvas) {
    var name = canvas.getAttribute("data-check-chart");
    var type = canvas.getAttribute("data-check-type");
    var thresholdLabel = type === "guardrail" ? "margin" : (type === "primary" ? "no difference" : "limit");
    var chart = new window.Chart(canvas, {
      type: "line",
      data: {
        labels: [],
        datasets: [
          { label: "low", data: [], borderWidth: 0, pointRadius: 0, fill: false, _part: "low" },
          { label: "interval", data: [], borderWidth: 0, pointRadius: 0, fill: "-1", backgroundColor: "rgba(91, 107, 140, 0.22)", _part: "high" },
          { label: "estimate", data: [], borderColor: "#1d2330", borderWidth: 2, pointRadius: 3, pointBackgroundColor: [], pointBorderColor: [], _part: "centre" },
          { label: thresholdLabel, data: [], borderColor: "#b3261e", borderWidth: 2, borderDash: [6, 4], pointRadius: 0, _part: "threshold" }
        ]
      },
      options: baseOptions("")
    });
    chart.options.plugins.legend.labels.filter = function (item) { return item.text !== "low"; };
    chart._checkName = name;
    return chart;
  }

  function baseOptions(unit) {
    return {
      responsive: true, maintainAspectRatio: false, animation: false, normalized: true,
      interaction: { mode: "index", intersect: false },
      scales: {
        x: { ticks: { maxTicksLimit: 6, maxRotation: 0, autoSkip: true } },
        y: { beginAtZero: false, title: { display: !!unit, text: unit } }
      },
      plugins: {
        legend: { position: "bottom", labels: { boxWidth: 14, boxHeight: 2 } },
        tooltip: {
          callbacks: {
            title: function (items) {
              var look = items.length ? state.looks[items[0].dataIndex] : null;
              return look ? label(look) + " · step " + look.step + " · " + look.decision.replace("_", " ") : "";
            }
          }
        }
      }
    };
  }

  function render() {
    var labels = state.looks.map(label);
    state.charts.forEach(function (chart) {
      chart.data.labels = labels;
      chart.data.datasets.forEach(function (ds) {
        ds.data = state.looks.map(function (look) {
          var arm = look.arms[ds._arm] || {};
          var v = arm[ds._key];
          return v === undefined ? null : v;
        });
      });
      chart.update("none");
    });
    state.checkCharts.forEach(function (chart) {
      var name = chart._checkName;
      var unit = "";
      chart.data.labels = labels;
      chart.data.datasets.forEach(function (ds) {
        ds.data = state.looks.map(function (look) {
          var c = look.checks[name];
          if (c && c.unit) unit = c.unit;
          var v = c ? c[ds._part] : null;
          return v === undefined ? null : v;
        });
        if (ds._part === "centre") {
          var colors = state.looks.map(function (look) {
            var c = look.checks[name];
            return DECISION[c && c.decision] || "#9aa3b2";
          });
          ds.pointBackgroundColor = colors;
          ds.pointBorderColor = colors;
          // Dots tell the decision at each look; with many looks they shrink so the band stays readable.
          ds.pointRadius = state.looks.length > 40 ? 1.5 : (state.looks.length > 15 ? 2.5 : 3.5);
        }
      });
      chart.options.scales.y.title = { display: !!unit, text: unit };
      chart.update("none");
    });
    var empty = document.querySelector(".chart-empty");
    if (empty) empty.hidden = state.looks.length > 0;
    var body = document.querySelector(".charts-body");
    if (body) body.hidden = state.looks.length === 0;
  }

  function initCharts() {
    var data = document.getElementById("rollout-series");
    var card = document.querySelector("[data-series-url]");
    if (!data || !card || !window.Chart) return;
    state.url = card.getAttribute("data-series-url");
    state.looks = JSON.parse(data.textContent).looks || [];
    document.querySelectorAll("canvas[data-arm-chart]").forEach(function (c) { state.charts.push(armChart(c)); });
    document.querySelectorAll("canvas[data-check-chart]").forEach(function (c) { state.checkCharts.push(checkChart(c)); });
    render();
  }

  // Called after every live swap: fetch only the looks newer than the last one drawn.
  function refreshCharts() {
    if (!state.url || state.loading) return;
    var status = document.querySelector("[data-latest-look]");
    var latest = status ? parseInt(status.getAttribute("data-latest-look"), 10) : 0;
    var last = state.looks.length ? state.looks[state.looks.length - 1] : null;
    if (!latest || (last && last.id >= latest)) return;
    state.loading = true;
    var url = state.url + (last ? "?since=" + encodeURIComponent(last.t) : "");
    fetch(url, { headers: { Accept: "application/json" }, credentials: "same-origin" })
      .then(function (r) { return r.ok ? r.json() : { looks: [] }; })
      .then(function (payload) {
        var known = {};
        state.looks.forEach(function (l) { known[l.id] = true; });
        (payload.looks || []).forEach(function (l) { if (!known[l.id]) state.looks.push(l); });
        if (state.looks.length > 500) state.looks = state.looks.slice(state.looks.length - 500);
        render();
      })
      .catch(function () { /* the next poll tries again */ })
      .then(function () { state.loading = false; });
  }

  function start() {
    tickClocks();
    setInterval(tickClocks, 1000);
    initCharts();
  }
  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
