// GET /data?limit=50 at a constant arrival rate (default 1000/s).
// KIND_PCT (default 30) of the requests filter by a kind (kinds discovered from
// the data in setup(), else KINDS); CURSOR_PCT (default 20) continue from a
// next_cursor saved from an earlier answer of the same VU (still one request
// per iteration, so the request rate is RATE). KEY_PCT (default 0) filter by
// a key, drawn from the keys of the newest records (setup()), so that lists
// by key, which read the key's index one range of seqs at a time, can be
// measured too.
// Target (TARGETS=1): p99 <= 10 ms @1000/s.
//   k6 run -e RATE=1000 loadtest/list.js
import { arrival, baseOptions, droppedTarget, fetchIdPool, getList, jget, KINDS, num, pick, p99Target, summary } from './lib/common.js';

const RATE = num('RATE', 1000);
const LIMIT = num('LIMIT', 50);
const KIND_PCT = num('KIND_PCT', 30);
const CURSOR_PCT = num('CURSOR_PCT', 20);
const KEY_PCT = num('KEY_PCT', 0);

export const options = baseOptions(
  { list: arrival(RATE, 'list') },
  ['list'],
  Object.assign(p99Target('list', 10), droppedTarget(RATE)),
);

export function setup() {
  // One page is enough to learn which kinds exist.
  const pool = fetchIdPool(1000);
  const kinds = pool.kinds.length ? pool.kinds : KINDS;
  console.log(`list: kinds ${JSON.stringify(kinds)}; ${pool.keys.length} keys`);
  return { kinds, keys: pool.keys };
}

const saved = []; // per VU: {kind, key, cursor}

export function list(data) {
  const roll = Math.random() * 100;
  let q;
  if (roll < CURSOR_PCT && saved.length > 0) {
    const s = saved.splice(Math.floor(Math.random() * saved.length), 1)[0];
    q = { kind: s.kind, key: s.key, limit: LIMIT, cursor: s.cursor };
  } else if (roll < CURSOR_PCT + KIND_PCT) {
    q = { kind: pick(data.kinds), limit: LIMIT };
  } else if (roll < CURSOR_PCT + KIND_PCT + KEY_PCT && data.keys.length > 0) {
    q = { key: pick(data.keys), limit: LIMIT };
  } else {
    q = { limit: LIMIT };
  }
  // Read the body only when a cursor is worth keeping (gjson, in Go: cheap).
  const keep = saved.length < 16;
  const res = getList(q, { ep: 'list', target: 'list' }, { body: keep });
  if (keep && res.status === 200) {
    const c = jget(res, 'next_cursor');
    if (typeof c === 'string' && c) saved.push({ kind: q.kind, key: q.key, cursor: c });
  }
}

export function handleSummary(data) {
  return summary('list', data, { rate: RATE, limit: LIMIT, target: 'GET /data p99<=10ms @1000/s' });
}
