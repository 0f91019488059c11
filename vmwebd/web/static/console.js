// vmweb: a VM's serial console in the page (the console tab, /vm/CLUSTER/VM/console).
// xterm.js draws the terminal; the bytes come over the WebSocket named by data-console (same
// origin, the session cookie) and go only to term.write: nothing the guest prints becomes
// markup. Binary messages are the console's output, text messages events
// {"event": "ready"|"error"|"end", "message"}; keys go back as text messages of at most
// 16 KiB (a paste in pieces). A dropped connection reconnects; the host replays the last
// 64 KiB the console printed, so the screen is cleared before each connection.
(function () {
  "use strict";
  var box = document.getElementById("console");
  if (!box) { return; }
  var status = document.getElementById("console-status");
  var again = document.getElementById("console-reconnect");
  var PIECE = 16384;
  var MAX_BUFFERED = 1 << 20;
  var MAX_ATTEMPTS = 8;     // connections in a row that never got "ready": then the button

  function say(text, kind) {
    status.textContent = text;
    status.className = "console-status" + (kind ? " " + kind : "");
  }

  if (typeof Terminal === "undefined") {
    say("The terminal (static/xterm.js) did not load; from a shell: vmweb vm console " +
        box.getAttribute("data-vm").replace("/", " "), "error");
    return;
  }
  // xterm.js adds <style> elements; the page's Content-Security-Policy allows those that carry
  // this response's nonce, which is stamped on them as they are made.
  var nonce = box.getAttribute("data-style-nonce");
  var make = document.createElement.bind(document);
  document.createElement = function (name, options) {
    var e = make(name, options);
    if (nonce && String(name).toLowerCase() === "style") { e.setAttribute("nonce", nonce); }
    return e;
  };

  var term = new Terminal({cols: 80, rows: 24, cursorBlink: true, scrollback: 5000,
                           fontFamily: '"DejaVu Sans Mono", ui-monospace, monospace', fontSize: 14});
  term.open(box);
  var ws = null;
  var ready = false;
  var refused = false;
  var delay = 1000;
  var timer = null;
  var attempts = 0;

  function connect() {
    timer = null;
    refused = false;
    ready = false;
    again.hidden = true;
    var url = (location.protocol === "https:" ? "wss://" : "ws://") + location.host +
              box.getAttribute("data-console");
    say("Connecting to the console of " + box.getAttribute("data-vm") + "…");
    term.reset();
    ws = new WebSocket(url);
    ws.binaryType = "arraybuffer";
    ws.onmessage = function (m) {
      if (typeof m.data !== "string") {
        term.write(new Uint8Array(m.data));
        return;
      }
      var ev;
      try { ev = JSON.parse(m.data); } catch (e) { return; }
      if (ev.event === "ready") {
        ready = true;
        delay = 1000;
        attempts = 0;
        say("Connected to " + box.getAttribute("data-vm") + ": keys go to the VM.", "ok");
        term.focus();
      } else if (ev.event === "error") {
        refused = true;
        say(ev.message, "error");
        again.hidden = false;
      } else if (ev.event === "end") {
        say(ev.message + " Reconnecting…", "warn");
      }
    };
    ws.onclose = function () {
      ready = false;
      if (refused) { return; }
      attempts += 1;
      if (attempts >= MAX_ATTEMPTS) {
        say("The console could not be reached " + attempts + " times in a row; try again later.", "error");
        again.hidden = false;
        return;
      }
      if (!status.classList.contains("warn")) { say("The connection was lost. Reconnecting…", "warn"); }
      timer = setTimeout(connect, delay);
      delay = Math.min(delay * 2, 15000);
    };
  }

  term.onData(function (data) {
    if (!ws || ws.readyState !== 1 || !ready) { return; }
    if (ws.bufferedAmount > MAX_BUFFERED) {
      say("That paste is larger than the connection can take at once; part of it was not sent.", "warn");
      return;
    }
    for (var i = 0; i < data.length; i += PIECE) { ws.send(data.slice(i, i + PIECE)); }
  });
  again.addEventListener("click", function () {
    attempts = 0;
    if (timer) { clearTimeout(timer); }
    if (ws) { ws.onclose = null; ws.close(); }
    connect();
  });
  connect();
}());
