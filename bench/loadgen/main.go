// Command loadgen drives a realtime server speaking the Centrifugo client
// protocol (JSON over WebSocket) or Socket.IO, and measures delivery
// throughput, end-to-end latency, connection cost and HTTP ingest.
//
// It prints one JSON object on stdout per run and logs progress on stderr.
// Exit status: 0 when the run worked, 2 when the run itself broke (no
// connection could be opened, or nothing was delivered), 1 on bad usage.
//
// Modes:
//
//	fanout    one channel, -subs subscribers, one HTTP API publisher whose rate
//	          ramps up until delivery falls behind; then latency at 50% and
//	          90% of the highest sustained rate.
//	channels  -conns connections, each subscribed to its own channel and to
//	          one shared channel; broadcast requests publish to -batch random
//	          own channels each, and about one request per second publishes to
//	          the shared channel; same ramp.
//	conns     -conns idle authenticated connections with one subscription
//	          each; time to open them and server RSS per connection.
//	ingest    HTTP only: telemetry frames (-points points of one of -devices
//	          devices, device JWT) POSTed to -api at ramping rates; sustained
//	          points/s and request latency.
//	ingest-fixed
//	          as ingest, but one step at -rate points/s for -measure, no ramp;
//	          reports the step's start and end time (for persistence checks).
//	devices   WebSocket telemetry: -devices device connections each publish
//	          -points points to telemetry:<prefix><i> -hz times a second, and
//	          -dashboards dashboard connections subscribed to all those
//	          channels record ingest-to-subscriber latency.
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"math"
	"math/rand/v2"
	"net"
	"net/url"
	"os"
	"runtime"
	"runtime/pprof"
	"strconv"
	"time"
)

type config struct {
	mode, proto, wsURL, apiURL, apiKey, secret, channel, label string
	cpuProfile, prefix, namespace                              string
	dashboards                                                 int
	hz, rate                                                   float64
	warmup                                                     time.Duration
	pid, subs, conns, connInflight, inflight, maxSteps, refine int
	batch, devices, points                                     int
	connRate, start, fixed, factor, maxDeliveries, minRatio    float64
	step, grace, measure, maxP99, settle, hold, timeout, drain time.Duration
}

// stepResult is one load step in the JSON report.
type stepResult struct {
	Phase            string    `json:"phase"`
	Rate             float64   `json:"rate"` // offered publications (or requests) per second
	Seconds          float64   `json:"seconds"`
	Subscribers      int       `json:"live_subscribers"`
	Publish          pubResult `json:"publish"`
	Expected         int64     `json:"expected"`
	Delivered        int64     `json:"delivered"`
	Late             int64     `json:"late"`
	Ratio            float64   `json:"delivered_ratio"`
	DeliveriesPerSec float64   `json:"deliveries_per_s"`
	Latency          latency   `json:"latency"`
	Disconnects      int       `json:"disconnects"`
	ServerCPU        float64   `json:"server_cpu_pct"`
	LoadgenCPU       float64   `json:"loadgen_cpu_pct"`
	OK               bool      `json:"ok"`
	Reason           string    `json:"reason,omitempty"`
}

type report struct {
	Mode   string         `json:"mode"`
	Proto  string         `json:"proto"`
	Label  string         `json:"label,omitempty"`
	Params map[string]any `json:"params"`
	Open   *openResult    `json:"open,omitempty"`
	Steps  []stepResult   `json:"steps,omitempty"`
	Max    *stepResult    `json:"max_sustained,omitempty"`
	Capped bool           `json:"capped,omitempty"`
	// LoadgenBound: the first step that fell behind had the load generator at
	// 90% of its core or more, so the maximum may be the load generator's.
	LoadgenBound bool        `json:"loadgen_bound,omitempty"`
	At50         *stepResult `json:"at_50pct,omitempty"`
	At90         *stepResult `json:"at_90pct,omitempty"`
	// Fixed: the -fixed step, run before the ramp at a set publication rate.
	Fixed *stepResult  `json:"fixed,omitempty"`
	Conns *connsResult `json:"conns,omitempty"`
	// Telemetry: the measured step of ingest-fixed and devices.
	Telemetry *telemetryResult `json:"telemetry,omitempty"`
	Total     int64            `json:"total_deliveries"`
	BadPush   int64            `json:"unparsed_pushes"`
	Seconds   float64          `json:"seconds"`
	OK        bool             `json:"ok"`
	Errors    []string         `json:"errors,omitempty"`
	Go        string           `json:"go"`
	Procs     int              `json:"gomaxprocs"`
	Finished  string           `json:"finished"`
}

type connsResult struct {
	Requested   int     `json:"requested"`
	Opened      int     `json:"opened"`
	AliveAfter  int     `json:"alive_after_hold"`
	RSSBefore   int64   `json:"rss_before_bytes"`
	RSSAfter    int64   `json:"rss_after_bytes"`
	RSSPerConn  float64 `json:"rss_per_conn_bytes"`
	AcceptSecs  float64 `json:"accept_seconds"`
	AcceptRate  float64 `json:"accept_per_s"`
	ServerCPU   float64 `json:"server_cpu_pct"`
	LoadgenCPU  float64 `json:"loadgen_cpu_pct"`
	HandshakeMs latency `json:"handshake"`
}

func main() {
	var c config
	flag.StringVar(&c.mode, "mode", "fanout", "fanout | channels | conns | ingest | ingest-fixed | devices")
	flag.StringVar(&c.proto, "proto", protoCentrifugo, "centrifugo | socketio")
	flag.StringVar(&c.wsURL, "ws", "ws://127.0.0.1:8000/connection/websocket", "WebSocket URL")
	flag.StringVar(&c.apiURL, "api", "http://127.0.0.1:8000/api/publish", "HTTP publish (or ingest) URL")
	flag.StringVar(&c.apiKey, "api-key", "", "value of the X-API-Key header")
	flag.StringVar(&c.secret, "secret", "", "HS256 secret for connection JWTs")
	flag.StringVar(&c.channel, "channel", "fanout", "fan-out channel name")
	flag.StringVar(&c.label, "label", "", "free text echoed in the report")
	flag.IntVar(&c.pid, "pid", 0, "server pid, for CPU and RSS from /proc (0: skip)")
	flag.IntVar(&c.subs, "subs", 100, "fanout: subscribers")
	flag.IntVar(&c.conns, "conns", 1000, "channels/conns: connections")
	flag.Float64Var(&c.connRate, "conn-rate", 2000, "connection attempts per second")
	flag.IntVar(&c.connInflight, "conn-inflight", 100, "handshakes outstanding at once")
	flag.IntVar(&c.batch, "batch", 20, "channels: own channels per broadcast request (1: publish requests)")
	flag.IntVar(&c.devices, "devices", 200, "ingest: devices taking turns (one token each)")
	flag.IntVar(&c.points, "points", 10, "ingest, devices: telemetry points per request (frame)")
	flag.StringVar(&c.prefix, "prefix", "bench-dev-", "ingest, devices: device ids are <prefix><i>")
	flag.StringVar(&c.namespace, "namespace", "telemetry", "devices: telemetry namespace (channel <namespace>:<device>)")
	flag.Float64Var(&c.hz, "hz", 10, "devices: frames per second per device")
	flag.IntVar(&c.dashboards, "dashboards", 1, "devices: dashboard connections (the devices are split among them)")
	flag.DurationVar(&c.warmup, "warmup", time.Second, "devices: publishing before the measured step (0: none)")
	flag.Float64Var(&c.rate, "rate", 0, "ingest-fixed: points per second")
	flag.IntVar(&c.inflight, "inflight", 32, "HTTP publish requests outstanding at once")
	flag.Float64Var(&c.fixed, "fixed", 0, "fanout: first publish this many publications/s for -measure (0: skip)")
	flag.Float64Var(&c.start, "start", 0, "first step: deliveries/s (fanout, channels) or points/s (ingest)")
	flag.Float64Var(&c.factor, "factor", 2, "rate multiplier between ramp steps")
	flag.IntVar(&c.refine, "refine", 2, "bisection steps between the last good and first bad rate")
	flag.IntVar(&c.maxSteps, "max-steps", 14, "ramp steps at most")
	flag.Float64Var(&c.maxDeliveries, "max-deliveries", 2e6, "stop the ramp at this many deliveries/s (loadgen cap)")
	flag.Float64Var(&c.minRatio, "min-ratio", 0.95, "a step keeps up if it delivers at least this share in time")
	flag.DurationVar(&c.maxP99, "max-p99", 500*time.Millisecond, "a step keeps up only if p99 latency is at most this")
	flag.DurationVar(&c.step, "step", 3*time.Second, "publishing time of a ramp step")
	flag.DurationVar(&c.grace, "grace", time.Second, "time after a step during which deliveries still count")
	flag.DurationVar(&c.measure, "measure", 5*time.Second, "publishing time of the 50%/90% steps")
	flag.DurationVar(&c.drain, "drain", 10*time.Second, "longest wait for the server to go quiet between steps")
	flag.DurationVar(&c.settle, "settle", 2*time.Second, "conns: wait before reading RSS")
	flag.DurationVar(&c.hold, "hold", 0, "conns: keep connections idle this long after RSS, then count the living")
	flag.DurationVar(&c.timeout, "timeout", 15*time.Minute, "hard limit on the whole run")
	flag.StringVar(&c.cpuProfile, "cpuprofile", "", "write a Go CPU profile here (tuning the load generator)")
	flag.Parse()

	for _, u := range []string{c.wsURL, c.apiURL} {
		if err := mustLoopback(u); err != nil {
			fmt.Fprintln(os.Stderr, "loadgen:", err)
			os.Exit(1)
		}
	}
	if c.proto != protoCentrifugo && c.proto != protoSocketIO {
		fmt.Fprintln(os.Stderr, "loadgen: unknown -proto", c.proto)
		os.Exit(1)
	}

	if c.cpuProfile != "" {
		f, err := os.Create(c.cpuProfile)
		if err == nil && pprof.StartCPUProfile(f) == nil {
			defer pprof.StopCPUProfile()
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), c.timeout)
	defer cancel()
	t0 := time.Now()
	rep := &report{Mode: c.mode, Proto: c.proto, Label: c.label, Go: runtime.Version(), Procs: runtime.GOMAXPROCS(0)}
	rep.Params = map[string]any{
		"subs": c.subs, "conns": c.conns, "step_s": c.step.Seconds(), "grace_s": c.grace.Seconds(),
		"measure_s": c.measure.Seconds(), "factor": c.factor, "min_ratio": c.minRatio,
		"max_p99_ms": c.maxP99.Milliseconds(), "inflight": c.inflight, "conn_rate": c.connRate,
		"batch": c.batch,
	}
	switch c.mode {
	case "fanout", "channels":
		runRamp(ctx, &c, rep, true)
	case "ingest":
		runRamp(ctx, &c, rep, false)
	case "ingest-fixed":
		runIngestFixed(ctx, &c, rep)
	case "devices":
		runDevices(ctx, &c, rep)
	case "conns":
		runConns(ctx, &c, rep)
	default:
		fmt.Fprintln(os.Stderr, "loadgen: unknown -mode", c.mode)
		os.Exit(1)
	}
	rep.Seconds = round3(time.Since(t0).Seconds())
	rep.Finished = time.Now().UTC().Format(time.RFC3339)
	out, _ := json.Marshal(rep)
	fmt.Println(string(out))
	if !rep.OK {
		pprof.StopCPUProfile()
		os.Exit(2)
	}
}

// mustLoopback refuses any target that is not on this machine's loopback.
func mustLoopback(raw string) error {
	u, err := url.Parse(raw)
	if err != nil {
		return err
	}
	host := u.Hostname()
	ips, err := net.LookupIP(host)
	if err != nil {
		return fmt.Errorf("resolve %s: %w", host, err)
	}
	for _, ip := range ips {
		if !ip.IsLoopback() {
			return fmt.Errorf("%s is not a loopback address; refusing to send traffic there", host)
		}
	}
	return nil
}

func logf(format string, a ...any) {
	fmt.Fprintf(os.Stderr, time.Now().Format("15:04:05.000")+" "+format+"\n", a...)
}

// runRamp drives fanout, channels and ingest: ramp the rate up by -factor
// until a step falls behind, bisect between the last good and the first bad
// rate, then measure at 50% and 90% of the best rate.
func runRamp(ctx context.Context, c *config, rep *report, ws bool) {
	rec := &recorder{}
	var p *pool
	var choose func(rate float64) pick
	var nominal func(rate float64) float64 // deliveries (or requests) per second offered
	switch c.mode {
	case "fanout":
		p = &pool{rec: rec, rate: c.connRate, inflight: c.connInflight,
			channels: func(int) []string { return []string{c.channel} }}
		one := []string{c.channel}
		choose = func(float64) pick {
			return func(int64) ([]string, int64) { return one, int64(c.subs) }
		}
		nominal = func(r float64) float64 { return r * float64(c.subs) }
		if c.start <= 0 {
			c.start = 5000
		}
		c.start = math.Max(c.start/float64(c.subs), 1) // deliveries/s -> publications/s
	case "channels":
		p = &pool{rec: rec, rate: c.connRate, inflight: c.connInflight,
			channels: func(i int) []string { return []string{"p" + strconv.Itoa(i), "shared"} }}
		batch := max(1, min(c.batch, c.conns))
		shared := []string{"shared"}
		choose = func(rate float64) pick {
			every := int64(math.Max(1, math.Round(rate))) // about one shared publication per second
			return func(seq int64) ([]string, int64) {
				if seq%every == 0 {
					return shared, int64(c.conns)
				}
				// A repeated channel is published to twice: still one delivery each.
				chs := make([]string, batch)
				for i := range chs {
					chs[i] = "p" + strconv.Itoa(rand.IntN(c.conns))
				}
				return chs, int64(batch)
			}
		}
		nominal = func(r float64) float64 { return r*float64(batch) + float64(c.conns) }
		if c.start <= 0 {
			c.start = 10000
		}
		c.start = math.Max((c.start-float64(c.conns))/float64(batch), 1) // deliveries/s -> requests/s
	case "ingest":
		choose = func(float64) pick {
			return func(int64) ([]string, int64) { return nil, int64(c.points) }
		}
		nominal = func(r float64) float64 { return r * float64(c.points) }
		if c.start <= 0 {
			c.start = 2000
		}
		c.start = math.Max(c.start/float64(c.points), 1) // points/s -> requests/s
	}
	pub := newPublisher(c.apiURL, c.apiKey, c.inflight)
	if !ws {
		in, err := newIngest(c.secret, c.prefix, c.devices, c.points)
		if err != nil {
			rep.Errors = append(rep.Errors, "device tokens: "+err.Error())
			return
		}
		pub.ingest = in
	}
	if ws {
		p.t = &target{proto: c.proto, wsURL: c.wsURL, secret: c.secret, timeout: 20 * time.Second}
		n := c.subs
		if c.mode == "channels" {
			n = c.conns
		}
		logf("opening %d connections (%s)", n, c.proto)
		o := p.openAll(ctx, n)
		rep.Open = &o
		logf("opened %d/%d in %.2fs (%d errors; %s)", o.Opened, n, o.Seconds, o.Errors, o.FirstErr)
		if o.Opened == 0 {
			rep.Errors = append(rep.Errors, "no connection could be opened: "+o.FirstErr)
			return
		}
		if o.Errors > 0 {
			rep.Errors = append(rep.Errors, fmt.Sprintf("%d of %d connections failed: %s", o.Errors, n, o.FirstErr))
		}
		defer p.closeAll()
	}

	run := func(phase string, rate float64, dur time.Duration) stepResult {
		if ws {
			if n, o := p.repair(ctx); n > 0 {
				logf("reopened %d/%d dropped connections", o.Opened, n)
			}
		}
		id, st := rec.newStep()
		live := 0
		if ws {
			live = p.live()
		}
		cpu := startCPU(c.pid)
		pr := pub.run(ctx, rate, dur, id, choose(rate))
		srvCPU, lgCPU := cpu.stop() // over the publishing time only
		st.deadline.Store(time.Now().Add(c.grace).UnixNano())
		select {
		case <-ctx.Done():
		case <-time.After(c.grace):
		}
		r := stepResult{Phase: phase, Rate: round3(rate), Seconds: dur.Seconds(), Subscribers: live,
			Publish: pr, Expected: pr.Expected, Delivered: st.delivered.Load(),
			ServerCPU: srvCPU, LoadgenCPU: lgCPU}
		if ws {
			r.Disconnects = max(live-p.live(), 0)
			r.Latency = summarize(st.merged())
			if r.Expected > 0 {
				r.Ratio = round3(float64(r.Delivered) / float64(r.Expected))
			}
			r.DeliveriesPerSec = round3(float64(r.Delivered) / dur.Seconds())
		} else {
			r.Latency = pr.HTTP // request latency: the points are not read back
			r.Ratio = round3(float64(pr.OK) / math.Max(1, float64(pr.Intended)))
			r.DeliveriesPerSec = round3(float64(pr.Expected) / dur.Seconds()) // points accepted
		}
		r.OK, r.Reason = judge(c, &r, ws)
		// Let the server drain before the next step so one step's backlog does
		// not load the next; late deliveries still count against this step.
		waitQuiet(ctx, rec, c.drain)
		r.Late = st.late.Load()
		logf("%-10s rate=%-9.1f offered=%-10.0f delivered/s=%-10.0f ratio=%.3f p50=%.1fms p99=%.1fms srv=%.0f%% lg=%.0f%% ok=%v %s",
			phase, rate, nominal(rate), r.DeliveriesPerSec, r.Ratio, r.Latency.P50, r.Latency.P99,
			r.ServerCPU, r.LoadgenCPU, r.OK, r.Reason)
		rep.Steps = append(rep.Steps, r)
		return r
	}

	if c.fixed > 0 && c.mode == "fanout" && ctx.Err() == nil {
		f := run("fixed", c.fixed, c.measure)
		rep.Fixed = &f
	}
	var good, bad *stepResult
	rate := c.start
	for i := 0; i < c.maxSteps && ctx.Err() == nil; i++ {
		r := run("ramp", rate, c.step)
		if !r.OK {
			bad = &r
			break
		}
		good = &r
		if nominal(rate*c.factor) > c.maxDeliveries {
			rep.Capped = true
			break
		}
		rate *= c.factor
	}
	// The first step already fell behind: step down until one keeps up.
	minRate := 0.25
	for good == nil && rate/c.factor >= minRate && ctx.Err() == nil {
		rate /= c.factor
		r := run("ramp-down", rate, c.step)
		if r.OK {
			good = &r
		} else {
			bad = &r
		}
	}
	for i := 0; i < c.refine && good != nil && bad != nil && ctx.Err() == nil; i++ {
		mid := math.Sqrt(good.Rate * bad.Rate)
		if mid/good.Rate < 1.04 {
			break
		}
		r := run("refine", mid, c.step)
		if r.OK {
			good = &r
		} else {
			bad = &r
		}
	}
	if bad != nil && bad.LoadgenCPU >= 90 {
		rep.LoadgenBound = true
	}
	if good == nil {
		rep.Errors = append(rep.Errors, "no rate kept up, not even the lowest")
	} else {
		rep.Max = good
		time.Sleep(c.grace) // a quiet pause after the last (usually overloaded) step
		a50 := run("at-50pct", good.Rate*0.5, c.measure)
		rep.At50 = &a50
		a90 := run("at-90pct", good.Rate*0.9, c.measure)
		rep.At90 = &a90
	}
	rep.Total = rec.total.Load()
	rep.BadPush = rec.bad.Load()
	if ws && rep.Total == 0 {
		rep.Errors = append(rep.Errors, "zero deliveries received")
	}
	if !ws && good == nil {
		rep.Errors = append(rep.Errors, "no request succeeded")
	}
	rep.OK = (ws && rep.Open != nil && rep.Open.Opened > 0 && rep.Total > 0) || (!ws && good != nil)
	if ctx.Err() != nil {
		rep.Errors = append(rep.Errors, "run timed out")
	}
}

// waitQuiet returns once no delivery has arrived for 0.3 s, or after drain.
func waitQuiet(ctx context.Context, rec *recorder, drain time.Duration) {
	quiet, last := 0, rec.total.Load()
	deadline := time.Now().Add(drain)
	for quiet < 3 && time.Now().Before(deadline) && ctx.Err() == nil {
		time.Sleep(100 * time.Millisecond)
		cur := rec.total.Load()
		if cur == last {
			quiet++
		} else {
			quiet = 0
		}
		last = cur
	}
}

// judge decides whether a step kept up; see the README for the criteria.
func judge(c *config, r *stepResult, ws bool) (bool, string) {
	pr := r.Publish
	if pr.Intended > 0 && float64(pr.Sent) < c.minRatio*float64(pr.Intended) {
		return false, fmt.Sprintf("publisher could issue only %d of %d requests", pr.Sent, pr.Intended)
	}
	if pr.Errors > 0 && float64(pr.Errors) > 0.01*float64(pr.Sent) {
		return false, fmt.Sprintf("%d publish errors: %s", pr.Errors, pr.FirstErr)
	}
	if ws {
		if r.Expected == 0 {
			return false, "nothing was published"
		}
		if r.Ratio < c.minRatio {
			return false, fmt.Sprintf("delivered %.1f%% in time", r.Ratio*100)
		}
		if r.Disconnects > 0 {
			return false, fmt.Sprintf("%d subscribers dropped", r.Disconnects)
		}
	}
	if p99 := time.Duration(r.Latency.P99 * float64(time.Millisecond)); p99 > c.maxP99 {
		return false, fmt.Sprintf("p99 %.0fms > %dms", r.Latency.P99, c.maxP99.Milliseconds())
	}
	return true, ""
}

// runConns opens idle connections and measures accept time and RSS.
func runConns(ctx context.Context, c *config, rep *report) {
	rec := &recorder{}
	p := &pool{rec: rec, rate: c.connRate, inflight: c.connInflight,
		t:        &target{proto: c.proto, wsURL: c.wsURL, secret: c.secret, timeout: 30 * time.Second},
		channels: func(i int) []string { return []string{"c" + strconv.Itoa(i)} }}
	rss0 := procRSS(c.pid)
	cpu := startCPU(c.pid)
	logf("opening %d idle connections (%s), server RSS %.1f MiB", c.conns, c.proto, float64(rss0)/(1<<20))
	o := p.openAll(ctx, c.conns)
	srvCPU, lgCPU := cpu.stop()
	rep.Open = &o
	logf("opened %d/%d in %.2fs (%.0f/s, %d errors; %s)", o.Opened, c.conns, o.Seconds, o.PerSecond, o.Errors, o.FirstErr)
	time.Sleep(c.settle)
	rss1 := procRSS(c.pid)
	if c.hold > 0 {
		time.Sleep(c.hold)
	}
	cr := &connsResult{Requested: c.conns, Opened: o.Opened, AliveAfter: p.live(), RSSBefore: rss0, RSSAfter: rss1,
		AcceptSecs: o.Seconds, AcceptRate: o.PerSecond, ServerCPU: srvCPU, LoadgenCPU: lgCPU, HandshakeMs: o.Handshake}
	if o.Opened > 0 && c.pid > 0 {
		cr.RSSPerConn = round3(float64(rss1-rss0) / float64(o.Opened))
	}
	logf("server RSS %.1f MiB -> %.1f MiB: %.0f bytes per connection; %d alive", float64(rss0)/(1<<20),
		float64(rss1)/(1<<20), cr.RSSPerConn, cr.AliveAfter)
	rep.Conns = cr
	p.closeAll()
	if o.Opened == 0 {
		rep.Errors = append(rep.Errors, "no connection could be opened: "+o.FirstErr)
	} else if o.Errors > 0 {
		rep.Errors = append(rep.Errors, fmt.Sprintf("%d of %d connections failed: %s", o.Errors, c.conns, o.FirstErr))
	}
	if cr.AliveAfter < o.Opened {
		rep.Errors = append(rep.Errors, fmt.Sprintf("%d connections dropped while idle", o.Opened-cr.AliveAfter))
	}
	rep.OK = o.Opened > 0
}
