package imgcache

import (
	"context"
	"errors"
	"fmt"
	"math"
	"net"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
)

// L1Size is "the most entries the in-process level holds" (Options, README). An L1 whose size is
// not a multiple of its shard count must still never hold more than L1Size entries.
func TestL1NeverHoldsMoreThanL1Size(t *testing.T) {
	for _, tc := range []struct {
		size   int
		policy Policy
	}{
		{1001, PolicyLRU},
		{1001, PolicyTinyLFU},
		{1, PolicyTinyLFU},
		{3, PolicyTinyLFU},
	} {
		t.Run(fmt.Sprintf("%d/%d", tc.size, tc.policy), func(t *testing.T) {
			c, err := New[int](Options{L1Size: tc.size, L1Policy: tc.policy, TTLJitter: -1})
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			for i := range 20 * tc.size {
				if err := c.Set(ctx, NewKey("k", fmt.Sprint(i)), i); err != nil {
					t.Fatal(err)
				}
			}
			if s := c.Stats(); s.L1Entries > uint64(tc.size) {
				t.Errorf("L1Size %d: L1 holds %d entries", tc.size, s.L1Entries)
			}
		})
	}
}

// New validates Options and reports bad ones as errors; it must not panic on any of them.
func TestNewRefusesAHugeL1SizeWithoutPanicking(t *testing.T) {
	for _, p := range []Policy{PolicyLRU, PolicyAuto} {
		t.Run(fmt.Sprint(p), func(t *testing.T) {
			var c *Cache[int]
			var err error
			func() {
				defer func() {
					if r := recover(); r != nil {
						t.Fatalf("New(L1Size: math.MaxInt, L1Policy: %d) panicked: %v", p, r)
					}
				}()
				c, err = New[int](Options{L1Size: math.MaxInt, L1Policy: p})
			}()
			if err != nil {
				return // a clear error is fine
			}
			defer c.Close()
			// Accepted: then it must hold what it was given room for.
			for i := range 1000 {
				_ = c.Set(ctx, NewKey("k", fmt.Sprint(i)), i)
			}
			if s := c.Stats(); s.L1Entries != 1000 || s.L1Evictions != 0 {
				t.Errorf("L1Size math.MaxInt accepted, but after 1000 Sets L1 holds %d entries (%d evictions)",
					s.L1Entries, s.L1Evictions)
			}
		})
	}
}

// NaN passes every "< x || > y" check, and a NaN TTLJitter would turn every TTL into
// garbage (L1 entries expiring at once, Redis TTLs collapsing to 1 ms): New refuses it.
func TestNewRejectsNaNOptions(t *testing.T) {
	nan := math.NaN()
	for name, o := range map[string]Options{
		"TTLJitter":              {TTLJitter: nan},
		"EarlyRefresh":           {EarlyRefresh: nan},
		"HitRateGuard.Threshold": {HitRateGuard: &HitRateGuard{Threshold: nan}},
	} {
		t.Run(name, func(t *testing.T) {
			c, err := New[int](o)
			if err != nil {
				return
			}
			defer c.Close()
			k := NewKey("k", "1")
			_ = c.Set(ctx, k, 1)
			_, gerr := c.Get(ctx, k)
			t.Errorf("New accepted %s = NaN (a Get right after a Set of an L1-only cache: %v)", name, gerr)
		})
	}
}

// faultHook fails (as a transport failure), panics, or passes every command, as mode says.
type faultHook struct{ mode *atomic.Int32 }

const (
	hookPasses = iota
	hookFails
	hookPanics
)

var errTestTransport = &net.OpError{Op: "read", Net: "tcp", Err: errors.New("connection reset (test)")}

func (h faultHook) act() error {
	switch h.mode.Load() {
	case hookFails:
		return errTestTransport
	case hookPanics:
		panic("hook panicked (test)")
	}
	return nil
}

func (faultHook) DialHook(next redis.DialHook) redis.DialHook { return next }
func (h faultHook) ProcessHook(next redis.ProcessHook) redis.ProcessHook {
	return func(ctx context.Context, cmd redis.Cmder) error {
		if err := h.act(); err != nil {
			cmd.SetErr(err)
			return err
		}
		return next(ctx, cmd)
	}
}
func (h faultHook) ProcessPipelineHook(next redis.ProcessPipelineHook) redis.ProcessPipelineHook {
	return func(ctx context.Context, cmds []redis.Cmder) error {
		if err := h.act(); err != nil {
			for _, c := range cmds {
				c.SetErr(err)
			}
			return err
		}
		return next(ctx, cmds)
	}
}

// A half-open probe that panics (in a go-redis hook, which the cache otherwise survives: see
// processHeld and errFlightPanicked) must not leave the breaker open for ever once Redis is healthy.
func TestBreakerClosesAfterAPanickingProbe(t *testing.T) {
	e := newMiniEnv(t)
	o := e.opts()
	o.L1Size = -1
	o.ReadConns = -1
	o.BreakerThreshold = 1
	o.BreakerCooldown = 20 * time.Millisecond
	c := newCache[ImageMeta](e, o)
	k := NewKey("artist", "1")
	if err := c.Set(ctx, k, metaV("1", 1)); err != nil {
		t.Fatal(err)
	}
	var mode atomic.Int32
	e.node().AddHook(faultHook{&mode})

	mode.Store(hookFails)
	_, _ = c.Get(ctx, k)
	if !c.Stats().L2BreakerOpen {
		t.Fatalf("breaker not open after a transport failure: %+v", c.Stats())
	}
	time.Sleep(2 * o.BreakerCooldown)
	mode.Store(hookPanics)
	panicked := false
	func() {
		defer func() { panicked = recover() != nil }()
		_, _ = c.Get(ctx, k) // the probe
	}()
	if !panicked {
		t.Fatal("the probe did not reach the panicking hook")
	}
	mode.Store(hookPasses)

	deadline := time.Now().Add(time.Second)
	for time.Now().Before(deadline) {
		if _, err := c.Get(ctx, k); err == nil && !c.Stats().L2BreakerOpen {
			return
		}
		time.Sleep(5 * time.Millisecond)
	}
	t.Fatalf("Redis healthy for 1s (50 cool-downs) after a panicking probe, breaker still open: %+v", c.Stats())
}

// NegativeTTL of 1 ms is valid ("at least 1ms"), and the default jitter shortens it below 1 ms:
// the remembered "not found" is then written as SET ... PX 0, which Redis refuses.
func TestMinimalNegativeTTLIsWrittenToRedis(t *testing.T) {
	e := newMiniEnv(t)
	o := e.opts()
	o.NegativeTTL = time.Millisecond
	c := newCache[ImageMeta](e, o)
	for i := range 5 {
		k := NewKey("artist", fmt.Sprint("neg", i))
		_, err := c.GetOrLoad(ctx, k, func(context.Context) (ImageMeta, error) { return ImageMeta{}, ErrNotFound })
		if !errors.Is(err, ErrNotFound) {
			t.Fatalf("GetOrLoad: %v", err)
		}
	}
	if s := c.Stats(); s.L2Errors != 0 {
		t.Errorf("remembering 5 not-founds for NegativeTTL 1ms: L2Errors = %d, want 0", s.L2Errors)
	}
}

// stallHook holds every command until its context's deadline while stall is set, and counts them.
type stallHook struct {
	stall *atomic.Bool
	seen  *atomic.Int64
}

func (stallHook) DialHook(next redis.DialHook) redis.DialHook { return next }
func (h stallHook) ProcessHook(next redis.ProcessHook) redis.ProcessHook {
	return func(ctx context.Context, cmd redis.Cmder) error {
		h.seen.Add(1)
		if h.stall.Load() {
			<-ctx.Done()
			cmd.SetErr(ctx.Err())
			return ctx.Err()
		}
		return next(ctx, cmd)
	}
}
func (h stallHook) ProcessPipelineHook(next redis.ProcessPipelineHook) redis.ProcessPipelineHook {
	return func(ctx context.Context, cmds []redis.Cmder) error {
		h.seen.Add(1)
		if h.stall.Load() {
			<-ctx.Done()
			for _, c := range cmds {
				c.SetErr(ctx.Err())
			}
			return ctx.Err()
		}
		return next(ctx, cmds)
	}
}

// Stats.L2Batched counts "Redis reads that shared one round trip with other concurrent reads". A
// batch that the open breaker keeps from Redis is no round trip: its reads must not count.
func TestL2BatchedDoesNotCountReadsTheBreakerSkipped(t *testing.T) {
	e := newMiniEnv(t)
	o := e.opts()
	o.L1Size = -1
	o.ReadConns = -1
	o.BreakerThreshold = 1
	o.BreakerCooldown = time.Minute
	o.L2Timeout = 200 * time.Millisecond
	c := newCache[ImageMeta](e, o)
	var stall atomic.Bool
	var seen atomic.Int64
	e.node().AddHook(stallHook{&stall, &seen})
	stall.Store(true)

	done := make(chan struct{}, 2*readsInFlight)
	get := func(i int) {
		_, _ = c.Get(ctx, NewKey("artist", fmt.Sprint(i)))
		done <- struct{}{}
	}
	for i := range readsInFlight { // these fill the round trips in flight, and time out
		go get(i)
	}
	time.Sleep(80 * time.Millisecond)
	for i := range readsInFlight { // these queue, and go as one batch after the first time-out
		go get(readsInFlight + i)
	}
	for range 2 * readsInFlight {
		<-done
	}
	s := c.Stats()
	if !s.L2BreakerOpen {
		t.Fatalf("breaker not open: %+v", s)
	}
	if n := seen.Load(); n != readsInFlight {
		t.Fatalf("Redis saw %d commands, want %d (the queued reads must have gone as one skipped batch)", n, readsInFlight)
	}
	if s.L2Batched != 0 {
		t.Errorf("L2Batched = %d, but no batch reached Redis (it saw %d single reads; L2Skipped = %d)", s.L2Batched, seen.Load(), s.L2Skipped)
	}
}

// The smallest MaxValueSize New accepts must let a value through: below the envelope and its
// stamp's room (minMaxValueSize), every Set would be refused.
func TestSmallestMaxValueSizeStoresAValue(t *testing.T) {
	e := newEnv(t)
	opts := e.opts()
	opts.MaxValueSize = minMaxValueSize - 1
	if _, err := New[byte](opts); err == nil || !strings.Contains(err.Error(), "MaxValueSize") {
		t.Fatalf("New(MaxValueSize: %d) = %v, want an error naming MaxValueSize", opts.MaxValueSize, err)
	}
	opts.MaxValueSize = minMaxValueSize
	c, err := New[byte](opts)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	k := NewKey("b", "1")
	if err := c.Set(ctx, k, 7); err != nil {
		t.Fatalf("Set of a one-byte value under MaxValueSize %d: %v", opts.MaxValueSize, err)
	}
}
