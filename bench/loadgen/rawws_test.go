package main

import (
	"encoding/binary"
	"fmt"
	"net"
	"os"
	"strings"
	"syscall"
	"testing"
	"time"
)

// pair returns a conn reading one end of a Unix socket pair (as the reactor
// would) and the other end, where the test writes server frames.
func pair(t *testing.T) (*conn, *os.File, *[]string) {
	t.Helper()
	fds, err := syscall.Socketpair(syscall.AF_UNIX, syscall.SOCK_STREAM, 0)
	if err != nil {
		t.Fatal(err)
	}
	for _, fd := range fds { // non-blocking: the test's reads and writes can time out
		if err := syscall.SetNonblock(fd, true); err != nil {
			t.Fatal(err)
		}
	}
	mine := os.NewFile(uintptr(fds[0]), "client")
	nc, err := net.FileConn(mine) // a dup: writes go through it, reads use fds[0]
	if err != nil {
		t.Fatal(err)
	}
	peer := os.NewFile(uintptr(fds[1]), "server")
	got := &[]string{}
	c := &conn{
		t:     &target{proto: protoCentrifugo},
		nc:    nc,
		fd:    fds[0],
		waits: map[uint32]chan error{},
		done:  make(chan struct{}),
		pub:   func(_ *conn, line []byte) { *got = append(*got, string(line)) },
	}
	t.Cleanup(func() {
		c.die()
		_ = mine.Close()
		_ = peer.Close()
	})
	return c, peer, got
}

func serverFrame(opcode byte, fin bool, payload []byte) []byte {
	b0 := opcode
	if fin {
		b0 |= 0x80
	}
	n := len(payload)
	out := []byte{b0}
	switch {
	case n < 126:
		out = append(out, byte(n))
	case n <= 0xFFFF:
		out = append(out, 126, byte(n>>8), byte(n))
	default:
		out = append(out, 127)
		out = binary.BigEndian.AppendUint64(out, uint64(n))
	}
	return append(out, payload...)
}

// drain calls readable until the socket is empty.
func drain(c *conn) {
	scratch := make([]byte, 7) // tiny reads: frames arrive cut anywhere
	for i := 0; i < 100000 && !c.dead.Load(); i++ {
		n := len(c.pending)
		c.readable(scratch)
		var probe [1]byte
		if _, _, err := syscall.Recvfrom(c.fd, probe[:], syscall.MSG_PEEK|syscall.MSG_DONTWAIT); err == syscall.EAGAIN && len(c.pending) == n {
			return
		}
	}
}

func pub(i int) string {
	return fmt.Sprintf(`{"push":{"channel":"c","pub":{"data":{"bench_ts":%d,"bench_step":1}}}}`, i)
}

func TestFramesCutAnywhereAndEveryLength(t *testing.T) {
	c, peer, got := pair(t)
	var want []string
	var wire []byte
	for i, size := range []int{10, 200, 70000} { // 7-bit, 16-bit and 64-bit lengths
		line := pub(i)
		line = line[:len(line)-2] + `,"pad":"` + strings.Repeat("x", size) + `"}}`
		want = append(want, line)
		wire = append(wire, serverFrame(0x1, true, []byte(line))...)
	}
	two := pub(7) + "\n" + pub(8) // newline-batched pushes in one frame
	want = append(want, pub(7), pub(8))
	wire = append(wire, serverFrame(0x1, true, []byte(two))...)
	go func() { _, _ = peer.Write(wire) }()
	deadline := time.Now().Add(5 * time.Second)
	for len(*got) < len(want) && time.Now().Before(deadline) {
		drain(c)
	}
	if len(*got) != len(want) {
		t.Fatalf("got %d publications, want %d", len(*got), len(want))
	}
	for i := range want {
		if (*got)[i] != want[i] {
			t.Fatalf("publication %d: got %.60q..., want %.60q...", i, (*got)[i], want[i])
		}
	}
	if len(c.pending) != 0 {
		t.Fatalf("%d bytes left pending", len(c.pending))
	}
}

func TestFragmentsWithAPingBetweenAndTheServersPing(t *testing.T) {
	c, peer, got := pair(t)
	line := []byte(pub(1))
	var wire []byte
	wire = append(wire, serverFrame(0x1, false, line[:10])...)
	wire = append(wire, serverFrame(0x9, true, []byte("hi"))...) // control frame between fragments
	wire = append(wire, serverFrame(0x0, false, line[10:20])...)
	wire = append(wire, serverFrame(0x0, true, line[20:])...)
	wire = append(wire, serverFrame(0x1, true, []byte("{}"))...) // protocol ping: answered with {}
	if _, err := peer.Write(wire); err != nil {
		t.Fatal(err)
	}
	drain(c)
	if len(*got) != 1 || (*got)[0] != string(line) {
		t.Fatalf("got %q", *got)
	}
	// The client's frames: the pong to the WebSocket ping, then {} (both masked).
	_ = peer.SetReadDeadline(time.Now().Add(2 * time.Second))
	buf := make([]byte, 64)
	n, err := peer.Read(buf)
	for err == nil && n < 2*6+2+2 {
		var m int
		m, err = peer.Read(buf[n:])
		n += m
	}
	frames := unmaskAll(t, buf[:n])
	if len(frames) != 2 || frames[0] != "10:hi" || frames[1] != "1:{}" {
		t.Fatalf("client frames %q", frames)
	}
}

func TestCloseFrameEndsTheConnection(t *testing.T) {
	c, peer, _ := pair(t)
	if _, err := peer.Write(serverFrame(0x8, true, []byte{0x03, 0xE8})); err != nil {
		t.Fatal(err)
	}
	drain(c)
	select {
	case <-c.done:
	default:
		t.Fatal("a close frame did not end the connection")
	}
	if c.alive() {
		t.Fatal("connection still alive after close")
	}
}

func TestOversizeDeclaredLengthEndsTheConnection(t *testing.T) {
	c, peer, _ := pair(t)
	head := []byte{0x81, 127}
	head = binary.BigEndian.AppendUint64(head, maxServerMessage+1)
	if _, err := peer.Write(head); err != nil {
		t.Fatal(err)
	}
	drain(c)
	if c.alive() {
		t.Fatal("a frame over maxServerMessage did not end the connection")
	}
}

// unmaskAll decodes masked client frames as "opcode:payload".
func unmaskAll(t *testing.T, b []byte) []string {
	t.Helper()
	var out []string
	for len(b) >= 6 {
		if b[1]&0x80 == 0 {
			t.Fatalf("client frame not masked: % x", b[:2])
		}
		n := int(b[1] & 0x7F)
		key := b[2:6]
		if len(b) < 6+n {
			t.Fatalf("short frame")
		}
		p := make([]byte, n)
		for i := range p {
			p[i] = b[6+i] ^ key[i&3]
		}
		out = append(out, fmt.Sprintf("%d:%s", b[0]&0x0F, p))
		b = b[6+n:]
	}
	return out
}

// Connections to a loopback server come from several loopback source
// addresses, so that the ephemeral ports of one address do not run out.
func TestLoopbackConnectionsSpreadOverSourceAddresses(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	sources := map[string]bool{}
	for i := 0; i < sourceAddrs+1; i++ {
		nc, err := loopbackDialer(ln.Addr().String()).Dial("tcp", ln.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		sc, err := ln.Accept()
		if err != nil {
			t.Fatal(err)
		}
		host, _, _ := net.SplitHostPort(sc.RemoteAddr().String())
		if !strings.HasPrefix(host, "127.") {
			t.Fatalf("connection from %s, not a loopback address", host)
		}
		sources[host] = true
		_ = sc.Close()
		_ = nc.Close()
	}
	if len(sources) != sourceAddrs {
		t.Fatalf("%d connections came from %d source addresses, want %d", sourceAddrs+1, len(sources), sourceAddrs)
	}
	if d := loopbackDialer("example.org:80"); d.LocalAddr != nil {
		t.Fatalf("a non-loopback destination got source address %v", d.LocalAddr)
	}
}
