// The dashboard under faults, in headless Chromium (playwright-core, the system's
// /usr/bin/chromium). Run by tests/browser/test_dashboard.py
// (test_dashboard_faults), which starts Squall, fills it with many quiet devices
// and runs the simulator for one live device.
//
// Environment:
//   SQUALL_URL          base URL of a running Squall (required)
//   SQUALL_TOKEN        dashboard token (claim devices) of user SQUALL_USER (required)
//   SQUALL_USER         that token's sub: the server API disconnects it (required)
//   SQUALL_API_KEY      the server API key (required)
//   SQUALL_SECRET       token.hmac_secret: a short-lived token is minted here (required)
//   SQUALL_DEVICE       the live device (required)
//   SQUALL_OTHER        a quiet device (required)
//   SQUALL_CHROMIUM     browser binary (default /usr/bin/chromium)
//
// Steps, each failing with a message naming what was expected:
//   1. a history query failing (503) shows an error banner, which goes away
//      with the device it was about;
//   2. with many devices listed, live points of the selected device do not
//      rebuild the other rows (that froze the page with a thousand devices);
//      then, with every history query failing, the page keeps only the recent
//      error messages (window.__squall.errors grew by one per failure);
//   3. two reconnects in a row while the history reload is slow: no bucket is
//      drawn twice (both reloads used to be appended); then a live point stamped
//      exactly at a backfill's end (its query excludes `to`) is drawn (it was
//      held back until the backfill was in, then skipped as already counted);
//   3c. a device with more metrics than the page charts (MAX_CHARTS in app.js)
//      gets that many charts and a note saying how many are left out (a device
//      inventing names made a chart and history reads for each, and froze the tab);
//   3d. with no animation frames (a background tab runs none), live points still
//      trim the series to the chart window (they grew for as long as it was hidden);
//   4. a token that expires while the page is open signs out saying so.
// The last stdout line is a JSON summary; the exit code is 0 only if every step passed.

import { createHmac } from 'node:crypto';
import { chromium } from 'playwright-core';

const env = (name) => {
  const value = process.env[name];
  if (!value) {
    console.error(`dashboard_faults.spec: ${name} is required`);
    process.exit(2);
  }
  return value;
};
const base = env('SQUALL_URL').replace(/\/$/, '');
const token = env('SQUALL_TOKEN');
const user = env('SQUALL_USER');
const apiKey = env('SQUALL_API_KEY');
const secret = env('SQUALL_SECRET');
const device = env('SQUALL_DEVICE');
const other = env('SQUALL_OTHER');
const executablePath = process.env.SQUALL_CHROMIUM || '/usr/bin/chromium';
const SLOW_HISTORY_MS = 4000; // longer than the SDK's first reconnect delay

function check(condition, message) {
  if (!condition) throw new Error(message);
}

function hs256(claims) {
  const part = (obj) => Buffer.from(JSON.stringify(obj)).toString('base64url');
  const head = `${part({ alg: 'HS256', typ: 'JWT' })}.${part(claims)}`;
  return `${head}.${createHmac('sha256', secret).update(head).digest('base64url')}`;
}

const EDGE_VALUE = 999.5; // step 3b's point, above every value the quiet device sent

async function postPoint(id, point) {
  const deviceToken = hs256({ sub: id, device: true, exp: Math.floor(Date.now() / 1000) + 600 });
  const resp = await fetch(`${base}/api/telemetry`, {
    method: 'POST',
    headers: { Authorization: `Bearer ${deviceToken}` },
    body: JSON.stringify([point]),
  });
  check(resp.status === 202, `POST /api/telemetry: HTTP ${resp.status} ${await resp.text()}`);
}

async function disconnectUser() {
  const resp = await fetch(`${base}/api/disconnect`, {
    method: 'POST',
    headers: { 'X-API-Key': apiKey },
    body: JSON.stringify({ user, disconnect: { code: 4000, reason: 'test reconnect' } }),
  });
  check(resp.ok, `server API disconnect: HTTP ${resp.status}`);
}

const summary = { device, steps: [] };
const started = Date.now();
// Each step with the seconds since the start: where the time went when one is slow.
const step = (name) => {
  const line = `${name} (${((Date.now() - started) / 1000).toFixed(1)} s)`;
  summary.steps.push(line);
  console.error(`step done: ${line}`); // read by the test when this script is stopped
};
const problems = [];
const browser = await chromium.launch({
  executablePath,
  headless: true,
  args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
    '--disable-background-networking', '--disable-component-update', '--disable-sync'],
  timeout: 30_000,
});
let exitCode = 0;
try {
  const context = await browser.newContext({ viewport: { width: 1280, height: 860 } });
  const page = await context.newPage();
  page.on('pageerror', (err) => problems.push(`page error: ${err.message}`));
  const row = (id) => page.locator(`li.device[data-device-id="${id}"]`);
  const resubscribed = () =>
    page.waitForFunction(
      () => window.__squall.conn === 'connected' && window.__squall.subscription === 'subscribed',
      null,
      { timeout: 30_000, polling: 50 },
    );

  await page.goto(`${base}/dashboard/#token=${encodeURIComponent(token)}`);
  await row(device).and(page.locator('[data-online="true"]')).waitFor({ timeout: 15_000 });
  await row(other).waitFor({ timeout: 5_000 });
  await page.locator('#conn[data-state="connected"]').waitFor({ timeout: 10_000 });

  // 1. The first history query of the device fails: a banner, gone with the device.
  let failed = false;
  await page.route(`**/api/devices/${encodeURIComponent(device)}/telemetry?*`, async (route) => {
    if (failed) return route.continue();
    failed = true;
    return route.fulfill({
      status: 503,
      contentType: 'application/json',
      body: JSON.stringify({ error: { code: 1001, message: 'store unavailable' } }),
    });
  });
  await row(device).locator('button').click();
  await page.locator('#error').filter({ hasText: `History of ${device}/` }).waitFor({ timeout: 10_000 });
  step('history error shown');

  // 2. Live points with many rows listed: count the chips added to other rows.
  await page.evaluate((id) => {
    window.__otherChips = 0;
    new MutationObserver((records) => {
      for (const rec of records) {
        for (const node of rec.addedNodes) {
          if (node.classList?.contains('chip') && node.closest('li')?.dataset.deviceId !== id) {
            window.__otherChips += 1;
          }
        }
      }
    }).observe(document.getElementById('device-list'), { childList: true, subtree: true });
  }, device);
  const liveBefore = await page.evaluate(() => window.__squall.livePoints);
  await page.waitForTimeout(3000);
  const rows = await page.locator('li.device').count();
  const liveDuring = (await page.evaluate(() => window.__squall.livePoints)) - liveBefore;
  const otherChips = await page.evaluate(() => window.__otherChips);
  Object.assign(summary, { rows, liveDuring, otherChips });
  check(liveDuring > 0, 'no live points while watching the device list');
  check(otherChips === 0, `${otherChips} chips of other devices rebuilt by ${liveDuring} live points`);
  step('other rows left alone');

  await row(other).locator('button').click();
  await page.locator('#detail-title').filter({ hasText: other }).waitFor({ timeout: 5_000 });
  check(
    await page.locator('#error').isHidden(),
    `error banner still shown for the device left: ${await page.locator('#error').textContent()}`,
  );
  step('history error cleared');

  // 2b. Errors keep coming (every history query fails): the page keeps the recent
  // ones only (window.__squall.errors is bounded), newest last.
  await page.unrouteAll();
  await page.route('**/api/devices/*/telemetry?*', (route) =>
    route.fulfill({
      status: 503,
      contentType: 'application/json',
      body: JSON.stringify({ error: { code: 1001, message: 'store unavailable' } }),
    }),
  );
  // Each click fails one query per chart: count the messages the banner showed.
  const MANY_ERRORS = 60; // more than the page keeps (MAX_ERRORS in app.js)
  await page.evaluate(() => {
    window.__shown = 0;
    new MutationObserver((records) => {
      for (const rec of records) {
        for (const node of rec.addedNodes) {
          if (node.textContent.startsWith('History of ')) window.__shown += 1;
        }
      }
    }).observe(document.getElementById('error'), { childList: true });
  });
  let shown = 0;
  let last = device; // the device clicked last: its error is the newest
  for (let i = 0; shown < MANY_ERRORS && i < MANY_ERRORS; i += 1) { // a click shows >= 1
    const id = i % 2 ? other : device;
    last = id;
    await row(id).locator('button').click();
    await page.locator('#error').filter({ hasText: `History of ${id}/` }).waitFor({ timeout: 10_000 });
    shown = await page.evaluate(() => window.__shown);
  }
  const kept = await page.evaluate(() => window.__squall.errors.slice());
  Object.assign(summary, { errorsShown: shown, errorsKept: kept.length });
  check(kept.length >= 10 && kept.length < shown,
    `${kept.length} error messages kept after ${shown} failed history queries`);
  check(kept[kept.length - 1].startsWith(`History of ${last}/`),
    `the newest error is not last: ${kept[kept.length - 1]}`);
  step('error log bounded');

  // 3. Slow history, two reconnects in a row: each reload replaces, never adds.
  await page.unrouteAll();
  await page.route('**/api/devices/*/telemetry?*', async (route) => {
    await new Promise((resolve) => setTimeout(resolve, SLOW_HISTORY_MS));
    await route.continue().catch(() => {}); // the page may have moved on
  });
  await row(device).locator('button').click();
  await resubscribed();
  await page.locator('#charts .chart[data-backfilled]').first().waitFor({ timeout: 3 * SLOW_HISTORY_MS });
  await page.evaluate(() => {
    // Sample every chart's buckets: bucket times must stay strictly increasing.
    window.__bad = [];
    window.__sampler = setInterval(() => {
      for (const fig of document.querySelectorAll('#charts .chart')) {
        const t = window.__squall.series(fig.dataset.metric)?.t ?? [];
        for (let i = 1; i < t.length; i += 1) {
          if (t[i] <= t[i - 1]) {
            window.__bad.push(`${fig.dataset.metric}: bucket ${t[i]} after ${t[i - 1]}`);
            break;
          }
        }
      }
    }, 100);
  });
  await disconnectUser();
  await page.waitForFunction(() => window.__squall.conn !== 'connected', null, { polling: 20 });
  await resubscribed(); // the first reload starts now...
  await disconnectUser(); // ...and the second one before it is in
  await page.waitForFunction(() => window.__squall.conn !== 'connected', null, { polling: 20 });
  await resubscribed();
  await page.waitForTimeout(SLOW_HISTORY_MS * 2); // both reloads answered
  const bad = await page.evaluate(() => {
    clearInterval(window.__sampler);
    return window.__bad;
  });
  summary.backfilled = await page
    .locator('#charts .chart')
    .evaluateAll((els) => els.map((e) => Number(e.dataset.backfilled ?? -1)));
  check(summary.backfilled.length > 0 && summary.backfilled.every((n) => n > 0),
    `charts not reloaded: ${summary.backfilled}`);
  check(bad.length === 0, `buckets drawn twice after two reconnects:\n${bad.slice(0, 5).join('\n')}`);
  step('reconnects: no duplicated buckets');
  await page.unrouteAll({ behavior: 'ignoreErrors' });

  // 3b. A live point stamped exactly at a backfill's `to` (the query's end, which it
  //     excludes) arrives while that backfill loads: it is drawn once it is in.
  let edge = 0;
  await page.route(`**/api/devices/${encodeURIComponent(other)}/telemetry?*`, async (route) => {
    const query = new URL(route.request().url()).searchParams;
    if (edge || query.get('metric') !== 'm00') return route.continue();
    edge = Number(query.get('to'));
    await page.waitForFunction(() => window.__squall.subscription === 'subscribed', null,
      { timeout: 10_000, polling: 20 });
    await postPoint(other, { ts: edge, values: { m00: EDGE_VALUE } });
    await page.waitForFunction(() => window.__squall.received >= 1, null,
      { timeout: 10_000, polling: 20 });
    return route.continue();
  });
  await row(other).locator('button').click();
  await page.locator('#charts .chart[data-metric="m00"][data-backfilled]').waitFor({ timeout: 10_000 });
  const m00 = await page.evaluate(() => window.__squall.series('m00'));
  const at = m00.t.indexOf(Math.floor(edge / 1000) * 1000);
  check(edge > 0 && at >= 0 && m00.max[at] === EDGE_VALUE,
    `point at the backfill's end (${edge}) not drawn: ${JSON.stringify(m00)}`);
  step('point at the backfill end drawn');
  await page.unrouteAll({ behavior: 'ignoreErrors' });

  // 3c. 40 metrics on one device: 32 charts and a note for the other 8.
  const wide = `${device}-wide`;
  const values = Object.fromEntries(
    Array.from({ length: 40 }, (_, i) => [`w${String(i).padStart(2, '0')}`, i]),
  );
  await postPoint(wide, { values });
  await row(wide).waitFor({ timeout: 15_000 });
  await row(wide).locator('button').click();
  await page.locator('#detail-title').filter({ hasText: wide }).waitFor({ timeout: 5_000 });
  await page.locator('#detail-hint').filter({ hasText: 'more metrics not charted' })
    .waitFor({ timeout: 5_000 });
  summary.wideCharts = await page.locator('#charts .chart').count();
  summary.wideHint = await page.locator('#detail-hint').textContent();
  check(summary.wideCharts === 32, `${summary.wideCharts} charts for 40 metrics (at most 32)`);
  check(summary.wideHint.startsWith('8 more metrics not charted'), `hint: ${summary.wideHint}`);
  step('charts capped');

  // 3d. No animation frames, and the page's clock 11 minutes ahead: the buckets it
  //     holds are all out of the window, and the next live points trim them away.
  await row(device).locator('button').click();
  await page.locator('#charts .chart[data-backfilled]').first().waitFor({ timeout: 10_000 });
  const metric = await page.locator('#charts .chart').first().getAttribute('data-metric');
  const held = await page.evaluate((m) => window.__squall.series(m).t.length, metric);
  check(held > 0, `no buckets to trim in ${metric}`);
  await page.evaluate(() => {
    window.requestAnimationFrame = () => 1; // as in a hidden tab: frames never come
    const real = Date.now.bind(Date);
    Date.now = () => real() + 11 * 60 * 1000;
    window.__receivedBefore = window.__squall.received;
  });
  await page.waitForFunction(() => window.__squall.received >= window.__receivedBefore + 3,
    null, { timeout: 10_000, polling: 50 });
  const left = await page.evaluate((m) => {
    const cutoff = Date.now() - 10 * 60 * 1000 - 1000; // WINDOW_MS + STEP_MS, as trim()
    return window.__squall.series(m).t.filter((t) => t < cutoff).length;
  }, metric);
  Object.assign(summary, { trimHeld: held, trimLeft: left });
  check(left === 0, `${left} of ${held} buckets out of the window kept without animation frames`);
  step('series trimmed without animation frames');

  // 4. A token expiring in a few seconds: signed out with "token expired".
  const short = hs256({ sub: user, devices: ['*'], exp: Math.floor(Date.now() / 1000) + 4 });
  await page.goto(`${base}/dashboard/#token=${short}`);
  await page.locator('#signin').waitFor({ state: 'visible', timeout: 20_000 });
  const banner = (await page.locator('#error').textContent()) ?? '';
  summary.expiredBanner = banner;
  check(/token expired/.test(banner), `expiry banner does not say why: ${banner}`);
  step('expiry explained');

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
