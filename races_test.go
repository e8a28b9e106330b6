package imgcache

import (
	"context"
	"errors"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
)

// holdPipeline blocks the first pipeline that has a command named cmd (and, if key is set, that
// key as its first argument) until released; before or after the pipeline runs.
type holdPipeline struct {
	recordCommands
	cmd, key string
	after    bool
	held     chan struct{}
	release  chan struct{}
	once     sync.Once
	// lie, if set, replaces the reply of the matched command after it ran (a reply lost in transit).
	lie error
}

func newHold(cmd, key string, after bool) *holdPipeline {
	return &holdPipeline{cmd: cmd, key: key, after: after, held: make(chan struct{}), release: make(chan struct{})}
}

func (h *holdPipeline) matches(cmds []redis.Cmder) redis.Cmder {
	for _, c := range cmds {
		if c.Name() == h.cmd && (h.key == "" || (len(c.Args()) > 1 && c.Args()[1] == h.key)) {
			return c
		}
	}
	return nil
}

func (h *holdPipeline) ProcessHook(next redis.ProcessHook) redis.ProcessHook {
	return func(ctx context.Context, cmd redis.Cmder) error {
		pipe := h.ProcessPipelineHook(func(ctx context.Context, cmds []redis.Cmder) error { return next(ctx, cmds[0]) })
		return pipe(ctx, []redis.Cmder{cmd})
	}
}

func (h *holdPipeline) ProcessPipelineHook(next redis.ProcessPipelineHook) redis.ProcessPipelineHook {
	return func(ctx context.Context, cmds []redis.Cmder) error {
		m := h.matches(cmds)
		first := false
		if m != nil {
			h.once.Do(func() { first = true })
		}
		if first && !h.after {
			close(h.held)
			<-h.release
		}
		err := next(ctx, cmds)
		if first && h.lie != nil {
			m.SetErr(h.lie)
		}
		if first && h.after {
			close(h.held)
			<-h.release
		}
		return err
	}
}

// heldClient is a client on e's Redis with hook h.
func heldClient(t *testing.T, e *testEnv, h redis.Hook) *redis.Client {
	c := redis.NewClient(&redis.Options{Addr: e.node().Options().Addr, ContextTimeoutEnabled: true})
	t.Cleanup(func() { _ = c.Close() })
	c.AddHook(h)
	return c
}

// heldRing is a one-shard Ring on e's Redis with hook h: not a *redis.Client, so the cache takes
// the paths it takes on a Cluster, where the keys a load writes and checks live on different nodes
// (write, then verify, then take back).
func heldRing(t *testing.T, e *testEnv, h redis.Hook) *redis.Ring {
	r := redis.NewRing(&redis.RingOptions{Addrs: map[string]string{"one": e.node().Options().Addr}, ContextTimeoutEnabled: true})
	t.Cleanup(func() { _ = r.Close() })
	r.AddHook(h)
	return r
}

// heldCluster is a client on e's Redis Cluster with hook h, which sees each command and each
// pipeline before go-redis splits it by node.
func heldCluster(t *testing.T, e *testEnv, h redis.Hook) *redis.ClusterClient {
	c := redis.NewClusterClient(&redis.ClusterOptions{Addrs: clusterAddrs, ContextTimeoutEnabled: true})
	t.Cleanup(func() { _ = c.Close() })
	c.AddHook(h)
	return c
}

// writePaths are the two ways a load writes and checks: on a single Redis in one pipeline that
// also releases the load's lease if its epochs did not move; on a Cluster (a one-shard Ring, and
// the real Cluster in the cluster run) the write first, then the check, and the lease after.
var writePaths = []struct {
	name   string
	env    func(testing.TB) *testEnv
	client func(*testing.T, *testEnv, redis.Hook) redis.UniversalClient
}{
	{"single", newNodeEnv, func(t *testing.T, e *testEnv, h redis.Hook) redis.UniversalClient { return heldClient(t, e, h) }},
	{"ring", newNodeEnv, func(t *testing.T, e *testEnv, h redis.Hook) redis.UniversalClient { return heldRing(t, e, h) }},
	{"cluster", newClusterEnv, func(t *testing.T, e *testEnv, h redis.Hook) redis.UniversalClient { return heldCluster(t, e, h) }},
}

// A read on the invalidating instance, between its L1 drop and its Redis delete, must not leave the
// old value in its L1 (it ignores its own bus message).
func TestLocalReadDuringOwnDelete(t *testing.T) {
	e := newNodeEnv(t) // a hooked *redis.Client on one node's address
	k := NewKey("artist", "local")
	hold := newHold("unlink", e.redisKey(k), false)
	opts := e.opts()
	opts.Redis = heldClient(t, e, hold)
	opts.L2Timeout = 5 * time.Second
	c := newCache[ImageMeta](e, opts)
	if err := c.Set(ctx, k, metaV("local", 1)); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- c.Delete(ctx, k) }()
	<-hold.held
	_, _ = c.Get(ctx, k) // reads the old value from Redis, between the drop and the UNLINK
	close(hold.release)
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if v, err := c.Get(ctx, k); !errors.Is(err, ErrNotFound) {
		t.Errorf("Get after Delete on the same instance = %v, %v; want ErrNotFound", v.ETag, err)
	}
}

// loadDuringDelete starts c.GetOrLoad of k with a loader that returns metaV(id, 1) but only after
// deleter has deleted k: a load that read the database before an update whose Delete overtook it.
// done is closed when the GetOrLoad returns; release lets the loader return.
func loadDuringDelete(t *testing.T, c, deleter *Cache[ImageMeta], k Key, id string) (release, done chan struct{}) {
	t.Helper()
	started := make(chan struct{})
	release, done = make(chan struct{}), make(chan struct{})
	go func() {
		defer close(done)
		_, _ = c.GetOrLoad(ctx, k, func(context.Context) (ImageMeta, error) {
			close(started)
			<-release
			return metaV(id, 1), nil
		})
	}()
	<-started
	if err := deleter.Delete(ctx, k); err != nil {
		t.Fatal(err)
	}
	return release, done
}

// A load whose write lands but whose reply is lost must not leave a value loaded before a Delete.
func TestWriteWithLostReplyIsTakenBack(t *testing.T) {
	for _, wp := range writePaths {
		t.Run(wp.name, func(t *testing.T) {
			e := wp.env(t)
			k := NewKey("artist", "lost")
			hold := newHold("set", e.redisKey(k), true)
			hold.lie = context.DeadlineExceeded
			close(hold.release) // do not block, just lie
			opts := e.opts()
			opts.Redis = wp.client(t, e, hold)
			loader := newCache[ImageMeta](e, opts)
			other := newCache[ImageMeta](e, e.opts())
			release, done := loadDuringDelete(t, loader, other, k, "lost")
			close(release)
			<-done
			select {
			case <-hold.held:
			default:
				t.Fatal("the load's write was never sent")
			}
			if raw := e.raw(k); raw != "" {
				t.Errorf("the write whose reply was lost is in Redis")
			}
			if _, ok := loader.l1.get(k); ok {
				t.Error("the loader kept the value in L1")
			}
		})
	}
}

// A reader that sees a load's write before the load takes it back must not keep it.
func TestTakenBackWriteLeavesNoCopyElsewhere(t *testing.T) {
	for _, wp := range writePaths {
		t.Run(wp.name, func(t *testing.T) {
			e := wp.env(t)
			k := NewKey("artist", "window")
			hold := newHold("evalsha", delIfUnchanged.Hash(), false) // the take-back
			opts := e.opts()
			opts.Redis = wp.client(t, e, hold)
			opts.L2Timeout = 5 * time.Second
			loader := newCache[ImageMeta](e, opts)
			deleter := newCache[ImageMeta](e, e.opts())
			reader := newCache[ImageMeta](e, e.opts())
			release, done := loadDuringDelete(t, loader, deleter, k, "window")
			close(release)
			select {
			case <-hold.held: // the take-back is held: the stale write is in Redis right now
				if v, err := reader.Get(ctx, k); err == nil {
					t.Logf("the reader saw the write in the window (%s), as it may", v.ETag)
				}
				close(hold.release)
			case <-done:
				t.Fatal("the load finished without taking its write back")
			}
			<-done
			eventually(t, wantMiss(reader, k))
			if e.raw(k) != "" {
				t.Error("the taken-back write is still in Redis")
			}
			if n := loader.Stats().LoadsSuperseded; n != 1 {
				t.Errorf("LoadsSuperseded = %d, want 1", n)
			}
		})
	}
}

// The fail-safe must not put back a value that an invalidation removed while the load ran.
func TestFailSafeYieldsToInvalidation(t *testing.T) {
	e := newEnv(t)
	opts := e.opts()
	opts.StaleTTL = time.Minute
	c := newCache[ImageMeta](e, opts)
	k := NewKey("artist", "fsdel")
	ttl := WithTTL(50 * time.Millisecond)
	if _, err := c.GetOrLoad(ctx, k, func(context.Context) (ImageMeta, error) { return metaV("fsdel", 1), nil }, ttl); err != nil {
		t.Fatal(err)
	}
	time.Sleep(80 * time.Millisecond)
	e.advance(80 * time.Millisecond)
	started, release := make(chan struct{}), make(chan struct{})
	done := make(chan error, 1)
	dbDown := errors.New("database is down")
	go func() {
		_, err := c.GetOrLoad(ctx, k, func(context.Context) (ImageMeta, error) {
			close(started)
			<-release
			return ImageMeta{}, dbDown
		}, ttl)
		done <- err
	}()
	<-started
	if err := c.Delete(ctx, k); err != nil {
		t.Fatal(err)
	}
	close(release)
	if err := <-done; !errors.Is(err, dbDown) {
		t.Errorf("the failing load after a Delete returned %v; want its error, not the deleted value", err)
	}
	if v, err := c.Get(ctx, k); !errors.Is(err, ErrNotFound) {
		t.Errorf("Get after Delete = %v, %v", v.ETag, err)
	}
}

// After a soft timeout served a stale value, a Delete must stop new callers from getting it.
func TestSoftTimeoutStaleNotServedAfterInvalidation(t *testing.T) {
	e := newEnv(t)
	opts := e.opts()
	opts.StaleTTL = time.Minute
	opts.SoftLoadTimeout = 20 * time.Millisecond
	c := newCache[ImageMeta](e, opts)
	k := NewKey("artist", "softdel")
	ttl := WithTTL(50 * time.Millisecond)
	if _, err := c.GetOrLoad(ctx, k, func(context.Context) (ImageMeta, error) { return metaV("softdel", 1), nil }, ttl); err != nil {
		t.Fatal(err)
	}
	time.Sleep(80 * time.Millisecond)
	e.advance(80 * time.Millisecond)
	release := make(chan struct{})
	defer close(release)
	slow := func(context.Context) (ImageMeta, error) { <-release; return metaV("softdel", 2), nil }
	if v, err := c.GetOrLoad(ctx, k, slow, ttl); err != nil || v.ETag != `"softdel-v1"` {
		t.Fatalf("past the soft timeout: %v, %v; want the stale value", v.ETag, err)
	}
	if err := c.Delete(ctx, k); err != nil {
		t.Fatal(err)
	}
	cctx, cancel := context.WithTimeout(ctx, 100*time.Millisecond)
	defer cancel()
	if v, err := c.GetOrLoad(cctx, k, func(context.Context) (ImageMeta, error) { return metaV("softdel", 3), nil }, ttl); err == nil && v.ETag == `"softdel-v1"` {
		t.Errorf("a caller after Delete got the deleted stale value")
	}
}

func TestCallersOwnDeadlinesDoNotOpenTheBreaker(t *testing.T) {
	e := newEnv(t)
	opts := e.opts()
	opts.BreakerThreshold = 2
	c := newCache[ImageMeta](e, opts)
	for range 5 {
		dctx, cancel := context.WithTimeout(ctx, time.Nanosecond)
		time.Sleep(time.Millisecond)
		_, _ = c.Get(dctx, NewKey("artist", "x"))
		cancel()
	}
	if s := c.Stats(); s.L2BreakerOpen {
		t.Errorf("callers' expired contexts opened the breaker: %+v", s)
	}
}

func TestHitRateGuardOptionsAreValidated(t *testing.T) {
	for _, g := range []HitRateGuard{{Window: time.Nanosecond}, {Threshold: 2}, {Threshold: -1}, {Cooldown: time.Nanosecond}} {
		if c, err := New[ImageMeta](Options{HitRateGuard: &g}); err == nil {
			_ = c.Close()
			t.Errorf("New with HitRateGuard %+v: nil error", g)
		}
	}
}

// panicCodec panics on Marshal, as a buggy custom codec might.
type panicCodec struct{ jsonCodec }

func (panicCodec) Name() string                { return "panic" }
func (panicCodec) Marshal(any) ([]byte, error) { panic("codec bug") }

func TestPanickingCodecIsAnError(t *testing.T) {
	e := newEnv(t)
	opts := e.opts()
	opts.Codec = panicCodec{}
	c := newCache[ImageMeta](e, opts)
	if err := c.Set(ctx, NewKey("artist", "p"), metaV("p", 1)); err == nil || !strings.Contains(err.Error(), "codec panicked") {
		t.Errorf("Set with a panicking codec: %v", err)
	}
	// An uncancellable caller runs its flight inline: it must neither panic nor hang.
	v, err := c.GetOrLoad(context.Background(), NewKey("artist", "q"), func(context.Context) (ImageMeta, error) { return metaV("q", 1), nil })
	if err != nil || v.ETag != `"q-v1"` {
		t.Errorf("GetOrLoad with a panicking codec = %v, %v; want the loaded value", v.ETag, err)
	}
	if s := c.Stats(); s.EncodeErrors != 1 {
		t.Errorf("EncodeErrors = %d, want 1", s.EncodeErrors)
	}
}

// The guard open + a pattern epoch present: every load's write is taken back and L1 dropped.
func TestGuardOpenLoadsAreKept(t *testing.T) {
	e := newEnv(t)
	opts := e.opts()
	opts.HitRateGuard = &HitRateGuard{}
	c := newCache[ImageMeta](e, opts)
	if _, err := c.InvalidatePattern(ctx, "nothing:*"); err != nil { // any pattern invalidation in the last day
		t.Fatal(err)
	}
	c.guard.openUntil.Store(coarseNow() + int64(time.Minute)) // as if the guard tripped
	k := NewKey("artist", "g")
	var loads atomic.Int64
	for range 5 {
		if _, err := c.GetOrLoad(ctx, k, func(context.Context) (ImageMeta, error) { loads.Add(1); return metaV("g", 1), nil }); err != nil {
			t.Fatal(err)
		}
	}
	s := c.Stats()
	t.Logf("loads=%d superseded=%d busSent=%d inRedis=%v", loads.Load(), s.LoadsSuperseded, s.BusSent, e.raw(k) != "")
	if loads.Load() != 1 {
		t.Errorf("5 GetOrLoad calls ran the loader %d times with the guard open", loads.Load())
	}
}

// An unrelated Set during a failing load disables the fail-safe.
func TestFailSafeSurvivesUnrelatedSet(t *testing.T) {
	e := newEnv(t)
	opts := e.opts()
	opts.StaleTTL = time.Minute
	c := newCache[ImageMeta](e, opts)
	k := NewKey("artist", "fs")
	ttl := WithTTL(50 * time.Millisecond)
	if _, err := c.GetOrLoad(ctx, k, func(context.Context) (ImageMeta, error) { return metaV("fs", 1), nil }, ttl); err != nil {
		t.Fatal(err)
	}
	time.Sleep(80 * time.Millisecond)
	e.advance(80 * time.Millisecond)
	started, release := make(chan struct{}), make(chan struct{})
	done := make(chan error, 1)
	go func() {
		_, err := c.GetOrLoad(ctx, k, func(context.Context) (ImageMeta, error) {
			close(started)
			<-release
			return ImageMeta{}, errors.New("db down")
		}, ttl)
		done <- err
	}()
	<-started
	if err := c.Set(ctx, NewKey("album", "unrelated"), metaV("u", 1)); err != nil {
		t.Fatal(err)
	}
	close(release)
	if err := <-done; err != nil {
		t.Errorf("fail-safe with stale value at hand, after an unrelated Set: %v", err)
	}
}

// Soft timeout, no LoadTimeout: another instance's Set of an unrelated key makes callers wait for the hung load.
func TestSoftTimeoutSurvivesRemoteUnrelatedSet(t *testing.T) {
	e := newEnv(t)
	opts := e.opts()
	opts.StaleTTL = time.Minute
	opts.SoftLoadTimeout = 50 * time.Millisecond
	c := newCache[ImageMeta](e, opts)
	other := newCache[ImageMeta](e, e.opts())
	k := NewKey("artist", "soft")
	ttl := WithTTL(50 * time.Millisecond)
	if _, err := c.GetOrLoad(ctx, k, func(context.Context) (ImageMeta, error) { return metaV("soft", 1), nil }, ttl); err != nil {
		t.Fatal(err)
	}
	time.Sleep(80 * time.Millisecond)
	e.advance(80 * time.Millisecond)
	started, release := make(chan struct{}), make(chan struct{})
	defer close(release)
	type res struct {
		v   ImageMeta
		err error
		d   time.Duration
	}
	done := make(chan res, 1)
	go func() {
		cctx, cancel := context.WithTimeout(ctx, time.Second)
		defer cancel()
		start := time.Now()
		v, err := c.GetOrLoad(cctx, k, func(ctx context.Context) (ImageMeta, error) {
			close(started)
			select {
			case <-release:
			case <-ctx.Done():
			}
			return ImageMeta{}, errors.New("db hung")
		}, ttl)
		done <- res{v, err, time.Since(start)}
	}()
	<-started
	if err := other.Set(ctx, NewKey("album", "unrelated"), metaV("u", 1)); err != nil {
		t.Fatal(err)
	}
	r := <-done
	t.Logf("got %q, %v after %v", r.v.ETag, r.err, r.d)
	if r.err != nil || r.d > 300*time.Millisecond {
		t.Errorf("SoftLoadTimeout 50ms with a stale value at hand: %v after %v", r.err, r.d)
	}
}

// A caller that starts after Delete returned joins a flight begun before it, and gets the old value.
func TestCallerAfterDeleteDoesNotJoinOlderLoad(t *testing.T) {
	e := newEnv(t)
	c := newCache[ImageMeta](e, e.opts())
	k := NewKey("artist", "join")
	started, release := make(chan struct{}), make(chan struct{})
	go func() {
		cctx, cancel := context.WithCancel(ctx)
		defer cancel()
		_, _ = c.GetOrLoad(cctx, k, func(context.Context) (ImageMeta, error) {
			close(started)
			<-release
			return metaV("join", 1), nil // read from the database before the update
		})
	}()
	<-started
	// The service updates the database to v2, then deletes the cache key.
	if err := c.Delete(ctx, k); err != nil {
		t.Fatal(err)
	}
	got := make(chan ImageMeta, 1)
	go func() {
		v, _ := c.GetOrLoad(ctx, k, func(context.Context) (ImageMeta, error) { return metaV("join", 2), nil })
		got <- v
	}()
	time.Sleep(20 * time.Millisecond)
	close(release)
	if v := <-got; v.ETag != `"join-v2"` {
		t.Errorf("GetOrLoad started after Delete returned got %s", v.ETag)
	}
}

// Blackholed Redis, callers with deadlines under L2Timeout: the breaker never opens.
func TestBreakerOpensForCallersWithShortDeadlines(t *testing.T) {
	e, p := newProxiedEnv(t)
	opts := e.opts()
	opts.L2Timeout = 100 * time.Millisecond
	c := newCache[ImageMeta](e, opts)
	p.setBlackhole(true)
	start := time.Now()
	for i := range 20 {
		dctx, cancel := context.WithTimeout(ctx, 50*time.Millisecond)
		_, _ = c.Get(dctx, NewKey("artist", "x"))
		cancel()
		_ = i
	}
	d := time.Since(start)
	s := c.Stats()
	t.Logf("20 Gets took %v, breaker open %v, L2Errors %d", d, s.L2BreakerOpen, s.L2Errors)
	if !s.L2BreakerOpen {
		t.Errorf("breaker closed after 20 failed reads on a blackholed Redis")
	}
}

// A GetOrLoad that starts after Delete returned must not get a lease holder's write that the
// holder is about to take back: waiters accept a value only once the lease is released.
func TestLeaseWaiterAfterDeleteGetsNewValue(t *testing.T) {
	for _, wp := range writePaths {
		t.Run(wp.name, func(t *testing.T) {
			e := wp.env(t)
			k := NewKey("artist", "lw")
			// Held: the take-back of the holder's stale write, which is in Redis meanwhile. Its
			// lease must still be held: the write's pipeline did not release it, the epoch having
			// moved.
			hold := newHold("evalsha", delIfUnchanged.Hash(), false)
			opts := e.opts()
			opts.Redis = wp.client(t, e, hold)
			opts.L2Timeout = 5 * time.Second
			holder := newCache[ImageMeta](e, opts)
			deleter := newCache[ImageMeta](e, e.opts())
			waiter := newCache[ImageMeta](e, e.opts())
			release, done := loadDuringDelete(t, holder, deleter, k, "lw")
			got := make(chan ImageMeta, 1)
			go func() { // starts after Delete returned; the holder's lease makes it wait
				v, _ := waiter.GetOrLoad(ctx, k, func(context.Context) (ImageMeta, error) { return metaV("lw", 2), nil })
				got <- v
			}()
			time.Sleep(20 * time.Millisecond)
			close(release)
			<-hold.held // the holder's stale write is in Redis, its take-back held, its lease still held
			select {
			case v := <-got:
				t.Fatalf("the waiter returned %s while the lease was held", v.ETag)
			case <-time.After(50 * time.Millisecond):
			}
			close(hold.release)
			if v := <-got; v.ETag != `"lw-v2"` {
				t.Errorf("GetOrLoad on another instance, started after Delete returned, got %s", v.ETag)
			}
			<-done
		})
	}
}

func TestCloseWithinASecondWithRedisBlackholed(t *testing.T) {
	for _, mode := range []string{"lease", "load", "soft", "inline", "leaseInline"} {
		t.Run(mode, func(t *testing.T) {
			e, p := newProxiedEnv(t)
			opts := e.opts()
			opts.StaleTTL = time.Minute
			opts.SoftLoadTimeout = 20 * time.Millisecond
			c, err := New[ImageMeta](opts)
			if err != nil {
				t.Fatal(err)
			}
			k := NewKey("artist", "close")
			ttl := WithTTL(50 * time.Millisecond)
			if mode == "soft" {
				_, _ = c.GetOrLoad(ctx, k, func(context.Context) (ImageMeta, error) { return metaV("c", 1), nil }, ttl)
				time.Sleep(80 * time.Millisecond)
				e.advance(80 * time.Millisecond)
			}
			if mode == "lease" || mode == "leaseInline" {
				if err := e.rdb.Set(ctx, c.leaseKey(k), "someone", time.Minute).Err(); err != nil {
					t.Fatal(err)
				}
			}
			started := make(chan struct{})
			done := make(chan struct{})
			go func() {
				defer close(done)
				cctx, cancel := context.WithCancel(ctx)
				defer cancel()
				if mode == "inline" || mode == "leaseInline" {
					cctx = context.Background()
				}
				if mode == "lease" || mode == "leaseInline" {
					close(started)
				}
				_, _ = c.GetOrLoad(cctx, k, func(lctx context.Context) (ImageMeta, error) {
					if mode != "lease" && mode != "leaseInline" {
						close(started)
					}
					<-lctx.Done()
					return ImageMeta{}, lctx.Err()
				}, ttl)
			}()
			<-started
			time.Sleep(60 * time.Millisecond)
			p.setBlackhole(true)
			time.Sleep(30 * time.Millisecond)
			start := time.Now()
			_ = c.Close()
			d := time.Since(start)
			t.Logf("%s: Close took %v", mode, d)
			if d > time.Second {
				t.Errorf("Close took %v", d)
			}
			select {
			case <-done:
			case <-time.After(2 * time.Second):
				t.Errorf("caller still blocked")
			}
		})
	}
}
