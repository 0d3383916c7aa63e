// Mixed traffic: 90% reads (GET /data/{id}, 10% of them GET /data), 10% POST /data,
// RATE total requests/s (default 2000).
//   k6 run -e RATE=2000 -e DURATION=60s loadtest/mixed.js
import { summary } from './lib/common.js';
import { mixedConfig, mixedSetup, reads, writes } from './lib/mixed.js';

const cfg = mixedConfig(2000, '30s');
export const options = cfg.options;
export { reads, writes };
export const setup = mixedSetup;

export function handleSummary(data) {
  return summary('mixed', data, { rate: cfg.rate, read_rate: cfg.readRate, write_rate: cfg.writeRate, duration: cfg.duration });
}
