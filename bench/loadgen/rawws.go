package main

// The receive side of Centrifugo-protocol connections, without a goroutine per
// connection.
//
// With one goroutine blocked in a WebSocket library's read per connection,
// every delivery costs the load generator two read system calls (the one that
// returns the frame and the one that finds the socket empty and parks the
// goroutine) plus a goroutine switch: about 20 µs of its core per delivery,
// more than the server under test spends sending it. Fan-out latency then
// measured the load generator. Here one goroutine waits on a level-triggered
// epoll set holding every connection's socket and reads each ready socket
// once per wake-up, parsing every complete frame the read returned. Writes
// (commands, pongs) still go through the net.Conn.
//
// The opening handshake is the plain RFC 6455 client handshake over that
// net.Conn; frames the client sends are masked as the RFC requires.

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha1"
	"encoding/base64"
	"encoding/binary"
	"fmt"
	"net"
	"net/http"
	"net/url"
	"sync"
	"syscall"
	"time"
)

const wsGUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

// maxServerMessage bounds one reassembled server message (a frame declaring
// more ends the connection): far above anything the scenarios receive.
const maxServerMessage = 16 << 20

type reactor struct {
	epfd  int
	mu    sync.Mutex
	conns map[int32]*conn
	buf   []byte
}

var (
	theReactor     *reactor
	theReactorErr  error
	theReactorOnce sync.Once
)

func getReactor() (*reactor, error) {
	theReactorOnce.Do(func() {
		fd, err := syscall.EpollCreate1(syscall.EPOLL_CLOEXEC)
		if err != nil {
			theReactorErr = fmt.Errorf("epoll_create1: %w", err)
			return
		}
		theReactor = &reactor{epfd: fd, conns: map[int32]*conn{}, buf: make([]byte, 256<<10)}
		go theReactor.run()
	})
	return theReactor, theReactorErr
}

func (r *reactor) add(c *conn) error {
	r.mu.Lock()
	r.conns[int32(c.fd)] = c
	r.mu.Unlock()
	ev := syscall.EpollEvent{Events: syscall.EPOLLIN | syscall.EPOLLRDHUP, Fd: int32(c.fd)}
	if err := syscall.EpollCtl(r.epfd, syscall.EPOLL_CTL_ADD, c.fd, &ev); err != nil {
		r.remove(c)
		return fmt.Errorf("epoll_ctl: %w", err)
	}
	return nil
}

// remove forgets c before its socket is closed (the descriptor number may be
// reused by the next connection at once).
func (r *reactor) remove(c *conn) {
	r.mu.Lock()
	if r.conns[int32(c.fd)] == c {
		delete(r.conns, int32(c.fd))
		_ = syscall.EpollCtl(r.epfd, syscall.EPOLL_CTL_DEL, c.fd, nil)
	}
	r.mu.Unlock()
}

func (r *reactor) run() {
	events := make([]syscall.EpollEvent, 512)
	for {
		n, err := syscall.EpollWait(r.epfd, events, -1)
		if err != nil {
			if err == syscall.EINTR {
				continue
			}
			panic(fmt.Sprintf("epoll_wait: %v", err))
		}
		for i := 0; i < n; i++ {
			r.mu.Lock()
			c := r.conns[events[i].Fd]
			r.mu.Unlock()
			if c != nil {
				c.readable(r.buf)
			}
		}
	}
}

// readable reads what the socket has (one read) and handles every complete frame.
func (c *conn) readable(scratch []byte) {
	if c.dead.Load() {
		return
	}
	n, err := syscall.Read(c.fd, scratch)
	if n <= 0 {
		if err == syscall.EAGAIN || err == syscall.EINTR {
			return
		}
		c.die() // end of stream or a socket error
		return
	}
	data := scratch[:n]
	if len(c.pending) > 0 {
		c.pending = append(c.pending, data...)
		data = c.pending
	}
	used, ok := c.frames(data)
	if !ok {
		c.die()
		return
	}
	rest := data[used:]
	switch {
	case len(rest) == 0:
		c.pending = c.pending[:0]
	case len(c.pending) > 0: // data is c.pending: move the rest to its start
		c.pending = c.pending[:copy(c.pending, rest)]
	default:
		c.pending = append(c.pending[:0], rest...)
	}
}

// frames handles the complete frames at the start of data; it returns the bytes
// used and false when the connection must end (a close frame, a protocol error).
func (c *conn) frames(data []byte) (int, bool) {
	i := 0
	for len(data)-i >= 2 {
		b0, b1 := data[i], data[i+1]
		opcode := b0 & 0x0F
		size := uint64(b1 & 0x7F)
		h := i + 2
		switch size {
		case 126:
			if len(data)-i < 4 {
				return i, true
			}
			size = uint64(binary.BigEndian.Uint16(data[h:]))
			h += 2
		case 127:
			if len(data)-i < 10 {
				return i, true
			}
			size = binary.BigEndian.Uint64(data[h:])
			h += 8
		}
		if size > maxServerMessage || uint64(len(c.frag))+size > maxServerMessage {
			return i, false
		}
		var mask []byte
		if b1&0x80 != 0 { // servers do not mask; accepted anyway
			if len(data) < h+4 {
				return i, true
			}
			mask = data[h : h+4]
			h += 4
		}
		end := h + int(size)
		if end > len(data) {
			return i, true
		}
		payload := data[h:end]
		if mask != nil {
			for k := range payload {
				payload[k] ^= mask[k&3]
			}
		}
		i = end
		final := b0&0x80 != 0
		switch {
		case opcode == 0x8: // close: echo it, then end
			_ = c.writeFrame(0x8, payload)
			return i, false
		case opcode == 0x9:
			_ = c.writeFrame(0xA, payload)
		case opcode == 0xA:
		case opcode == 0x0:
			c.frag = append(c.frag, payload...)
			if final {
				c.message(c.frag)
				c.frag = c.frag[:0]
			}
		case !final:
			c.frag = append(c.frag[:0], payload...)
		default:
			c.message(payload)
		}
	}
	return i, true
}

// message splits one text message into its newline-separated replies and pushes.
func (c *conn) message(msg []byte) {
	for len(msg) > 0 {
		line := msg
		if j := bytes.IndexByte(msg, '\n'); j >= 0 {
			line, msg = msg[:j], msg[j+1:]
		} else {
			msg = nil
		}
		if len(line) > 0 {
			c.handleCentrifugo(line)
		}
	}
}

// writeFrame sends one masked, unfragmented frame.
func (c *conn) writeFrame(opcode byte, payload []byte) error {
	n := len(payload)
	frame := make([]byte, 0, n+14)
	frame = append(frame, 0x80|opcode)
	switch {
	case n < 126:
		frame = append(frame, 0x80|byte(n))
	case n <= 0xFFFF:
		frame = append(frame, 0x80|126, byte(n>>8), byte(n))
	default:
		frame = append(frame, 0x80|127)
		frame = binary.BigEndian.AppendUint64(frame, uint64(n))
	}
	var key [4]byte
	_, _ = rand.Read(key[:])
	frame = append(frame, key[:]...)
	start := len(frame)
	frame = append(frame, payload...)
	for k := range frame[start:] {
		frame[start+k] ^= key[k&3]
	}
	c.wmu.Lock()
	defer c.wmu.Unlock()
	_ = c.nc.SetWriteDeadline(time.Now().Add(10 * time.Second))
	_, err := c.nc.Write(frame)
	return err
}

// die ends the connection once: the reactor forgets it, the socket closes and
// every caller waiting on a reply gets errClosed.
func (c *conn) die() {
	c.endOnce.Do(func() {
		c.dead.Store(true)
		if c.r != nil {
			c.r.remove(c)
		}
		_ = c.nc.Close()
		close(c.done)
	})
}

// dialRaw opens a TCP connection, does the WebSocket handshake and hands the
// socket to the reactor.
func dialRaw(ctx context.Context, t *target, c *conn) error {
	u, err := url.Parse(t.wsURL)
	if err != nil {
		return fmt.Errorf("websocket URL: %w", err)
	}
	if u.Scheme != "ws" {
		return fmt.Errorf("websocket URL: only ws:// is supported, not %q", u.Scheme)
	}
	nc, err := loopbackDialer(u.Host).DialContext(ctx, "tcp", u.Host)
	if err != nil {
		return fmt.Errorf("websocket dial: %w", err)
	}
	if d, ok := ctx.Deadline(); ok {
		_ = nc.SetDeadline(d)
	}
	var raw [16]byte
	_, _ = rand.Read(raw[:])
	key := base64.StdEncoding.EncodeToString(raw[:])
	path := u.RequestURI()
	req := "GET " + path + " HTTP/1.1\r\nHost: " + u.Host +
		"\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: " + key +
		"\r\nSec-WebSocket-Version: 13\r\n\r\n"
	if _, err := nc.Write([]byte(req)); err != nil {
		_ = nc.Close()
		return fmt.Errorf("websocket dial: %w", err)
	}
	br := bufio.NewReaderSize(nc, 1024)
	resp, err := http.ReadResponse(br, nil)
	if err != nil {
		_ = nc.Close()
		return fmt.Errorf("websocket dial: %w", err)
	}
	_ = resp.Body.Close()
	sum := sha1.Sum([]byte(key + wsGUID))
	if resp.StatusCode != http.StatusSwitchingProtocols ||
		resp.Header.Get("Sec-WebSocket-Accept") != base64.StdEncoding.EncodeToString(sum[:]) {
		_ = nc.Close()
		return fmt.Errorf("websocket dial: bad handshake (HTTP %d)", resp.StatusCode)
	}
	_ = nc.SetDeadline(time.Time{})
	c.nc = nc
	sc, err := nc.(*net.TCPConn).SyscallConn()
	if err != nil {
		_ = nc.Close()
		return err
	}
	if err := sc.Control(func(fd uintptr) { c.fd = int(fd) }); err != nil {
		_ = nc.Close()
		return err
	}
	if n := br.Buffered(); n > 0 { // bytes after the 101 response (none expected)
		early, _ := br.Peek(n)
		c.pending = append(c.pending, early...)
	}
	r, err := getReactor()
	if err != nil {
		_ = nc.Close()
		return err
	}
	c.r = r
	if len(c.pending) > 0 {
		used, ok := c.frames(c.pending)
		if !ok {
			_ = nc.Close()
			return fmt.Errorf("websocket: connection ended during the handshake")
		}
		c.pending = c.pending[:copy(c.pending, c.pending[used:])]
	}
	if err := r.add(c); err != nil {
		_ = nc.Close()
		return err
	}
	return nil
}
