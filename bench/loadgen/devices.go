package main

import (
	"context"
	"fmt"
	"math"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/HdrHistogram/hdrhistogram-go"
)

// telemetryResult is the measured step of the ingest-fixed and devices modes.
// The start and end times let the caller (bench/run.py) relate the step to
// what reached the database.
type telemetryResult struct {
	StartNs int64 `json:"step_start_unix_ns"`
	EndNs   int64 `json:"step_end_unix_ns"` // end of publishing (last reply included)
	// Accepted counts the points the server accepted over the whole run (the
	// warm-up and the probe-free steps), for comparing with what was stored.
	Accepted   int64       `json:"points_accepted_total"`
	Devices    int         `json:"devices,omitempty"`
	Hz         float64     `json:"hz,omitempty"`
	Points     int         `json:"points_per_frame"`
	Dashboards *openResult `json:"dashboards,omitempty"`
	Step       *stepResult `json:"step"`
}

// runIngestFixed posts telemetry frames at a fixed rate (-rate points/s) for
// -measure: one step, no ramp.
func runIngestFixed(ctx context.Context, c *config, rep *report) {
	if c.rate <= 0 {
		rep.Errors = append(rep.Errors, "ingest-fixed needs -rate > 0")
		return
	}
	in, err := newIngest(c.secret, c.prefix, c.devices, c.points)
	if err != nil {
		rep.Errors = append(rep.Errors, "device tokens: "+err.Error())
		return
	}
	rep.Params["devices"], rep.Params["points"], rep.Params["rate"] = c.devices, c.points, c.rate
	pub := newPublisher(c.apiURL, c.apiKey, c.inflight)
	pub.ingest = in
	reqRate := c.rate / float64(c.points)
	points := int64(c.points)
	choose := func(int64) ([]string, int64) { return nil, points }
	cpu := startCPU(c.pid)
	t0 := time.Now()
	pr := pub.run(ctx, reqRate, c.measure, 0, choose)
	t1 := time.Now()
	srvCPU, lgCPU := cpu.stop()
	r := stepResult{Phase: "fixed", Rate: round3(reqRate), Seconds: c.measure.Seconds(), Publish: pr,
		Expected: pr.Expected, ServerCPU: srvCPU, LoadgenCPU: lgCPU, Latency: pr.HTTP}
	r.Ratio = round3(float64(pr.OK) / math.Max(1, float64(pr.Intended)))
	r.DeliveriesPerSec = round3(float64(pr.Expected) / c.measure.Seconds())
	r.OK, r.Reason = judge(c, &r, false)
	logf("%-10s rate=%-9.1f offered=%-10.0f accepted/s=%-10.0f ratio=%.3f p50=%.1fms p99=%.1fms srv=%.0f%% lg=%.0f%% ok=%v %s",
		r.Phase, reqRate, c.rate, r.DeliveriesPerSec, r.Ratio, r.Latency.P50, r.Latency.P99,
		r.ServerCPU, r.LoadgenCPU, r.OK, r.Reason)
	rep.Steps = append(rep.Steps, r)
	rep.Telemetry = &telemetryResult{StartNs: t0.UnixNano(), EndNs: t1.UnixNano(), Accepted: pr.Expected,
		Points: c.points, Step: &rep.Steps[len(rep.Steps)-1]}
	if pr.OK == 0 {
		rep.Errors = append(rep.Errors, "no request succeeded: "+pr.FirstErr)
	}
	rep.OK = pr.OK > 0
	if ctx.Err() != nil {
		rep.Errors = append(rep.Errors, "run timed out")
	}
}

// deviceStats gathers the publish side of one devices step.
type deviceStats struct {
	intended, sent, ok, errs, skipped, points atomic.Int64
	errOnce                                   sync.Once
	firstErr                                  string
	mu                                        sync.Mutex
	hist                                      *hdrhistogram.Histogram // publish-reply latency
}

func (s *deviceStats) fail(err error) {
	s.errs.Add(1)
	s.errOnce.Do(func() { s.firstErr = err.Error() })
}

// runDevices: -devices device connections each publish a frame of -points
// points to their own telemetry channel -hz times a second; -dashboards
// connections subscribed to every device channel record ingest-to-subscriber
// latency (bench_ts in the points, µs). A warm-up of -warmup precedes the
// measured step of -measure.
func runDevices(ctx context.Context, c *config, rep *report) {
	if c.hz <= 0 || c.devices <= 0 || c.points <= 0 {
		rep.Errors = append(rep.Errors, "devices needs -devices, -hz and -points > 0")
		return
	}
	rep.Params["devices"], rep.Params["hz"], rep.Params["points"] = c.devices, c.hz, c.points
	rep.Params["dashboards"], rep.Params["warmup_s"] = c.dashboards, c.warmup.Seconds()
	ndash := max(1, min(c.dashboards, c.devices))
	channel := func(dev int) string { return c.namespace + ":" + c.prefix + strconv.Itoa(dev) }
	rec := &recorder{}
	globs := []string{c.prefix + "*"}
	dash := &pool{rec: rec, rate: c.connRate, inflight: c.connInflight, points: true,
		t: &target{proto: c.proto, wsURL: c.wsURL, secret: c.secret, timeout: 30 * time.Second,
			token: func(i int) (string, error) {
				return makeDashboardToken(c.secret, "bench-dashboard-"+strconv.Itoa(i), globs)
			}},
		channels: func(k int) []string {
			var chs []string
			for d := k; d < c.devices; d += ndash {
				chs = append(chs, channel(d))
			}
			return chs
		}}
	devs := &pool{rec: rec, rate: c.connRate, inflight: c.connInflight,
		t: &target{proto: c.proto, wsURL: c.wsURL, secret: c.secret, timeout: 20 * time.Second,
			token: func(i int) (string, error) {
				return makeDeviceToken(c.secret, c.prefix+strconv.Itoa(i))
			}},
		channels: func(int) []string { return nil }}

	logf("opening %d dashboard connection(s), subscribing to %d device channels", ndash, c.devices)
	do := dash.openAll(ctx, ndash)
	logf("dashboards: %d/%d in %.2fs (%s)", do.Opened, ndash, do.Seconds, do.FirstErr)
	defer dash.closeAll()
	tr := &telemetryResult{Devices: c.devices, Hz: c.hz, Points: c.points, Dashboards: &do}
	rep.Telemetry = tr
	if do.Errors > 0 {
		rep.Errors = append(rep.Errors, fmt.Sprintf("%d of %d dashboards failed: %s", do.Errors, ndash, do.FirstErr))
		return
	}
	logf("opening %d device connections", c.devices)
	o := devs.openAll(ctx, c.devices)
	rep.Open = &o
	defer devs.closeAll()
	logf("devices: %d/%d in %.2fs (%d errors; %s)", o.Opened, c.devices, o.Seconds, o.Errors, o.FirstErr)
	if o.Opened == 0 {
		rep.Errors = append(rep.Errors, "no device connection could be opened: "+o.FirstErr)
		return
	}
	if o.Errors > 0 {
		rep.Errors = append(rep.Errors, fmt.Sprintf("%d of %d device connections failed: %s", o.Errors, c.devices, o.FirstErr))
	}
	in := &ingest{points: c.points, lastTS: make([]int64, c.devices)}

	run := func(phase string, dur time.Duration) stepResult {
		id, st := rec.newStep()
		live := devs.live() + dash.live()
		s := &deviceStats{hist: newHist()}
		period := time.Duration(float64(time.Second) / c.hz)
		cpu := startCPU(c.pid)
		start := time.Now().Add(20 * time.Millisecond) // every goroutine is waiting when it starts
		end := start.Add(dur)
		var wg sync.WaitGroup
		devs.mu.Lock()
		conns := append([]*conn(nil), devs.conns...)
		devs.mu.Unlock()
		for i, cn := range conns {
			if cn == nil {
				continue
			}
			wg.Add(1)
			offset := time.Duration(int64(period) * int64(i) / int64(c.devices))
			go func() {
				defer wg.Done()
				publishFrames(ctx, cn, channel(i), in, i, id, start.Add(offset), period, end, s)
			}()
		}
		wg.Wait()
		published := time.Now()
		srvCPU, lgCPU := cpu.stop()
		st.deadline.Store(published.Add(c.grace).UnixNano())
		select {
		case <-ctx.Done():
		case <-time.After(c.grace):
		}
		pr := pubResult{Intended: s.intended.Load(), Sent: s.sent.Load(), OK: s.ok.Load(),
			Errors: s.errs.Load(), Skipped: s.skipped.Load(), Expected: s.points.Load(),
			FirstErr: s.firstErr, HTTP: summarize(s.hist)}
		r := stepResult{Phase: phase, Rate: round3(c.hz * float64(c.devices)), Seconds: dur.Seconds(),
			Subscribers: live, Publish: pr, Expected: pr.Expected, Delivered: st.delivered.Load(),
			ServerCPU: srvCPU, LoadgenCPU: lgCPU, Latency: summarize(st.merged())}
		r.Disconnects = max(live-devs.live()-dash.live(), 0)
		if r.Expected > 0 {
			r.Ratio = round3(float64(r.Delivered) / float64(r.Expected))
		}
		r.DeliveriesPerSec = round3(float64(pr.Expected) / dur.Seconds()) // points accepted
		r.OK, r.Reason = judge(c, &r, true)
		// Let the server drain before going on; late deliveries count against this step.
		waitQuiet(ctx, rec, c.drain)
		r.Late = st.late.Load()
		logf("%-10s frames/s=%-8.0f accepted points/s=%-9.0f delivered=%.3f reply p99=%.1fms e2e p50=%.1fms p99=%.1fms p99.9=%.1fms srv=%.0f%% lg=%.0f%% ok=%v %s",
			phase, r.Rate, r.DeliveriesPerSec, r.Ratio, pr.HTTP.P99, r.Latency.P50, r.Latency.P99, r.Latency.P999,
			r.ServerCPU, r.LoadgenCPU, r.OK, r.Reason)
		tr.Accepted += pr.Expected
		if phase == "measure" {
			tr.StartNs, tr.EndNs = start.UnixNano(), published.UnixNano()
		}
		rep.Steps = append(rep.Steps, r)
		return r
	}
	if c.warmup > 0 {
		run("warmup", c.warmup)
	}
	m := run("measure", c.measure)
	tr.Step = &m
	rep.Total = rec.total.Load()
	rep.BadPush = rec.bad.Load()
	if rep.Total == 0 {
		rep.Errors = append(rep.Errors, "zero points delivered to the dashboards")
	}
	rep.OK = o.Opened > 0 && rep.Total > 0 && m.Publish.OK > 0
	if ctx.Err() != nil {
		rep.Errors = append(rep.Errors, "run timed out")
	}
}

// publishFrames is one device: a frame every period from first until end,
// each a publish command waited on before the next. A frame that is due more
// than one period late (the previous reply took that long) is skipped and
// counted: the device cannot keep its rate.
func publishFrames(ctx context.Context, cn *conn, channel string, in *ingest, dev, stepID int,
	first time.Time, period time.Duration, end time.Time, s *deviceStats) {
	buf := make([]byte, 0, 512)
	for n := int64(0); ; n++ {
		due := first.Add(time.Duration(n) * period)
		if !due.Before(end) || ctx.Err() != nil {
			return
		}
		s.intended.Add(1)
		if d := time.Until(due); d > 0 {
			time.Sleep(d)
		} else if -d > period {
			s.skipped.Add(1)
			continue
		}
		sent := time.Now()
		id, ch := cn.register()
		buf = buf[:0]
		buf = append(buf, `{"id":`...)
		buf = strconv.AppendUint(buf, uint64(id), 10)
		buf = append(buf, `,"publish":{"channel":`...)
		buf = strconv.AppendQuote(buf, channel)
		buf = append(buf, `,"data":`...)
		buf = in.frame(buf, dev, sent.UnixNano(), stepID, n)
		buf = append(buf, `}}`...)
		s.sent.Add(1)
		err := cn.write(buf)
		if err == nil {
			wctx, cancel := context.WithTimeout(ctx, 10*time.Second)
			err = cn.wait(wctx, id, ch)
			cancel()
		}
		us := time.Since(sent).Microseconds()
		s.mu.Lock()
		_ = s.hist.RecordValue(max(us, histMinUs))
		s.mu.Unlock()
		if err != nil {
			s.fail(err)
			continue
		}
		s.ok.Add(1)
		s.points.Add(int64(in.points))
	}
}
