// Smoke test of the HTTP contract (shared/API.md) against a running stack: a
// few requests of every endpoint, checking statuses, headers and bodies. Any
// failed check fails the run (thresholds: checks rate==1). Used by CI.
//   k6 run loadtest/smoke.js                  # services on :8080/:8081(/:8082)
//   k6 run -e GATEWAY=1 loadtest/smoke.js     # through the gateway on :8000
//   k6 run -e FLOOR=1 loadtest/smoke.js       # against the floor: happy paths, status only
// RATE (default 1) iterations/s for DURATION (default 2s); each iteration runs every check.
import http from 'k6/http';
import { check as k6check, group } from 'k6';
import {
  arrival, baseOptions, CMD_URL, env, FLOOR, GATEWAY, getById, getList, headers, jget, JSON_HEADERS,
  makePayload, num, postRecord, PROJECTOR_URL, QUERY_URL, summary,
} from './lib/common.js';

const RATE = num('RATE', 1);
export const options = baseOptions(
  { smoke: arrival(RATE, 'smoke', { duration: env('DURATION', '2s'), preAllocatedVUs: 1, maxVUs: num('MAX_VUS', 2) }) },
  [],
  {},
  { checks: ['rate==1'] },
);

// check() whose predicates count as failed when they throw (e.g. on an
// unexpected body shape) instead of aborting the iteration.
function check(val, sets) {
  const safe = {};
  for (const [name, fn] of Object.entries(sets)) {
    safe[name] = (v) => {
      try {
        return !!fn(v);
      } catch (e) {
        return false;
      }
    };
  }
  return k6check(val, safe);
}

const any = { responseCallback: http.expectedStatuses({ min: 200, max: 499 }) };
const UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$/;
const TS = /^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}Z$/;
const BIG = '123456789012345678901234567890';

function hdr(res, name) {
  const want = name.toLowerCase();
  for (const [k, v] of Object.entries(res.headers || {})) if (k.toLowerCase() === want) return v;
  return undefined;
}
const isProblem = (r) => /^application\/problem\+json/.test(hdr(r, 'Content-Type') || '');
const isJson = (r) => /^application\/json/.test(hdr(r, 'Content-Type') || '');
const projSeq = (r) => {
  const v = hdr(r, 'X-Projection-Seq');
  return v !== undefined && /^\d+$/.test(v) ? Number(v) : NaN;
};
function body(res) {
  try {
    return res.json();
  } catch (e) {
    return undefined;
  }
}
const randKind = () => `smoke_${Date.now().toString(36)}_${Math.floor(Math.random() * 1e6)}`;

function ops(base, name, withOpenapi) {
  const h = http.get(`${base}/healthz`, { tags: { name: `${name} /healthz`, ep: 'ops' } });
  check(h, { [`${name} /healthz 200`]: (r) => r.status === 200 });
  const r = http.get(`${base}/readyz`, { tags: { name: `${name} /readyz`, ep: 'ops' } });
  check(r, { [`${name} /readyz 200`]: (x) => x.status === 200 });
  const m = http.get(`${base}/metrics`, { tags: { name: `${name} /metrics`, ep: 'ops' }, responseType: 'text' });
  check(m, { [`${name} /metrics 200 text`]: (x) => x.status === 200 && /^text\/plain/.test(hdr(x, 'Content-Type') || '') });
  if (withOpenapi) {
    const o = http.get(`${base}/openapi.json`, { tags: { name: `${name} /openapi.json`, ep: 'ops' }, responseType: 'text' });
    check(o, { [`${name} /openapi.json is OpenAPI 3`]: (x) => x.status === 200 && /^3\./.test(String(jget(x, 'openapi'))) });
  }
}

function floorSmoke() {
  const w = postRecord({ kind: 'smoke', payload: makePayload() }, { ep: 'write' }, { body: true });
  check(w, { 'floor POST /data 201': (r) => r.status === 201 });
  const b = http.post(`${CMD_URL}/data/batch`, JSON.stringify([{ kind: 'smoke', payload: {} }]), { headers: JSON_HEADERS, tags: { name: 'POST /data/batch', ep: 'batch' } });
  check(b, { 'floor POST /data/batch 201': (r) => r.status === 201 });
  const g = getById(jget(w, 'id') || 'x', { ep: 'read_id' });
  check(g, { 'floor GET /data/{id} 200': (r) => r.status === 200 });
  const l = getList({ limit: 50 }, { ep: 'list' });
  check(l, { 'floor GET /data 200': (r) => r.status === 200 });
}

export function smoke() {
  if (FLOOR) return floorSmoke();
  const kind = randKind();

  group('POST /data', () => {
    const rec = { kind, key: 'smoke-1', payload: { a: 1, s: 'x', big: 0, nested: { b: [1, 2, 3] } } };
    // A 30-digit integer must come back with all its digits.
    const raw = JSON.stringify(rec).replace('"big":0', `"big":${BIG}`);
    const res = postRecord(raw, { ep: 'write' }, { body: true });
    const b = body(res) || {};
    check(res, {
      'POST /data 201': (r) => r.status === 201,
      'POST /data application/json': isJson,
      'POST /data Location /data/{id}': (r) => (hdr(r, 'Location') || '').endsWith(`/data/${b.id}`),
      'POST /data id is UUIDv7': () => UUID.test(b.id || ''),
      'POST /data seq is a positive integer': () => Number.isInteger(b.seq) && b.seq > 0,
      'POST /data echoes kind/key/payload': () => b.kind === kind && b.key === 'smoke-1' && b.payload && b.payload.s === 'x' && b.payload.nested.b.length === 3,
      'POST /data keeps big integers': (r) => r.body.indexOf(BIG) >= 0,
      'POST /data created_at RFC 3339 µs UTC': () => TS.test(b.created_at || ''),
    });
    if (!b.id) return;

    const g = getById(b.id, { ep: 'min_seq' }, { minSeq: b.seq, body: true });
    const gb = body(g) || {};
    check(g, {
      'GET /data/{id}?min_seq 200': (r) => r.status === 200,
      'GET /data/{id} application/json': isJson,
      'GET /data/{id} X-Cache hit|miss': (r) => /^(hit|miss)$/.test(hdr(r, 'X-Cache') || ''),
      'GET /data/{id} X-Projection-Seq >= seq': (r) => projSeq(r) >= b.seq,
      'GET /data/{id} same record': () => gb.id === b.id && gb.seq === b.seq && gb.kind === kind && gb.created_at === b.created_at,
      'GET /data/{id} keeps big integers': (r) => r.body.indexOf(BIG) >= 0,
    });
    const g2 = getById(b.id, { ep: 'read_id' }, { body: true });
    check(g2, {
      'GET /data/{id} again 200': (r) => r.status === 200,
      'GET /data/{id} again X-Cache hit|miss': (r) => /^(hit|miss)$/.test(hdr(r, 'X-Cache') || ''),
      'GET /data/{id} (cache) keeps big integers': (r) => r.body.indexOf(BIG) >= 0,
    });
  });

  let batchItems = [];
  group('POST /data/batch', () => {
    const items = [1, 2, 3].map((i) => ({ kind, key: `smoke-b${i}`, payload: makePayload(64) }));
    const res = http.post(`${CMD_URL}/data/batch`, JSON.stringify(items), { headers: JSON_HEADERS, tags: { name: 'POST /data/batch', ep: 'batch' }, responseType: 'text' });
    const b = body(res) || {};
    batchItems = Array.isArray(b.items) ? b.items : [];
    check(res, {
      'POST /data/batch 201': (r) => r.status === 201,
      'POST /data/batch items in request order': () => batchItems.length === 3 && batchItems.every((it, i) => it.key === `smoke-b${i + 1}` && UUID.test(it.id || '')),
      'POST /data/batch seqs increase': () => batchItems.length === 3 && batchItems[0].seq < batchItems[1].seq && batchItems[1].seq < batchItems[2].seq,
    });
    const bad = [{ kind, payload: {} }, { kind: 'BAD KIND!', payload: {} }, { kind, payload: [] }];
    const r2 = http.post(`${CMD_URL}/data/batch`, JSON.stringify(bad), Object.assign({ headers: JSON_HEADERS, tags: { name: 'POST /data/batch', ep: 'batch' }, responseType: 'text' }, any));
    check(r2, {
      'POST /data/batch invalid element 422': (r) => r.status === 422,
      'POST /data/batch 422 problem+json': isProblem,
      'POST /data/batch 422 names the bad indexes': (r) => /1/.test(JSON.stringify(jget(r, 'errors') || '')) && /2/.test(JSON.stringify(jget(r, 'errors') || '')),
    });
  });

  group('GET /data', () => {
    const last = batchItems.length ? batchItems[batchItems.length - 1].seq : undefined;
    const p1 = getList({ kind, limit: 2, min_seq: last }, { ep: 'list' }, { body: true });
    const b1 = body(p1) || {};
    const items1 = Array.isArray(b1.items) ? b1.items : [];
    check(p1, {
      'GET /data 200': (r) => r.status === 200,
      'GET /data X-Projection-Seq': (r) => Number.isFinite(projSeq(r)),
      'GET /data limit=2 gives 2 items': () => items1.length === 2,
      'GET /data newest first': () => items1.length === 2 && items1[0].seq > items1[1].seq,
      'GET /data kind filter': () => items1.every((it) => it.kind === kind),
      'GET /data next_cursor is a string': () => typeof b1.next_cursor === 'string' && b1.next_cursor.length > 0,
    });
    // Follow the cursor to the end: 4 records of this kind, each exactly once.
    const seen = items1.map((it) => it.id);
    let cursor = b1.next_cursor;
    for (let i = 0; i < 5 && typeof cursor === 'string'; i++) {
      const p = getList({ kind, limit: 2, cursor }, { ep: 'list' }, { body: true });
      const b = body(p) || {};
      check(p, { 'GET /data?cursor 200': (r) => r.status === 200 });
      for (const it of b.items || []) seen.push(it.id);
      cursor = b.next_cursor;
    }
    check(null, {
      'GET /data cursor visits every record once': () => seen.length === 4 && new Set(seen).size === 4,
    });
    const forged = getList({ limit: 2, cursor: 'AAAAforged-cursor' }, { ep: 'list' }, Object.assign({ body: true }, any));
    check(forged, {
      'GET /data forged cursor 400': (r) => r.status === 400,
      'GET /data forged cursor problem+json': isProblem,
    });
    const badLimit = getList({ limit: 0 }, { ep: 'list' }, Object.assign({ body: true }, any));
    check(badLimit, { 'GET /data limit=0 rejected (400/422)': (r) => r.status === 400 || r.status === 422 });
    const big = getList({ limit: 1001 }, { ep: 'list' }, Object.assign({ body: true }, any));
    check(big, { 'GET /data limit=1001 rejected (400/422)': (r) => r.status === 400 || r.status === 422 });
  });

  group('errors', () => {
    const unknown = '01900000-0000-7000-8000-000000000000';
    const nf = getById(unknown, { ep: 'read_id' }, Object.assign({ body: true }, any));
    check(nf, {
      'GET unknown id 404': (r) => r.status === 404,
      'GET unknown id problem+json': isProblem,
      'GET unknown id X-Projection-Seq': (r) => Number.isFinite(projSeq(r)),
    });
    const p = (b, h) => http.post(`${CMD_URL}/data`, b, Object.assign({ headers: h, tags: { name: 'POST /data', ep: 'write' }, responseType: 'text' }, any));
    const notJson = p('{not json', JSON_HEADERS);
    check(notJson, { 'POST /data malformed JSON 400': (r) => r.status === 400, 'POST /data 400 problem+json': isProblem });
    const arr = p('[1,2]', JSON_HEADERS);
    check(arr, { 'POST /data JSON array 400': (r) => r.status === 400 });
    const ct = p(JSON.stringify({ kind, payload: {} }), headers({ 'Content-Type': 'text/plain' }));
    check(ct, { 'POST /data wrong Content-Type 415': (r) => r.status === 415, 'POST /data 415 problem+json': isProblem });
    const inv = p(JSON.stringify({ kind: '', payload: [] }), JSON_HEADERS);
    const errs = JSON.stringify(jget(inv, 'errors') || []);
    check(inv, {
      'POST /data invalid fields 422': (r) => r.status === 422,
      'POST /data 422 problem+json with status': (r) => isProblem(r) && jget(r, 'status') === 422,
      'POST /data 422 lists every bad field': () => errs.indexOf('kind') >= 0 && errs.indexOf('payload') >= 0,
    });
  });

  group('Idempotency-Key', () => {
    const key = `smoke-${Date.now()}-${Math.random()}`;
    const rec = JSON.stringify({ kind, key: 'idem', payload: { n: 1 } });
    const h = headers({ 'Idempotency-Key': key });
    const first = postRecord(rec, { ep: 'write' }, { headers: h, body: true });
    const again = postRecord(rec, { ep: 'write' }, { headers: h, body: true });
    const other = postRecord(JSON.stringify({ kind, key: 'idem', payload: { n: 2 } }), { ep: 'write' }, Object.assign({ headers: h, body: true }, any));
    check(first, { 'Idempotency-Key first 201': (r) => r.status === 201 });
    check(again, {
      'Idempotency-Key repeat 200': (r) => r.status === 200,
      'Idempotency-Key repeat same record': (r) => jget(r, 'id') === jget(first, 'id'),
    });
    check(other, { 'Idempotency-Key other body 422': (r) => r.status === 422 });
  });

  if (!GATEWAY) {
    group('ops', () => {
      ops(CMD_URL, 'command-api', true);
      ops(QUERY_URL, 'query-api', true);
      if (PROJECTOR_URL) ops(PROJECTOR_URL, 'projector', false);
    });
  }
}

export function handleSummary(data) {
  return summary('smoke', data, { rate: RATE });
}
