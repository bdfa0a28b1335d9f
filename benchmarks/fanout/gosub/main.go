// gosub: the subscriber and connection-storm load generator of benchmarks/fanout in Go, so
// that the client side costs less per delivery (and per connection) than the servers under
// test (a Python client needs several microseconds per received frame, and its storms were the
// client's ceiling). Same contract as `loadgen.py` with roles "subscribers" and "storm": JSON
// config in argv[1], JSON-line commands on stdin (reset, stat, report, quit), JSON-line
// replies on stdout, latencies written as little-endian int64 nanoseconds.
// Standard library only: `go build` needs no module downloads.
package main

import (
	"bufio"
	"bytes"
	"crypto/rand"
	"encoding/base64"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

type Spec struct {
	Host    string            `json:"host"`
	Port    int               `json:"port"`
	Path    string            `json:"path"`
	Headers map[string]string `json:"headers"`
	Hello   []string          `json:"hello"`
	Ready   string            `json:"ready"`
	Groups  int               `json:"groups"`
	SrcBase int               `json:"src_base"`
	Tokens  string            `json:"tokens"` // a file, one token a line: connection i's is %T%
}

type Config struct {
	Role        string `json:"role"`
	Server      Spec   `json:"server"`
	N           int    `json:"n"`
	Offset      int    `json:"offset"`
	Concurrency int    `json:"concurrency"`
	Total       int    `json:"total"` // storm: connections made, one after another per worker
	Path        string `json:"path"`  // storm: where the connect latencies go
}

var (
	// The connection tokens of Spec.Tokens: connection i authenticates with tokens[i].
	tokens     []string
	marker     = []byte(`{"t":`)
	groupField = []byte(`,"g":`)
	count      atomic.Int64
	// Bytes read after the handshake and the ready message: the frames as sent, headers
	// included (the baselines' frames must be the gateway's size).
	received atomic.Int64
	first    atomic.Int64
	last     atomic.Int64
	// Latencies of this process's deliveries since the last reset, in nanoseconds. One slice
	// for all connections: the receive loop is the only writer, and takes mu once per batch
	// of ready sockets, not per read.
	mu   sync.Mutex
	lats []int64
	// Deliveries that a connection should not have had, counted under mu: an event of another
	// group than the connection's (misrouted), and one whose timestamp is not after the last
	// the connection read (duplicated, or out of order). A total alone passed a server that
	// sent every group's events to another group's subscribers.
	misrouted int64
	disorder  int64
)

// conn is one subscriber socket after its handshake: a non-blocking descriptor owned by the
// process's epoll loop (no goroutine per connection, so a read costs a system call and the
// scan of its bytes, not a goroutine wake-up).
type conn struct {
	fd     int
	tail   []byte // the unparsed end of the previous read (a marker cut in two)
	closed atomic.Bool
	group  int64 // the group whose events it subscribed to (index % groups)
	lastT  int64 // the timestamp of the last event it read
}

func clientFrame(data []byte) []byte {
	n := len(data)
	var head []byte
	switch {
	case n < 126:
		head = []byte{0x81, 0x80 | byte(n)}
	case n < 65536:
		head = []byte{0x81, 0x80 | 126, byte(n >> 8), byte(n)}
	default:
		head = make([]byte, 10)
		head[0], head[1] = 0x81, 0x80|127
		binary.BigEndian.PutUint64(head[2:], uint64(n))
	}
	mask := make([]byte, 4)
	rand.Read(mask)
	out := append(head, mask...)
	for i, b := range data {
		out = append(out, b^mask[i%4])
	}
	return out
}

// dial retries a set-up that fails (a server whose accept queue overflowed resets or
// closes the connection), as a real client would.
func dial(spec *Spec, index int) (*conn, error) {
	var err error
	for attempt := 0; attempt < 3; attempt++ {
		var k *conn
		if k, err = dialOnce(spec, index); err == nil {
			return k, nil
		}
		time.Sleep(time.Duration(50*(attempt+1)) * time.Millisecond)
	}
	return nil, err
}

func dialOnce(spec *Spec, index int) (*conn, error) {
	c, err := handshake(spec, index)
	if err != nil {
		return nil, err
	}
	// Take the descriptor out of Go's poller: the receive loop reads it with its own epoll.
	f, err := c.(*net.TCPConn).File()
	c.Close()
	if err != nil {
		return nil, err
	}
	fd, err := syscall.Dup(int(f.Fd()))
	f.Close()
	if err != nil {
		return nil, err
	}
	if err := syscall.SetNonblock(fd, true); err != nil {
		syscall.Close(fd)
		return nil, err
	}
	return &conn{fd: fd, group: int64(index % max(1, spec.Groups))}, nil
}

// handshake connects, upgrades, sends the hello messages and reads up to the ready marker.
func handshake(spec *Spec, index int) (net.Conn, error) {
	src := fmt.Sprintf("127.0.0.%d", spec.SrcBase+(index/20000)%200)
	d := net.Dialer{
		Timeout:   60 * time.Second,
		LocalAddr: &net.TCPAddr{IP: net.ParseIP(src)},
		Control: func(network, address string, rc syscall.RawConn) error {
			return rc.Control(func(fd uintptr) {
				syscall.SetsockoptInt(int(fd), syscall.IPPROTO_IP, 24, 1) // IP_BIND_ADDRESS_NO_PORT
			})
		},
	}
	c, err := d.Dial("tcp", net.JoinHostPort(spec.Host, strconv.Itoa(spec.Port)))
	if err != nil {
		return nil, err
	}
	c.SetDeadline(time.Now().Add(60 * time.Second))
	key := make([]byte, 16)
	rand.Read(key)
	var req strings.Builder
	fmt.Fprintf(&req, "GET %s HTTP/1.1\r\nHost: %s:%d\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"+
		"Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n", spec.Path, spec.Host, spec.Port,
		base64.StdEncoding.EncodeToString(key))
	fill := func(m string) string {
		if len(tokens) > 0 {
			m = strings.ReplaceAll(m, "%T%", tokens[index%len(tokens)])
		}
		m = strings.ReplaceAll(m, "%I%", strconv.Itoa(index))
		return strings.ReplaceAll(m, "%G%", strconv.Itoa(index%max(1, spec.Groups)))
	}
	for k, v := range spec.Headers {
		fmt.Fprintf(&req, "%s: %s\r\n", k, fill(v))
	}
	req.WriteString("\r\n")
	if _, err := c.Write([]byte(req.String())); err != nil {
		c.Close()
		return nil, err
	}
	buf := make([]byte, 0, 4096)
	tmp := make([]byte, 4096)
	for bytes.Index(buf, []byte("\r\n\r\n")) < 0 {
		n, err := c.Read(tmp)
		if err != nil {
			c.Close()
			return nil, fmt.Errorf("handshake: %w", err)
		}
		buf = append(buf, tmp[:n]...)
	}
	if !bytes.HasPrefix(buf, []byte("HTTP/1.1 101")) {
		c.Close()
		return nil, fmt.Errorf("upgrade refused: %.200q", buf)
	}
	buf = buf[bytes.Index(buf, []byte("\r\n\r\n"))+4:]
	var hello []byte
	for _, m := range spec.Hello {
		hello = append(hello, clientFrame([]byte(fill(m)))...)
	}
	if len(hello) > 0 {
		if _, err := c.Write(hello); err != nil {
			c.Close()
			return nil, err
		}
	}
	ready := []byte(spec.Ready)
	for bytes.Index(buf, ready) < 0 {
		n, err := c.Read(tmp)
		if err != nil {
			c.Close()
			return nil, fmt.Errorf("before ready: %w (%.200q)", err, buf)
		}
		buf = append(buf, tmp[:n]...)
	}
	c.SetDeadline(time.Time{})
	return c, nil
}

// storm connects, authenticates, subscribes and closes cfg.Total times, cfg.Concurrency at
// once (as loadgen.py's run_storm: a set-up reset by a full accept queue is retried, and the
// connection is closed without a close handshake), then replies with the counts and writes
// each successful set-up's duration.
func storm(cfg *Config, conc int) {
	var next atomic.Int64
	var smu sync.Mutex
	times := make([]int64, 0, cfg.Total)
	errs := []string{}
	var wg sync.WaitGroup
	t0, cpu0 := time.Now(), cpuSeconds()
	for w := 0; w < conc; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				i := int(next.Add(1)) - 1
				if i >= cfg.Total {
					return
				}
				start := time.Now()
				var c net.Conn
				var err error
				for attempt := 0; attempt < 3; attempt++ {
					if c, err = handshake(&cfg.Server, cfg.Offset+i); err == nil {
						break
					}
					time.Sleep(time.Duration(50*(attempt+1)) * time.Millisecond)
				}
				d := time.Since(start).Nanoseconds()
				smu.Lock()
				if err != nil {
					errs = append(errs, err.Error())
				} else {
					times = append(times, d)
				}
				smu.Unlock()
				if c != nil {
					c.Close()
				}
			}
		}()
	}
	wg.Wait()
	elapsed, cpu := time.Since(t0).Seconds(), cpuSeconds()-cpu0
	time.Sleep(200 * time.Millisecond) // let the closes go out
	if f, err := os.Create(cfg.Path); err == nil {
		w := bufio.NewWriter(f)
		binary.Write(w, binary.LittleEndian, times)
		w.Flush()
		f.Close()
	}
	failed := len(errs)
	if len(errs) > 3 {
		errs = errs[:3]
	}
	reply(map[string]any{"done": len(times), "failed": failed, "errors": errs, "elapsed": elapsed, "cpu_s": cpu})
}

// receive is the process's one receive loop: epoll over every connection, each ready socket
// read once into a shared buffer (warm in cache) and scanned for the payloads' timestamps.
func receive(conns []*conn) {
	runtime.LockOSThread()
	ep, err := syscall.EpollCreate1(0)
	if err != nil {
		fmt.Fprintln(os.Stderr, "epoll:", err)
		os.Exit(2)
	}
	maxFd := 0
	for _, k := range conns {
		maxFd = max(maxFd, k.fd)
	}
	byFd := make([]*conn, maxFd+1)
	for _, k := range conns {
		byFd[k.fd] = k
		ev := syscall.EpollEvent{Events: syscall.EPOLLIN | syscall.EPOLLRDHUP, Fd: int32(k.fd)}
		if err := syscall.EpollCtl(ep, syscall.EPOLL_CTL_ADD, k.fd, &ev); err != nil {
			fmt.Fprintln(os.Stderr, "epoll_ctl:", err)
			os.Exit(2)
		}
	}
	events := make([]syscall.EpollEvent, 512)
	buf := make([]byte, 256*1024)
	for {
		n, err := syscall.EpollWait(ep, events, 200)
		if err != nil {
			if err == syscall.EINTR {
				continue
			}
			fmt.Fprintln(os.Stderr, "epoll_wait:", err)
			os.Exit(2)
		}
		if n <= 0 {
			continue
		}
		found := int64(0)
		got := int64(0)
		var now int64
		mu.Lock()
		for i := 0; i < n; i++ {
			k := byFd[events[i].Fd]
			m := copy(buf, k.tail)
			r, err := syscall.Read(k.fd, buf[m:])
			if r <= 0 {
				if err == syscall.EAGAIN || err == syscall.EINTR {
					continue
				}
				syscall.EpollCtl(ep, syscall.EPOLL_CTL_DEL, k.fd, nil)
				syscall.Close(k.fd)
				k.closed.Store(true)
				continue
			}
			now = time.Now().UnixNano()
			got += int64(r)
			data := buf[:m+r]
			f, keep := scan(data, now, k)
			found += f
			k.tail = append(k.tail[:0], data[keep:]...)
			if len(k.tail) > len(buf)/2 {
				k.tail = k.tail[:0]
			}
		}
		mu.Unlock()
		received.Add(got)
		if found > 0 {
			if count.Add(found) == found {
				first.Store(now)
			}
			last.Store(now)
		}
	}
}

// scan appends the latency of each complete timestamp in data to lats, and checks each event's
// group and order for connection k; it returns how many it found and where the unparsed end
// starts (a marker, a number or the group cut by the read's end).
func scan(data []byte, now int64, k *conn) (int64, int) {
	found := int64(0)
	keep := len(data) - len(marker) + 1
	pos := bytes.Index(data, marker)
	for pos >= 0 {
		i := pos + len(marker)
		t := int64(0)
		for i < len(data) && data[i] >= '0' && data[i] <= '9' {
			t = t*10 + int64(data[i]-'0')
			i++
		}
		// `,"g":N` follows the timestamp (wire.payload, and the PostgreSQL row's columns)
		g, j := int64(0), i+len(groupField)
		if j > len(data) || !bytes.Equal(data[i:j], groupField) {
			if i == len(data) || j > len(data) && bytes.HasPrefix(groupField, data[i:]) {
				keep = pos
				break
			}
			g = -1 // no group: not checked
		} else {
			for j < len(data) && data[j] >= '0' && data[j] <= '9' {
				g = g*10 + int64(data[j]-'0')
				j++
			}
			if j == len(data) {
				keep = pos
				break
			}
			i = j
		}
		if g >= 0 && g != k.group {
			misrouted++
		}
		if t <= k.lastT {
			disorder++
		}
		k.lastT = t
		lats = append(lats, now-t)
		found++
		next := bytes.Index(data[i:], marker)
		if next < 0 {
			break
		}
		pos = i + next
	}
	if keep < 0 {
		keep = 0
	}
	return found, keep
}

func reply(v any) {
	b, _ := json.Marshal(v)
	os.Stdout.Write(append(b, '\n'))
}

func cpuSeconds() float64 {
	var ru syscall.Rusage
	syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return float64(ru.Utime.Sec+ru.Stime.Sec) + float64(ru.Utime.Usec+ru.Stime.Usec)/1e6
}

func main() {
	var cfg Config
	if err := json.Unmarshal([]byte(os.Args[1]), &cfg); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	var lim syscall.Rlimit
	syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim)
	want := uint64(200000)
	if lim.Max < want {
		lim.Max = want
	}
	lim.Cur = lim.Max
	syscall.Setrlimit(syscall.RLIMIT_NOFILE, &lim)

	if cfg.Server.Tokens != "" {
		b, err := os.ReadFile(cfg.Server.Tokens)
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(2)
		}
		tokens = strings.Fields(string(b))
	}
	conc := cfg.Concurrency
	if conc < 1 {
		conc = 256
	}
	if cfg.Role == "storm" {
		storm(&cfg, conc)
		return
	}
	sem := make(chan struct{}, conc)
	var dialMu sync.Mutex // not mu: that one guards the latencies (receive, reset, report)
	var conns []*conn
	errs := []string{}
	var wg sync.WaitGroup
	t0 := time.Now()
	for i := 0; i < cfg.N; i++ {
		wg.Add(1)
		sem <- struct{}{}
		go func(i int) {
			defer wg.Done()
			defer func() { <-sem }()
			k, err := dial(&cfg.Server, cfg.Offset+i)
			dialMu.Lock()
			defer dialMu.Unlock()
			if err != nil {
				errs = append(errs, err.Error())
				return
			}
			conns = append(conns, k)
		}(i)
	}
	wg.Wait()
	go receive(conns)
	if len(errs) > 3 {
		errs = errs[:3]
	}
	reply(map[string]any{"ready": len(conns), "failed": cfg.N - len(conns), "errors": errs,
		"connect_s": time.Since(t0).Seconds()})
	open := func() int {
		n := 0
		for _, k := range conns {
			if !k.closed.Load() {
				n++
			}
		}
		return n
	}
	cpu0 := cpuSeconds()
	in := bufio.NewScanner(os.Stdin)
	for in.Scan() {
		var cmd struct {
			Op   string `json:"op"`
			Path string `json:"path"`
		}
		json.Unmarshal(in.Bytes(), &cmd)
		switch cmd.Op {
		case "reset":
			cpu0 = cpuSeconds() // cpu_s counts from here: not the connecting
			mu.Lock()
			lats = lats[:0]
			misrouted, disorder = 0, 0
			count.Store(0)
			received.Store(0)
			first.Store(0)
			last.Store(0)
			mu.Unlock()
			reply(map[string]any{"ok": true})
		case "stat":
			reply(map[string]any{"count": count.Load(), "first": first.Load(), "last": last.Load(), "open": open()})
		case "report":
			// The CPU of the run, taken before the latencies are written: writing them (8 bytes
			// per delivery, ~270 MB at 34M deliveries) took 1.5 s and counted as load.
			cpu := cpuSeconds() - cpu0
			f, err := os.Create(cmd.Path)
			samples := 0
			if err == nil {
				w := bufio.NewWriterSize(f, 1<<20)
				mu.Lock()
				binary.Write(w, binary.LittleEndian, lats)
				samples = len(lats)
				mu.Unlock()
				w.Flush()
				f.Close()
			}
			mu.Lock()
			wrong := map[string]int64{"misrouted": misrouted, "disorder": disorder}
			mu.Unlock()
			reply(map[string]any{"count": count.Load(), "first": first.Load(), "last": last.Load(),
				"samples": samples, "open": open(), "cpu_s": cpu, "bytes": received.Load(),
				"misrouted": wrong["misrouted"], "disorder": wrong["disorder"]})
		case "quit":
			reply(map[string]any{"bye": true})
			os.Exit(0)
		}
	}
}
