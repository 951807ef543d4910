// The status page: polls /api/v1/status every few seconds and redraws the tables.
// Everything from the node is put in with textContent, never as markup.
"use strict";

const POLL_MS = 3000;
const token = new URLSearchParams(location.search).get("token");

function ago(nowMs, thenMs) {
  if (thenMs === null || thenMs === undefined) return "never";
  const s = Math.max(0, Math.round((nowMs - thenMs) / 1000));
  if (s < 60) return s + "s ago";
  if (s < 3600) return Math.floor(s / 60) + "m " + (s % 60) + "s ago";
  if (s < 86400) return Math.floor(s / 3600) + "h " + Math.floor((s % 3600) / 60) + "m ago";
  return Math.floor(s / 86400) + "d " + Math.floor((s % 86400) / 3600) + "h ago";
}

function span(ms) {
  if (ms === null || ms === undefined) return "unknown";
  return ago(ms, 0).replace(" ago", "");
}

function bytes(n) {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let u = 0;
  while (n >= 1024 && u + 1 < units.length) { n /= 1024; u++; }
  return (u === 0 ? n : n.toFixed(1)) + " " + units[u];
}

function utc(ms) {
  return new Date(ms).toISOString().replace("T", " ").slice(0, 19) + " UTC";
}

function row(tbody, cells, attrs) {
  const tr = document.createElement("tr");
  for (const [text, cls] of cells) {
    const td = document.createElement("td");
    td.textContent = text;
    if (cls) td.className = cls;
    tr.appendChild(td);
  }
  for (const [k, v] of Object.entries(attrs || {})) tr.setAttribute(k, v);
  tbody.appendChild(tr);
}

function fill(id) {
  const tbody = document.querySelector("#" + id + " tbody");
  tbody.textContent = "";
  return tbody;
}

function draw(facts) {
  const status = facts.status, report = facts.report, now = status.now_unix_ms;
  document.getElementById("site").textContent = status.site_name;
  const images = fill("images");
  for (const image of report.images) {
    const live = status.images.find((i) => i.image === image.image) || {};
    const below = image.sites_with_newest < image.replication_target;
    const repair = live.copy_bytes_target
      ? Math.floor((1000 * live.copy_bytes_done) / live.copy_bytes_target) / 10 + "% of copies in place"
      : "-";
    const perSite = image.copies.map((c) => c.site_name + " " + bytes(c.bytes)).join(", ");
    const drill = image.last_drill
      ? utc(image.last_drill.when_unix_ms) + (image.last_drill.passed ? " passed" : " failed")
      : "no drill recorded";
    row(images, [
      [image.image, "name"],
      [image.newest_snapshot_unix_ms ? utc(image.newest_snapshot_unix_ms) : "none yet"],
      [span(image.rpo_ms) + " (" + image.rpo_compliance + ")"],
      [image.sites_with_newest + " of " + image.replication_target + " sites", below ? "copies below" : "copies ok"],
      [perSite || "-"],
      [repair],
      [drill],
    ], { "data-image": image.image });
  }
  const gaps = document.getElementById("gaps");
  gaps.textContent = "";
  for (const gap of report.gaps) {
    const li = document.createElement("li");
    li.textContent = gap;
    gaps.appendChild(li);
  }
  const peers = fill("peers");
  for (const peer of status.peers) {
    const rate = (status.fetch_rates || []).find((r) => r.site_id === peer.site_id);
    row(peers, [
      [peer.site_name],
      [peer.node_id.slice(0, 7)],
      [peer.state, peer.state === "live" ? "ok" : "below"],
      [ago(now, peer.last_seen_unix_ms)],
      [rate ? bytes(rate.bytes_per_sec) + "/s" : "not measured"],
    ]);
  }
  const jobs = fill("jobs");
  for (const job of status.jobs) {
    const last = job.last_run;
    row(jobs, [
      [job.image],
      [job.schedule],
      [last ? utc(last.start_unix_ms) : "never"],
      [last ? last.result : "-"],
      [job.running_since_unix_ms ? "running" : job.next_run_unix_ms ? utc(job.next_run_unix_ms) : "-"],
    ]);
  }
  const updated = document.getElementById("updated");
  updated.textContent = "updated " + utc(now);
  updated.className = "";
}

async function poll() {
  try {
    const headers = token ? { Authorization: "Bearer " + token } : {};
    const answer = await fetch("api/v1/status", { headers, cache: "no-store" });
    if (!answer.ok) throw new Error(await answer.text());
    draw(await answer.json());
  } catch (e) {
    const updated = document.getElementById("updated");
    updated.textContent = "cannot reach the node: " + e.message;
    updated.className = "stale";
  }
  setTimeout(poll, POLL_MS);
}

poll();
