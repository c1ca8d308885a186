package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/golang-jwt/jwt/v5"
	"github.com/gorilla/websocket"
)

// Two wire protocols are spoken:
//
//   - centrifugo: Centrifugo client protocol v2, JSON format. Commands and
//     replies are JSON objects; several may share one WebSocket frame,
//     separated by '\n'. The server pings with `{}` and expects `{}` back.
//   - socketio: Socket.IO v5 over Engine.IO v4, WebSocket transport only.
//     The server pings with "2" and expects "3"; events are `42["name",data]`,
//     acknowledgements `43<id>[...]`.
//
// Both carry publications whose data holds "bench_ts" (the publisher's send
// time, unix ns) and "bench_step" (the load step that sent it).

const (
	protoCentrifugo = "centrifugo"
	protoSocketIO   = "socketio"
)

// errClosed is returned to callers waiting on a reply when the connection dies.
var errClosed = errors.New("connection closed")

type target struct {
	proto   string
	wsURL   string // full WebSocket URL
	secret  string // HS256 secret for connection JWTs
	timeout time.Duration
	// token, when set, mints the connection token of connection idx (device and
	// dashboard tokens); otherwise a plain user token for "bench-<idx>".
	token func(idx int) (string, error)
}

// onPub is called from a connection's read loop for each publication.
type onPub func(c *conn, line []byte)

type conn struct {
	idx int
	t   *target
	ws  *websocket.Conn // socketio: read by readLoop
	// centrifugo: the socket, read by the reactor (rawws.go)
	nc      net.Conn
	fd      int
	r       *reactor
	pending []byte // bytes of an incomplete frame
	frag    []byte // a fragmented message being gathered
	endOnce sync.Once
	wmu     sync.Mutex
	mu      sync.Mutex
	waits   map[uint32]chan error
	nextID  uint32
	dead    atomic.Bool
	done    chan struct{}
	pub     onPub
	// pushes without a bench timestamp that signalled a disconnect or unsubscribe
	kicked atomic.Int64
}

// sourceAddrs is how many loopback source addresses (127.0.0.2 and up) the
// connections are spread over. From one source address, tens of thousands of
// connections (with those of the previous repetition in TIME_WAIT) nearly
// exhaust the ephemeral port range, and the kernel's search for a free port
// in connect() then becomes the limit of the accept rate: 19,800 connections
// went at 130/s to every server alike. Each source address has a port range
// of its own. Destinations are unchanged (127.0.0.1).
const sourceAddrs = 64

var nextSource atomic.Uint32

// loopbackDialer returns a dialer bound to the next loopback source address
// (round robin) when the destination is a loopback address, else a plain one.
func loopbackDialer(hostport string) *net.Dialer {
	d := &net.Dialer{Timeout: 10 * time.Second}
	host, _, err := net.SplitHostPort(hostport)
	if err != nil {
		return d
	}
	if ip := net.ParseIP(host); ip != nil && ip.IsLoopback() && ip.To4() != nil {
		n := nextSource.Add(1) % sourceAddrs
		d.LocalAddr = &net.TCPAddr{IP: net.IPv4(127, 0, 0, byte(2+n))}
	}
	return d
}

var wsDialer = &websocket.Dialer{
	Proxy:            nil, // never go through a proxy: traffic stays on loopback
	HandshakeTimeout: 15 * time.Second,
	ReadBufferSize:   4096,
	WriteBufferSize:  1024,
	NetDialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
		return loopbackDialer(addr).DialContext(ctx, network, addr)
	},
}

func makeToken(secret, user string) (string, error) {
	claims := jwt.MapClaims{
		"sub": user,
		"exp": time.Now().Add(2 * time.Hour).Unix(),
	}
	return jwt.NewWithClaims(jwt.SigningMethodHS256, claims).SignedString([]byte(secret))
}

// makeDeviceToken signs a telemetry device token: Squall lets it post points
// for the device named by sub.
func makeDeviceToken(secret, device string) (string, error) {
	claims := jwt.MapClaims{
		"sub":    device,
		"device": true,
		"exp":    time.Now().Add(2 * time.Hour).Unix(),
	}
	return jwt.NewWithClaims(jwt.SigningMethodHS256, claims).SignedString([]byte(secret))
}

// makeDashboardToken signs a dashboard token: its "devices" claim (the
// telemetry namespace's subscribe_claim) holds the device-id globs it may watch.
func makeDashboardToken(secret, user string, globs []string) (string, error) {
	claims := jwt.MapClaims{
		"sub":     user,
		"devices": globs,
		"exp":     time.Now().Add(2 * time.Hour).Unix(),
	}
	return jwt.NewWithClaims(jwt.SigningMethodHS256, claims).SignedString([]byte(secret))
}

// dial opens one authenticated connection.
func dial(ctx context.Context, t *target, idx int, pub onPub) (*conn, error) {
	ctx, cancel := context.WithTimeout(ctx, t.timeout)
	defer cancel()
	c := &conn{idx: idx, t: t, waits: map[uint32]chan error{}, done: make(chan struct{}), pub: pub}
	token, err := c.token()
	if err != nil {
		return nil, err
	}
	switch t.proto {
	case protoCentrifugo:
		if err := dialRaw(ctx, t, c); err != nil {
			return nil, err
		}
		id, ch := c.register()
		cmd, _ := json.Marshal(map[string]any{
			"id":      id,
			"connect": map[string]any{"token": token, "name": "squall-loadgen"},
		})
		if err := c.write(cmd); err != nil {
			c.close()
			return nil, err
		}
		if err := c.wait(ctx, id, ch); err != nil {
			c.close()
			return nil, fmt.Errorf("connect: %w", err)
		}
	case protoSocketIO:
		ws, resp, err := wsDialer.DialContext(ctx, t.wsURL, http.Header{})
		if err != nil {
			if resp != nil {
				return nil, fmt.Errorf("websocket dial: %w (HTTP %d)", err, resp.StatusCode)
			}
			return nil, fmt.Errorf("websocket dial: %w", err)
		}
		c.ws = ws
		// The Engine.IO open packet comes first; read it before the loop starts.
		_ = ws.SetReadDeadline(time.Now().Add(t.timeout))
		_, msg, err := ws.ReadMessage()
		if err != nil || len(msg) == 0 || msg[0] != '0' {
			_ = ws.Close()
			return nil, fmt.Errorf("engine.io open: %q %v", msg, err)
		}
		_ = ws.SetReadDeadline(time.Time{})
		go c.readLoop()
		ch := make(chan error, 1)
		c.mu.Lock()
		c.waits[0] = ch // id 0 stands for the namespace connect
		c.mu.Unlock()
		auth, _ := json.Marshal(map[string]string{"token": token})
		if err := c.write(append([]byte("40"), auth...)); err != nil {
			c.close()
			return nil, err
		}
		if err := c.wait(ctx, 0, ch); err != nil {
			c.close()
			return nil, fmt.Errorf("socket.io connect: %w", err)
		}
	default:
		return nil, fmt.Errorf("unknown protocol %q", t.proto)
	}
	return c, nil
}

// token mints the connection's JWT.
func (c *conn) token() (string, error) {
	if c.t.token != nil {
		return c.t.token(c.idx)
	}
	return makeToken(c.t.secret, "bench-"+strconv.Itoa(c.idx))
}

func (c *conn) register() (uint32, chan error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.nextID++
	ch := make(chan error, 1)
	c.waits[c.nextID] = ch
	return c.nextID, ch
}

func (c *conn) wait(ctx context.Context, id uint32, ch chan error) error {
	select {
	case err := <-ch:
		return err
	case <-c.done:
		return errClosed
	case <-ctx.Done():
		c.mu.Lock()
		delete(c.waits, id)
		c.mu.Unlock()
		return fmt.Errorf("no reply: %w", ctx.Err())
	}
}

func (c *conn) resolve(id uint32, err error) {
	c.mu.Lock()
	ch, ok := c.waits[id]
	delete(c.waits, id)
	c.mu.Unlock()
	if ok {
		ch <- err
	}
}

// subscribe subscribes to channels one after another, waiting for each reply.
func (c *conn) subscribe(ctx context.Context, channels ...string) error {
	for _, chName := range channels {
		ctx, cancel := context.WithTimeout(ctx, c.t.timeout)
		id, ch := c.register()
		var msg []byte
		if c.t.proto == protoCentrifugo {
			msg, _ = json.Marshal(map[string]any{"id": id, "subscribe": map[string]any{"channel": chName}})
		} else {
			body, _ := json.Marshal([]any{"subscribe", map[string]any{"channel": chName}})
			msg = append([]byte("42"+strconv.FormatUint(uint64(id), 10)), body...)
		}
		err := c.write(msg)
		if err == nil {
			err = c.wait(ctx, id, ch)
		}
		cancel()
		if err != nil {
			return fmt.Errorf("subscribe %s: %w", chName, err)
		}
	}
	return nil
}

func (c *conn) write(b []byte) error {
	if c.ws == nil {
		return c.writeFrame(0x1, b)
	}
	c.wmu.Lock()
	defer c.wmu.Unlock()
	_ = c.ws.SetWriteDeadline(time.Now().Add(10 * time.Second))
	return c.ws.WriteMessage(websocket.TextMessage, b)
}

func (c *conn) close() {
	if c.ws == nil {
		c.die()
		return
	}
	if c.dead.CompareAndSwap(false, true) {
		_ = c.ws.Close()
	}
}

func (c *conn) alive() bool {
	select {
	case <-c.done:
		return false
	default:
		return !c.dead.Load()
	}
}

// readLoop reads a Socket.IO connection (Centrifugo connections are read by the
// reactor, rawws.go).
func (c *conn) readLoop() {
	defer func() {
		c.dead.Store(true)
		_ = c.ws.Close()
		close(c.done)
	}()
	for {
		_, msg, err := c.ws.ReadMessage()
		if err != nil {
			return
		}
		c.handleSocketIO(msg)
	}
}

type centrifugoReply struct {
	ID    uint32 `json:"id"`
	Error *struct {
		Code    int    `json:"code"`
		Message string `json:"message"`
	} `json:"error"`
	Push *struct {
		Disconnect  json.RawMessage `json:"disconnect"`
		Unsubscribe json.RawMessage `json:"unsubscribe"`
	} `json:"push"`
}

func (c *conn) handleCentrifugo(line []byte) {
	if bytes.Contains(line, []byte(`"bench_ts"`)) {
		c.pub(c, line)
		return
	}
	trimmed := bytes.TrimSpace(line)
	if bytes.Equal(trimmed, []byte("{}")) {
		_ = c.write([]byte("{}")) // pong
		return
	}
	var r centrifugoReply
	if err := json.Unmarshal(trimmed, &r); err != nil {
		return
	}
	if r.ID != 0 {
		if r.Error != nil {
			c.resolve(r.ID, fmt.Errorf("error %d: %s", r.Error.Code, r.Error.Message))
		} else {
			c.resolve(r.ID, nil)
		}
		return
	}
	if r.Push != nil && (r.Push.Disconnect != nil || r.Push.Unsubscribe != nil) {
		c.kicked.Add(1)
	}
}

func (c *conn) handleSocketIO(msg []byte) {
	switch {
	case len(msg) == 0:
	case msg[0] == '2': // Engine.IO ping
		_ = c.write([]byte("3"))
	case msg[0] == '1': // Engine.IO close
		c.close()
	case len(msg) >= 2 && msg[0] == '4':
		body := msg[2:]
		switch msg[1] {
		case '2': // event
			if bytes.Contains(body, []byte(`"bench_ts"`)) {
				c.pub(c, body)
			}
		case '0': // namespace connect accepted
			c.resolve(0, nil)
		case '4': // namespace connect refused
			c.resolve(0, fmt.Errorf("refused: %s", body))
		case '3': // ack: digits of the id, then the JSON array
			n := 0
			for n < len(body) && body[n] >= '0' && body[n] <= '9' {
				n++
			}
			id, err := strconv.ParseUint(string(body[:n]), 10, 32)
			if err == nil {
				if bytes.Contains(body[n:], []byte(`"error"`)) {
					c.resolve(uint32(id), fmt.Errorf("ack error: %s", body[n:]))
				} else {
					c.resolve(uint32(id), nil)
				}
			}
		case '1': // namespace disconnect
			c.kicked.Add(1)
			c.close()
		}
	}
}
