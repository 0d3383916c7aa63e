// POST /data/batch with BATCH_SIZE records (default 1000) at RATE batches/s
// (default 110, i.e. 110,000 records/s offered; the target is >= 100,000/s
// achieved). records_ingested counts the records of every 201 answer, so its
// rate is the ingest rate. With RETRIES=n (default 0: each batch is sent
// once), a batch answered 503 or 429 is sent again after its Retry-After, n
// times at most, as a careful client would; batch_retries counts them. The
// VU sleeps meanwhile, so raise MAX_VUS with it.
//   k6 run -e RATE=110 -e BATCH_SIZE=1000 loadtest/batch.js
import http from 'k6/http';
import { sleep } from 'k6';
import { Counter } from 'k6/metrics';
import { arrival, baseOptions, CMD_URL, droppedTarget, JSON_HEADERS, num, recordBody, randInt, summary, timeline } from './lib/common.js';

const RATE = num('RATE', 110);
const BATCH_SIZE = num('BATCH_SIZE', 1000);
// Pre-serialized batch bodies, built per VU at init (~25 ms each): serializing
// 100,000 records/s in k6's JS would cost more than the service under test.
// (A SharedArray is slower here: it decodes the 300 KB element on every access.)
const BODIES = num('BATCH_BODIES', 2);
const MIN_RECORDS_PER_S = num('TARGET_RECORDS_PER_S', 100000);
const RETRIES = num('RETRIES', 0);

const bodies = [];
for (let b = 0; b < BODIES; b++) {
  const items = [];
  for (let i = 0; i < BATCH_SIZE; i++) items.push(recordBody());
  bodies.push(`[${items.join(',')}]`);
}

const recordsIngested = new Counter('records_ingested');
const retries = new Counter('batch_retries');

export const options = baseOptions(
  { batch: arrival(RATE, 'batch', { preAllocatedVUs: num('PRE_VUS', Math.max(5, Math.ceil(RATE / 10))), maxVUs: num('MAX_VUS', Math.max(50, Math.ceil(RATE / 2))) }) },
  ['batch'],
  Object.assign(
    { 'records_ingested{target:batch}': [`rate>=${MIN_RECORDS_PER_S}`] },
    droppedTarget(RATE),
  ),
);

export function batch() {
  const body = bodies[randInt(bodies.length)];
  for (let attempt = 0; ; attempt++) {
    const res = http.post(`${CMD_URL}/data/batch`, body, {
      headers: JSON_HEADERS,
      tags: { name: 'POST /data/batch', ep: 'batch', target: 'batch' },
      timeout: '60s',
    });
    timeline('batch', res.timings.duration);
    if (res.status === 201 || res.status === 200) {
      recordsIngested.add(BATCH_SIZE, { target: 'batch' });
      return;
    }
    if ((res.status !== 503 && res.status !== 429) || attempt >= RETRIES) return;
    retries.add(1, { target: 'batch' });
    // Retry-After is in seconds here (the service never sends a date).
    sleep(Math.min(Number(res.headers['Retry-After']) || 1, 10));
  }
}

export function handleSummary(data) {
  return summary('batch', data, { rate: RATE, batch_size: BATCH_SIZE, target: `records_ingested >= ${MIN_RECORDS_PER_S}/s` });
}
