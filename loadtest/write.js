// POST /data at a constant arrival rate (default 1500/s, the write target).
//   k6 run -e RATE=1500 -e DURATION=30s loadtest/write.js
import { arrival, baseOptions, droppedTarget, recordBody, num, p99Target, postRecord, summary } from './lib/common.js';

const RATE = num('RATE', 1500);

export const options = baseOptions(
  { write: arrival(RATE, 'write') },
  ['write'],
  Object.assign(p99Target('write', 15), droppedTarget(RATE)),
);

export function write() {
  postRecord(recordBody(), { ep: 'write', target: 'write' });
}

export function handleSummary(data) {
  return summary('write', data, { rate: RATE, target: 'POST /data p99<=15ms @1500/s' });
}
