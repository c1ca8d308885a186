package main

import (
	"bytes"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/HdrHistogram/hdrhistogram-go"
)

// Latencies are recorded in microseconds, from 1 µs to 60 s, with three
// significant digits: the HDR histogram keeps that precision over the whole range.
const (
	histMinUs   = 1
	histMaxUs   = 60_000_000
	histSigFigs = 3
	histShards  = 8
	maxSteps    = 128
)

func newHist() *hdrhistogram.Histogram {
	return hdrhistogram.New(histMinUs, histMaxUs, histSigFigs)
}

// step collects the deliveries of one load step. Publications carry the id of
// the step that sent them, so a delivery that arrives after the next step has
// started is still charged to its own step. Deliveries that arrive after the
// step's deadline are counted as late and not recorded in the histogram.
type step struct {
	deadline  atomic.Int64 // unix ns; 0 while the step is open
	delivered atomic.Int64
	late      atomic.Int64
	shards    [histShards]struct {
		mu sync.Mutex
		h  *hdrhistogram.Histogram
	}
}

// recorder routes deliveries to steps.
type recorder struct {
	mu    sync.Mutex
	steps [maxSteps]*step
	next  int
	total atomic.Int64 // every delivery carrying a bench timestamp, late or not
	bad   atomic.Int64 // pushes whose payload could not be parsed
}

func (r *recorder) newStep() (int, *step) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.next >= maxSteps {
		// Reuse the last slot rather than fail: the ramp never gets this far.
		r.next = maxSteps - 1
	}
	s := &step{}
	for i := range s.shards {
		s.shards[i].h = newHist()
	}
	id := r.next
	r.steps[id] = s
	r.next++
	return id, s
}

func (r *recorder) get(id int) *step {
	if id < 0 || id >= maxSteps {
		return nil
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.steps[id]
}

// record charges one delivery (sent at sentNs by the publisher) to its step.
func (r *recorder) record(stepID int, sentNs int64, shard int) {
	now := time.Now().UnixNano()
	r.total.Add(1)
	s := r.get(stepID)
	if s == nil {
		return
	}
	if d := s.deadline.Load(); d != 0 && now > d {
		s.late.Add(1)
		return
	}
	s.delivered.Add(1)
	us := (now - sentNs) / 1000
	if us < histMinUs {
		us = histMinUs
	}
	if us > histMaxUs {
		us = histMaxUs
	}
	sh := &s.shards[shard%histShards]
	sh.mu.Lock()
	_ = sh.h.RecordValue(us)
	sh.mu.Unlock()
}

// merged returns one histogram with every shard of the step.
func (s *step) merged() *hdrhistogram.Histogram {
	h := newHist()
	for i := range s.shards {
		sh := &s.shards[i]
		sh.mu.Lock()
		h.Merge(sh.h)
		sh.mu.Unlock()
	}
	return h
}

// latency is the summary written to the JSON report, in milliseconds.
type latency struct {
	Count int64   `json:"count"`
	P50   float64 `json:"p50_ms"`
	P90   float64 `json:"p90_ms"`
	P99   float64 `json:"p99_ms"`
	P999  float64 `json:"p999_ms"`
	Max   float64 `json:"max_ms"`
	Mean  float64 `json:"mean_ms"`
}

func summarize(h *hdrhistogram.Histogram) latency {
	ms := func(us int64) float64 { return round3(float64(us) / 1000) }
	return latency{
		Count: h.TotalCount(),
		P50:   ms(h.ValueAtQuantile(50)),
		P90:   ms(h.ValueAtQuantile(90)),
		P99:   ms(h.ValueAtQuantile(99)),
		P999:  ms(h.ValueAtQuantile(99.9)),
		Max:   ms(h.Max()),
		Mean:  round3(h.Mean() / 1000),
	}
}

func round3(v float64) float64 {
	return float64(int64(v*1000+0.5)) / 1000
}

// parseBench finds the bench timestamp and step id in a push. It scans the raw
// line instead of decoding JSON so that the load generator stays cheap at
// hundreds of thousands of deliveries per second; it tolerates whitespace after
// the colon because Python's json.dumps writes `"key": value`.
func parseBench(line []byte) (ts int64, stepID int, ok bool) {
	ts, ok = intAfter(line, []byte(`"bench_ts"`))
	if !ok {
		return 0, 0, false
	}
	st, ok := intAfter(line, []byte(`"bench_step"`))
	if !ok {
		return 0, 0, false
	}
	return ts, int(st), true
}

func intAfter(b, key []byte) (int64, bool) {
	i := bytes.Index(b, key)
	if i < 0 {
		return 0, false
	}
	i += len(key)
	for i < len(b) && (b[i] == ' ' || b[i] == ':') {
		i++
	}
	var v int64
	n := 0
	for i < len(b) && b[i] >= '0' && b[i] <= '9' {
		v = v*10 + int64(b[i]-'0')
		i++
		n++
	}
	return v, n > 0
}

// procCPU returns the user+system CPU seconds of pid and all its descendants.
func procCPU(pid int) float64 {
	if pid <= 0 {
		return 0
	}
	total := 0.0
	for _, p := range procTree(pid) {
		b, err := os.ReadFile("/proc/" + strconv.Itoa(p) + "/stat")
		if err != nil {
			continue
		}
		// Fields after the command name, which is wrapped in parentheses.
		s := string(b)
		j := strings.LastIndexByte(s, ')')
		if j < 0 {
			continue
		}
		f := strings.Fields(s[j+1:])
		if len(f) < 13 {
			continue
		}
		ut, _ := strconv.ParseFloat(f[11], 64)
		st, _ := strconv.ParseFloat(f[12], 64)
		total += (ut + st) / 100 // USER_HZ is 100 on Linux
	}
	return total
}

// procRSS returns the resident set size in bytes of pid and its descendants.
func procRSS(pid int) int64 {
	if pid <= 0 {
		return 0
	}
	var total int64
	for _, p := range procTree(pid) {
		b, err := os.ReadFile("/proc/" + strconv.Itoa(p) + "/status")
		if err != nil {
			continue
		}
		for _, line := range strings.Split(string(b), "\n") {
			if strings.HasPrefix(line, "VmRSS:") {
				f := strings.Fields(line)
				if len(f) >= 2 {
					kb, _ := strconv.ParseInt(f[1], 10, 64)
					total += kb * 1024
				}
			}
		}
	}
	return total
}

// procTree lists pid and every descendant process.
func procTree(pid int) []int {
	entries, err := os.ReadDir("/proc")
	if err != nil {
		return []int{pid}
	}
	children := map[int][]int{}
	for _, e := range entries {
		p, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		b, err := os.ReadFile("/proc/" + e.Name() + "/stat")
		if err != nil {
			continue
		}
		s := string(b)
		j := strings.LastIndexByte(s, ')')
		if j < 0 {
			continue
		}
		f := strings.Fields(s[j+1:])
		if len(f) < 2 {
			continue
		}
		pp, _ := strconv.Atoi(f[1])
		children[pp] = append(children[pp], p)
	}
	out := []int{pid}
	for i := 0; i < len(out); i++ {
		out = append(out, children[out[i]]...)
	}
	return out
}

// selfCPU returns this process's user+system CPU seconds.
func selfCPU() float64 {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	tv := func(t syscall.Timeval) float64 { return float64(t.Sec) + float64(t.Usec)/1e6 }
	return tv(ru.Utime) + tv(ru.Stime)
}

// cpuMeter measures the CPU share of the server and of the load generator
// over an interval, in percent of one core.
type cpuMeter struct {
	pid         int
	t0          time.Time
	srv0, self0 float64
}

func startCPU(pid int) cpuMeter {
	return cpuMeter{pid: pid, t0: time.Now(), srv0: procCPU(pid), self0: selfCPU()}
}

func (m cpuMeter) stop() (server, loadgen float64) {
	wall := time.Since(m.t0).Seconds()
	if wall <= 0 {
		return 0, 0
	}
	server = round3((procCPU(m.pid) - m.srv0) / wall * 100)
	loadgen = round3((selfCPU() - m.self0) / wall * 100)
	if m.pid <= 0 {
		server = -1
	}
	return server, loadgen
}
