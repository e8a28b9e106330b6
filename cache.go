package imgcache

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"strings"
	"sync/atomic"
	"time"

	"github.com/redis/go-redis/v9"
)

var (
	// ErrNotFound reports a miss: [Cache.Get] found nothing, or a loader said (by returning an error
	// that wraps ErrNotFound) that the value does not exist. Match it with errors.Is.
	ErrNotFound = errors.New("imgcache: not found")
	// ErrClosed is returned by every method of a Cache after [Cache.Close].
	ErrClosed = errors.New("imgcache: cache is closed")
)

// Options configures a Cache. The zero value of every field means the documented default; New
// validates the struct and never modifies it.
type Options struct {
	// Redis is the shared level (L2). Nil runs the cache with L1 only. The client must have
	// ContextTimeoutEnabled set, so that L2Timeout bounds every call; New says so otherwise. The
	// caller owns the client: Close does not close it.
	Redis redis.UniversalClient
	// Namespace prefixes every Redis key as "<Namespace>:". Default "imgcache". It may not contain
	// white space, control characters, Redis glob characters (* ? [ ] \) or braces.
	Namespace string
	// L1Size is the most entries the in-process level holds. 0 means 10,000; negative disables L1;
	// at most MaxL1Size.
	L1Size int
	// L1Policy chooses what L1 keeps when it is full: PolicyAuto (the zero value: W-TinyLFU from
	// 1,000 entries up, LRU below), PolicyLRU or PolicyTinyLFU.
	L1Policy Policy
	// L1TTL is the longest an entry lives in L1, however long its L2 TTL. 0 means 1 minute. It bounds
	// how long an instance can serve a value that another instance has changed.
	L1TTL time.Duration
	// TTL is the L2 lifetime of a value when no WithTTL is given. 0 means 5 minutes.
	TTL time.Duration
	// NegativeTTL is how long a loader's ErrNotFound is remembered, in both levels. 0 means 30 s.
	NegativeTTL time.Duration
	// GenerationTTL is how long an instance trusts a generation it has read from Redis: an entity's or
	// a tag's (see the README's Invalidation section). While it does, a Redis read of a value of that
	// entity, or with that tag, reads the value alone (a GET rather than an MGET with the entity's
	// generation key; no second round trip for the tags'). Every invalidation reaches the trusted
	// generations as it reaches L1: at once on the instance that runs it, through the bus on the
	// others, and a resubscription forgets them all; so with L1 on, a value is never staler than L1
	// already allows. 0 means L1TTL (its default without L1). Negative turns the trust off: every
	// Redis read checks the current generations in Redis, so even an instance whose bus is down never
	// reads a value invalidated before the read began.
	GenerationTTL time.Duration
	// L2Timeout is the budget of one Redis call, waits for a pooled connection included. 0 means
	// 100 ms.
	L2Timeout time.Duration
	// ReadConns is how many of a single Redis client's (*redis.Client) pooled connections the cache
	// holds for its reads, which then skip the pool's per-command checks (see the README's
	// Performance section): at most 4, fewer than the pool's size. 0 means a quarter of PoolSize (or
	// of MaxActiveConns, if smaller) up to 4, and none with go-redis's client-side cache; negative
	// holds none. Hooks added to the client after the cache's first Redis read see reads on held
	// connections only once those are replaced (within 30 s), and a hook sees a held read's command
	// wrapped in a type of imgcache's own. Close gives them back.
	ReadConns int
	// Codec encodes values for Redis. Nil means the default: V's own binary encoding when it has one
	// (ImageMeta does), encoding/json otherwise. See Codec.
	Codec Codec
	// MaxValueSize bounds an encoded value, in bytes: larger values are refused on write and treated
	// as unreadable on read, before they are decoded. 0 means 1 MiB; at least 36 (an envelope, its
	// stamp's room and one byte).
	MaxValueSize int
	// Logger receives debug records of every L2 GET and SET (the Redis key and HIT, MISS or ERROR,
	// never a value), and the hit-rate guard's warning. Nil means silent.
	Logger *slog.Logger

	// Resilience (see the README's failure model).

	// BreakerThreshold is how many Redis calls in a row must fail to reach Redis (time out, be
	// refused or reset) before the circuit breaker opens and Redis is left alone for
	// BreakerCooldown; then one call probes it, and a success closes the breaker. 0 means 5;
	// negative disables the breaker.
	BreakerThreshold int
	// BreakerCooldown is how long an open breaker skips Redis before it probes. 0 means 1 s.
	BreakerCooldown time.Duration
	// HitRateGuard, if set, stops reading Redis for a while when almost no read hits. Nil means off.
	HitRateGuard *HitRateGuard
	// StaleTTL keeps a value for this long past its TTL, in both levels, as a fail-safe: when a
	// GetOrLoad's loader then fails or times out, the stale value is returned instead of the error
	// (Stats.StaleServed), and the load is retried later with exponential backoff. An invalidation
	// removes stale values too. 0 means off.
	StaleTTL time.Duration
	// LoadTimeout is the hard timeout of a GetOrLoad load: its context ends then, and the callers get
	// the error (or a stale value, with StaleTTL). 0 means none.
	LoadTimeout time.Duration
	// SoftLoadTimeout, with StaleTTL, is how long callers wait for a load when a stale value is at
	// hand: past it they get the stale value, and the load goes on in the background and refreshes
	// the cache when it finishes. 0 means off.
	SoftLoadTimeout time.Duration
	// EarlyRefresh turns on probabilistic early refresh (XFetch, Vattani et al., VLDB 2015) for
	// GetOrLoad: a hit on a value near its expiry may start one background load of it, more likely
	// the nearer the expiry and the longer the value took to load, so that hot keys are refreshed
	// before they expire and never miss. It is XFetch's beta: 1 is the paper's default, larger
	// refreshes earlier. 0 means off.
	EarlyRefresh float64
	// MaxRefreshes bounds the early refreshes running at once. 0 means 64. (A load that goes on
	// past a soft timeout is not counted: it is the flight its callers started.)
	MaxRefreshes int
	// TTLJitter shortens each default TTL (Options.TTL, NegativeTTL and L1TTL, not WithTTL) by a
	// random fraction up to this much, so that values written together do not expire together.
	// 0 means 0.1; negative disables it.
	TTLJitter float64
	// LocalLoadsOnly turns off the distributed stampede protection, which is on whenever Redis is
	// set: when instances miss the same key at once, one takes a lease in Redis (SET NX PX with a
	// token) and loads; the others wait for its value and read it from Redis. A lease whose holder
	// died expires after LockTTL, and another instance loads. GetOrLoad and GetOrLoadMany both
	// take leases.
	LocalLoadsOnly bool
	// LockTTL is the lifetime of a load's lease. 0 means LoadTimeout plus a second, or 10 s without
	// LoadTimeout.
	LockTTL time.Duration
}

// Defaults for the zero values of Options.
const (
	DefaultNamespace    = "imgcache"
	DefaultL1Size       = 10_000
	DefaultL1TTL        = time.Minute
	DefaultTTL          = 5 * time.Minute
	DefaultNegativeTTL  = 30 * time.Second
	DefaultL2Timeout    = 100 * time.Millisecond
	DefaultMaxValueSize = 1 << 20

	DefaultBreakerThreshold = 5
	DefaultBreakerCooldown  = time.Second
	DefaultMaxRefreshes     = 64
	DefaultTTLJitter        = 0.1
	DefaultLockTTL          = 10 * time.Second

	// MaxL1Size is the largest Options.L1Size: W-TinyLFU's sketch is allocated at New for the
	// whole size.
	MaxL1Size = 1 << 30
)

// Interface holds the methods a service calls on a cache. *Cache[V] implements it; a service can
// depend on Interface[V] and give its tests a fake.
type Interface[V any] interface {
	Get(ctx context.Context, k Key) (V, error)
	Set(ctx context.Context, k Key, v V, opts ...SetOption) error
	GetOrLoad(ctx context.Context, k Key, load func(context.Context) (V, error), opts ...SetOption) (V, error)
	GetMany(ctx context.Context, ks []Key) (vals []V, found []bool, err error)
	GetOrLoadMany(ctx context.Context, ks []Key, load func(ctx context.Context, missing []Key) (map[Key]V, error), opts ...SetOption) (vals []V, found []bool, err error)
	Delete(ctx context.Context, ks ...Key) error
	InvalidateEntity(ctx context.Context, entity, id string) error
	InvalidateTags(ctx context.Context, tags ...string) error
	InvalidatePattern(ctx context.Context, pattern string) (int, error)
	Stats() Stats
}

var _ Interface[ImageMeta] = (*Cache[ImageMeta])(nil)

// SetOption changes how one Set or GetOrLoad stores its value.
type SetOption func(*setOptions)

type setOptions struct {
	ttl         time.Duration
	explicitTTL bool // WithTTL was given: the TTL is kept exactly, not jittered
	tags        []string
}

// WithTTL sets the L2 lifetime of the value, instead of Options.TTL; L1 keeps it for the shorter of
// this and Options.L1TTL. A TTL under 1 ms is an error (Redis counts in milliseconds), not rounded up.
func WithTTL(d time.Duration) SetOption {
	return func(o *setOptions) { o.ttl, o.explicitTTL = d, true }
}

// Cache is a two-level cache of values of type V: an in-process LRU (L1) over Redis (L2). It is safe
// for concurrent use. Make one with New and Close it when done.
type Cache[V any] struct {
	l1       *l1[V] // nil when disabled
	l2       *l2    // nil without Redis
	l1TTL    time.Duration
	ttl      time.Duration
	negTTL   time.Duration
	codec    Codec
	codecID  uint32
	maxValue int
	log      *slog.Logger

	guard       *guard // nil when off
	staleTTL    time.Duration
	loadTimeout time.Duration
	softTimeout time.Duration
	beta        float64
	refreshSem  chan struct{} // one token per running background refresh
	jitter      float64
	leases      bool
	lockTTL     time.Duration
	loadCost    atomic.Int64  // moving average of load durations, for early refresh
	l2Misses    atomic.Uint32 // moving average of GetOrLoad's Redis misses, in 1/65536ths (see speculate)

	flights flightGroup[V]
	stats   counters
	closed  atomic.Bool
	// base is cancelled by Close; running loads and the bus goroutine see it.
	base   context.Context
	cancel context.CancelFunc

	// gens holds the generations this instance trusts (gens.go); nil without Redis or with
	// GenerationTTL negative.
	gens *trustedGens
	// inv is bumped by every invalidation before it removes L1 entries; an L1 fill stores only if
	// its key's sequence is unchanged since the fill began (see l1.addIf and invseq.go).
	inv invalidations
	// The bus (bus.go): this instance's id in its messages, the subscription and its goroutine.
	instance   uint64
	busDone    chan struct{}
	subscribed atomic.Bool
	outbox     outbox                        // messages of failed invalidations, for the bus goroutine to publish
	busHook    atomic.Pointer[func(busKind)] // tests only: called after a message from another instance is applied
}

// New validates opts and returns a Cache. With Redis it subscribes to the namespace's invalidation
// channel (see InvalidateEntity); a Redis that is down at start is handled like one that goes down
// later, and the subscription is retried in the background.
func New[V any](opts Options) (*Cache[V], error) {
	ns := opts.Namespace
	if ns == "" {
		ns = DefaultNamespace
	}
	if strings.ContainsFunc(ns, func(r rune) bool {
		return r <= ' ' || r == 0x7f || strings.ContainsRune(`*?[]\{}^`, r)
	}) {
		return nil, fmt.Errorf("imgcache: Options.Namespace %q has white space, a control, glob or brace character", ns)
	}
	c := &Cache[V]{
		l1TTL:    orDefault(opts.L1TTL, DefaultL1TTL),
		ttl:      orDefault(opts.TTL, DefaultTTL),
		negTTL:   orDefault(opts.NegativeTTL, DefaultNegativeTTL),
		codec:    opts.Codec,
		maxValue: orDefault(opts.MaxValueSize, DefaultMaxValueSize),
		log:      opts.Logger,
	}
	for _, d := range []struct {
		name string
		v    time.Duration
	}{{"L1TTL", c.l1TTL}, {"TTL", c.ttl}, {"NegativeTTL", c.negTTL}, {"L2Timeout", orDefault(opts.L2Timeout, DefaultL2Timeout)}} {
		if d.v < time.Millisecond {
			return nil, fmt.Errorf("imgcache: Options.%s is %v; it must be at least 1ms (or 0 for the default)", d.name, d.v)
		}
	}
	for _, d := range []struct {
		name string
		v    time.Duration
	}{{"StaleTTL", opts.StaleTTL}, {"GenerationTTL", max(opts.GenerationTTL, 0)}, {"LoadTimeout", opts.LoadTimeout}, {"SoftLoadTimeout", opts.SoftLoadTimeout},
		{"BreakerCooldown", opts.BreakerCooldown}, {"LockTTL", opts.LockTTL}} {
		if d.v != 0 && d.v < time.Millisecond {
			return nil, fmt.Errorf("imgcache: Options.%s is %v; it must be at least 1ms (or 0)", d.name, d.v)
		}
	}
	switch {
	case opts.SoftLoadTimeout > 0 && opts.StaleTTL == 0:
		return nil, errors.New("imgcache: Options.SoftLoadTimeout needs Options.StaleTTL: past it, callers get a stale value")
	case opts.LoadTimeout > 0 && opts.SoftLoadTimeout >= opts.LoadTimeout:
		return nil, errors.New("imgcache: Options.SoftLoadTimeout must be shorter than Options.LoadTimeout")
	case !(opts.EarlyRefresh >= 0 && opts.EarlyRefresh <= 100): // NaN fails every comparison
		return nil, fmt.Errorf("imgcache: Options.EarlyRefresh is %v; it must be between 0 (off) and 100", opts.EarlyRefresh)
	case !(opts.TTLJitter < 1):
		return nil, fmt.Errorf("imgcache: Options.TTLJitter is %v; it must be under 1", opts.TTLJitter)
	case opts.MaxRefreshes < 0:
		return nil, fmt.Errorf("imgcache: Options.MaxRefreshes is %d; it must not be negative", opts.MaxRefreshes)
	case opts.L1Size > MaxL1Size:
		return nil, fmt.Errorf("imgcache: Options.L1Size is %d; it must be at most %d", opts.L1Size, MaxL1Size)
	}
	if opts.HitRateGuard != nil {
		if err := opts.HitRateGuard.validate(); err != nil {
			return nil, err
		}
	}
	c.guard = newGuard(opts.HitRateGuard, opts.Logger)
	c.staleTTL, c.loadTimeout, c.softTimeout, c.beta = opts.StaleTTL, opts.LoadTimeout, opts.SoftLoadTimeout, opts.EarlyRefresh
	c.refreshSem = make(chan struct{}, orDefault(opts.MaxRefreshes, DefaultMaxRefreshes))
	c.jitter = max(orDefault(opts.TTLJitter, DefaultTTLJitter), 0)
	c.leases = opts.Redis != nil && !opts.LocalLoadsOnly
	c.lockTTL = opts.LockTTL
	if c.lockTTL == 0 {
		c.lockTTL = DefaultLockTTL
		if opts.LoadTimeout > 0 {
			c.lockTTL = opts.LoadTimeout + time.Second
		}
	}
	if c.maxValue < minMaxValueSize {
		return nil, fmt.Errorf("imgcache: Options.MaxValueSize is %d; it must be at least %d (or 0 for the default)", c.maxValue, minMaxValueSize)
	}
	if opts.Redis == nil && opts.L1Size < 0 {
		return nil, errors.New("imgcache: L1 is disabled (Options.L1Size < 0) and Options.Redis is nil: nothing would be cached")
	}
	if opts.Redis != nil {
		if err := checkClient(opts.Redis); err != nil {
			return nil, err
		}
		c.l2 = &l2{rdb: opts.Redis, prefix: ns + ":", epoch: ns + ":%p", timeout: orDefault(opts.L2Timeout, DefaultL2Timeout), log: opts.Logger}
		if single, ok := opts.Redis.(*redis.Client); ok {
			n, err := readConnsFor(single, opts.ReadConns)
			if err != nil {
				return nil, err
			}
			c.l2.conns.init(single, n)
		}
		if opts.BreakerThreshold >= 0 {
			c.l2.brk = &breaker{
				threshold: int64(orDefault(opts.BreakerThreshold, DefaultBreakerThreshold)),
				cooldown:  int64(orDefault(opts.BreakerCooldown, DefaultBreakerCooldown)),
			}
		}
	}
	if c.codec == nil {
		c.codec = defaultCodecFor[V]()
	}
	c.codecID = codecID(c.codec)
	if opts.L1Size >= 0 {
		if opts.L1Policy < PolicyAuto || opts.L1Policy > PolicyTinyLFU {
			return nil, fmt.Errorf("imgcache: Options.L1Policy %d is not a Policy", opts.L1Policy)
		}
		c.l1 = newL1[V](orDefault(opts.L1Size, DefaultL1Size), opts.L1Policy)
	}
	if c.l2 != nil && opts.GenerationTTL >= 0 {
		c.gens = newTrustedGens(max(opts.L1Size, DefaultL1Size), int64(orDefault(opts.GenerationTTL, c.l1TTL)))
	}
	c.base, c.cancel = context.WithCancel(context.Background())
	c.flights.seq = c.inv.of
	c.instance = rand.Uint64()
	acquireClock()
	if c.l2 != nil {
		c.l2.loadScripts(c.base, registerScript, releaseIfUnchangedScript, releaseManyIfUnchangedScript, releaseLeaseScript)
		c.startBus()
	}
	return c, nil
}

func orDefault[T comparable](v, def T) T {
	var zero T
	if v == zero {
		return def
	}
	return v
}

// check returns the error for a call on key k: ErrClosed, or why k cannot be used.
func (c *Cache[V]) check(k Key) error {
	if c.closed.Load() {
		return ErrClosed
	}
	if err := k.Err(); err != nil {
		return err
	}
	if c.l2 != nil {
		if n := len(c.l2.prefix) + len(k.redis()); n > MaxKeyLen {
			return fmt.Errorf("imgcache: invalid key: Redis key of %d bytes is longer than %d", n, MaxKeyLen)
		}
	}
	return nil
}

// Get returns the value for k from L1 or Redis. It returns ErrNotFound when neither has it, or when a
// loader's ErrNotFound is remembered for k; a Redis failure also reads as ErrNotFound (and counts in
// Stats.L2Errors), never as an error of its own. It returns ErrClosed after Close, and an error for
// an invalid key.
func (c *Cache[V]) Get(ctx context.Context, k Key) (V, error) {
	var zero V
	if err := c.check(k); err != nil {
		return zero, err
	}
	if c.l1 != nil {
		if e, ok := c.l1.get(k); ok {
			return c.result(e)
		}
	}
	if e, ok, _ := c.readL2(ctx, k); ok {
		return c.result(e)
	}
	c.stats.misses.Add(1)
	return zero, ErrNotFound
}

func (c *Cache[V]) result(e *l1entry[V]) (V, error) {
	if e.stale {
		c.stats.staleServed.Add(1)
	}
	if e.negative {
		c.stats.negativeHits.Add(1)
		var zero V
		return zero, ErrNotFound
	}
	return e.val, nil
}

// Set stores v for k in both levels, for Options.TTL or WithTTL's duration, and drops k from the
// L1 of every other instance. If only Redis fails, the L1 copy stays and Set returns the error,
// wrapped. An invalid key, TTL or tag, or a value the codec cannot encode within MaxValueSize, is an
// error and nothing is written.
func (c *Cache[V]) Set(ctx context.Context, k Key, v V, opts ...SetOption) error {
	if err := c.check(k); err != nil {
		return err
	}
	so, err := c.setOptions(opts)
	if err != nil {
		return fmt.Errorf("imgcache: set %s: %w", k, err)
	}
	var payload []byte
	if c.l2 != nil {
		if payload, err = c.encodePayload(v); err == nil {
			err = c.checkSize(payload, so.tags)
		}
		if err != nil {
			return fmt.Errorf("imgcache: set %s: %w", k, err)
		}
	}
	// Loads of k in flight on this instance began before this value existed: keep them out of L1.
	c.inv.key(k)
	ttl := c.l2TTL(so)
	expMs := time.Now().Add(ttl).UnixMilli()
	var own *l1entry[V]
	if c.l1 != nil {
		own = &l1entry[V]{val: v, tags: so.tags, expMs: expMs}
		c.stamp(own, ttl)
		own.refreshFrom = 0 // Set has no loader to refresh with
		c.l1.add(k, own)
	}
	if c.l2 == nil {
		return nil
	}
	// Again once Redis holds the value (or may): a read on this instance that missed L1 meanwhile
	// (the copy above evicted) may have refilled it with the value this Set replaces, and this
	// instance ignores its own message. A copy other than this Set's own goes.
	defer func() {
		c.inv.key(k)
		if c.l1 != nil {
			c.l1.removeOther(k, own)
		}
	}()
	fail := func(err error) error {
		c.countL2Error(err)
		return fmt.Errorf("imgcache: set %s: %w", k, err)
	}
	reg, err := c.register(ctx, k, so.tags, c.pxTTL(ttl, false), true)
	if err != nil {
		return fail(err)
	}
	b := make([]byte, 0, envHeaderLen+32+len(payload))
	b = append(appendHeader(b, c.codecID, false, expMs, reg.st), payload...)
	if err := c.l2.set(ctx, c.l2.key(k), b, c.pxTTL(ttl, false)); err != nil {
		return fail(err)
	}
	c.sendSet(ctx, k, b)
	return nil
}

// Close stops everything the cache started: it cancels running loads' contexts and waits for them to
// return. Invalidation messages still waiting for Redis to answer (see InvalidateEntity) get one
// more try, which an unreachable Redis ends within L2Timeout. It is idempotent; afterwards every
// other method returns ErrClosed. It does not close Options.Redis.
func (c *Cache[V]) Close() error {
	if !c.closed.CompareAndSwap(false, true) {
		return nil
	}
	c.cancel()
	c.flights.close()
	if c.busDone != nil {
		<-c.busDone // the bus goroutine closes its subscription
	}
	if c.l2 != nil {
		// Messages still queued (the loads' take-backs above may have added some): one more try,
		// each publish bounded by L2Timeout, the first failure ending it.
		c.flushOutbox(context.WithoutCancel(c.base))
		c.l2.conns.close()
	}
	releaseClock()
	return nil
}

func (c *Cache[V]) setOptions(opts []SetOption) (setOptions, error) {
	if len(opts) == 0 { // the common case, kept free of the allocation below
		return setOptions{ttl: c.ttl}, nil
	}
	so := new(setOptions) // escapes: the options are arbitrary functions
	so.ttl = c.ttl
	for _, o := range opts {
		if o != nil {
			o(so)
		}
	}
	if so.ttl < time.Millisecond {
		return *so, fmt.Errorf("TTL %v is under 1ms", so.ttl)
	}
	if err := checkTags(so.tags); err != nil {
		return *so, err
	}
	return *so, nil
}
