// vmweb: keeps a page current without reloading it while clusters come up.
// Polls /state.json (same origin, the session cookie) and puts each value into the element with
// that data-k key (textContent only: nothing from the server becomes markup here). When the
// page's structure changed (a cluster or VM came or went), it fetches the page again and swaps
// the #live part (same query: a view's filter), unless the user is typing in it.
(function () {
  "use strict";
  // The search form of a view filters on the server (it works without this script); choosing
  // an owner, a host or a state applies it at once.
  var filter = document.getElementById("filter");
  if (filter) {
    filter.addEventListener("change", function (e) {
      if (e.target.tagName === "SELECT") { filter.submit(); }
    });
  }
  var url = document.body.getAttribute("data-live");
  if (!url) { return; }
  var busy = false;
  var swapping = false;
  var polls = 0;

  function swap() {
    if (swapping) { return; }
    swapping = true;
    fetch(location.pathname + location.search, {credentials: "same-origin", cache: "no-store",
                              headers: {"X-Vmweb-Partial": "1"}})
      .then(function (r) { return r.ok ? r.text() : null; })
      .then(function (text) {
        if (text === null) { return; }
        var fresh = new DOMParser().parseFromString(text, "text/html").getElementById("live");
        var live = document.getElementById("live");
        var active = document.activeElement;
        if (!fresh || !live) { return; }
        if (active && active !== document.body && live.contains(active) &&
            (active.tagName === "INPUT" || active.tagName === "SELECT")) { return; }
        live.replaceWith(document.importNode(fresh, true));
      })
      .catch(function () {})
      .then(function () { swapping = false; });
  }

  function apply(state) {
    var cells = state.cells || {};
    document.querySelectorAll("[data-k]").forEach(function (e) {
      var v = cells[e.getAttribute("data-k")];
      if (v === undefined) { return; }
      if (e.textContent !== v) { e.textContent = v; }
      if (e.hasAttribute("data-state")) { e.setAttribute("data-state", v); }
    });
    document.querySelectorAll("[data-w]").forEach(function (e) {
      var v = cells[e.getAttribute("data-w")];
      if (v !== undefined && e.className !== v) { e.className = v; }
    });
    var live = document.getElementById("live");
    if (live && state.shape && live.getAttribute("data-shape") !== state.shape) { swap(); }
  }

  function tick() {
    if (busy) { return; }
    busy = true;
    fetch(url, {credentials: "same-origin", cache: "no-store"})
      .then(function (r) {
        if (r.status === 401) { location.assign("/login"); return null; }
        return r.ok ? r.json() : null;
      })
      .then(function (state) { if (state) { apply(state); } })
      .catch(function () {})
      .then(function () {
        busy = false;
        polls += 1;
        document.body.setAttribute("data-polls", String(polls));
      });
  }

  setInterval(tick, 1000);
  tick();
}());
