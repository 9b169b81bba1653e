// The dashboard's only script. Without it every page still works (reload to refresh);
// with it, times read in the viewer's own time zone and pages follow the event stream.
"use strict";

(function () {
  const STREAM = "/api/update-pipeline/events/stream";
  const MAX_DELAY_MS = 30000;
  // Heartbeats publish no event, so a stage's numbers are fetched now and then as well.
  const POLL_MS = 30000;

  function localTimes(root) {
    const format = new Intl.DateTimeFormat(undefined, { dateStyle: "medium", timeStyle: "short" });
    for (const node of root.querySelectorAll("time[datetime]")) {
      const moment = new Date(node.getAttribute("datetime"));
      if (!Number.isNaN(moment.getTime())) node.textContent = format.format(moment);
    }
  }

  function say(text) {
    const status = document.getElementById("live-status");
    if (status && status.textContent !== text) status.textContent = text;
  }

  let refreshing = false;
  let again = false;

  // Fetch this page again and swap in the sections that changed; the rest (and where
  // the keyboard focus is, unless inside a replaced section) stays as it is.
  async function refresh() {
    if (refreshing) { again = true; return; }
    refreshing = true;
    try {
      const response = await fetch(location.pathname + location.search, {
        cache: "no-store", credentials: "same-origin", headers: { Accept: "text/html" },
      });
      if (response.redirected || response.status === 401 || response.status === 403) {
        say("Signed out: reload the page to sign in again.");
        stop();
        return;
      }
      if (!response.ok) return;
      const fresh = new DOMParser().parseFromString(await response.text(), "text/html");
      for (const incoming of fresh.querySelectorAll("[data-live][id]")) {
        const current = document.getElementById(incoming.id);
        if (!current || current.innerHTML === incoming.innerHTML) continue;
        const focused = document.activeElement;
        const refocus = focused && current.contains(focused) && focused.id ? focused.id : null;
        current.innerHTML = incoming.innerHTML;
        localTimes(current);
        if (refocus) document.getElementById(refocus)?.focus();
      }
      const now = new Intl.DateTimeFormat(undefined, { timeStyle: "medium" }).format(new Date());
      say(`Live: updated ${now}`);
    } catch (error) {
      // A failed fetch is retried on the next event or poll.
    } finally {
      refreshing = false;
      if (again) { again = false; refresh(); }
    }
  }

  let source = null;
  let delay = 1000;
  let retryTimer = null;
  let pollTimer = null;
  let pending = null;

  function soon() {
    clearTimeout(pending);
    pending = setTimeout(refresh, 200);
  }

  function connect(events) {
    source = new EventSource(STREAM);
    source.addEventListener("open", () => {
      delay = 1000;
      say("Live");
      soon(); // whatever happened while disconnected
    });
    for (const name of events) source.addEventListener(name, soon);
    source.addEventListener("error", () => {
      // The browser's own retry would hide the outage; ours backs off and says so.
      source.close();
      say(`Reconnecting… (next try in ${Math.round(delay / 1000)} s)`);
      retryTimer = setTimeout(() => connect(events), delay);
      delay = Math.min(delay * 2, MAX_DELAY_MS);
    });
  }

  function stop() {
    if (source) source.close();
    clearTimeout(retryTimer);
    clearInterval(pollTimer);
  }

  document.addEventListener("DOMContentLoaded", () => {
    localTimes(document);
    const events = (document.body.dataset.liveEvents || "").split(" ").filter(Boolean);
    if (events.length === 0 || !("EventSource" in window)) return;
    connect(events);
    pollTimer = setInterval(refresh, POLL_MS);
  });
})();
