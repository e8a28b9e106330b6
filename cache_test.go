package imgcache

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
)

var ctx = context.Background()

func sampleMeta(id string) ImageMeta {
	return ImageMeta{
		Path:     "/srv/images/artists/" + id + "/avatar.webp",
		Size:     48213,
		MIMEType: "image/webp",
		Width:    512,
		Height:   512,
		ETag:     `"5d41402abc4b2a76` + id + `"`,
		ModTime:  time.Date(2026, 3, 14, 15, 9, 26, 535897932, time.UTC),
	}
}

// countingLoader returns a loader that counts its calls and returns v.
func countingLoader[V any](v V, err error) (func(context.Context) (V, error), *atomic.Int64) {
	var n atomic.Int64
	return func(context.Context) (V, error) {
		n.Add(1)
		return v, err
	}, &n
}

func TestNewValidatesOptions(t *testing.T) {
	e := newMiniEnv(t)
	noCtxTimeout := redis.NewClient(&redis.Options{Addr: e.mr.Addr()})
	t.Cleanup(func() { _ = noCtxTimeout.Close() })
	tests := []struct {
		name string
		opts Options
		want string
	}{
		{"ttl under 1ms", Options{TTL: 500 * time.Microsecond}, "Options.TTL"},
		{"negative ttl", Options{TTL: -time.Second}, "Options.TTL"},
		{"l1 ttl under 1ms", Options{L1TTL: time.Microsecond}, "Options.L1TTL"},
		{"negative ttl under 1ms", Options{NegativeTTL: time.Nanosecond}, "Options.NegativeTTL"},
		{"l2 timeout negative", Options{L2Timeout: -1}, "Options.L2Timeout"},
		{"namespace with glob", Options{Namespace: "img*"}, "Options.Namespace"},
		{"namespace with space", Options{Namespace: "a b"}, "Options.Namespace"},
		{"namespace with brace", Options{Namespace: "{x}"}, "Options.Namespace"},
		{"max value too small", Options{MaxValueSize: 3}, "Options.MaxValueSize"},
		{"nothing to cache", Options{L1Size: -1}, "nothing would be cached"},
		{"client ignores ctx deadlines", Options{Redis: noCtxTimeout}, "ContextTimeoutEnabled"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			before := tt.opts
			c, err := New[ImageMeta](tt.opts)
			if err == nil {
				_ = c.Close()
				t.Fatalf("New(%+v) = nil error, want one mentioning %q", tt.opts, tt.want)
			}
			if !strings.Contains(err.Error(), tt.want) || !strings.HasPrefix(err.Error(), "imgcache: ") {
				t.Errorf("New error %q, want an imgcache: error mentioning %q", err, tt.want)
			}
			if before != tt.opts {
				t.Errorf("New modified its Options")
			}
		})
	}
	// The zero Options are valid: an L1-only cache with every default.
	c, err := New[ImageMeta](Options{})
	if err != nil {
		t.Fatalf("New(Options{}) = %v", err)
	}
	_ = c.Close()
}

func TestReadPathL1ThenL2ThenMiss(t *testing.T) {
	e := newEnv(t)
	a := newCache[ImageMeta](e, e.opts())
	b := newCache[ImageMeta](e, e.opts())
	k := NewKey("artist", "42").With("type", "avatar")
	want := sampleMeta("42")

	if _, err := b.Get(ctx, k); !errors.Is(err, ErrNotFound) {
		t.Fatalf("Get before Set: err = %v, want ErrNotFound", err)
	}
	if err := a.Set(ctx, k, want); err != nil {
		t.Fatalf("Set: %v", err)
	}
	if e.raw(k) == "" {
		t.Fatalf("Set did not write Redis key %s", e.redisKey(k))
	}
	// a wrote its own L1.
	if got, err := a.Get(ctx, k); err != nil || !sameImageMeta(got, want) {
		t.Fatalf("a.Get = %+v, %v; want %+v", got, err, want)
	}
	if s := a.Stats(); s.L1Hits != 1 || s.L2Hits != 0 {
		t.Errorf("a stats after Get = %+v, want one L1 hit", s)
	}
	// b has nothing in L1: L2 answers and fills L1, so the next read is an L1 hit. Wait for a's
	// message first: one applied during b's L2 read keeps that read out of L1 (it may predate
	// the write), which would make the L1 hit an L2 hit.
	waitFor(t, func() bool { return b.Stats().BusReceived == 1 })
	for i := range 2 {
		got, err := b.Get(ctx, k)
		if err != nil || !sameImageMeta(got, want) {
			t.Fatalf("b.Get #%d = %+v, %v; want %+v", i, got, err, want)
		}
	}
	if s := b.Stats(); s.L2Hits != 1 || s.L1Hits != 1 || s.Misses != 1 {
		t.Errorf("b stats = %+v, want 1 miss, 1 L2 hit, 1 L1 hit", s)
	}
	if hr := b.Stats().HitRate(); hr < 0.66 || hr > 0.67 {
		t.Errorf("HitRate = %v, want 2/3", hr)
	}
}

func TestTTLIsMillisecondsEndToEnd(t *testing.T) {
	e := newEnv(t)
	c := newCache[ImageMeta](e, e.opts())
	k := NewKey("album", "9").With("type", "cover")
	if err := c.Set(ctx, k, sampleMeta("9"), WithTTL(1500*time.Millisecond)); err != nil {
		t.Fatalf("Set: %v", err)
	}
	if got := e.pttl(k); got < 1400*time.Millisecond || got > 1500*time.Millisecond {
		t.Errorf("PTTL after a 1500ms TTL = %v, want about 1.5s (not 1500s, not 1.5ms)", got)
	}
	// The default TTL and the negative TTL reach Redis the same way.
	k2 := NewKey("album", "10")
	if err := c.Set(ctx, k2, sampleMeta("10")); err != nil {
		t.Fatalf("Set: %v", err)
	}
	// Default TTLs are jittered down by up to DefaultTTLJitter; WithTTL above is exact.
	if got := e.pttl(k2); got < time.Duration(float64(DefaultTTL)*(1-DefaultTTLJitter))-time.Second || got > DefaultTTL {
		t.Errorf("PTTL with the default TTL = %v, want %v less up to 10%%", got, DefaultTTL)
	}
	k3 := NewKey("album", "missing")
	_, err := c.GetOrLoad(ctx, k3, func(context.Context) (ImageMeta, error) { return ImageMeta{}, ErrNotFound })
	if !errors.Is(err, ErrNotFound) {
		t.Fatalf("GetOrLoad of a missing album: %v, want ErrNotFound", err)
	}
	if got := e.pttl(k3); got < time.Duration(float64(DefaultNegativeTTL)*(1-DefaultTTLJitter))-time.Second || got > DefaultNegativeTTL {
		t.Errorf("PTTL of a negative entry = %v, want %v less up to 10%%", got, DefaultNegativeTTL)
	}
}

func TestTTLUnderOneMillisecondIsAnError(t *testing.T) {
	e := newEnv(t)
	c := newCache[ImageMeta](e, e.opts())
	k := NewKey("artist", "1")
	for _, d := range []time.Duration{999 * time.Microsecond, 0, -time.Second} {
		if err := c.Set(ctx, k, sampleMeta("1"), WithTTL(d)); err == nil || !strings.Contains(err.Error(), "under 1ms") {
			t.Errorf("Set with TTL %v: err = %v, want a TTL error", d, err)
		}
		load, n := countingLoader(sampleMeta("1"), nil)
		if _, err := c.GetOrLoad(ctx, k, load, WithTTL(d)); err == nil {
			t.Errorf("GetOrLoad with TTL %v: nil error", d)
		}
		if n.Load() != 0 {
			t.Errorf("GetOrLoad with a bad TTL called the loader")
		}
	}
	if keys := e.namespaceKeys(); len(keys) != 0 {
		t.Errorf("bad TTLs wrote %v", keys)
	}
	if _, err := c.Get(ctx, k); !errors.Is(err, ErrNotFound) {
		t.Errorf("a bad-TTL Set left a value in L1: %v", err)
	}
}

// recordCommands records every command the client sends.
type recordCommands struct {
	mu   sync.Mutex
	cmds [][]any
}

func (r *recordCommands) DialHook(next redis.DialHook) redis.DialHook { return next }
func (r *recordCommands) ProcessHook(next redis.ProcessHook) redis.ProcessHook {
	return func(ctx context.Context, cmd redis.Cmder) error {
		r.mu.Lock()
		r.cmds = append(r.cmds, cmd.Args())
		r.mu.Unlock()
		return next(ctx, cmd)
	}
}
func (r *recordCommands) ProcessPipelineHook(next redis.ProcessPipelineHook) redis.ProcessPipelineHook {
	return func(ctx context.Context, cmds []redis.Cmder) error {
		r.mu.Lock()
		for _, c := range cmds {
			r.cmds = append(r.cmds, c.Args())
		}
		r.mu.Unlock()
		return next(ctx, cmds)
	}
}

func TestEveryWriteCarriesItsTTLInTheSameCommand(t *testing.T) {
	e := newEnv(t)
	rec := &recordCommands{}
	e.rdb.AddHook(rec)
	c := newCache[ImageMeta](e, e.opts())
	_ = c.Set(ctx, NewKey("artist", "1"), sampleMeta("1"))
	_ = c.Set(ctx, NewKey("artist", "2"), sampleMeta("2"), WithTTL(90*time.Second))
	_, _ = c.GetOrLoad(ctx, NewKey("artist", "3"), func(context.Context) (ImageMeta, error) { return sampleMeta("3"), nil })
	_, _ = c.GetOrLoad(ctx, NewKey("artist", "4"), func(context.Context) (ImageMeta, error) { return ImageMeta{}, ErrNotFound })
	waitFor(t, func() bool { return len(e.namespaceKeys()) == 4 })

	sets := 0
	rec.mu.Lock()
	for _, args := range rec.cmds {
		name := strings.ToLower(fmt.Sprint(args[0]))
		switch name {
		case "expire", "pexpire", "expireat", "pexpireat", "setex", "psetex", "persist":
			t.Errorf("the cache sent %v; every TTL must travel with its SET", args)
		case "set":
			if strings.Contains(fmt.Sprint(args[1]), ":%l:") {
				// A load's lease: its TTL travels with it too.
				if len(args) != 6 || fmt.Sprint(args[3]) != "px" || fmt.Sprint(args[5]) != "nx" {
					t.Errorf("lease SET without PX NX: %v", args)
				}
				continue
			}
			sets++
			if n := len(args); (n != 5 && (n != 6 || fmt.Sprint(args[5]) != "nx")) || strings.ToLower(fmt.Sprint(args[3])) != "px" {
				t.Errorf("SET without PX: %v", args)
			}
		}
	}
	rec.mu.Unlock()
	if sets != 4 {
		t.Errorf("saw %d SETs, want 4", sets)
	}
	for _, key := range e.namespaceKeys() {
		if d := e.rdb.PTTL(ctx, key).Val(); d <= 0 {
			t.Errorf("key %s has PTTL %v: every key must expire", key, d)
		}
	}
}

// waitFor polls cond until it holds or a second has passed.
func waitFor(t *testing.T, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatal("condition not met within 1s")
		}
		time.Sleep(time.Millisecond)
	}
}

func TestL1NeverOutlivesL2TTL(t *testing.T) {
	e := newEnv(t)
	opts := e.opts()
	opts.L1TTL = time.Hour
	a := newCache[ImageMeta](e, opts)
	b := newCache[ImageMeta](e, opts)
	k := NewKey("artist", "7")
	if err := a.Set(ctx, k, sampleMeta("7"), WithTTL(60*time.Millisecond)); err != nil {
		t.Fatal(err)
	}
	if _, err := b.Get(ctx, k); err != nil { // fills b's L1 from the envelope's expiry
		t.Fatal(err)
	}
	time.Sleep(80 * time.Millisecond)
	e.advance(80 * time.Millisecond) // miniredis's clock does not move by itself
	for name, c := range map[string]*Cache[ImageMeta]{"writer": a, "reader": b} {
		if v, err := c.Get(ctx, k); !errors.Is(err, ErrNotFound) {
			t.Errorf("%s: Get after the 60ms TTL = %+v, %v; want ErrNotFound", name, v, err)
		}
	}
}

func TestL1TTLBoundsL1(t *testing.T) {
	e := newMiniEnv(t)
	opts := e.opts()
	opts.L1TTL = 30 * time.Millisecond
	c := newCache[ImageMeta](e, opts)
	k := NewKey("artist", "8")
	if err := c.Set(ctx, k, sampleMeta("8")); err != nil {
		t.Fatal(err)
	}
	time.Sleep(50 * time.Millisecond)
	if _, err := c.Get(ctx, k); err != nil {
		t.Fatal(err)
	}
	if s := c.Stats(); s.L1Hits != 0 || s.L2Hits != 1 {
		t.Errorf("after L1TTL the read must come from L2: %+v", s)
	}
}

func TestL1OnlyCache(t *testing.T) {
	c, err := New[string](Options{L1Size: 2})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	for i := range 3 {
		if err := c.Set(ctx, NewKey("k", fmt.Sprint(i)), fmt.Sprint("v", i)); err != nil {
			t.Fatal(err)
		}
	}
	if v, err := c.Get(ctx, NewKey("k", "2")); err != nil || v != "v2" {
		t.Errorf("Get = %q, %v", v, err)
	}
	if s := c.Stats(); s.L1Evictions != 1 || s.L1Entries != 2 {
		t.Errorf("stats = %+v, want 1 eviction and 2 entries", s)
	}
	if err := c.Delete(ctx, NewKey("k", "2")); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Get(ctx, NewKey("k", "2")); !errors.Is(err, ErrNotFound) {
		t.Errorf("Get after Delete: %v", err)
	}
}

func TestL1DisabledUsesRedisOnly(t *testing.T) {
	e := newEnv(t)
	opts := e.opts()
	opts.L1Size = -1
	c := newCache[ImageMeta](e, opts)
	k := NewKey("artist", "5")
	v, err := c.GetOrLoad(ctx, k, func(context.Context) (ImageMeta, error) { return sampleMeta("5"), nil })
	if err != nil || v.Path == "" {
		t.Fatalf("GetOrLoad = %+v, %v", v, err)
	}
	if _, err := c.Get(ctx, k); err != nil {
		t.Fatal(err)
	}
	if s := c.Stats(); s.L1Hits != 0 || s.L2Hits != 1 || s.Loads != 1 {
		t.Errorf("stats = %+v, want 1 load then 1 L2 hit", s)
	}
}

func TestDeleteRemovesBothLevels(t *testing.T) {
	e := newEnv(t)
	c := newCache[ImageMeta](e, e.opts())
	k1, k2 := NewKey("artist", "1"), NewKey("album", "1")
	for _, k := range []Key{k1, k2} {
		if err := c.Set(ctx, k, sampleMeta("1")); err != nil {
			t.Fatal(err)
		}
	}
	if err := c.Delete(ctx, k1, k2); err != nil {
		t.Fatal(err)
	}
	for _, k := range []Key{k1, k2} {
		if _, err := c.Get(ctx, k); !errors.Is(err, ErrNotFound) {
			t.Errorf("Get(%v) after Delete: %v", k, err)
		}
		if e.raw(k) != "" {
			t.Errorf("Redis still has %s", e.redisKey(k))
		}
	}
	if err := c.Delete(ctx); err != nil {
		t.Errorf("Delete of no keys: %v", err)
	}
}

func TestSetKeepsL1WhenRedisWriteFails(t *testing.T) {
	e := newMiniEnv(t)
	c := newCache[ImageMeta](e, e.opts())
	k := NewKey("artist", "11")
	e.mr.SetError("ERR injected write failure")
	err := c.Set(ctx, k, sampleMeta("11"))
	if err == nil || !strings.Contains(err.Error(), "imgcache: set artist:11:") || !strings.Contains(err.Error(), "injected write failure") {
		t.Fatalf("Set with a failing Redis: err = %v, want the wrapped Redis error", err)
	}
	got, err := c.Get(ctx, k)
	if err != nil || !sameImageMeta(got, sampleMeta("11")) {
		t.Errorf("Get after a failed L2 write = %+v, %v; want the L1 copy", got, err)
	}
	if s := c.Stats(); s.L2Errors != 1 {
		t.Errorf("L2Errors = %d, want 1", s.L2Errors)
	}
}

func TestGetAndGetOrLoadFailOpen(t *testing.T) {
	e := newMiniEnv(t)
	c := newCache[ImageMeta](e, e.opts())
	cached, fresh := NewKey("artist", "1"), NewKey("artist", "2")
	if err := c.Set(ctx, cached, sampleMeta("1")); err != nil {
		t.Fatal(err)
	}
	for _, fault := range []struct {
		name  string
		apply func()
	}{
		{"erroring", func() { e.mr.SetError("ERR injected") }},
		{"down", func() { e.mr.Close() }},
	} {
		t.Run(fault.name, func(t *testing.T) {
			fault.apply()
			if got, err := c.Get(ctx, cached); err != nil || !sameImageMeta(got, sampleMeta("1")) {
				t.Errorf("Get of an L1 entry = %+v, %v", got, err)
			}
			before := c.Stats().L2Errors
			if _, err := c.Get(ctx, NewKey("artist", "nowhere")); !errors.Is(err, ErrNotFound) {
				t.Errorf("Get of an absent key = %v, want ErrNotFound", err)
			}
			_ = c.Delete(ctx, fresh) // only L1 can be cleared
			load, n := countingLoader(sampleMeta("2"), nil)
			got, err := c.GetOrLoad(ctx, fresh, load)
			if err != nil || !sameImageMeta(got, sampleMeta("2")) || n.Load() != 1 {
				t.Errorf("GetOrLoad = %+v, %v after %d loads; want the loaded value", got, err, n.Load())
			}
			if after := c.Stats().L2Errors; after < before+2 {
				t.Errorf("L2Errors went %d -> %d, want the failed read and write counted", before, after)
			}
		})
	}
}

func TestGetOrLoadStoresInBothLevels(t *testing.T) {
	e := newEnv(t)
	a := newCache[ImageMeta](e, e.opts())
	b := newCache[ImageMeta](e, e.opts())
	k := NewKey("album", "3").With("type", "cover")
	load, n := countingLoader(sampleMeta("3"), nil)
	if _, err := a.GetOrLoad(ctx, k, load); err != nil {
		t.Fatal(err)
	}
	waitFor(t, func() bool { return e.raw(k) != "" })
	if _, err := a.GetOrLoad(ctx, k, load); err != nil {
		t.Fatal(err)
	}
	got, err := b.GetOrLoad(ctx, k, load)
	if err != nil || !sameImageMeta(got, sampleMeta("3")) {
		t.Fatalf("b.GetOrLoad = %+v, %v", got, err)
	}
	if n.Load() != 1 {
		t.Errorf("loader ran %d times, want once across both instances", n.Load())
	}
	if sa, sb := a.Stats(), b.Stats(); sa.Loads != 1 || sa.L1Hits != 1 || sb.L2Hits != 1 || sb.Loads != 0 {
		t.Errorf("stats a=%+v b=%+v", sa, sb)
	}
}

func TestGetOrLoadSharesOneLoad(t *testing.T) {
	e := newEnv(t)
	c := newCache[ImageMeta](e, e.opts())
	k := NewKey("artist", "99")
	release := make(chan struct{})
	var calls atomic.Int64
	load := func(context.Context) (ImageMeta, error) {
		calls.Add(1)
		<-release
		return sampleMeta("99"), nil
	}
	const callers = 100
	var wg sync.WaitGroup
	errs := make(chan error, callers)
	for range callers {
		wg.Go(func() {
			v, err := c.GetOrLoad(ctx, k, load)
			if err == nil && !sameImageMeta(v, sampleMeta("99")) {
				err = fmt.Errorf("got %+v", v)
			}
			errs <- err
		})
	}
	waitFor(t, func() bool { return c.Stats().Coalesced+1 >= callers || calls.Load() > 1 })
	close(release)
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Error(err)
		}
	}
	if calls.Load() != 1 {
		t.Errorf("loader ran %d times for %d concurrent callers, want 1", calls.Load(), callers)
	}
	if s := c.Stats(); s.Loads != 1 || s.Coalesced != callers-1 {
		t.Errorf("stats = %+v, want 1 load and %d coalesced", s, callers-1)
	}
}

func TestGetOrLoadCallerLeavesLoadGoesOn(t *testing.T) {
	e := newEnv(t)
	c := newCache[ImageMeta](e, e.opts())
	k := NewKey("artist", "77")
	started, release := make(chan struct{}), make(chan struct{})
	var loadCtxErr atomic.Value
	load := func(lctx context.Context) (ImageMeta, error) {
		close(started)
		<-release
		loadCtxErr.Store(fmt.Sprint(lctx.Err()))
		return sampleMeta("77"), nil
	}
	leaver, leave := context.WithCancel(ctx)
	leaverErr := make(chan error, 1)
	go func() {
		_, err := c.GetOrLoad(leaver, k, load)
		leaverErr <- err
	}()
	<-started
	stayerErr := make(chan error, 1)
	go func() {
		v, err := c.GetOrLoad(ctx, k, load)
		if err == nil && !sameImageMeta(v, sampleMeta("77")) {
			err = fmt.Errorf("got %+v", v)
		}
		stayerErr <- err
	}()
	waitFor(t, func() bool { return c.Stats().Coalesced == 1 })
	leave()
	if err := <-leaverErr; !errors.Is(err, context.Canceled) {
		t.Errorf("the caller whose ctx ended got %v, want context.Canceled", err)
	}
	close(release)
	if err := <-stayerErr; err != nil {
		t.Errorf("the caller who stayed: %v", err)
	}
	if got := loadCtxErr.Load(); got != "<nil>" {
		t.Errorf("the shared load's ctx was cancelled with its first caller: %v", got)
	}
	if v, err := c.Get(ctx, k); err != nil || !sameImageMeta(v, sampleMeta("77")) {
		t.Errorf("the load's value was not cached: %+v, %v", v, err)
	}
}

// A GetOrLoad whose context can be cancelled, as a request's can, reads Redis in the caller's own
// goroutine: an L2 hit costs no goroutine, and no handoff to one and back. (Its load still runs
// detached: TestGetOrLoadCallerLeavesLoadGoesOn.)
func TestGetOrLoadReadsRedisInTheCallersGoroutine(t *testing.T) {
	e := newNodeEnv(t)
	o := e.opts()
	o.L1Size = -1 // every call reads Redis
	c := newCache[ImageMeta](e, o)
	k := NewKey("artist", "inline")
	if err := c.Set(ctx, k, metaV("inline", 1)); err != nil {
		t.Fatal(err)
	}
	var reads, inCaller atomic.Int32
	e.node().AddHook(onProcess(func(cmd redis.Cmder) {
		if name := cmd.Name(); name == "get" || name == "mget" {
			reads.Add(1)
			if onStackOf("TestGetOrLoadReadsRedisInTheCallersGoroutine") {
				inCaller.Add(1)
			}
		}
	}))
	reqCtx, cancel := context.WithCancel(ctx)
	defer cancel()
	for range 3 {
		v, err := c.GetOrLoad(reqCtx, k, func(context.Context) (ImageMeta, error) {
			t.Error("load called on a hit")
			return ImageMeta{}, nil
		})
		if err != nil || !sameImageMeta(v, metaV("inline", 1)) {
			t.Fatalf("GetOrLoad = %+v, %v; want the stored value", v, err)
		}
	}
	if r, in := reads.Load(), inCaller.Load(); r < 3 || in != r {
		t.Errorf("%d reads of Redis, %d of them in the caller's goroutine; want 3 or more, all there", r, in)
	}
}

// A caller whose context has already ended gets its error at once, without a command to Redis of
// its own, and the flight it started still loads and caches the value for everyone else.
func TestGetOrLoadWithAnEndedContext(t *testing.T) {
	e := newNodeEnv(t)
	c := newCache[ImageMeta](e, e.opts())
	var inCaller atomic.Int32
	e.node().AddHook(onProcess(func(redis.Cmder) {
		if onStackOf("TestGetOrLoadWithAnEndedContext") {
			inCaller.Add(1)
		}
	}))
	k := NewKey("artist", "ended")
	var loads atomic.Int32
	load := func(context.Context) (ImageMeta, error) {
		loads.Add(1)
		return metaV("ended", 1), nil
	}
	ended, cancel := context.WithCancel(ctx)
	cancel()
	if _, err := c.GetOrLoad(ended, k, load); !errors.Is(err, context.Canceled) {
		t.Errorf("GetOrLoad with an ended context: %v, want context.Canceled", err)
	}
	if n := inCaller.Load(); n != 0 {
		t.Errorf("the caller whose context had ended sent %d Redis commands itself, want 0", n)
	}
	waitFor(t, func() bool { return loads.Load() == 1 })
	v, err := c.GetOrLoad(ctx, k, load)
	if err != nil || !sameImageMeta(v, metaV("ended", 1)) {
		t.Errorf("next GetOrLoad = %+v, %v; want the value the flight loaded", v, err)
	}
	if n := loads.Load(); n != 1 {
		t.Errorf("%d loads, want 1", n)
	}
}

// A caller whose deadline is nearer than the flight's read of Redis could take does not wait for
// that read: the flight runs detached, as a load does, and the caller returns at its deadline.
func TestGetOrLoadNearDeadlineDoesNotWaitForRedis(t *testing.T) {
	e := newNodeEnv(t)
	o := e.opts()
	o.L1Size = -1
	o.L2Timeout = 500 * time.Millisecond
	c := newCache[ImageMeta](e, o)
	k := NewKey("artist", "slow")
	if err := c.Set(ctx, k, metaV("slow", 1)); err != nil {
		t.Fatal(err)
	}
	e.node().AddHook(onProcess(func(cmd redis.Cmder) {
		if name := cmd.Name(); name == "get" || name == "mget" {
			time.Sleep(300 * time.Millisecond) // a slow Redis, still within L2Timeout
		}
	}))
	dctx, cancel := context.WithTimeout(ctx, 30*time.Millisecond)
	defer cancel()
	start := time.Now()
	_, err := c.GetOrLoad(dctx, k, func(context.Context) (ImageMeta, error) { return metaV("slow", 2), nil })
	if took := time.Since(start); !errors.Is(err, context.DeadlineExceeded) || took > 250*time.Millisecond {
		t.Errorf("GetOrLoad with a 30ms deadline over a 300ms read: %v after %v; want DeadlineExceeded at about 30ms", err, took)
	}
}

// A flight that panics before it publishes (in a go-redis hook here) ends the wait of the callers
// that joined it with an error, and leaves no flight behind: the next call starts afresh, and Close
// returns. Both ways a flight runs: in the caller's goroutine (a context that cannot end), and
// started there by readFirst (one that can).
func TestFlightPanicEndsItsCallersWait(t *testing.T) {
	for _, cancellable := range []bool{false, true} {
		t.Run(fmt.Sprint("cancellable=", cancellable), func(t *testing.T) {
			e := newNodeEnv(t)
			o := e.opts()
			o.L1Size = -1
			c := newCache[ImageMeta](e, o)
			k := NewKey("artist", "panics")
			if err := c.Set(ctx, k, metaV("panics", 1)); err != nil {
				t.Fatal(err)
			}
			var armed atomic.Bool
			armed.Store(true)
			entered := make(chan struct{})
			e.node().AddHook(onProcess(func(cmd redis.Cmder) {
				if name := cmd.Name(); (name == "get" || name == "mget") && armed.CompareAndSwap(true, false) {
					close(entered)
					waitFor(t, func() bool { return c.Stats().Coalesced == 1 }) // a second caller has joined
					panic("hook panicked")
				}
			}))
			load := func(context.Context) (ImageMeta, error) { return metaV("panics", 2), nil }
			joinerErr := make(chan error, 1)
			first := ctx
			if cancellable {
				var cancel context.CancelFunc
				first, cancel = context.WithCancel(ctx)
				defer cancel()
			}
			func() {
				defer func() {
					if r := recover(); r != "hook panicked" {
						t.Errorf("the first caller recovered %v, want the hook's panic", r)
					}
				}()
				go func() {
					<-entered // the first caller's flight is reading Redis
					waitCtx, cancel := context.WithTimeout(ctx, 5*time.Second)
					defer cancel()
					_, err := c.GetOrLoad(waitCtx, k, load)
					joinerErr <- err
				}()
				_, _ = c.GetOrLoad(first, k, load)
			}()
			if err := <-joinerErr; !errors.Is(err, errFlightPanicked) {
				t.Errorf("the caller who joined the flight got %v, want errFlightPanicked", err)
			}
			if v, err := c.GetOrLoad(ctx, k, load); err != nil || !sameImageMeta(v, metaV("panics", 1)) {
				t.Errorf("the next GetOrLoad = %+v, %v; want the stored value", v, err)
			}
		})
	}
}

// onStackOf reports whether the calling goroutine is running test (a test function's own frame,
// not a closure of it).
func onStackOf(test string) bool {
	buf := make([]byte, 64<<10)
	return bytes.Contains(buf[:runtime.Stack(buf, false)], []byte("."+test+"("))
}

// onProcess is a go-redis hook that calls fn with every command sent on its own (not pipelined).
type onProcess func(cmd redis.Cmder)

func (onProcess) DialHook(next redis.DialHook) redis.DialHook { return next }
func (h onProcess) ProcessHook(next redis.ProcessHook) redis.ProcessHook {
	return func(ctx context.Context, cmd redis.Cmder) error {
		h(cmd)
		return next(ctx, cmd)
	}
}
func (onProcess) ProcessPipelineHook(next redis.ProcessPipelineHook) redis.ProcessPipelineHook {
	return next
}

func TestNotFoundIsRememberedAcrossInstances(t *testing.T) {
	e := newEnv(t)
	opts := e.opts()
	opts.NegativeTTL = 150 * time.Millisecond
	a := newCache[ImageMeta](e, opts)
	b := newCache[ImageMeta](e, opts)
	k := NewKey("artist", "gone")
	var calls atomic.Int64
	load := func(context.Context) (ImageMeta, error) {
		calls.Add(1)
		return ImageMeta{}, fmt.Errorf("artist gone: %w", ErrNotFound)
	}
	for _, c := range []*Cache[ImageMeta]{a, a, b, b} {
		if _, err := c.GetOrLoad(ctx, k, load); err != ErrNotFound {
			t.Errorf("GetOrLoad = %v, want ErrNotFound itself", err)
		}
	}
	if _, err := b.Get(ctx, k); !errors.Is(err, ErrNotFound) {
		t.Errorf("Get of a remembered not-found = %v", err)
	}
	if calls.Load() != 1 {
		t.Errorf("loader ran %d times, want 1: not-found must be remembered, across instances too", calls.Load())
	}
	if s := b.Stats(); s.NegativeHits != 3 || s.Loads != 0 {
		t.Errorf("b stats = %+v, want 3 negative hits, no load", s)
	}
	time.Sleep(200 * time.Millisecond)
	e.advance(200 * time.Millisecond)
	if _, err := a.GetOrLoad(ctx, k, load); !errors.Is(err, ErrNotFound) {
		t.Fatal(err)
	}
	if calls.Load() != 2 {
		t.Errorf("after NegativeTTL the loader ran %d times in all, want 2", calls.Load())
	}
}

func TestLoadErrorsAreNotCached(t *testing.T) {
	e := newEnv(t)
	c := newCache[ImageMeta](e, e.opts())
	k := NewKey("artist", "flaky")
	dbDown := errors.New("database is down")
	load, n := countingLoader(ImageMeta{}, dbDown)
	for range 2 {
		_, err := c.GetOrLoad(ctx, k, load)
		if !errors.Is(err, dbDown) || !strings.HasPrefix(err.Error(), "imgcache: load artist:flaky:") {
			t.Errorf("err = %v, want the loader's error wrapped with the key", err)
		}
	}
	if n.Load() != 2 {
		t.Errorf("loader ran %d times, want 2: errors are not cached", n.Load())
	}
	if e.raw(k) != "" {
		t.Error("a load error reached Redis")
	}
	if s := c.Stats(); s.LoadErrors != 2 || s.Loads != 2 {
		t.Errorf("stats = %+v", s)
	}
}

func TestLoaderPanicBecomesAnError(t *testing.T) {
	e := newEnv(t)
	c := newCache[ImageMeta](e, e.opts())
	_, err := c.GetOrLoad(ctx, NewKey("artist", "p"), func(context.Context) (ImageMeta, error) { panic("boom") })
	if err == nil || !strings.Contains(err.Error(), "panicked: boom") {
		t.Errorf("err = %v, want the panic as an error", err)
	}
}

func TestUnreadableValuesAreMissesAndDeleted(t *testing.T) {
	e := newEnv(t)
	o := e.opts()
	// Not a timeout test: deleting the oversized value sends 1 MiB back through a script, which
	// miniredis under -race, beside other packages' tests, can take longer than the default 100 ms
	// to answer, and a timeout would count one more L2 error.
	o.L2Timeout = 5 * time.Second
	c := newCache[ImageMeta](e, o)
	jsonCache := newCache[ImageMeta](e, Options{Redis: e.rdb, Namespace: e.ns, Codec: jsonCodec{}})
	big := bytes.Repeat([]byte{'x'}, DefaultMaxValueSize+1)
	header := appendHeader(nil, c.codecID, false, time.Now().Add(time.Hour).UnixMilli(), stamp{})
	tests := []struct {
		name  string
		write func(k Key)
	}{
		{"garbage", func(k Key) { e.rdb.Set(ctx, e.redisKey(k), "not an envelope", time.Minute) }},
		{"other codec", func(k Key) { _ = jsonCache.Set(ctx, k, sampleMeta("1")) }},
		{"other version", func(k Key) {
			b := bytes.Clone(header)
			b[1] = 99
			e.rdb.Set(ctx, e.redisKey(k), b, time.Minute)
		}},
		{"corrupt payload", func(k Key) { e.rdb.Set(ctx, e.redisKey(k), append(bytes.Clone(header), 1, 200), time.Minute) }},
		{"oversized", func(k Key) { e.rdb.Set(ctx, e.redisKey(k), append(bytes.Clone(header), big...), time.Minute) }},
	}
	for i, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			k := NewKey("artist", fmt.Sprint("u", i))
			tt.write(k)
			before := c.Stats()
			if _, err := c.Get(ctx, k); !errors.Is(err, ErrNotFound) {
				t.Errorf("Get = %v, want ErrNotFound", err)
			}
			after := c.Stats()
			if after.L2Errors != before.L2Errors+1 || after.L2Unreadable != before.L2Unreadable+1 {
				t.Errorf("stats %+v -> %+v, want one more L2 error and unreadable", before, after)
			}
			if e.raw(k) != "" {
				t.Errorf("the unreadable value is still in Redis")
			}
			load, n := countingLoader(sampleMeta("1"), nil)
			if v, err := c.GetOrLoad(ctx, k, load); err != nil || !sameImageMeta(v, sampleMeta("1")) || n.Load() != 1 {
				t.Errorf("GetOrLoad after an unreadable value = %+v, %v, %d loads", v, err, n.Load())
			}
		})
	}
}

func TestOversizedValueIsRefused(t *testing.T) {
	e := newEnv(t)
	opts := e.opts()
	opts.MaxValueSize = 100
	c := newCache[ImageMeta](e, opts)
	k := NewKey("artist", "big")
	v := sampleMeta("big")
	v.Source = strings.Repeat("x", 200)
	if err := c.Set(ctx, k, v); err == nil || !strings.Contains(err.Error(), "MaxValueSize") {
		t.Errorf("Set of an oversized value: %v", err)
	}
	if _, err := c.Get(ctx, k); !errors.Is(err, ErrNotFound) {
		t.Errorf("a refused Set wrote L1: %v", err)
	}
	got, err := c.GetOrLoad(ctx, k, func(context.Context) (ImageMeta, error) { return v, nil })
	if err != nil || got.Source != v.Source {
		t.Errorf("GetOrLoad of an oversized value = %v; the caller must still get it", err)
	}
	if s := c.Stats(); s.EncodeErrors != 1 {
		t.Errorf("EncodeErrors = %d, want 1", s.EncodeErrors)
	}
}

func TestBadInputIsAnErrorNotAPanic(t *testing.T) {
	e := newEnv(t)
	c := newCache[ImageMeta](e, e.opts())
	load := func(context.Context) (ImageMeta, error) { return ImageMeta{}, nil }
	long := strings.Repeat("a", MaxKeyLen)
	tests := []struct {
		name string
		key  Key
		want string
	}{
		{"zero key", Key{}, "zero Key"},
		{"empty entity", NewKey("  ", "1"), "empty entity"},
		{"empty id", NewKey("artist", ""), "empty id"},
		{"control in id", NewKey("artist", "1\n2"), "control"},
		{"control in value", NewKey("artist", "1").With("type", "a\x00b"), "control"},
		{"empty param name", NewKey("artist", "1").With("_-.", "x"), "empty"},
		{"over-long id", NewKey("artist", long), "longer than"},
		{"over-long once escaped", NewKey("artist", strings.Repeat(":", MaxKeyLen/2)), "longer than"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			for op, err := range map[string]error{
				"Get":       second(c.Get(ctx, tt.key)),
				"Set":       c.Set(ctx, tt.key, ImageMeta{}),
				"GetOrLoad": second(c.GetOrLoad(ctx, tt.key, load)),
				"Delete":    c.Delete(ctx, NewKey("artist", "ok"), tt.key),
			} {
				if err == nil || !strings.Contains(err.Error(), tt.want) || errors.Is(err, ErrNotFound) {
					t.Errorf("%s: err = %v, want an error mentioning %q", op, err, tt.want)
				}
			}
		})
	}
	if _, err := c.GetOrLoad(ctx, NewKey("artist", "1"), nil); err == nil || !strings.Contains(err.Error(), "nil load") {
		t.Errorf("nil loader: err = %v", err)
	}
	if keys := e.namespaceKeys(); len(keys) != 0 {
		t.Errorf("bad input wrote %v", keys)
	}
}

func second[V any](_ V, err error) error { return err }

func TestCloseStopsEverything(t *testing.T) {
	e := newEnv(t)
	c, err := New[ImageMeta](e.opts())
	if err != nil {
		t.Fatal(err)
	}
	k := NewKey("artist", "1")
	started := make(chan struct{})
	loadErr := make(chan error, 1)
	go func() {
		_, err := c.GetOrLoad(ctx, k, func(lctx context.Context) (ImageMeta, error) {
			close(started)
			<-lctx.Done() // a well-behaved loader stops when the cache closes
			return ImageMeta{}, lctx.Err()
		})
		loadErr <- err
	}()
	<-started
	if err := c.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	if err := <-loadErr; !errors.Is(err, context.Canceled) {
		t.Errorf("the running load's caller got %v, want context.Canceled", err)
	}
	if err := c.Close(); err != nil {
		t.Errorf("second Close: %v", err)
	}
	for op, err := range map[string]error{
		"Get":       second(c.Get(ctx, k)),
		"Set":       c.Set(ctx, k, ImageMeta{}),
		"GetOrLoad": second(c.GetOrLoad(ctx, k, func(context.Context) (ImageMeta, error) { return ImageMeta{}, nil })),
		"Delete":    c.Delete(ctx, k),
	} {
		if !errors.Is(err, ErrClosed) {
			t.Errorf("%s after Close: %v, want ErrClosed", op, err)
		}
	}
	_ = c.Stats() // still works
}

func TestStatsAreExactUnderConcurrency(t *testing.T) {
	e := newMiniEnv(t)
	c := newCache[ImageMeta](e, e.opts())
	const workers, each = 8, 500
	keys := make([]Key, 16)
	for i := range keys {
		keys[i] = NewKey("artist", fmt.Sprint(i))
		if err := c.Set(ctx, keys[i], sampleMeta(fmt.Sprint(i))); err != nil {
			t.Fatal(err)
		}
	}
	var wg sync.WaitGroup
	for w := range workers {
		wg.Go(func() {
			for i := range each {
				if _, err := c.Get(ctx, keys[(w+i)%len(keys)]); err != nil {
					t.Error(err)
					return
				}
				_, _ = c.Get(ctx, NewKey("absent", fmt.Sprint(i)))
			}
		})
	}
	wg.Wait()
	if s := c.Stats(); s.L1Hits != workers*each || s.Misses != workers*each {
		t.Errorf("stats = %+v, want exactly %d L1 hits and %d misses", s, workers*each, workers*each)
	}
}

func TestDebugLogNamesKeysNotValues(t *testing.T) {
	e := newEnv(t)
	opts := e.opts()
	logged := captureLog(&opts, slog.LevelDebug)
	opts.L1Size = -1 // every read reaches Redis
	c := newCache[ImageMeta](e, opts)
	k := NewKey("artist", "12").With("type", "avatar")
	_, _ = c.Get(ctx, k)
	_ = c.Set(ctx, k, sampleMeta("secret-path"))
	_, _ = c.Get(ctx, k)
	out := logged()
	rkey := e.redisKey(k)
	for _, want := range []string{
		`msg="imgcache L2 GET" key=` + rkey + " result=MISS",
		`msg="imgcache L2 SET" key=` + rkey + " ttl=4m", // the default TTL less its jitter
		" result=OK",
		`msg="imgcache L2 GET" key=` + rkey + " result=HIT",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("debug log lacks %q:\n%s", want, out)
		}
	}
	if strings.Contains(out, "secret-path") {
		t.Errorf("debug log contains the value:\n%s", out)
	}
	// Without a Logger, nothing is logged (and nothing panics).
	silent := newCache[ImageMeta](e, e.opts())
	_, _ = silent.Get(ctx, k)
}

// captureLog sets o.Logger to a text logger at level and returns what it has logged so far.
func captureLog(o *Options, level slog.Level) (logged func() string) {
	w := &lockedBuffer{}
	o.Logger = slog.New(slog.NewTextHandler(w, &slog.HandlerOptions{Level: level}))
	return w.String
}

// lockedBuffer is a bytes.Buffer that the cache's goroutines may write while a test reads it.
type lockedBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.buf.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.buf.String()
}

// fakeCache shows that services can fake the cache in their own tests through Interface.
type fakeCache[V any] struct{ m map[Key]V }

func (f *fakeCache[V]) Get(_ context.Context, k Key) (V, error) {
	v, ok := f.m[k]
	if !ok {
		return v, ErrNotFound
	}
	return v, nil
}
func (f *fakeCache[V]) Set(_ context.Context, k Key, v V, _ ...SetOption) error {
	f.m[k] = v
	return nil
}
func (f *fakeCache[V]) GetOrLoad(ctx context.Context, k Key, load func(context.Context) (V, error), _ ...SetOption) (V, error) {
	if v, ok := f.m[k]; ok {
		return v, nil
	}
	v, err := load(ctx)
	if err == nil {
		f.m[k] = v
	}
	return v, err
}
func (f *fakeCache[V]) GetMany(ctx context.Context, ks []Key) ([]V, []bool, error) {
	vals, found := make([]V, len(ks)), make([]bool, len(ks))
	for i, k := range ks {
		vals[i], found[i] = f.m[k]
	}
	return vals, found, nil
}
func (f *fakeCache[V]) GetOrLoadMany(ctx context.Context, ks []Key, load func(context.Context, []Key) (map[Key]V, error), _ ...SetOption) ([]V, []bool, error) {
	vals, found, _ := f.GetMany(ctx, ks)
	var missing []Key
	for i, k := range ks {
		if !found[i] {
			missing = append(missing, k)
		}
	}
	if len(missing) == 0 {
		return vals, found, nil
	}
	got, err := load(ctx, missing)
	for i, k := range ks {
		if v, ok := got[k]; ok && !found[i] {
			f.m[k], vals[i], found[i] = v, v, true
		}
	}
	return vals, found, err
}
func (f *fakeCache[V]) Delete(_ context.Context, ks ...Key) error {
	for _, k := range ks {
		delete(f.m, k)
	}
	return nil
}
func (f *fakeCache[V]) InvalidateEntity(context.Context, string, string) error { return nil }
func (f *fakeCache[V]) InvalidateTags(context.Context, ...string) error        { return nil }
func (f *fakeCache[V]) InvalidatePattern(context.Context, string) (int, error) { return 0, nil }
func (f *fakeCache[V]) Stats() Stats                                           { return Stats{} }

func TestInterfaceCanBeFaked(t *testing.T) {
	var c Interface[ImageMeta] = &fakeCache[ImageMeta]{m: map[Key]ImageMeta{}}
	// Normalised keys meet in the fake too: a different spelling finds the same entry.
	_ = c.Set(ctx, NewKey("Artist", "1").With("userID", "7"), sampleMeta("1"))
	if _, err := c.Get(ctx, NewKey("artist", "1").With("user_id", "7")); err != nil {
		t.Errorf("fake Get: %v", err)
	}
}
