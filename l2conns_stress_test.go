package imgcache

import (
	"context"
	"fmt"
	"math/rand/v2"
	"net"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
)

// After a burst of concurrent reads the cache holds readsInFlight connections. Once they have all
// been idle for ConnMaxIdleTime, serial reads should not keep the idle ones held out of the pool.
func TestIdleHeldConnectionsAreGivenBack(t *testing.T) {
	e := newMiniEnv(t)
	rdb := redis.NewClient(&redis.Options{Addr: e.mr.Addr(), ContextTimeoutEnabled: true, ConnMaxIdleTime: 50 * time.Millisecond})
	t.Cleanup(func() { _ = rdb.Close() })
	o := e.opts()
	o.Redis = rdb
	c, keys := heldConnsEnv(t, e, o, 1)
	// A burst: readsInFlight+ concurrent reads, so that readsInFlight connections are held.
	for try := 0; try < 50 && c.l2.conns.held() < readsInFlight; try++ {
		var wg sync.WaitGroup
		for range 16 {
			wg.Go(func() {
				for range 20 {
					_, _ = c.Get(context.Background(), keys[0])
				}
			})
		}
		wg.Wait()
	}
	if n := c.l2.conns.held(); n != readsInFlight {
		t.Fatalf("the burst left %d connections held; want %d to run the test", n, readsInFlight)
	}
	time.Sleep(200 * time.Millisecond) // 4x ConnMaxIdleTime: every held connection is idle
	for range 20 {
		getAll(t, c, keys)
		time.Sleep(5 * time.Millisecond)
	}
	s := rdb.PoolStats()
	if n := c.l2.conns.held(); n > 1 {
		t.Errorf("after %v idle (ConnMaxIdleTime %v) and 20 serial reads, the cache still holds %d connections "+
			"(pool: %d total, %d idle); the idle ones should have been given back",
			200*time.Millisecond, 50*time.Millisecond, n, s.TotalConns, s.IdleConns)
	}
}

// Many concurrent reads of random keys (duplicates included), some cancelled, some with short
// deadlines: each answer must be its own key's value.
func TestConcurrentHeldReadsEachGetTheirOwnValue(t *testing.T) {
	e := newNodeEnv(t)
	o := e.opts()
	o.L2Timeout = 2 * time.Second
	c, keys := heldConnsEnv(t, e, o, 40)
	var kill func()
	if e.mr == nil { // a real Redis: kill the cache's connections now and then
		kill = func() {
			_ = e.node().Do(context.Background(), "client", "kill", "type", "normal", "skipme", "yes").Err()
		}
	}
	var wg sync.WaitGroup
	errs := make(chan error, 64)
	stop := time.Now().Add(1500 * time.Millisecond)
	for g := range 32 {
		wg.Go(func() {
			r := rand.New(rand.NewPCG(uint64(g), 1))
			for time.Now().Before(stop) {
				i := r.IntN(len(keys))
				rctx, cancel := context.Background(), context.CancelFunc(func() {})
				switch r.IntN(4) {
				case 0:
					rctx, cancel = context.WithTimeout(rctx, time.Duration(r.IntN(300))*time.Microsecond)
				case 1:
					rctx, cancel = context.WithCancel(rctx)
					d := time.Duration(r.IntN(100)) * time.Microsecond
					go func() { time.Sleep(d); cancel() }()
				}
				v, err := c.Get(rctx, keys[i])
				cancel()
				if err == nil && v.Path != fmt.Sprintf("/img/%d.jpg", i) {
					select {
					case errs <- fmt.Errorf("Get(%d) = %q", i, v.Path):
					default:
					}
				}
			}
		})
	}
	if kill != nil {
		wg.Go(func() {
			for time.Now().Before(stop) {
				time.Sleep(50 * time.Millisecond)
				kill()
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	if n := c.l2.reads.inflight; n != 0 {
		t.Errorf("%d reads still counted in flight", n)
	}
	if n := c.l2.conns.held(); n > readsInFlight {
		t.Errorf("held %d", n)
	}
}

// Every held connection dies (CLIENT KILL, real Redis): a burst of concurrent reads, batched, must
// still all succeed with no Redis error counted.
func TestDeadHeldConnectionsUnderABurst(t *testing.T) {
	if realRedisAddr == "" {
		t.Skip("needs IMGCACHE_REDIS_ADDR")
	}
	e := newNodeEnv(t)
	o := e.opts()
	o.BreakerThreshold = -1
	c, keys := heldConnsEnv(t, e, o, 32)
	for try := 0; try < 50 && c.l2.conns.held() < readsInFlight; try++ {
		var wg sync.WaitGroup
		for g := range 16 {
			wg.Go(func() {
				for range 10 {
					_, _ = c.Get(context.Background(), keys[g])
				}
			})
		}
		wg.Wait()
	}
	t.Logf("held %d", c.l2.conns.held())
	if err := e.node().Do(context.Background(), "client", "kill", "type", "normal", "skipme", "yes").Err(); err != nil {
		t.Fatal(err)
	}
	time.Sleep(20 * time.Millisecond)
	before := c.Stats().L2Errors
	var wg sync.WaitGroup
	errs := make(chan error, 64)
	for g := range 32 {
		wg.Go(func() {
			v, err := c.Get(context.Background(), keys[g])
			if err != nil || v.Path != fmt.Sprintf("/img/%d.jpg", g) {
				errs <- fmt.Errorf("Get(%d) = %q, %v", g, v.Path, err)
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	if n := c.Stats().L2Errors - before; n != 0 {
		t.Errorf("L2Errors +%d", n)
	}
}

// Close while reads are in flight on held connections: when they end, every connection is back.
func TestCloseDuringHeldReads(t *testing.T) {
	e := newNodeEnv(t)
	o := e.opts()
	o.L1Size = -1
	c, err := New[ImageMeta](o)
	if err != nil {
		t.Fatal(err)
	}
	k := NewKey("album", "1")
	if err := c.Set(ctx, k, ImageMeta{Path: "/a.jpg"}); err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	stop := make(chan struct{})
	for range 8 {
		wg.Go(func() {
			for {
				select {
				case <-stop:
					return
				default:
				}
				if _, err := c.Get(ctx, k); err == ErrClosed {
					return
				}
			}
		})
	}
	time.Sleep(50 * time.Millisecond)
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	close(stop)
	wg.Wait()
	if n := c.l2.conns.held(); n != 0 {
		t.Errorf("held %d after Close and the reads ended", n)
	}
	if s := e.node().PoolStats(); s.TotalConns != s.IdleConns {
		t.Errorf("pool: %d total, %d idle after Close", s.TotalConns, s.IdleConns)
	}
}

// A Get whose caller has already left makes no Redis call ("do not ask Redis, and do not count it",
// l2.call; "a read that gives up before a call was made for it is not counted in L2Errors",
// README), so it must not count in L2Errors; a read that queues and then leaves is not counted.
func TestCancelledGetIsNotAnL2Error(t *testing.T) {
	e := newMiniEnv(t)
	c, keys := heldConnsEnv(t, e, e.opts(), 1)
	gone, cancel := context.WithCancel(context.Background())
	cancel()
	_, err := c.Get(gone, keys[0])
	t.Logf("Get with a cancelled context: %v", err)
	if n := c.Stats().L2Errors; n != 0 {
		t.Errorf("L2Errors = %d after a Get whose context was already cancelled (no Redis call was made); want 0", n)
	}
}

// Reads of random keys, some cancelled, racing Close: no hang, no race, no wrong value, and every
// held connection back once they end.
func TestCloseRacingCancelledReads(t *testing.T) {
	for round := range 5 {
		e := newNodeEnv(t)
		o := e.opts()
		o.L1Size = -1
		c, err := New[ImageMeta](o)
		if err != nil {
			t.Fatal(err)
		}
		keys := make([]Key, 16)
		for i := range keys {
			keys[i] = NewKey("artist", fmt.Sprint(i))
			if err := c.Set(ctx, keys[i], ImageMeta{Path: fmt.Sprintf("/img/%d.jpg", i)}); err != nil {
				t.Fatal(err)
			}
		}
		var wg sync.WaitGroup
		var bad sync.Map
		for g := range 24 {
			wg.Go(func() {
				r := rand.New(rand.NewPCG(uint64(g), uint64(round)))
				for range 200 {
					i := r.IntN(len(keys))
					rctx, cancel := context.WithCancel(ctx)
					if r.IntN(3) == 0 {
						cancel()
					}
					v, err := c.Get(rctx, keys[i])
					cancel()
					if err == ErrClosed {
						return
					}
					if err == nil && v.Path != fmt.Sprintf("/img/%d.jpg", i) {
						bad.Store(i, v.Path)
					}
					if r.IntN(4) == 0 {
						idx := []int{i, r.IntN(len(keys)), i}
						ks := []Key{keys[idx[0]], keys[idx[1]], keys[idx[2]]}
						vals, found, err := c.GetMany(ctx, ks)
						if err == nil {
							for x := range ks {
								if found[x] && vals[x].Path != fmt.Sprintf("/img/%d.jpg", idx[x]) {
									bad.Store(idx[x], vals[x].Path)
								}
							}
						}
					}
				}
			})
		}
		time.Sleep(time.Duration(10+round*20) * time.Millisecond)
		done := make(chan struct{})
		go func() { _ = c.Close(); close(done) }()
		select {
		case <-done:
		case <-time.After(5 * time.Second):
			t.Fatal("Close hangs")
		}
		wg.Wait()
		bad.Range(func(k, v any) bool { t.Errorf("key %v answered %v", k, v); return true })
		if n := c.l2.conns.held(); n != 0 {
			t.Errorf("held %d after Close", n)
		}
		if s := e.node().PoolStats(); s.TotalConns != s.IdleConns {
			t.Errorf("pool: %d total, %d idle after Close", s.TotalConns, s.IdleConns)
		}
	}
}

// agedConn records when it was dialled, and the greatest age at which a command was written on it.
type agedConn struct {
	net.Conn
	born   time.Time
	maxAge *atomic.Int64
}

func (c *agedConn) Write(b []byte) (int, error) {
	if age := int64(time.Since(c.born)); age > c.maxAge.Load() {
		c.maxAge.Store(age)
	}
	return c.Conn.Write(b)
}

// go-redis: "ConnMaxLifetime is the maximum amount of time a connection may be reused." A pooled
// connection taken for a held one late in its life is used for another ConnMaxLifetime after that.
func TestHeldConnectionLivesUnderOneAndAHalfConnMaxLifetime(t *testing.T) {
	e := newMiniEnv(t)
	var maxAge atomic.Int64
	const life = 200 * time.Millisecond
	rdb := redis.NewClient(&redis.Options{
		Addr: e.mr.Addr(), ContextTimeoutEnabled: true, ConnMaxLifetime: life, PoolSize: 4,
		Dialer: func(ctx context.Context, network, addr string) (net.Conn, error) {
			c, err := (&net.Dialer{}).DialContext(ctx, network, addr)
			if err != nil {
				return nil, err
			}
			return &agedConn{Conn: c, born: time.Now(), maxAge: &maxAge}, nil
		},
	})
	t.Cleanup(func() { _ = rdb.Close() })
	o := e.opts()
	o.Redis, o.L1Size = rdb, -1
	c := newCache[ImageMeta](e, o)
	k := NewKey("album", "1")
	if err := c.Set(ctx, k, ImageMeta{Path: "/a.jpg"}); err != nil { // dials the pool's connection
		t.Fatal(err)
	}
	time.Sleep(life * 3 / 4)
	maxAge.Store(0)
	deadline := time.Now().Add(life)
	for time.Now().Before(deadline) {
		if _, err := c.Get(ctx, k); err != nil {
			t.Fatal(err)
		}
		time.Sleep(2 * time.Millisecond)
	}
	t.Logf("max age %v, pool %+v", time.Duration(maxAge.Load()), *rdb.PoolStats())
	if got := time.Duration(maxAge.Load()); got > life*3/2+30*time.Millisecond {
		t.Errorf("a read was written on a connection %v old; ConnMaxLifetime is %v, and a held connection must live at most 1.5 times it", got.Round(time.Millisecond), life)
	}
}
