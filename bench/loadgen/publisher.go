package main

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/HdrHistogram/hdrhistogram-go"
)

// publisher posts publications to the server's HTTP API at a fixed rate over
// keep-alive connections, with up to `inflight` requests outstanding. A
// publication that cannot be handed to a worker when it is due (every worker
// busy and the small queue full) is skipped and counted: that is the HTTP API
// falling behind, and it fails the step.
type publisher struct {
	client       *http.Client
	url          string // publish (or ingest) endpoint
	broadcastURL string // used for requests that name several channels
	key          string
	inflight     int
	ingest       *ingest // set: post telemetry points instead of publications
}

// ingest builds telemetry requests for Squall's POST /api/telemetry: each
// request is one device's frame of `points` points, authorised by that
// device's token. Devices take turns. Every point gets a distinct ts
// (milliseconds, kept at or after the current time) so the store keeps them
// all, and carries the send time and the step like a publication does.
type ingest struct {
	points int
	tokens []string // "Bearer <device JWT>", one per device
	mu     sync.Mutex
	lastTS []int64 // per device, the last ts handed out (ms)
}

func newIngest(secret, prefix string, devices, points int) (*ingest, error) {
	in := &ingest{points: points, tokens: make([]string, devices), lastTS: make([]int64, devices)}
	for i := range in.tokens {
		tok, err := makeDeviceToken(secret, prefix+strconv.Itoa(i))
		if err != nil {
			return nil, err
		}
		in.tokens[i] = "Bearer " + tok
	}
	return in, nil
}

// frame appends device dev's frame to buf.
func (in *ingest) frame(buf []byte, dev int, sentNs int64, stepID int, seq int64) []byte {
	now := sentNs / int64(time.Millisecond)
	in.mu.Lock()
	ts := max(now, in.lastTS[dev]+1)
	in.lastTS[dev] = ts + int64(in.points) - 1
	in.mu.Unlock()
	buf = append(buf, '[')
	for i := 0; i < in.points; i++ {
		if i > 0 {
			buf = append(buf, ',')
		}
		buf = append(buf, `{"ts":`...)
		buf = strconv.AppendInt(buf, ts+int64(i), 10)
		buf = append(buf, `,"values":{"bench_ts":`...)
		buf = strconv.AppendInt(buf, sentNs/1000, 10) // µs: a JSON number that stays exact
		buf = append(buf, `,"bench_step":`...)
		buf = strconv.AppendInt(buf, int64(stepID), 10)
		buf = append(buf, `,"seq":`...)
		buf = strconv.AppendInt(buf, seq, 10)
		buf = append(buf, `,"temp":21.5,"load":0.42}}`...)
	}
	return append(buf, ']')
}

func newPublisher(url, key string, inflight int) *publisher {
	tr := &http.Transport{
		Proxy:               nil, // loopback only, never through a proxy
		DialContext:         (&net.Dialer{Timeout: 5 * time.Second, KeepAlive: 30 * time.Second}).DialContext,
		MaxIdleConns:        inflight,
		MaxIdleConnsPerHost: inflight,
		MaxConnsPerHost:     inflight,
		DisableCompression:  true,
		IdleConnTimeout:     90 * time.Second,
	}
	return &publisher{
		client:       &http.Client{Transport: tr, Timeout: 30 * time.Second},
		url:          url,
		broadcastURL: strings.TrimSuffix(url, "/publish") + "/broadcast",
		key:          key,
		inflight:     inflight,
	}
}

// pick chooses the channels of request seq and how many deliveries it should
// cause in all. One channel makes a publish request; several make one
// broadcast request (the same data published to each channel).
type pick func(seq int64) (channels []string, fanout int64)

type pubResult struct {
	Intended int64   `json:"intended"`
	Sent     int64   `json:"sent"`
	OK       int64   `json:"ok"`
	Errors   int64   `json:"errors"`
	Skipped  int64   `json:"skipped"`
	Expected int64   `json:"expected_deliveries"`
	FirstErr string  `json:"first_error,omitempty"`
	HTTP     latency `json:"http_latency"`
}

type pubJob struct {
	seq      int64
	channels []string
	fanout   int64
}

// run publishes at `rate` per second for `dur`, tagging each publication with
// stepID. The first publication goes out at once, so even rates below one per
// step still publish.
func (p *publisher) run(ctx context.Context, rate float64, dur time.Duration, stepID int, choose pick) pubResult {
	var (
		res      pubResult
		ok, errs atomic.Int64
		expected atomic.Int64
		errOnce  sync.Once
		hmu      sync.Mutex
	)
	hist := hdrhistogram.New(histMinUs, histMaxUs, histSigFigs)
	record := func(sent time.Time, err error, fanout int64) {
		us := time.Since(sent).Microseconds()
		hmu.Lock()
		_ = hist.RecordValue(max(us, histMinUs))
		hmu.Unlock()
		if err != nil {
			errs.Add(1)
			errOnce.Do(func() { res.FirstErr = err.Error() })
			return
		}
		ok.Add(1)
		expected.Add(fanout)
	}
	jobs := make(chan pubJob, p.inflight)
	var wg sync.WaitGroup
	for w := 0; w < p.inflight; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			buf := make([]byte, 0, 256)
			for j := range jobs {
				sent := time.Now()
				buf = buf[:0]
				url := p.url
				if p.ingest != nil {
					dev := int(j.seq % int64(len(p.ingest.tokens)))
					buf = p.ingest.frame(buf, dev, sent.UnixNano(), stepID, j.seq)
					err := p.post(ctx, url, p.ingest.tokens[dev], buf)
					record(sent, err, j.fanout)
					continue
				}
				if len(j.channels) == 1 {
					buf = append(buf, `{"channel":`...)
					buf = strconv.AppendQuote(buf, j.channels[0])
				} else {
					url = p.broadcastURL
					buf = append(buf, `{"channels":[`...)
					for i, ch := range j.channels {
						if i > 0 {
							buf = append(buf, ',')
						}
						buf = strconv.AppendQuote(buf, ch)
					}
					buf = append(buf, ']')
				}
				buf = append(buf, `,"data":{"bench_ts":`...)
				buf = strconv.AppendInt(buf, sent.UnixNano(), 10)
				buf = append(buf, `,"bench_step":`...)
				buf = strconv.AppendInt(buf, int64(stepID), 10)
				buf = append(buf, `,"seq":`...)
				buf = strconv.AppendInt(buf, j.seq, 10)
				buf = append(buf, `}}`...)
				err := p.post(ctx, url, "", buf)
				record(sent, err, j.fanout)
			}
		}()
	}

	start := time.Now()
	tick := time.NewTicker(time.Millisecond)
	var seq int64
loop:
	for {
		elapsed := time.Since(start)
		if elapsed >= dur {
			break
		}
		due := int64(rate*elapsed.Seconds()) + 1
		for seq < due {
			chs, fan := choose(seq)
			select {
			case jobs <- pubJob{seq: seq, channels: chs, fanout: fan}:
				res.Sent++
			default:
				res.Skipped++
			}
			seq++
		}
		select {
		case <-ctx.Done():
			break loop
		case <-tick.C:
		}
	}
	tick.Stop()
	close(jobs)
	wg.Wait()
	res.Intended = seq
	res.OK = ok.Load()
	res.Errors = errs.Load()
	res.Expected = expected.Load()
	res.HTTP = summarize(hist)
	return res
}

func (p *publisher) post(ctx context.Context, url, auth string, body []byte) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, url, bytes.NewReader(body))
	if err != nil {
		return err
	}
	req.Header.Set("Content-Type", "application/json")
	if auth != "" {
		req.Header.Set("Authorization", auth)
	} else if p.key != "" {
		req.Header.Set("X-API-Key", p.key)
	}
	resp, err := p.client.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(io.LimitReader(resp.Body, 64<<10))
	if resp.StatusCode/100 != 2 {
		return fmt.Errorf("HTTP %d: %.200s", resp.StatusCode, b)
	}
	if bytes.Contains(b, []byte(`"error"`)) || bytes.Contains(b, []byte(`"reason"`)) {
		return fmt.Errorf("API error: %.200s", b) // an error, or telemetry points rejected
	}
	return nil
}
