// Mixed traffic (used by mixed.js and soak.js): READ_PCT (default 90) of RATE
// are reads, the rest POST /data. Of the reads, LIST_PCT (default 10) are
// GET /data?limit=50 (optionally by kind), the others GET /data/{id} on an id
// pool from ID_FILE or fetched in setup(). Reads and writes are two constant-arrival-rate
// scenarios, so the split is exact.
import { arrival, baseOptions, dur, fetchIdPool, getById, getList, KINDS, recordBody, num, pick, postRecord, requirePool, sharedIds } from './common.js';

export function mixedConfig(defRate, defDuration) {
  const rate = num('RATE', defRate);
  const readPct = num('READ_PCT', 90);
  const readRate = Math.max(1, Math.round((rate * readPct) / 100));
  const writeRate = Math.max(1, rate - readRate);
  const duration = dur(defDuration);
  const options = baseOptions(
    {
      reads: arrival(readRate, 'reads', { duration }),
      writes: arrival(writeRate, 'writes', { duration }),
    },
    ['read_id', 'list', 'write'],
  );
  return { rate, readRate, writeRate, duration, options };
}

const LIST_PCT = num('LIST_PCT', 10);
const ID_POOL = num('ID_POOL', 20000);

const SHARED_IDS = sharedIds('mixed ids');

export function mixedSetup() {
  // With shared ids, one page is enough to learn the kinds.
  const pool = requirePool(fetchIdPool(SHARED_IDS ? 1000 : ID_POOL), 'mixed');
  return { ids: SHARED_IDS ? null : pool.ids, kinds: pool.kinds.length ? pool.kinds : KINDS };
}

export function reads(data) {
  if (Math.random() * 100 < LIST_PCT) {
    getList({ kind: Math.random() < 0.5 ? pick(data.kinds) : undefined, limit: 50 }, { ep: 'list' });
  } else {
    getById(pick(SHARED_IDS || data.ids), { ep: 'read_id' });
  }
}

export function writes() {
  postRecord(recordBody(), { ep: 'write' });
}
