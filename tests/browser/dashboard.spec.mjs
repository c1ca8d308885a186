// Drives the dashboard in headless Chromium with playwright-core (no bundled
// browsers: the system's /usr/bin/chromium). Run by tests/browser/test_dashboard.py;
// it can also be run by hand against any Squall with the telemetry backend:
//
//   SQUALL_URL=http://127.0.0.1:8000 SQUALL_TOKEN=<dashboard token> SQUALL_DEVICE=<id> \
//     node tests/browser/dashboard.spec.mjs
//
// Environment:
//   SQUALL_URL          base URL of a running Squall (required)
//   SQUALL_TOKEN        dashboard token (claim devices) (required)
//   SQUALL_DEVICE       id of a device that is sending telemetry (required)
//   SQUALL_SCREENSHOTS  comma-separated PNG paths to write (optional)
//   SQUALL_CHROMIUM     browser binary (default /usr/bin/chromium)
//   SQUALL_LIVE_WITHIN  ms allowed between selecting the device and the first live point (2000)
//
// Steps, each failing with a message naming what was expected:
//   1. a bad token shows "Token rejected" and the sign-in form;
//   2. signing in with the form, then with /#token=<good> (through the / redirect):
//      the device is online, and the token leaves the address bar;
//   3. the live connection reaches "connected";
//   4. selecting the device: backfilled charts, and live points within SQUALL_LIVE_WITHIN;
//   5. no page errors, no CSP violations; screenshots.
// The last stdout line is a JSON summary; the exit code is 0 only if every step passed.

import { chromium } from 'playwright-core';

const base = required('SQUALL_URL').replace(/\/$/, '');
const token = required('SQUALL_TOKEN');
const device = required('SQUALL_DEVICE');
const screenshots = (process.env.SQUALL_SCREENSHOTS ?? '').split(',').filter(Boolean);
const executablePath = process.env.SQUALL_CHROMIUM || '/usr/bin/chromium';
const liveWithin = Number(process.env.SQUALL_LIVE_WITHIN || 2000);

// The network is closed: without these Chromium keeps trying to reach Google.
const CHROMIUM_ARGS = [
  '--headless',
  '--no-sandbox',
  '--disable-gpu',
  '--disable-quic',
  '--no-first-run',
  '--disable-background-networking',
  '--disable-component-update',
  '--disable-sync',
];

function required(name) {
  const value = process.env[name];
  if (!value) {
    console.error(`dashboard.spec: ${name} is required`);
    process.exit(2);
  }
  return value;
}

function check(condition, message) {
  if (!condition) throw new Error(message);
}

const summary = { device, steps: [] };
const problems = []; // page errors, failed requests of our own origin, CSP reports

const browser = await chromium.launch({
  executablePath,
  headless: true,
  args: CHROMIUM_ARGS,
  timeout: 30_000,
});
let exitCode = 0;
try {
  // A fresh context is a fresh, in-memory profile (playwright passes its own --user-data-dir).
  const context = await browser.newContext({ viewport: { width: 1280, height: 860 } });
  const page = await context.newPage();
  page.on('pageerror', (err) => problems.push(`page error: ${err.message}`));
  page.on('console', (msg) => {
    if (msg.type() === 'error' && /Content Security Policy|Refused to/i.test(msg.text())) {
      problems.push(`CSP: ${msg.text()}`);
    }
  });
  page.on('requestfailed', (req) => {
    // ERR_ABORTED: a poll cut short by our own navigation, not a failure.
    const why = req.failure()?.errorText ?? '';
    if (req.url().startsWith(base) && !why.includes('ERR_ABORTED')) problems.push(`request failed: ${req.url()} ${why}`);
  });

  // 1. A bad token: a clear message and the sign-in form.
  await page.goto(`${base}/dashboard/#token=not-a-token`);
  await page.locator('#error').filter({ hasText: 'Token rejected' }).waitFor({ timeout: 10_000 });
  check(await page.locator('#signin').isVisible(), 'bad token: the sign-in form is not shown');
  summary.steps.push('bad token rejected');

  // 2a. Signing in through the form works too (the token stays in sessionStorage).
  await page.locator('#token-input').fill(token);
  await page.locator('#signin-form button[type="submit"]').click();
  await page.locator(`li.device[data-device-id="${device}"]`).waitFor({ timeout: 10_000 });
  check(await page.locator('#signin').isHidden(), 'form sign-in: the form is still shown');
  summary.steps.push('form sign-in');

  // 2b. The good token through the fragment (the "/" redirect keeps it); the device is online.
  const response = await page.goto(`${base}/#token=${encodeURIComponent(token)}`);
  const csp = response?.headers()['content-security-policy'] ?? '';
  check(/script-src 'self'/.test(csp), `dashboard page CSP missing or loose: ${csp}`);
  const row = page.locator(`li.device[data-device-id="${device}"]`);
  await row.and(page.locator('[data-online="true"]')).waitFor({ timeout: 15_000 });
  check(page.url().endsWith('/dashboard/'), `token left in the URL or no redirect: ${page.url()}`);
  summary.steps.push('device online');

  // 3. The live connection.
  await page.locator('#conn[data-state="connected"]').waitFor({ timeout: 10_000 });
  summary.steps.push('connected');

  // 4. Select it: charts backfill, then live points within liveWithin ms.
  const t0 = Date.now();
  await row.locator('button').click();
  await page.waitForFunction(
    (id) => {
      const charts = document.getElementById('charts');
      return charts.dataset.device === id && Number(charts.dataset.livePoints) > 0;
    },
    device,
    { timeout: liveWithin },
  );
  summary.firstLiveMs = Date.now() - t0;
  summary.steps.push('live points');
  check((await page.locator('#charts .chart canvas').count()) > 0, 'no chart canvas');
  await page.locator('#charts .chart[data-backfilled]').first().waitFor({ timeout: 5_000 });
  summary.metrics = await page.locator('#charts .chart').evaluateAll((els) =>
    els.map((e) => ({ metric: e.dataset.metric, backfilled: Number(e.dataset.backfilled ?? -1) })),
  );
  // Let a couple of seconds of live data draw, then check it kept flowing.
  const before = await page.evaluate(() => window.__squall.livePoints);
  await page.waitForTimeout(2500);
  const state = await page.evaluate(() => ({
    conn: window.__squall.conn,
    subscription: window.__squall.subscription,
    livePoints: window.__squall.livePoints,
    publications: window.__squall.publications,
    errors: window.__squall.errors,
  }));
  Object.assign(summary, state);
  check(state.livePoints > before, `live points stopped: ${before} -> ${state.livePoints}`);
  check(state.subscription === 'subscribed', `subscription state: ${state.subscription}`);
  check(
    await page.locator('#error').isHidden(),
    `error banner shown: ${await page.locator('#error').textContent()}`,
  );

  // 5. Screenshots, then no page errors or CSP violations anywhere on the way.
  for (const path of screenshots) await page.screenshot({ path, fullPage: true });
  summary.screenshots = screenshots;
  check(problems.length === 0, `browser problems:\n${problems.join('\n')}`);
  summary.ok = true;
} catch (err) {
  summary.ok = false;
  summary.error = err.message;
  summary.problems = problems;
  exitCode = 1;
} finally {
  await browser.close();
}
console.log(JSON.stringify(summary));
process.exit(exitCode);
