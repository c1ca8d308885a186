package main

import (
	"bytes"
	"context"
	"sync"
	"sync/atomic"
	"time"

	"github.com/HdrHistogram/hdrhistogram-go"
)

// pool holds the subscriber connections of one run.
type pool struct {
	t        *target
	rec      *recorder
	channels func(i int) []string
	rate     float64 // connection attempts per second
	inflight int     // handshakes outstanding at once
	// points: pushes are telemetry publications, {"points": [...]}, whose
	// points each carry bench_ts in microseconds; every point is one delivery.
	points bool

	mu    sync.Mutex
	conns []*conn
}

type openResult struct {
	Requested int     `json:"requested"`
	Opened    int     `json:"opened"`
	Errors    int     `json:"errors"`
	FirstErr  string  `json:"first_error,omitempty"`
	Seconds   float64 `json:"seconds"`
	PerSecond float64 `json:"per_second"`
	// Handshake is the time from dial to the last subscribe reply, per connection.
	Handshake latency `json:"handshake"`
}

func (p *pool) onPub(c *conn, line []byte) {
	if p.points {
		p.onPoints(c, line)
		return
	}
	ts, st, ok := parseBench(line)
	if !ok {
		p.rec.bad.Add(1)
		return
	}
	p.rec.record(st, ts, c.idx)
}

// onPoints records every point of a telemetry publication. Squall stores
// metric values as doubles, so bench_ts (µs) comes back as e.g.
// 1717000000123456.0: exact below 2^53, and intAfter stops at the '.'.
func (p *pool) onPoints(c *conn, line []byte) {
	key := []byte(`"bench_ts"`)
	n := 0
	for i := bytes.Index(line, key); i >= 0; {
		rest := line[i:]
		us, ok1 := intAfter(rest, key)
		st, ok2 := intAfter(rest, []byte(`"bench_step"`))
		if !ok1 || !ok2 {
			p.rec.bad.Add(1)
			return
		}
		p.rec.record(int(st), us*1000, c.idx)
		n++
		j := bytes.Index(rest[len(key):], key)
		if j < 0 {
			break
		}
		i += len(key) + j
	}
	if n == 0 {
		p.rec.bad.Add(1)
	}
}

// open dials every index in idxs at the pool's bounded rate.
func (p *pool) open(ctx context.Context, idxs []int) openResult {
	res := openResult{Requested: len(idxs)}
	hist := hdrhistogram.New(histMinUs, histMaxUs, histSigFigs)
	var (
		hmu     sync.Mutex
		errs    atomic.Int64
		errOnce sync.Once
		wg      sync.WaitGroup
	)
	sem := make(chan struct{}, p.inflight)
	start := time.Now()
	interval := time.Duration(float64(time.Second) / p.rate)
	for n, i := range idxs {
		if ctx.Err() != nil {
			break
		}
		// Pace attempts: attempt n starts no earlier than n*interval.
		if d := time.Until(start.Add(time.Duration(n) * interval)); d > 0 {
			time.Sleep(d)
		}
		sem <- struct{}{}
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			defer func() { <-sem }()
			t0 := time.Now()
			c, err := dial(ctx, p.t, i, p.onPub)
			if err == nil {
				err = c.subscribe(ctx, p.channels(i)...)
				if err != nil {
					c.close()
				}
			}
			if err != nil {
				errs.Add(1)
				errOnce.Do(func() { res.FirstErr = err.Error() })
				return
			}
			hmu.Lock()
			_ = hist.RecordValue(max(time.Since(t0).Microseconds(), histMinUs))
			hmu.Unlock()
			p.mu.Lock()
			p.conns[i] = c
			p.mu.Unlock()
		}(i)
	}
	wg.Wait()
	res.Seconds = round3(time.Since(start).Seconds())
	res.Errors = int(errs.Load())
	res.Opened = len(idxs) - res.Errors
	if res.Seconds > 0 {
		res.PerSecond = round3(float64(res.Opened) / res.Seconds)
	}
	res.Handshake = summarize(hist)
	return res
}

// openAll creates n connections, indices 0..n-1.
func (p *pool) openAll(ctx context.Context, n int) openResult {
	p.conns = make([]*conn, n)
	idxs := make([]int, n)
	for i := range idxs {
		idxs[i] = i
	}
	return p.open(ctx, idxs)
}

// dead lists the indices whose connection is missing or closed.
func (p *pool) dead() []int {
	p.mu.Lock()
	defer p.mu.Unlock()
	var out []int
	for i, c := range p.conns {
		if c == nil || !c.alive() {
			out = append(out, i)
		}
	}
	return out
}

func (p *pool) live() int {
	return len(p.conns) - len(p.dead())
}

// repair reopens dead connections; returns how many were reopened.
func (p *pool) repair(ctx context.Context) (int, openResult) {
	idxs := p.dead()
	if len(idxs) == 0 {
		return 0, openResult{}
	}
	return len(idxs), p.open(ctx, idxs)
}

func (p *pool) closeAll() {
	p.mu.Lock()
	conns := p.conns
	p.mu.Unlock()
	for _, c := range conns {
		if c != nil {
			c.close()
		}
	}
}
