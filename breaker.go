package imgcache

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"github.com/redis/go-redis/v9"
)

// ErrBreakerOpen is the error of an L2 operation skipped because the circuit breaker is open: Redis
// failed Options.BreakerThreshold times in a row and is left alone for Options.BreakerCooldown.
// Set, Delete and the Invalidate methods return it wrapped; reads never do (they fall back).
var ErrBreakerOpen = errors.New("imgcache: Redis circuit breaker is open")

// breaker stops calling Redis after threshold consecutive transport failures (timeouts, refused or
// reset connections), for cooldown; then it lets one call through as a probe, and closes on its
// success. Replies that Redis sent (OOM, WRONGTYPE, ...) are not transport failures: a Redis that
// answers is up, so they do not count.
type breaker struct {
	threshold int64
	cooldown  int64 // nanoseconds

	failures  atomic.Int64 // consecutive transport failures
	openUntil atomic.Int64 // preciseNow reading until which calls are skipped; 0 = closed
	probing   atomic.Bool  // a probe is in flight while half-open
	trips     atomic.Uint64
	skipped   atomic.Uint64
}

// allow reports whether a call may go to Redis; a false costs an atomic load and no clock read
// while the breaker is closed.
func (b *breaker) allow() bool {
	if b == nil {
		return true
	}
	until := b.openUntil.Load()
	if until == 0 {
		return true
	}
	if preciseNow() < until || !b.probing.CompareAndSwap(false, true) {
		b.skipped.Add(1)
		return false
	}
	return true // half-open: this call is the probe
}

// observe records a call's outcome.
func (b *breaker) observe(err error) {
	if b == nil {
		return
	}
	if err == nil || !transportFailure(err) {
		if b.openUntil.Load() != 0 {
			b.openUntil.Store(0)
			b.probing.Store(false)
		}
		if b.failures.Load() != 0 { // a store on every call would bounce the line between cores
			b.failures.Store(0)
		}
		return
	}
	if b.openUntil.Load() != 0 { // a failed probe: open again
		b.openUntil.Store(preciseNow() + b.cooldown)
		b.probing.Store(false)
		return
	}
	if b.failures.Add(1) >= b.threshold {
		b.openUntil.Store(preciseNow() + b.cooldown)
		b.trips.Add(1)
	}
}

func (b *breaker) open() bool { return b != nil && b.openUntil.Load() != 0 }

// abandon gives up a call whose outcome says nothing about Redis (its caller left): if it was the
// half-open probe, the next call may probe instead.
func (b *breaker) abandon() {
	if b != nil && b.openUntil.Load() != 0 {
		b.probing.Store(false)
	}
}

// transportFailure reports whether err means Redis could not be reached in time, as opposed to a
// reply (redis.Nil, OOM, ...) or the caller's own cancellation.
func transportFailure(err error) bool {
	if isReply(err) || errors.Is(err, context.Canceled) {
		return false
	}
	var ne net.Error
	return errors.Is(err, context.DeadlineExceeded) || errors.As(err, &ne) || errors.Is(err, net.ErrClosed) ||
		errors.Is(err, redis.ErrClosed) || err.Error() == "EOF" || errors.Is(err, errL2Call)
}

// failedSlowly reports whether err says that Redis did not answer in time, or that the breaker
// kept it from being asked: unlike a refused connection or a reply, asking again would cost
// another wait.
func failedSlowly(err error) bool {
	var ne net.Error
	return errors.Is(err, ErrBreakerOpen) || errors.Is(err, context.DeadlineExceeded) || (errors.As(err, &ne) && ne.Timeout())
}

// HitRateGuard configures the hit-rate guard: when the share of L2 reads that hit falls under
// Threshold over Window (with at least MinReads reads), the cache stops reading Redis for
// Cooldown, still writes to it, lets one read in ProbeEvery through to measure again, and logs one
// warning naming the likely causes. A collapsed hit rate almost always means the writer and the
// reader disagree: keys built differently, a codec or schema mismatch, or TTLs too short for the
// traffic. Skipped reads cost nothing instead of a round trip that cannot hit. Zero fields take
// the defaults below.
type HitRateGuard struct {
	Threshold  float64       // 0 means 0.05
	Window     time.Duration // 0 means 5 minutes
	MinReads   uint64        // 0 means 1,000
	Cooldown   time.Duration // 0 means 1 minute
	ProbeEvery uint64        // 0 means 100
}

// guard is the running hit-rate guard. The window is a ring of buckets, each covering
// Window/guardBuckets, rotated lazily by whichever read finds its bucket out of date.
type guard struct {
	cfg      HitRateGuard
	span     int64 // one bucket's duration
	log      *slog.Logger
	mu       sync.Mutex // protects buckets, cur, curStart and warned
	buckets  [guardBuckets]struct{ reads, hits uint64 }
	cur      int
	curStart int64
	warned   bool

	openUntil atomic.Int64 // 0 = closed
	probe     atomic.Uint64
	trips     atomic.Uint64
	skipped   atomic.Uint64
}

const guardBuckets = 10

func newGuard(cfg *HitRateGuard, log *slog.Logger) *guard {
	if cfg == nil {
		return nil
	}
	c := *cfg
	c.Threshold = orDefault(c.Threshold, 0.05)
	c.Window = orDefault(c.Window, 5*time.Minute)
	c.MinReads = orDefault(c.MinReads, 1000)
	c.Cooldown = orDefault(c.Cooldown, time.Minute)
	c.ProbeEvery = orDefault(c.ProbeEvery, 100)
	return &guard{cfg: c, span: int64(c.Window) / guardBuckets, log: log, curStart: coarseNow()}
}

// skipRead reports whether an L2 read should be skipped; while open it lets every ProbeEvery-th
// read through.
func (g *guard) skipRead() bool {
	if g == nil {
		return false
	}
	until := g.openUntil.Load()
	if until == 0 {
		return false
	}
	if coarseNow() >= until {
		g.openUntil.Store(0)
		return false
	}
	if g.probe.Add(1)%g.cfg.ProbeEvery == 0 {
		return false
	}
	g.skipped.Add(1)
	return true
}

// record counts an L2 read (hit or not) and trips the guard when the window's hit rate collapses.
func (g *guard) record(ctx context.Context, hit bool) {
	if g == nil {
		return
	}
	now := coarseNow()
	g.mu.Lock()
	for now-g.curStart >= g.span {
		g.cur = (g.cur + 1) % guardBuckets
		g.buckets[g.cur] = struct{ reads, hits uint64 }{}
		g.curStart += g.span
		if now-g.curStart > int64(g.cfg.Window) { // idle for a whole window: start afresh
			g.buckets = [guardBuckets]struct{ reads, hits uint64 }{}
			g.curStart = now
		}
	}
	g.buckets[g.cur].reads++
	if hit {
		g.buckets[g.cur].hits++
	}
	var reads, hits uint64
	for _, b := range g.buckets {
		reads += b.reads
		hits += b.hits
	}
	trip := g.openUntil.Load() == 0 && reads >= g.cfg.MinReads && float64(hits) < g.cfg.Threshold*float64(reads)
	warn := trip && !g.warned
	if trip {
		g.warned = true
		// Start the next window clean, so the probes measure the present.
		g.buckets = [guardBuckets]struct{ reads, hits uint64 }{}
	}
	g.mu.Unlock()
	if !trip {
		return
	}
	g.openUntil.Store(now + int64(g.cfg.Cooldown))
	g.trips.Add(1)
	if warn && g.log != nil {
		g.log.LogAttrs(ctx, slog.LevelWarn, "imgcache: L2 hit rate collapsed; skipping Redis reads for a while. "+
			"Likely causes: the writer and the reader build keys differently (compare the keys of L2 SET and L2 GET "+
			"debug records), a codec or schema mismatch (see Stats.L2Unreadable), or TTLs too short for the traffic",
			slog.Uint64("reads", reads), slog.Uint64("hits", hits), slog.Float64("threshold", g.cfg.Threshold),
			slog.Duration("cooldown", g.cfg.Cooldown))
	}
}

// isReply reports whether err is an answer from Redis (redis.Nil, OOM, WRONGTYPE, ...), which
// proves that the command reached Redis and was not executed (or found nothing).
func isReply(err error) bool {
	var re redis.Error
	return errors.Is(err, redis.Nil) || errors.As(err, &re)
}

// validate checks a HitRateGuard's fields as New does: zero means the default, anything else must
// make sense.
func (h *HitRateGuard) validate() error {
	switch {
	case !(h.Threshold >= 0 && h.Threshold <= 1): // NaN fails every comparison
		return fmt.Errorf("imgcache: Options.HitRateGuard.Threshold is %v; it must be between 0 and 1", h.Threshold)
	case h.Window != 0 && h.Window < guardBuckets*time.Millisecond:
		return fmt.Errorf("imgcache: Options.HitRateGuard.Window is %v; it must be at least %v (or 0)", h.Window, guardBuckets*time.Millisecond)
	case h.Cooldown != 0 && h.Cooldown < time.Millisecond:
		return fmt.Errorf("imgcache: Options.HitRateGuard.Cooldown is %v; it must be at least 1ms (or 0)", h.Cooldown)
	}
	return nil
}

func (g *guard) open() bool {
	return g != nil && g.openUntil.Load() != 0 && coarseNow() < g.openUntil.Load()
}
