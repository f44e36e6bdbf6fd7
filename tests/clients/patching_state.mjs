#!/usr/bin/env node
// README "Patching events": the browser snippet that keeps the current state of every event, run
// under the npm `eventsource` package (WhatWG-compliant) for test_patching.py.
//
// usage: node patching_state.mjs URL [--header 'Name: value']... --count N [--timeout SECONDS]
//
// After N frames with an id (events and patches), prints the state as one JSON object
// {"<SSE id of an event>": <its current payload>, ...} and exits 0; exit 2 on timeout.

import {EventSource} from 'eventsource';

const headers = {};
let count = 0;
let timeout = 30;
let url = null;
const argv = process.argv.slice(2);
for (let i = 0; i < argv.length; i++) {
  if (argv[i] === '--header') {
    const h = argv[++i];
    const colon = h.indexOf(':');
    headers[h.slice(0, colon).trim()] = h.slice(colon + 1).trim();
  } else if (argv[i] === '--count') {
    count = Number(argv[++i]);
  } else if (argv[i] === '--timeout') {
    timeout = Number(argv[++i]);
  } else {
    url = argv[i];
  }
}

// --- the README snippet, as a page would have it (the URL and headers come from the test) ---
const events = new Map(); // SSE id of an event -> its current payload
function mergePatch(target, patch) {                          // RFC 7396
  if (patch === null || typeof patch !== 'object' || Array.isArray(patch)) return patch;
  const out = (target && typeof target === 'object' && !Array.isArray(target)) ? {...target} : {};
  for (const [k, v] of Object.entries(patch)) {
    if (v === null) delete out[k]; else out[k] = mergePatch(out[k], v);
  }
  return out;
}
function put(id, value) { if (value === null) events.delete(id); else events.set(id, value); }
const es = new EventSource(url, {
  fetch: (input, init) => fetch(input, {...init, headers: {...(init.headers || {}), ...headers}}),
});
es.addEventListener('order', e => put(e.lastEventId, JSON.parse(e.data)));  // each type you send
es.addEventListener('patch', e => {
  const m = JSON.parse(e.data), id = String(m.target);
  put(id, 'state' in m ? m.state : mergePatch(events.get(id), m.patch));
});
// --- end of the snippet ---

let seen = 0;
const done = () => {
  if (++seen < count) return;
  es.close();
  process.stdout.write(JSON.stringify(Object.fromEntries(events)) + '\n');
  process.exit(0);
};
es.addEventListener('order', done);
es.addEventListener('patch', done);
setTimeout(() => { es.close(); process.stderr.write('timeout\n'); process.exit(2); },
           timeout * 1000);
