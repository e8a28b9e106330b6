package imgcache

import (
	"context"
	"errors"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
)

// proxy is a loopback TCP proxy in front of a Redis, for fault tests: it forwards, or (blackholed)
// accepts connections and reads requests but never answers, which is what a Redis behind a dead
// network path looks like to a client.
type proxy struct {
	ln        net.Listener
	target    string
	blackhole atomic.Bool
	latency   atomic.Int64 // added before forwarding each chunk from the server, in ns

	mu    sync.Mutex // protects conns
	conns map[net.Conn]struct{}
	wg    sync.WaitGroup
}

func newProxy(t testing.TB, target string) *proxy {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &proxy{ln: ln, target: target, conns: map[net.Conn]struct{}{}}
	p.wg.Add(1)
	go p.accept()
	t.Cleanup(p.close)
	return p
}

func (p *proxy) addr() string { return p.ln.Addr().String() }

func (p *proxy) accept() {
	defer p.wg.Done()
	for {
		c, err := p.ln.Accept()
		if err != nil {
			return
		}
		if !p.track(c) {
			return
		}
		p.wg.Add(1)
		go func() {
			defer p.wg.Done()
			p.serve(c)
		}()
	}
}

func (p *proxy) track(cs ...net.Conn) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.conns == nil {
		for _, c := range cs {
			_ = c.Close()
		}
		return false
	}
	for _, c := range cs {
		p.conns[c] = struct{}{}
	}
	return true
}

func (p *proxy) serve(client net.Conn) {
	if p.blackhole.Load() {
		_, _ = io.Copy(io.Discard, client)
		return
	}
	server, err := net.Dial("tcp", p.target)
	if err != nil || !p.track(server) {
		_ = client.Close()
		return
	}
	done := make(chan struct{}, 2)
	pipe := func(dst, src net.Conn) {
		_, _ = io.Copy(dst, src)
		_ = dst.Close()
		_ = src.Close()
		done <- struct{}{}
	}
	go pipe(server, client)
	go func() {
		buf := make([]byte, 32<<10)
		for {
			n, err := server.Read(buf)
			if n > 0 {
				if d := p.latency.Load(); d > 0 {
					time.Sleep(time.Duration(d))
				}
				if _, werr := client.Write(buf[:n]); werr != nil {
					break
				}
			}
			if err != nil {
				break
			}
		}
		_ = client.Close()
		_ = server.Close()
		done <- struct{}{}
	}()
	<-done
	<-done
}

// setBlackhole switches modes and drops every open connection, so that the client's next call meets
// the new mode on a fresh connection.
func (p *proxy) setBlackhole(on bool) {
	p.blackhole.Store(on)
	p.mu.Lock()
	for c := range p.conns {
		_ = c.Close()
	}
	clear(p.conns)
	p.mu.Unlock()
}

func (p *proxy) close() {
	_ = p.ln.Close()
	p.mu.Lock()
	for c := range p.conns {
		_ = c.Close()
	}
	p.conns = nil
	p.mu.Unlock()
	p.wg.Wait()
}

// newProxiedEnv returns an env whose client reaches Redis (real or miniredis) through a proxy.
func newProxiedEnv(t *testing.T) (*testEnv, *proxy) {
	e := newNodeEnv(t) // the proxy forwards to one address
	p := newProxy(t, e.node().Options().Addr)
	rdb := redis.NewClient(&redis.Options{Addr: p.addr(), ContextTimeoutEnabled: true})
	t.Cleanup(func() { _ = rdb.Close() })
	e.rdb = rdb
	return e, p
}

func TestBlackholedRedisCostsAboutL2Timeout(t *testing.T) {
	e, p := newProxiedEnv(t)
	const budget = 50 * time.Millisecond
	const margin = 60 * time.Millisecond // scheduling under -race on two cores
	opts := e.opts()
	opts.L2Timeout = budget
	c := newCache[ImageMeta](e, opts)
	warm := NewKey("artist", "warm")
	if err := c.Set(ctx, warm, sampleMeta("warm")); err != nil {
		t.Fatal(err)
	}
	p.setBlackhole(true)

	timed := func(name string, f func() error, want func(error) bool) {
		t.Helper()
		start := time.Now()
		err := f()
		if d := time.Since(start); d > budget+margin {
			t.Errorf("%s took %v with Redis blackholed, want at most about L2Timeout (%v)", name, d, budget)
		}
		if !want(err) {
			t.Errorf("%s: unexpected error %v", name, err)
		}
	}
	isNil := func(err error) bool { return err == nil }
	for i := range 3 {
		timed("Get of an L1 entry", func() error { return second(c.Get(ctx, warm)) }, isNil)
		timed("Get of an absent key", func() error { return second(c.Get(ctx, NewKey("artist", "cold"))) },
			func(err error) bool { return errors.Is(err, ErrNotFound) })
		k := NewKey("artist", "load").With("round", string(rune('a'+i)))
		timed("GetOrLoad of an absent key", func() error {
			_, err := c.GetOrLoad(ctx, k, func(context.Context) (ImageMeta, error) { return sampleMeta("x"), nil })
			return err
		}, isNil)
		timed("Set", func() error { return c.Set(ctx, NewKey("artist", "w"), sampleMeta("w")) },
			func(err error) bool { return err != nil })
		timed("Delete", func() error { return c.Delete(ctx, NewKey("artist", "w")) },
			func(err error) bool { return err != nil })
	}
	if s := c.Stats(); s.L2Errors == 0 {
		t.Errorf("L2Errors = 0 with Redis blackholed")
	}
	start := time.Now()
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	if d := time.Since(start); d > budget+margin {
		t.Errorf("Close took %v with Redis blackholed", d)
	}

	// Redis back: L2 works again without a restart of anything.
	p.setBlackhole(false)
	c2 := newCache[ImageMeta](e, opts)
	if err := c2.Set(ctx, warm, sampleMeta("warm")); err != nil {
		t.Errorf("Set after Redis came back: %v", err)
	}
}

// A speculating GetOrLoad (most recent reads missed) whose registration times out does not read
// again: with Redis blackholed it costs one L2Timeout, as a flight that read first does, not two.
func TestSpeculatingFlightWaitsOneL2TimeoutAtMost(t *testing.T) {
	e, p := newProxiedEnv(t)
	const budget = 100 * time.Millisecond
	const margin = 60 * time.Millisecond // scheduling under -race on two cores
	opts := e.opts()
	opts.L2Timeout = budget
	c := newCache[ImageMeta](e, opts)
	c.l2Misses.Store(1 << 16)
	p.setBlackhole(true)
	start := time.Now()
	v, err := c.GetOrLoad(ctx, NewKey("artist", "slow"), func(context.Context) (ImageMeta, error) { return metaV("slow", 1), nil })
	if d := time.Since(start); d > budget+margin {
		t.Errorf("GetOrLoad took %v with Redis blackholed, want at most about L2Timeout (%v)", d, budget)
	}
	if err != nil || v.ETag != `"slow-v1"` {
		t.Errorf("GetOrLoad = %s, %v; want the loaded value", v.ETag, err)
	}
}
