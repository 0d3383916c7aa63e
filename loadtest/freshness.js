// Write-to-visible latency under load. RATE (default 1000) is the total
// writes/s: PROBE_RATE probe iterations/s (default 50) each write 2 records, the
// rest (RATE - 2*PROBE_RATE) are plain background POST /data.
// A probe iteration:
//   1. POST /data, then poll GET /data/{id} (no min_seq) every POLL_MS (default
//      2) until 200 -> Trend write_to_visible_ms (from the POST answer to the
//      first 200 answer). VISIBLE_TIMEOUT_MS (default 5000) -> freshness_timeouts.
//   2. POST /data, then one GET /data/{id}?min_seq=<seq> -> Trend
//      write_to_visible_min_seq_ms (200 expected; anything else counts in
//      min_seq_failures).
// Target (TARGETS=1): write_to_visible_ms p99 <= 50 ms under 1000 writes/s.
//   k6 run -e RATE=1000 loadtest/freshness.js
import { sleep } from 'k6';
import exec from 'k6/execution';
import { Counter, Trend } from 'k6/metrics';
import { arrival, baseOptions, FLOOR, getById, jget, recordBody, num, ok200or404, postRecord, summary, timeline, timelineKeys } from './lib/common.js';

const RATE = num('RATE', 1000);
const PROBE_RATE = num('PROBE_RATE', 50);
const BG_RATE = Math.max(0, RATE - 2 * PROBE_RATE);
const POLL_MS = num('POLL_MS', 2);
const TIMEOUT_MS = num('VISIBLE_TIMEOUT_MS', 5000);

const visible = new Trend('write_to_visible_ms', true);
const visibleMinSeq = new Trend('write_to_visible_min_seq_ms', true);
const polls = new Trend('visible_polls');
const timeouts = new Counter('freshness_timeouts');
const minSeqFailures = new Counter('min_seq_failures');
const writeFailures = new Counter('probe_write_failures');

const scenarios = {
  probe: arrival(PROBE_RATE, 'probe', {
    preAllocatedVUs: num('PROBE_PRE_VUS', Math.max(5, Math.ceil(PROBE_RATE / 5))),
    maxVUs: num('PROBE_MAX_VUS', Math.max(50, PROBE_RATE * 2)),
  }),
};
if (BG_RATE > 0) scenarios.background = arrival(BG_RATE, 'background');

export const options = baseOptions(
  scenarios,
  ['write', 'probe_write', 'poll', 'min_seq'],
  {
    'write_to_visible_ms{target:freshness}': [`p(99)<${num('TARGET_VISIBLE_MS', 50)}`],
  },
  {
    // Contract: read-your-writes with min_seq answers within the budget.
    write_to_visible_min_seq_ms: ['p(99)<500'],
    freshness_timeouts: ['count==0'],
    min_seq_failures: ['count==0'],
    // Tagged copies so the summary always lists them.
    'write_to_visible_ms{target:freshness}': [],
    'write_to_visible_min_seq_ms{target:freshness}': [],
  },
);

export function background() {
  postRecord(recordBody(), { ep: 'write' });
}

timelineKeys(['write_to_visible_ms', 'write_to_visible_min_seq_ms']);

// A clock with sub-millisecond resolution (Date.now() has 1 ms).
const now = () => exec.instance.currentTestRunDuration;

// POST one record; returns {id, seq, t} (t = ms when the answer arrived) or null.
function write() {
  const res = postRecord(recordBody(), { ep: 'probe_write' }, { body: true });
  const t = now();
  if (res.status !== 201) {
    writeFailures.add(1);
    return null;
  }
  const id = jget(res, 'id');
  const seq = jget(res, 'seq');
  if (typeof id !== 'string' || seq === undefined || seq === null) {
    writeFailures.add(1);
    return null;
  }
  return { id, seq, t };
}

export function probe() {
  // 1. Eventual visibility, polling without min_seq.
  const a = write();
  if (a) {
    let n = 0;
    for (;;) {
      n++;
      const r = getById(a.id, { ep: 'poll' }, { responseCallback: ok200or404 });
      const dt = now() - a.t;
      if (r.status === 200) {
        visible.add(dt, { target: 'freshness' });
        timeline('write_to_visible_ms', dt);
        polls.add(n);
        break;
      }
      if (r.status !== 404 || dt > TIMEOUT_MS) {
        timeouts.add(1);
        visible.add(dt, { target: 'freshness' });
        timeline('write_to_visible_ms', dt);
        break;
      }
      sleep(POLL_MS / 1000);
    }
  }
  // 2. Read-your-writes with min_seq: one request.
  const b = write();
  if (b) {
    const r = getById(b.id, { ep: 'min_seq' }, { minSeq: b.seq });
    const dt = now() - b.t;
    if (r.status === 200) {
      visibleMinSeq.add(dt, { target: 'freshness' });
      timeline('write_to_visible_min_seq_ms', dt);
    } else minSeqFailures.add(1);
  }
}

export function handleSummary(data) {
  return summary('freshness', data, {
    rate: RATE,
    probe_rate: PROBE_RATE,
    background_rate: BG_RATE,
    poll_ms: POLL_MS,
    floor_note: FLOOR ? 'floor answers 200 at once: the trends measure one round trip' : undefined,
    target: 'write_to_visible p99<=50ms under 1000 writes/s',
  });
}
