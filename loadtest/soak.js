// Soak: the mixed traffic of mixed.js for a long time (DURATION default 30m,
// RATE default 1000/s). The drift of p99 over time (target <= 10%) is computed
// by loadtest/report.py (first vs last window) from the timelines in the
// summary (lib/common.js), or from raw output when there is one.
//   k6 run -e DURATION=30m -e RATE=1000 -e SUMMARY_PATH=loadtest/results/soak.json loadtest/soak.js
import { summary } from './lib/common.js';
import { mixedConfig, mixedSetup, reads, writes } from './lib/mixed.js';

const cfg = mixedConfig(1000, '30m');
export const options = cfg.options;
export { reads, writes };
export const setup = mixedSetup;

export function handleSummary(data) {
  return summary('soak', data, { rate: cfg.rate, read_rate: cfg.readRate, write_rate: cfg.writeRate, duration: cfg.duration });
}
