#!/usr/bin/env node
// A standard EventSource client (npm `eventsource`, WhatWG-compliant) for the integration tests.
//
// usage: node eventsource_client.mjs URL [--header 'Name: value']... [--type insert]...
//                                        [--count N] [--timeout SECONDS]
//
// Prints one JSON object per line on stdout, in the order things happen:
//   {"kind":"request","n":1,"lastEventId":null}    each HTTP request the client makes (n from 1),
//                                                  with the Last-Event-ID header it sends
//   {"kind":"response","n":1,"status":200}         each response's status
//   {"kind":"open"}                                 the EventSource `open` event
//   {"kind":"event","type":"insert","id":"3","data":"{...}"}   each dispatched event
//   {"kind":"error","readyState":0,"message":"..."} each `error` event (0 = will reconnect)
//   {"kind":"done","events":N}                      N events received: the client closes, exit 0
// Exit status 2 (after a {"kind":"timeout"} line) when --timeout passes first.
// The client never reconnects by hand: reconnection and Last-Event-ID are the library's own.

import {EventSource} from 'eventsource';

function parseArgs(argv) {
  const opts = {url: null, headers: {}, types: [], count: 0, timeout: 60};
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    if (a === '--header') {
      const h = argv[++i];
      const colon = h.indexOf(':');
      if (colon <= 0) throw new Error(`bad --header ${h}`);
      opts.headers[h.slice(0, colon).trim()] = h.slice(colon + 1).trim();
    } else if (a === '--type') {
      opts.types.push(argv[++i]);
    } else if (a === '--count') {
      opts.count = Number(argv[++i]);
    } else if (a === '--timeout') {
      opts.timeout = Number(argv[++i]);
    } else if (!opts.url) {
      opts.url = a;
    } else {
      throw new Error(`unexpected argument ${a}`);
    }
  }
  if (!opts.url) throw new Error('usage: eventsource_client.mjs URL [options]');
  if (opts.types.length === 0) opts.types = ['insert'];
  return opts;
}

const opts = parseArgs(process.argv.slice(2));
// Every line also carries `t`: the wall-clock time in ms (Date.now()) when it happened.
const out = (obj) => process.stdout.write(JSON.stringify({...obj, t: Date.now()}) + '\n');

let requests = 0;
let received = 0;

// The `fetch` option is how eventsource v3+ lets a client add request headers. The wrapper also
// records what the library itself puts in each request (Last-Event-ID on reconnects).
const es = new EventSource(opts.url, {
  fetch: async (input, init) => {
    const n = ++requests;
    const headers = {...(init.headers || {}), ...opts.headers};
    out({kind: 'request', n, lastEventId: headers['Last-Event-ID'] ?? null});
    const response = await fetch(input, {...init, headers});
    out({kind: 'response', n, status: response.status});
    return response;
  },
});

es.addEventListener('open', () => out({kind: 'open'}));
es.addEventListener('error', (e) => {
  out({kind: 'error', readyState: es.readyState, message: e.message ?? null, code: e.code ?? null});
});

function onEvent(e) {
  received++;
  out({kind: 'event', type: e.type, id: e.lastEventId, data: e.data});
  if (opts.count > 0 && received >= opts.count) {
    es.close();
    out({kind: 'done', events: received});
    clearTimeout(timer);
  }
}
for (const t of opts.types) es.addEventListener(t, onEvent);

const timer = setTimeout(() => {
  out({kind: 'timeout', events: received});
  es.close();
  process.exit(2);
}, opts.timeout * 1000);
