// vmweb: a host's charts drawn with uPlot (static/uPlot.iife.min.js, MIT, its licence in
// static/uPlot.LICENSE.txt). The page already shows each chart as an SVG drawn by the server;
// this script fetches the same samples from the section's data-history URL, draws each series with
// uPlot in place of that SVG (hover shows a sample's time and value), and fetches again every 30 s.
// Without uPlot or without an answer the server's SVG stays. Values reach the page as text only.
(function () {
  "use strict";
  var section = document.getElementById("history");
  if (!section || typeof uPlot !== "function") { return; }
  var url = section.getAttribute("data-history");
  var figures = Array.prototype.slice.call(section.querySelectorAll("figure.chart"));
  var COLUMN = {load: 1, mem: 2, vms: 3};
  var COLOR = {load: "#1f5fbf", mem: "#7c3aed", vms: "#1b7f3b"};
  var FILL = {load: "rgba(31,95,191,.12)", mem: "rgba(124,58,237,.12)", vms: "rgba(27,127,59,.12)"};
  var plots = {};
  var busy = false;

  // Memory is drawn in GiB (ticks at whole GiB), shown in MiB below 1 GiB; times in UTC, as the
  // rest of the pages and the server's SVG.
  function fmt(unit, v) {
    if (v === null || v === undefined) { return "–"; }
    if (v === 0) { return "0"; }
    if (unit === "MiB") { return v >= 1 ? (Math.round(v * 10) / 10) + " GiB" : Math.round(v * 1024) + " MiB"; }
    return String(Math.round(v * 100) / 100);
  }

  function hhmm(t, seconds) {
    return new Date(t * 1000).toISOString().slice(11, seconds ? 19 : 16);
  }

  function width(fig) {
    return Math.max(200, fig.clientWidth - 2);
  }

  function draw(samples) {
    var times = samples.map(function (s) { return s[0]; });
    figures.forEach(function (fig) {
      var key = fig.getAttribute("data-series");
      var unit = fig.getAttribute("data-unit");
      var scale = unit === "MiB" ? 1024 : 1;
      var ymax = (parseFloat(fig.getAttribute("data-ymax")) || 1) / scale;
      var values = samples.map(function (s) { return s[COLUMN[key]] / scale; });
      var last = fig.querySelector("[data-last]");
      if (last) { last.textContent = values.length ? fmt(unit, values[values.length - 1]) : "–"; }
      if (!times.length) { return; }
      var data = [times, values];
      if (plots[key]) { plots[key].setData(data); return; }
      var opts = {
        width: width(fig), height: 150,
        legend: {show: true, live: true},
        cursor: {drag: {x: false, y: false}},
        scales: {x: {time: true}, y: {range: function (u, lo, hi) { return [0, Math.max(ymax, hi)]; }}},
        axes: [{values: function (u, ticks) { return ticks.map(function (t) { return hhmm(t, false); }); }},
               {size: 64, values: function (u, ticks) { return ticks.map(function (v) { return fmt(unit, v); }); }}],
        series: [{label: "UTC", value: function (u, t) { return t === null ? "–" : hhmm(t, true); }},
                 {label: fig.querySelector("figcaption").firstChild.textContent.trim(),
                      stroke: COLOR[key], fill: FILL[key], width: 2, points: {show: false},
                      value: function (u, v) { return fmt(unit, v); }}]
      };
      var target = fig.querySelector(".chart-js");
      plots[key] = new uPlot(opts, data, target);
      fig.classList.add("drawn");
    });
    section.setAttribute("data-drawn", String(times.length));
  }

  function load() {
    if (busy) { return; }
    busy = true;
    fetch(url, {credentials: "same-origin", cache: "no-store"})
      .then(function (r) { return r.ok ? r.json() : null; })
      .then(function (doc) { if (doc && doc.samples) { draw(doc.samples); } })
      .catch(function () {})
      .then(function () { busy = false; });
  }

  window.addEventListener("resize", function () {
    figures.forEach(function (fig) {
      var p = plots[fig.getAttribute("data-series")];
      if (p) { p.setSize({width: width(fig), height: 150}); }
    });
  });
  load();
  setInterval(load, 30000);
}());
