package imgcache

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/alicebob/miniredis/v2/server"
	"github.com/redis/go-redis/v9"
)

// poolGets is how many times a command has taken a connection from rdb's pool.
func poolGets(rdb *redis.Client) uint32 {
	s := rdb.PoolStats()
	return s.Hits + s.Misses
}

// heldConnsEnv stores n values under a cache without L1, so that every Get reads Redis.
func heldConnsEnv(t *testing.T, e *testEnv, o Options, n int) (*Cache[ImageMeta], []Key) {
	t.Helper()
	o.L1Size = -1
	c := newCache[ImageMeta](e, o)
	ctx := context.Background()
	keys := make([]Key, n)
	for i := range keys {
		keys[i] = NewKey("artist", fmt.Sprint(i)).With("type", "avatar")
		if err := c.Set(ctx, keys[i], ImageMeta{Path: fmt.Sprintf("/img/%d.jpg", i)}); err != nil {
			t.Fatal(err)
		}
	}
	return c, keys
}

func getAll(t *testing.T, c *Cache[ImageMeta], keys []Key) {
	t.Helper()
	for i, k := range keys {
		v, err := c.Get(context.Background(), k)
		if err != nil || v.Path != fmt.Sprintf("/img/%d.jpg", i) {
			t.Fatalf("Get(%v) = %+v, %v", k, v, err)
		}
	}
}

// Serial reads go on one held connection: after the first, they take nothing from the pool. With
// ReadConns negative every read takes a pooled connection, as before.
func TestSerialReadsShareOneHeldConnection(t *testing.T) {
	for _, tc := range []struct {
		readConns int
		held      bool
	}{{0, true}, {-1, false}} {
		t.Run(fmt.Sprintf("ReadConns=%d", tc.readConns), func(t *testing.T) {
			e := newNodeEnv(t)
			o := e.opts()
			o.ReadConns = tc.readConns
			c, keys := heldConnsEnv(t, e, o, 50)
			getAll(t, c, keys[:1]) // the connection is taken at the first read
			before := poolGets(e.node())
			getAll(t, c, keys)
			gets := poolGets(e.node()) - before
			if tc.held && gets > 2 { // the bus may take one meanwhile
				t.Errorf("50 reads took %d pooled connections; want them all on the held one", gets)
			}
			if !tc.held && gets < 50 {
				t.Errorf("50 reads took %d pooled connections with ReadConns -1; want one each", gets)
			}
			want := 0
			if tc.held {
				want = 1
			}
			if n := c.l2.conns.held(); n != want {
				t.Errorf("the cache holds %d connections; want %d", n, want)
			}
		})
	}
}

// A held connection that dies (here: Redis restarts) costs no read: the read is made again through
// the pool, the dead connection is dropped, and nothing is counted as a Redis error.
func TestDeadHeldConnectionCostsNoRead(t *testing.T) {
	e := newMiniEnv(t)
	c, keys := heldConnsEnv(t, e, e.opts(), 3)
	getAll(t, c, keys)
	e.mr.Close()
	if err := e.mr.Restart(); err != nil { // same address, same data
		t.Fatal(err)
	}
	getAll(t, c, keys)
	if n := c.Stats().L2Errors; n != 0 {
		t.Errorf("L2Errors = %d after reads that a dead held connection failed; want 0", n)
	}
	if n := c.l2.conns.held(); n != 1 {
		t.Errorf("the cache holds %d connections; want 1, a new one", n)
	}
}

// A held connection that times out is dropped, and the read is not made again through the pool,
// even with budget left (the client's ReadTimeout is shorter than L2Timeout): Redis is slow, not
// the connection dead.
func TestHeldConnectionTimeoutIsNotRetried(t *testing.T) {
	e, p := newProxiedEnv(t)
	rdb := redis.NewClient(&redis.Options{Addr: p.addr(), ContextTimeoutEnabled: true, ReadTimeout: 30 * time.Millisecond, MaxRetries: -1})
	t.Cleanup(func() { _ = rdb.Close() })
	e.rdb = rdb
	o := e.opts()
	o.L2Timeout = 500 * time.Millisecond
	o.BreakerThreshold = -1
	c, keys := heldConnsEnv(t, e, o, 1)
	getAll(t, c, keys)
	p.latency.Store(int64(200 * time.Millisecond))
	before := poolGets(e.node())
	if _, err := c.Get(context.Background(), keys[0]); !errors.Is(err, ErrNotFound) {
		t.Fatalf("Get through a stalled Redis = %v; want ErrNotFound (a miss)", err)
	}
	if n := poolGets(e.node()) - before; n != 0 {
		t.Errorf("the timed-out read took %d pooled connections; it must not be made again", n)
	}
	if n := c.l2.conns.held(); n != 0 {
		t.Errorf("the cache holds %d connections after a timeout; want the timed-out one dropped", n)
	}
	p.latency.Store(0)
	getAll(t, c, keys)
}

// Close gives the held connections back to the client's pool.
func TestCloseGivesHeldConnectionsBack(t *testing.T) {
	e := newNodeEnv(t)
	o := e.opts()
	o.L1Size = -1
	c, err := New[ImageMeta](o)
	if err != nil {
		t.Fatal(err)
	}
	k := NewKey("album", "1")
	ctx := context.Background()
	if err := c.Set(ctx, k, ImageMeta{Path: "/a.jpg"}); err != nil {
		t.Fatal(err)
	}
	// Concurrent reads, so that more than one connection is held.
	done := make(chan error, 8)
	for range 8 {
		go func() {
			var err error
			for range 50 {
				if _, err = c.Get(ctx, k); err != nil {
					break
				}
			}
			done <- err
		}()
	}
	for range 8 {
		if err := <-done; err != nil {
			t.Fatal(err)
		}
	}
	if n := c.l2.conns.held(); n < 1 || n > readsInFlight {
		t.Fatalf("the cache holds %d connections; want 1 to %d", n, readsInFlight)
	}
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	if n := c.l2.conns.held(); n != 0 {
		t.Errorf("the cache holds %d connections after Close; want 0", n)
	}
	if s := e.node().PoolStats(); s.TotalConns != s.IdleConns {
		t.Errorf("after Close the pool has %d connections, %d idle: the cache kept some", s.TotalConns, s.IdleConns)
	}
}

// A held connection is given back once the pool's ConnMaxLifetime has passed, and another taken.
func TestHeldConnectionHonoursConnMaxLifetime(t *testing.T) {
	e := newMiniEnv(t)
	rdb := redis.NewClient(&redis.Options{Addr: e.mr.Addr(), ContextTimeoutEnabled: true, ConnMaxLifetime: 30 * time.Millisecond})
	t.Cleanup(func() { _ = rdb.Close() })
	o := e.opts()
	o.Redis = rdb
	c, keys := heldConnsEnv(t, e, o, 1)
	getAll(t, c, keys)
	before := poolGets(rdb)
	getAll(t, c, keys)
	if n := poolGets(rdb) - before; n > 1 {
		t.Fatalf("a read within the lifetime took %d pooled connections; want the held one", n)
	}
	time.Sleep(60 * time.Millisecond)
	before = poolGets(rdb)
	getAll(t, c, keys)
	if n := poolGets(rdb) - before; n == 0 {
		t.Error("a read past ConnMaxLifetime took no pooled connection; the held one should have been replaced")
	}
}

func TestReadConnsCount(t *testing.T) {
	for _, tc := range []struct {
		name    string
		opt     redis.Options
		want    int
		n       int
		wantErr string
	}{
		{name: "default pool of 20", opt: redis.Options{PoolSize: 20}, n: 4},
		{name: "pool of 8", opt: redis.Options{PoolSize: 8}, n: 2},
		{name: "pool of 3", opt: redis.Options{PoolSize: 3}, n: 0},
		{name: "MaxActiveConns under PoolSize", opt: redis.Options{PoolSize: 20, MaxActiveConns: 4}, n: 1},
		{name: "client-side cache", opt: redis.Options{PoolSize: 20, Protocol: 3, ClientSideCacheConfig: &redis.ClientSideCacheConfig{}}, n: 0},
		{name: "asked for 2", opt: redis.Options{PoolSize: 20}, want: 2, n: 2},
		{name: "asked for 9", opt: redis.Options{PoolSize: 20}, want: 9, n: readsInFlight},
		{name: "asked for none", opt: redis.Options{PoolSize: 20}, want: -1, n: 0},
		{name: "asked for the whole pool", opt: redis.Options{PoolSize: 3}, want: 3, wantErr: "ReadConns is 3"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			tc.opt.Addr = "127.0.0.1:1"
			c := redis.NewClient(&tc.opt)
			defer c.Close()
			n, err := readConnsFor(c, tc.want)
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("readConnsFor = %d, %v; want an error containing %q", n, err, tc.wantErr)
				}
				return
			}
			if err != nil || n != tc.n {
				t.Fatalf("readConnsFor = %d, %v; want %d", n, err, tc.n)
			}
		})
	}
	// New refuses such a count with a clear error.
	e := newMiniEnv(t)
	rdb := redis.NewClient(&redis.Options{Addr: e.mr.Addr(), ContextTimeoutEnabled: true, PoolSize: 2})
	defer rdb.Close()
	o := e.opts()
	o.Redis, o.ReadConns = rdb, 2
	if c, err := New[ImageMeta](o); err == nil {
		_ = c.Close()
		t.Fatal("New accepted ReadConns 2 on a pool of 2")
	}
}

// failReadsOnce makes miniredis answer the next GET or MGET with the error msg.
func failReadsOnce(e *testEnv, msg string) {
	var left atomic.Int32
	left.Store(1)
	e.mr.Server().SetPreHook(func(p *server.Peer, cmd string, _ ...string) bool {
		if (strings.EqualFold(cmd, "get") || strings.EqualFold(cmd, "mget")) && left.Add(-1) >= 0 {
			p.WriteError(msg)
			return true
		}
		return false
	})
}

// A reply error on a held connection drops it, and the read is made again through the pool, as
// go-redis would retry it there: a LOADING or READONLY reply costs no read, and a READONLY, after
// which go-redis marks the connection bad, does not leave a dead connection held.
func TestHeldConnectionReplyErrorIsReadAgainThroughThePool(t *testing.T) {
	for _, msg := range []string{
		"LOADING Redis is loading the dataset in memory",
		"READONLY You can't write against a read only replica.",
	} {
		t.Run(strings.Fields(msg)[0], func(t *testing.T) {
			e := newMiniEnv(t)
			o := e.opts()
			o.BreakerThreshold = -1
			c, keys := heldConnsEnv(t, e, o, 1)
			getAll(t, c, keys)
			failReadsOnce(e, msg)
			getAll(t, c, keys)
			e.mr.Server().SetPreHook(nil)
			before := poolGets(e.node())
			for range 5 {
				getAll(t, c, keys)
			}
			if n := poolGets(e.node()) - before; n > 2 { // the bus may take one meanwhile
				t.Errorf("5 reads after the reply took %d pooled connections; want them on a fresh held one", n)
			}
			if n := c.Stats().L2Errors; n != 0 {
				t.Errorf("L2Errors = %d; want 0", n)
			}
		})
	}
}

// A hook that panics during a read on a held connection does not leak the connection.
func TestHeldConnectionGoesBackWhenAHookPanics(t *testing.T) {
	e := newMiniEnv(t)
	var armed atomic.Bool
	e.node().AddHook(beforeCall(func(_ context.Context, cmds []redis.Cmder) {
		if cmds[0].Name() == "get" && armed.CompareAndSwap(true, false) {
			panic("hook")
		}
	}))
	c, keys := heldConnsEnv(t, e, e.opts(), 1)
	getAll(t, c, keys)
	armed.Store(true)
	func() {
		defer func() {
			if recover() == nil {
				t.Fatal("the hook's panic did not reach the caller")
			}
		}()
		_, _ = c.Get(context.Background(), keys[0])
	}()
	if n := c.l2.conns.held(); n != 0 {
		t.Errorf("the cache holds %d connections after a panic in a read; want the read's given back", n)
	}
	getAll(t, c, keys)
}

// Without a ConnMaxLifetime, a held connection is still replaced after heldConnMaxAge.
func TestHeldConnectionsAreReplacedAfterMaxAge(t *testing.T) {
	e := newMiniEnv(t)
	c, _ := heldConnsEnv(t, e, e.opts(), 0)
	if got := c.l2.conns.maxLife; got != int64(heldConnMaxAge) {
		t.Errorf("maxLife = %v without ConnMaxLifetime; want %v", time.Duration(got), heldConnMaxAge)
	}
}
