// GET /data/{id} at a constant arrival rate (default 3000/s). The ids are
// sampled uniformly from a pool of up to ID_POOL (default 20000) existing ids,
// read from ID_FILE (bench.sh writes it) or fetched in setup() by paging
// GET /data?limit=1000.
// Target (TARGETS=1): p99 <= 10 ms up to 3000/s, <= 50 ms above (issue: up to 6000/s).
//   k6 run -e RATE=3000 loadtest/read_id.js
import { arrival, baseOptions, droppedTarget, fetchIdPool, getById, num, p99Target, pick, requirePool, sharedIds, summary } from './lib/common.js';

const RATE = num('RATE', 3000);
const ID_POOL = num('ID_POOL', 20000);
const TARGET_MS = RATE <= 3000 ? 10 : 50;

export const options = baseOptions(
  { read_id: arrival(RATE, 'readId') },
  ['read_id'],
  Object.assign(p99Target('read_id', TARGET_MS), droppedTarget(RATE)),
);

const SHARED_IDS = sharedIds('read_id ids');

export function setup() {
  return SHARED_IDS ? {} : { ids: requirePool(fetchIdPool(ID_POOL), 'read_id').ids };
}

export function readId(data) {
  getById(pick(SHARED_IDS || data.ids), { ep: 'read_id', target: 'read_id' });
}

export function handleSummary(data) {
  return summary('read_id', data, { rate: RATE, id_pool: ID_POOL, target: `GET /data/{id} p99<=${TARGET_MS}ms @${RATE}/s` });
}
