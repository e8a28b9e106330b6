package imgcache

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
)

func TestBreakerOpensSkipsRedisAndCloses(t *testing.T) {
	e, p := newProxiedEnv(t)
	opts := e.opts()
	opts.L2Timeout = 50 * time.Millisecond
	opts.BreakerThreshold = 3
	opts.BreakerCooldown = 300 * time.Millisecond
	c := newCache[ImageMeta](e, opts)
	p.setBlackhole(true)
	load := func(context.Context) (ImageMeta, error) { return metaV("b", 1), nil }
	for i := range 3 {
		_, _ = c.Get(ctx, NewKey("artist", fmt.Sprint("cold", i)))
	}
	if s := c.Stats(); !s.L2BreakerOpen || s.BreakerTrips != 1 {
		t.Fatalf("after 3 timeouts: %+v, want the breaker open", s)
	}
	for i := range 20 {
		start := time.Now()
		v, err := c.GetOrLoad(ctx, NewKey("artist", fmt.Sprint("open", i)), load)
		if err != nil || v.ETag != `"b-v1"` {
			t.Fatalf("GetOrLoad with the breaker open: %v, %v", v.ETag, err)
		}
		if d := time.Since(start); d > 20*time.Millisecond {
			t.Errorf("GetOrLoad took %v with the breaker open; it must not wait for Redis", d)
		}
	}
	if s := c.Stats(); s.L2Skipped == 0 {
		t.Errorf("L2Skipped = 0 with the breaker open")
	}
	// Redis back: after the cool-down one call probes, succeeds, and the breaker closes.
	p.setBlackhole(false)
	writer := newCache[ImageMeta](e, e.opts())
	k := NewKey("artist", "back")
	if err := writer.Set(ctx, k, metaV("back", 1)); err != nil {
		t.Fatal(err)
	}
	time.Sleep(opts.BreakerCooldown + 50*time.Millisecond)
	eventually(t, func() error {
		if _, err := c.Get(ctx, k); err != nil {
			return fmt.Errorf("Get after Redis came back: %v (stats %+v)", err, c.Stats())
		}
		return nil
	})
	if s := c.Stats(); s.L2BreakerOpen || s.L2Hits == 0 {
		t.Errorf("after recovery: %+v, want the breaker closed and L2 hits", s)
	}
}

// TestRedisRestartDuringLoad restarts Redis under continuous traffic: callers see no error (the
// loader never fails), every instance flushes its L1 on resubscribing, and the hit rate recovers.
func TestRedisRestartDuringLoad(t *testing.T) {
	var e *testEnv
	var restart func()
	if realRedisAddr == "" {
		e = newMiniEnv(t)
		restart = func() { e.mr.Close(); _ = e.mr.Restart() }
	} else {
		e, restart = ownRedisServer(t)
	}
	// A lease whose release the restart swallowed holds its key's loads back for LockTTL (the
	// lease's own expiry, or the waiters' giving up where miniredis never expires it): short here,
	// so that the window below measures recovery, not that wait.
	o := e.opts()
	o.LockTTL = 100 * time.Millisecond
	cs := instances(e, 2, o)
	var errs atomic.Int64
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for g := range 8 {
		wg.Go(func() {
			for i := 0; ; i++ {
				select {
				case <-stop:
					return
				default:
				}
				k := NewKey("artist", fmt.Sprint((i*7+g)%50))
				if _, err := cs[g%2].GetOrLoad(ctx, k, func(context.Context) (ImageMeta, error) { return metaV(k.ID(), 1), nil }); err != nil {
					errs.Add(1)
				}
			}
		})
	}
	time.Sleep(300 * time.Millisecond)
	restart()
	// The bus notices within a few hundred milliseconds; the 8 goroutines above, whose L1 hits
	// never block, share the cores with it (2 here, under -race), hence the generous deadline.
	eventuallyWithin(t, 5*time.Second, func() error {
		for i, c := range cs {
			if s := c.Stats(); s.BusResubscribes < 1 || s.L1Flushes < 1 {
				return fmt.Errorf("instance %d has not resubscribed and flushed: %+v", i, s)
			}
		}
		return nil
	})
	before := cs[0].Stats()
	time.Sleep(300 * time.Millisecond)
	after := cs[0].Stats()
	close(stop)
	wg.Wait()
	if n := errs.Load(); n != 0 {
		t.Errorf("%d callers got errors across the restart", n)
	}
	hits := (after.L1Hits + after.L2Hits) - (before.L1Hits + before.L2Hits)
	misses := after.Misses - before.Misses
	if rate := float64(hits) / float64(hits+misses); rate < 0.9 {
		t.Errorf("hit rate after the restart = %.2f (%d hits, %d misses), want it recovered", rate, hits, misses)
	}
}

func TestSlowRedisBoundedLatencyServesStale(t *testing.T) {
	e, p := newProxiedEnv(t)
	opts := e.opts()
	opts.L2Timeout = 50 * time.Millisecond
	opts.StaleTTL = time.Minute
	opts.BreakerThreshold = -1 // measure the timeout itself, every call
	c := newCache[ImageMeta](e, opts)
	k := NewKey("album", "slow")
	if _, err := c.GetOrLoad(ctx, k, func(context.Context) (ImageMeta, error) { return metaV("slow", 1), nil },
		WithTTL(50*time.Millisecond)); err != nil {
		t.Fatal(err)
	}
	time.Sleep(80 * time.Millisecond) // the value is now stale
	p.latency.Store(int64(300 * time.Millisecond))
	dbDown := errors.New("database is down")
	start := time.Now()
	v, err := c.GetOrLoad(ctx, k, func(context.Context) (ImageMeta, error) { return ImageMeta{}, dbDown }, WithTTL(50*time.Millisecond))
	if d := time.Since(start); d > 2*opts.L2Timeout+100*time.Millisecond {
		t.Errorf("GetOrLoad took %v with Redis answering in 300ms; want about L2Timeout", d)
	}
	if err != nil || v.ETag != `"slow-v1"` {
		t.Errorf("GetOrLoad = %v, %v; want the stale value", v.ETag, err)
	}
	if s := c.Stats(); s.StaleServed != 1 {
		t.Errorf("StaleServed = %d, want 1", s.StaleServed)
	}
	start = time.Now()
	if _, err := c.Get(ctx, NewKey("album", "other")); !errors.Is(err, ErrNotFound) || time.Since(start) > opts.L2Timeout+100*time.Millisecond {
		t.Errorf("Get with a slow Redis: %v after %v", err, time.Since(start))
	}
}

func TestFailSafeServesStaleWithBackoffUntilInvalidated(t *testing.T) {
	e := newEnv(t)
	opts := e.opts()
	opts.StaleTTL = time.Minute
	cs := instances(e, 2, opts)
	a, b := cs[0], cs[1]
	k := NewKey("artist", "fs").With("type", "avatar")
	ttl := WithTTL(100 * time.Millisecond)
	if _, err := a.GetOrLoad(ctx, k, func(context.Context) (ImageMeta, error) { return metaV("fs", 1), nil }, ttl); err != nil {
		t.Fatal(err)
	}
	time.Sleep(150 * time.Millisecond)
	e.advance(150 * time.Millisecond)
	dbDown := errors.New("database is down")
	failing, calls := countingLoader(ImageMeta{}, dbDown)
	for _, c := range []*Cache[ImageMeta]{a, b} { // a from its L1, b from Redis
		v, err := c.GetOrLoad(ctx, k, failing, ttl)
		if err != nil || v.ETag != `"fs-v1"` {
			t.Fatalf("GetOrLoad with the database down = %v, %v; want the stale value", v.ETag, err)
		}
	}
	if calls.Load() != 2 {
		t.Fatalf("loader ran %d times, want once per instance", calls.Load())
	}
	// Within the backoff the loader is not called again.
	for range 5 {
		_, _ = a.GetOrLoad(ctx, k, failing, ttl)
	}
	if calls.Load() != 2 {
		t.Errorf("the failing loader was retried within the backoff: %d calls", calls.Load())
	}
	if s := a.Stats(); s.StaleServed != 6 {
		t.Errorf("a.StaleServed = %d, want 6", s.StaleServed)
	}
	time.Sleep(failSafeBackoff + 50*time.Millisecond)
	_, _ = a.GetOrLoad(ctx, k, failing, ttl)
	if calls.Load() != 3 {
		t.Errorf("after the backoff the loader was not retried: %d calls", calls.Load())
	}
	// An invalidation removes stale values too.
	if err := b.InvalidateEntity(ctx, "artist", "fs"); err != nil {
		t.Fatal(err)
	}
	for i, c := range cs {
		eventually(t, func() error {
			if _, err := c.GetOrLoad(ctx, k, failing, ttl); !errors.Is(err, dbDown) {
				return fmt.Errorf("instance %d after InvalidateEntity: %v, want the load's error", i, err)
			}
			return nil
		})
	}
}

func TestSoftAndHardLoadTimeouts(t *testing.T) {
	e := newEnv(t)
	opts := e.opts()
	opts.StaleTTL = time.Minute
	opts.SoftLoadTimeout = 50 * time.Millisecond
	opts.LoadTimeout = 300 * time.Millisecond
	c := newCache[ImageMeta](e, opts)
	k := NewKey("artist", "soft")
	ttl := WithTTL(100 * time.Millisecond)
	if _, err := c.GetOrLoad(ctx, k, func(context.Context) (ImageMeta, error) { return metaV("soft", 1), nil }, ttl); err != nil {
		t.Fatal(err)
	}
	time.Sleep(150 * time.Millisecond)
	e.advance(150 * time.Millisecond)

	// Soft: the stale value after 50ms, the new one stored when the slow load finishes.
	start := time.Now()
	v, err := c.GetOrLoad(ctx, k, func(context.Context) (ImageMeta, error) {
		time.Sleep(150 * time.Millisecond)
		return metaV("soft", 2), nil
	}, WithTTL(time.Minute))
	if d := time.Since(start); err != nil || v.ETag != `"soft-v1"` || d > 150*time.Millisecond {
		t.Fatalf("past the soft timeout: %v, %v after %v; want the stale value after about 50ms", v.ETag, err, d)
	}
	eventually(t, wantETag(c, k, `"soft-v2"`))

	// Hard, no stale value: the error at the deadline, even from a loader that ignores its context.
	k2 := NewKey("artist", "hard")
	release := make(chan struct{})
	defer close(release)
	start = time.Now()
	_, err = c.GetOrLoad(ctx, k2, func(context.Context) (ImageMeta, error) {
		<-release
		return metaV("hard", 1), nil
	})
	if d := time.Since(start); !errors.Is(err, context.DeadlineExceeded) || d > opts.LoadTimeout+150*time.Millisecond {
		t.Errorf("past the hard timeout: %v after %v, want context.DeadlineExceeded after about %v", err, d, opts.LoadTimeout)
	}
	if s := c.Stats(); s.LoadTimeouts != 1 {
		t.Errorf("LoadTimeouts = %d, want 1", s.LoadTimeouts)
	}
}

// TestFleetStampede: 4 instances x 200 goroutines ask for one cold key whose loader takes 100ms.
func TestFleetStampede(t *testing.T) {
	for _, distributed := range []bool{true, false} {
		t.Run(fmt.Sprint("distributed=", distributed), func(t *testing.T) {
			e := newEnv(t)
			opts := e.opts()
			opts.LocalLoadsOnly = !distributed
			cs := instances(e, 4, opts)
			k := NewKey("album", "hot").With("type", "cover")
			var calls atomic.Int64
			load := func(context.Context) (ImageMeta, error) {
				calls.Add(1)
				time.Sleep(100 * time.Millisecond)
				return metaV("hot", 1), nil
			}
			var wg sync.WaitGroup
			var failed atomic.Int64
			start := make(chan struct{})
			for g := range 800 {
				wg.Go(func() {
					<-start
					if v, err := cs[g%4].GetOrLoad(ctx, k, load); err != nil || v.ETag != `"hot-v1"` {
						failed.Add(1)
					}
				})
			}
			close(start)
			wg.Wait()
			if n := failed.Load(); n != 0 {
				t.Errorf("%d callers failed", n)
			}
			n := calls.Load()
			if distributed && n != 1 {
				t.Errorf("the loader ran %d times across 4 instances, want exactly 1", n)
			}
			if !distributed && (n < 1 || n > 4) {
				t.Errorf("the loader ran %d times, want at most once per instance", n)
			}
			if distributed {
				var waits uint64
				for _, c := range cs {
					waits += c.Stats().LockWaits
				}
				if waits != 3 {
					t.Errorf("LockWaits = %d across instances, want 3", waits)
				}
			}
		})
	}
}

func TestEarlyRefreshKeepsAHotKeyWarm(t *testing.T) {
	e := newEnv(t)
	opts := e.opts()
	opts.EarlyRefresh = 1
	c := newCache[ImageMeta](e, opts)
	k := NewKey("artist", "hot").With("type", "avatar")
	const ttl = 400 * time.Millisecond
	var calls atomic.Int64
	load := func(context.Context) (ImageMeta, error) {
		n := calls.Add(1)
		time.Sleep(5 * time.Millisecond)
		return metaV("hot", int(n)), nil
	}
	const run = 2 * time.Second
	deadline := time.Now().Add(run)
	var wg sync.WaitGroup
	for range 4 {
		wg.Go(func() {
			for time.Now().Before(deadline) {
				if _, err := c.GetOrLoad(ctx, k, load, WithTTL(ttl)); err != nil {
					t.Error(err)
					return
				}
			}
		})
	}
	wg.Wait()
	s := c.Stats()
	if s.Misses != 1 {
		t.Errorf("misses = %d across %v of a %v TTL, want 1 (the first load only)", s.Misses, run, ttl)
	}
	// About once per TTL: 5 TTLs in the run, refreshes land a little before each expiry.
	if n := calls.Load(); n < 4 || n > 12 {
		t.Errorf("the loader ran %d times in %v with a %v TTL, want about once per TTL", n, run, ttl)
	}
	if s.Refreshes == 0 {
		t.Errorf("no early refresh: %+v", s)
	}
}

func TestHitRateGuard(t *testing.T) {
	e := newEnv(t)
	// The writer encodes with JSON, the reader expects the binary form: no read ever hits.
	writer := newCache[ImageMeta](e, Options{Redis: e.rdb, Namespace: e.ns, Codec: jsonCodec{}})
	opts := e.opts()
	opts.L1Size = -1
	logged := captureLog(&opts, slog.LevelWarn)
	opts.HitRateGuard = &HitRateGuard{MinReads: 20, ProbeEvery: 10}
	reader := newCache[ImageMeta](e, opts)
	keys := make([]Key, 20)
	for i := range keys {
		keys[i] = NewKey("artist", fmt.Sprint(i))
		if err := writer.Set(ctx, keys[i], metaV("x", i)); err != nil {
			t.Fatal(err)
		}
	}
	for i := range 60 {
		if i%20 == 0 { // the reader deletes what it cannot read; the writer writes it again
			for j, k := range keys {
				_ = writer.Set(ctx, k, metaV("x", j))
			}
		}
		_, _ = reader.Get(ctx, keys[i%20])
	}
	s := reader.Stats()
	if !s.HitRateGuardOpen || s.HitRateGuardTrips != 1 || s.L2Skipped < 30 {
		t.Errorf("stats = %+v, want the guard open after 20 reads and most later reads skipped", s)
	}
	// Writes go on while reads are skipped.
	k := NewKey("artist", "written")
	if err := reader.Set(ctx, k, metaV("w", 1)); err != nil || e.raw(k) == "" {
		t.Errorf("Set with the guard open: %v; Redis has %q", err, e.raw(k))
	}
	out := logged()
	if n := strings.Count(out, "hit rate collapsed"); n != 1 {
		t.Errorf("%d warnings, want 1:\n%s", n, out)
	}
	for _, cause := range []string{"build keys differently", "codec or schema mismatch", "TTLs too short"} {
		if !strings.Contains(out, cause) {
			t.Errorf("the warning does not name %q:\n%s", cause, out)
		}
	}
}

func TestTTLJitter(t *testing.T) {
	for _, jitter := range []float64{0, -1} {
		t.Run(fmt.Sprint("TTLJitter=", jitter), func(t *testing.T) {
			e := newEnv(t)
			opts := e.opts()
			opts.TTL = 10 * time.Second
			opts.TTLJitter = jitter
			c := newCache[ImageMeta](e, opts)
			seen := map[time.Duration]bool{}
			for i := range 50 {
				k := NewKey("artist", fmt.Sprint(i))
				if err := c.Set(ctx, k, metaV("j", i)); err != nil {
					t.Fatal(err)
				}
				d := e.pttl(k).Round(10 * time.Millisecond)
				if d < 9*time.Second-50*time.Millisecond || d > 10*time.Second {
					t.Errorf("PTTL %v, want within 10%% under 10s", d)
				}
				seen[d] = true
			}
			if jitter == 0 && len(seen) < 10 {
				t.Errorf("%d distinct TTLs among 50 values written together, want them spread", len(seen))
			}
			if jitter < 0 && len(seen) > 2 {
				t.Errorf("TTLJitter < 0 still spread the TTLs: %v", seen)
			}
		})
	}
}

// oomError is a Redis reply, as an OOM from a full Redis is.
type oomError string

func (e oomError) Error() string { return string(e) }
func (oomError) RedisError()     {}

// failWrites answers every write with OOM, as a Redis at maxmemory with noeviction does.
type failWrites struct {
	recordCommands
	writes atomic.Int64
}

func isWrite(name string) bool {
	switch name {
	case "set", "eval", "evalsha", "unlink", "del", "hset", "pexpire":
		return true
	}
	return false
}

func (f *failWrites) ProcessHook(next redis.ProcessHook) redis.ProcessHook {
	return func(ctx context.Context, cmd redis.Cmder) error {
		if isWrite(cmd.Name()) {
			f.writes.Add(1)
			cmd.SetErr(oomError("OOM command not allowed when used memory > 'maxmemory'."))
			return cmd.Err()
		}
		return next(ctx, cmd)
	}
}

func (f *failWrites) ProcessPipelineHook(next redis.ProcessPipelineHook) redis.ProcessPipelineHook {
	return func(ctx context.Context, cmds []redis.Cmder) error {
		var rest []redis.Cmder
		for _, cmd := range cmds {
			if isWrite(cmd.Name()) {
				f.writes.Add(1)
				cmd.SetErr(oomError("OOM command not allowed when used memory > 'maxmemory'."))
			} else {
				rest = append(rest, cmd)
			}
		}
		if len(rest) == 0 {
			return cmds[0].Err()
		}
		return next(ctx, rest)
	}
}

// TestRedisOutOfMemory: reads keep working, writes are counted as errors, nothing retries in a
// storm, and the breaker stays closed (a Redis that answers OOM is up). With a real Redis the
// second part runs against a redis-server of the test's own at maxmemory.
func TestRedisOutOfMemory(t *testing.T) {
	e := newNodeEnv(t) // a hooked *redis.Client on one node's address
	warmC := newCache[ImageMeta](e, e.opts())
	stored := NewKey("artist", "stored")
	if err := warmC.Set(ctx, stored, metaV("stored", 1)); err != nil {
		t.Fatal(err)
	}
	hook := &failWrites{}
	full := redis.NewClient(&redis.Options{Addr: e.node().Options().Addr, ContextTimeoutEnabled: true})
	t.Cleanup(func() { _ = full.Close() })
	full.AddHook(hook)
	opts := e.opts()
	opts.Redis = full
	c := newCache[ImageMeta](e, opts)
	if v, err := c.Get(ctx, stored); err != nil || v.ETag != `"stored-v1"` {
		t.Errorf("read from a full Redis: %v, %v", v.ETag, err)
	}
	other := newCache[ImageMeta](e, opts) // nothing in L1: GetOrLoad must read Redis too
	load, loads := countingLoader(metaV("stored", 2), nil)
	if v, err := other.GetOrLoad(ctx, stored, load); err != nil || v.ETag != `"stored-v1"` || loads.Load() != 0 {
		t.Errorf("GetOrLoad from a full Redis = %v, %v after %d loads; want the stored value", v.ETag, err, loads.Load())
	}
	const n = 20
	for i := range n {
		if _, err := c.GetOrLoad(ctx, NewKey("artist", fmt.Sprint("new", i)), func(context.Context) (ImageMeta, error) {
			return metaV("new", i), nil
		}); err != nil {
			t.Fatalf("GetOrLoad with Redis full: %v", err)
		}
	}
	if err := c.Set(ctx, NewKey("artist", "s"), metaV("s", 1)); err == nil || !strings.Contains(err.Error(), "OOM") {
		t.Errorf("Set with Redis full: %v, want the OOM error", err)
	}
	s := c.Stats()
	if s.L2Errors < n || s.L2BreakerOpen {
		t.Errorf("stats = %+v, want every failed write counted and the breaker closed", s)
	}
	if w := hook.writes.Load(); w > 2*n+4 {
		t.Errorf("%d write attempts for %d loads and a Set: writes are retried", w, n)
	}
	if realRedisAddr != "" {
		testNoEvictionOOM(t)
		testAllKeysLRUEvictionReloads(t)
	}
}

// testNoEvictionOOM fills a redis-server of the test's own to maxmemory under noeviction.
func testNoEvictionOOM(t *testing.T) {
	e, _ := ownRedisServer(t)
	c := newCache[ImageMeta](e, e.opts())
	stored := NewKey("artist", "stored")
	if err := c.Set(ctx, stored, metaV("stored", 1)); err != nil {
		t.Fatal(err)
	}
	if err := e.rdb.ConfigSet(ctx, "maxmemory-policy", "noeviction").Err(); err != nil {
		t.Fatal(err)
	}
	if err := e.rdb.ConfigSet(ctx, "maxmemory", "3mb").Err(); err != nil {
		t.Fatal(err)
	}
	junk := bytes.Repeat([]byte("x"), 32<<10)
	for i := 0; ; i++ {
		if err := e.rdb.Set(ctx, fmt.Sprint("junk:", i), junk, time.Minute).Err(); err != nil {
			if !strings.Contains(err.Error(), "OOM") {
				t.Fatal(err)
			}
			break
		}
		if i > 10_000 {
			t.Fatal("Redis never reported OOM")
		}
	}
	reader := newCache[ImageMeta](e, e.opts()) // empty L1: reads reach the full Redis
	load, loads := countingLoader(metaV("stored", 2), nil)
	if v, err := reader.GetOrLoad(ctx, stored, load); err != nil || v.ETag != `"stored-v1"` || loads.Load() != 0 {
		t.Errorf("GetOrLoad from a Redis at maxmemory = %v, %v after %d loads; want the stored value", v.ETag, err, loads.Load())
	}
	for i := range 10 {
		if _, err := reader.GetOrLoad(ctx, NewKey("artist", fmt.Sprint("oom", i)), func(context.Context) (ImageMeta, error) {
			return metaV("oom", i), nil
		}); err != nil {
			t.Fatalf("GetOrLoad with Redis at maxmemory: %v", err)
		}
	}
	if err := reader.Set(ctx, NewKey("artist", "s"), metaV("s", 1)); err == nil || !strings.Contains(err.Error(), "OOM") {
		t.Errorf("Set with Redis at maxmemory: %v, want the OOM error", err)
	}
	if s := reader.Stats(); s.L2Errors < 10 || s.L2BreakerOpen {
		t.Errorf("stats = %+v, want the failed writes counted and the breaker closed", s)
	}
}

func testAllKeysLRUEvictionReloads(t *testing.T) {
	e, _ := ownRedisServer(t)
	if err := e.rdb.ConfigSet(ctx, "maxmemory-policy", "allkeys-lru").Err(); err != nil {
		t.Fatal(err)
	}
	if err := e.rdb.ConfigSet(ctx, "maxmemory", "4mb").Err(); err != nil {
		t.Fatal(err)
	}
	opts := e.opts()
	opts.L1Size = -1
	c := newCache[ImageMeta](e, opts)
	var loads atomic.Int64
	load := func(k Key) func(context.Context) (ImageMeta, error) {
		return func(context.Context) (ImageMeta, error) { loads.Add(1); return metaV(k.ID(), 1), nil }
	}
	keys := make([]Key, 200)
	for i := range keys {
		keys[i] = NewKey("artist", fmt.Sprint(i))
		if _, err := c.GetOrLoad(ctx, keys[i], load(keys[i])); err != nil {
			t.Fatal(err)
		}
	}
	junk := bytes.Repeat([]byte("x"), 64<<10)
	for i := range 200 { // push the cache's keys out
		e.rdb.Set(ctx, fmt.Sprint("junk:", i), junk, time.Minute)
	}
	before := loads.Load()
	for _, k := range keys {
		if v, err := c.GetOrLoad(ctx, k, load(k)); err != nil || v.ETag != metaV(k.ID(), 1).ETag {
			t.Fatalf("GetOrLoad after eviction: %v, %v", v.ETag, err)
		}
	}
	if loads.Load() == before {
		t.Errorf("no key was evicted and reloaded; the test did not exercise eviction")
	}
}

// A failing early refresh keeps the current value, counts nothing as stale, and is not retried on
// every hit.
func TestFailingEarlyRefreshKeepsTheValueAndBacksOff(t *testing.T) {
	e := newEnv(t)
	opts := e.opts()
	opts.EarlyRefresh = 50 // refresh as early as possible
	c := newCache[ImageMeta](e, opts)
	k := NewKey("artist", "refresh-fails")
	// delta*beta = 20ms*50 = 1s, the whole TTL: XFetch wants a refresh from the first hits on.
	if _, err := c.GetOrLoad(ctx, k, func(context.Context) (ImageMeta, error) {
		time.Sleep(20 * time.Millisecond)
		return metaV("rf", 1), nil
	}, WithTTL(time.Second)); err != nil {
		t.Fatal(err)
	}
	failing, calls := countingLoader(ImageMeta{}, errors.New("database is down"))
	for range 200 {
		v, err := c.GetOrLoad(ctx, k, failing, WithTTL(time.Second))
		if err != nil || v.ETag != `"rf-v1"` {
			t.Fatalf("GetOrLoad during failing refreshes = %v, %v; want the current value", v.ETag, err)
		}
		time.Sleep(time.Millisecond)
	}
	if n := calls.Load(); n < 1 || n > 2 {
		t.Errorf("the failing refresh ran %d times in ~200ms, want once per backoff (%v)", n, failSafeBackoff)
	}
	if s := c.Stats(); s.StaleServed != 0 {
		t.Errorf("StaleServed = %d: a fresh value was counted as stale", s.StaleServed)
	}
}
