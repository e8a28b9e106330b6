package imgcache

import (
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/golang-lru/v2/simplelru"
)

// l1 is the in-process level: golang-lru's LRU core, sharded by the key's hash. Entries carry their
// own expiry, checked on read against the coarse clock; nothing runs per entry.
//
// Within a shard, golang-lru is keyed by the Key's 64-bit hash, not by the Key: hashing and comparing
// a uint64 is far cheaper than the canonical string, and that is most of a lookup. Each entry holds
// its Key, and every lookup checks it, so two keys whose hashes collide never see each other's value;
// they only take turns in one slot.
//
// Each shard is golang-lru under a plain Mutex. A hit takes it once: the lookup, the policy's update
// (an LRU hit moves to the front, a TinyLFU hit counts in the sketch), the hit counter and the
// removal of an expired entry share one critical section, so no hit pays for more than two atomic
// operations, which cost more than the whole lookup on a virtualised core. Shards are many (up to
// maxShards, at least minPerShard entries each) and a cache line each, so two cores rarely meet.
// A read lock and a buffer of hits to apply later (Caffeine's design) were measured here and lost:
// they need four or five atomic operations per hit, and the hit took 2.6 times golang-lru's.
type l1[V any] struct {
	shards []l1shard[V]
	mask   uint64
}

const (
	maxShards   = 64
	minPerShard = 128
)

type l1shard[V any] struct {
	mu        sync.Mutex                          // protects everything below
	lru       *simplelru.LRU[uint64, *l1entry[V]] // PolicyLRU; entries change only in moved, under mu
	w         *wtinylfu[V]                        // PolicyTinyLFU; lru is nil then
	hits      uint64
	evictions uint64
	front     mover              // PolicyLRU: lazy promotion
	_         [64 - 8 - 6*8]byte // a cache line per shard (the array is 64-byte aligned in practice)
}

// Lazy promotion: an LRU hit moves its entry to the front only if at least a quarter of the
// shard's capacity has been moved in front of it since it was last moved; an entry nearer the
// front cannot be evicted before it would be, and skipping the move spares a hit the writes to
// the list's links, which live in cache lines that other shards' entries share (golang-lru
// allocates list elements as entries arrive, so neighbours in memory belong to any shard). With a
// few entries per shard the quarter is zero and the LRU is exact.
const lazyFraction = 4

// mover counts the moves to the front of one LRU list (a shard's, or W-TinyLFU's protected
// segment) for lazy promotion. Its entries' moved fields hold its count at their last move.
type mover struct {
	moves uint64 // entries moved to the front so far: adds and promotions
	lazy  uint64 // an entry fewer than this many moves from the front is not moved
}

func newMover(capacity int) mover { return mover{lazy: uint64(capacity / lazyFraction)} }

// due reports whether e is far enough from the front to be moved on a hit.
func (m *mover) due(moved uint64) bool { return m.moves-moved >= m.lazy }

// count records a move to the front and returns the count to store in the entry's moved field.
func (m *mover) count() uint64 {
	m.moves++
	return m.moves
}

// Policy chooses what L1 keeps when it is full.
type Policy int

const (
	// PolicyAuto, the zero value, is PolicyTinyLFU for an L1 of at least autoTinyLFU entries and
	// PolicyLRU for a smaller one, where a frequency sketch has too little to learn from and plain
	// recency is what a caller expects. The default by measurement: W-TinyLFU keeps 2.6 points more
	// hits than LRU on a Zipf trace and 4.5 more with scans (README, L1 policy).
	PolicyAuto Policy = iota
	// PolicyLRU evicts the least recently used entry: golang-lru's LRU, sharded.
	PolicyLRU
	// PolicyTinyLFU is W-TinyLFU (see wtinylfu.go) on golang-lru's LRUs: a new entry enters a
	// small window, and then stays only if it has been asked for more often than the entry it
	// would push out, by a small frequency sketch of recent lookups. One-off keys and scans then
	// cannot push out popular entries.
	PolicyTinyLFU
)

type l1entry[V any] struct {
	val         V
	exp         int64    // clock reading (see coarseNow) after which the entry is not served as fresh
	staleUntil  int64    // after exp and until this, kept for a GetOrLoad's fail-safe (StaleTTL)
	l2exp       int64    // when the value expires in Redis: early refresh aims before it
	expMs       int64    // the envelope's expiry (Unix ms): identifies this write of the value
	wid         uint64   // xxhash of the envelope read from Redis (0 = not read from Redis)
	refreshFrom int64    // from here on a GetOrLoad hit considers an early refresh; 0 = never
	delta       int64    // how long the value took to load, in ns (0 = unknown)
	negative    bool     // a remembered "not found"
	stale       bool     // a stale value put back by the fail-safe: served, and counted, as stale
	failures    uint8    // consecutive failed loads behind a fail-safe entry, for its backoff
	tags        []string // for InvalidateTags
	key         Key      // set when added: the policy is keyed by the hash, and lookups check the key
	moved       uint64   // the shard's (or protected segment's) move count when last moved to the front; under the shard lock
}

// autoTinyLFU is the smallest L1 for which PolicyAuto picks PolicyTinyLFU.
const autoTinyLFU = 1000

// newL1 makes an L1 of about size entries. Shards get an equal share, rounded up, so the total may
// exceed size by less than one entry per shard.
func newL1[V any](size int, policy Policy) *l1[V] {
	n := 1
	for n < maxShards && size/(n*2) >= minPerShard {
		n *= 2
	}
	l := &l1[V]{shards: make([]l1shard[V], n), mask: uint64(n - 1)}
	per := (size + n - 1) / n
	if policy == PolicyAuto {
		policy = PolicyLRU
		if size >= autoTinyLFU {
			policy = PolicyTinyLFU
		}
	}
	for i := range l.shards {
		if policy == PolicyTinyLFU {
			l.shards[i].w = newWTinyLFU[V](per)
			continue
		}
		c, err := simplelru.NewLRU[uint64, *l1entry[V]](per, nil)
		if err != nil { // only for per <= 0, which New rules out
			panic(err)
		}
		l.shards[i].lru = c
		l.shards[i].front = newMover(per)
	}
	return l
}

func (l *l1[V]) shard(k Key) *l1shard[V] { return &l.shards[k.h&l.mask] }

// get returns the entry for k if it is present and unexpired, counting the hit; an expired entry is
// removed. The entry is shared: callers must not modify it. Entries are pointers so that a hit copies
// the value once, into the caller's result, instead of at every layer.
func (l *l1[V]) get(k Key) (*l1entry[V], bool) { return l.lookup(k, false) }

// recheck is get for a caller looking again inside its flight: the policy does not count it as
// another access.
func (l *l1[V]) recheck(k Key) (*l1entry[V], bool) { return l.lookup(k, true) }

func (l *l1[V]) lookup(k Key, recheck bool) (*l1entry[V], bool) {
	s := l.shard(k)
	s.mu.Lock()
	var e *l1entry[V]
	var ok bool
	switch {
	case s.w == nil:
		if e, ok = s.lru.Peek(k.h); ok && !recheck && e.key == k && s.front.due(e.moved) {
			s.lru.Get(k.h)
			e.moved = s.front.count()
		}
	case recheck: // the same caller looking again: not another access
		e, ok = s.w.peek(k.h)
	default:
		e, ok = s.w.get(k.h)
	}
	if !ok || e.key != k {
		s.mu.Unlock()
		return nil, false
	}
	// Reading the wall clock would cost more than the whole lookup, so the coarse clock decides unless
	// the entry is within clockSlack of its expiry; then the precise clock does.
	if d := e.exp - coarseNow(); d <= clockSlack && (d <= 0 || e.exp <= preciseNow()) {
		if e.staleUntil <= preciseNow() {
			s.removeLocked(k)
		}
		s.mu.Unlock()
		return nil, false
	}
	s.hits++
	s.mu.Unlock()
	return e, true
}

// peekStale returns k's entry if it is past its freshness but within its fail-safe grace.
func (l *l1[V]) peekStale(k Key) *l1entry[V] {
	s := l.shard(k)
	s.mu.Lock()
	defer s.mu.Unlock()
	e, ok := s.peekLocked(k)
	if !ok || e.negative {
		return nil
	}
	if now := preciseNow(); e.exp > now || e.staleUntil <= now {
		return nil
	}
	return e
}

// snapshot returns a copy of e, k's entry (or one that was), taken under k's shard lock: hits
// update e.moved under that lock, so a copy taken without it would race them.
func (l *l1[V]) snapshot(k Key, e *l1entry[V]) l1entry[V] {
	s := l.shard(k)
	s.mu.Lock()
	defer s.mu.Unlock()
	return *e
}

// add stores e, admission filter or not: the caller's own Set and the fail-safe's backoff use it.
func (l *l1[V]) add(k Key, e *l1entry[V]) {
	s := l.shard(k)
	s.mu.Lock()
	s.addLocked(k, e, false)
	s.mu.Unlock()
}

// addIf adds e only if k's invalidation sequence still reads want, checked under the shard lock. An invalidation bumps
// seq before it takes the shard locks to remove entries, so a fill that read L2 or loaded before the
// invalidation either sees the bump here or is added before the removal reaches its shard.
// With admit, the policy's admission filter applies (fills from Redis or a load); without, it
// does not (the fail-safe putting back a value it serves).
func (l *l1[V]) addIf(k Key, e *l1entry[V], inv *invalidations, want uint64, admit bool) bool {
	s := l.shard(k)
	s.mu.Lock()
	defer s.mu.Unlock()
	if inv.of(k) != want {
		return false
	}
	return s.addLocked(k, e, admit)
}

// addLocked adds e. Under PolicyTinyLFU a new entry enters the window, where admission to the main
// area is decided later, so admit does not matter there; it is kept for the call sites' sake.
func (s *l1shard[V]) addLocked(k Key, e *l1entry[V], _ bool) bool {
	e.key = k
	if s.w != nil {
		s.evictions += uint64(s.w.add(k.h, e))
	} else {
		if s.lru.Add(k.h, e) {
			s.evictions++
		}
		e.moved = s.front.count()
	}
	return true
}

// removeLocked removes k's entry, not that of another key with the same hash.
func (s *l1shard[V]) removeLocked(k Key) bool {
	if _, ok := s.peekLocked(k); !ok {
		return false
	}
	if s.w != nil {
		return s.w.remove(k.h)
	}
	return s.lru.Remove(k.h)
}

// peekLocked returns k's entry, if the slot of k's hash holds k.
func (s *l1shard[V]) peekLocked(k Key) (*l1entry[V], bool) {
	if e, ok := s.peekHash(k.h); ok && e.key == k {
		return e, true
	}
	return nil, false
}

// peekHash returns the entry in the slot of hash h, whatever its key.
func (s *l1shard[V]) peekHash(h uint64) (*l1entry[V], bool) {
	if s.w != nil {
		return s.w.peek(h)
	}
	return s.lru.Peek(h)
}

func (s *l1shard[V]) lenLocked() int {
	if s.w != nil {
		return s.w.len()
	}
	return s.lru.Len()
}

func (l *l1[V]) remove(k Key) {
	s := l.shard(k)
	s.mu.Lock()
	s.removeLocked(k)
	s.mu.Unlock()
}

// removeUnless removes k's entry unless it was read from Redis as the envelope whose hash is wid.
func (l *l1[V]) removeUnless(k Key, wid uint64) {
	s := l.shard(k)
	s.mu.Lock()
	if e, ok := s.peekLocked(k); ok && (wid == 0 || e.wid != wid) {
		s.removeLocked(k)
	}
	s.mu.Unlock()
}

func (l *l1[V]) purge() {
	for i := range l.shards {
		s := &l.shards[i]
		s.mu.Lock()
		if s.w != nil {
			s.w.purge()
		} else {
			s.lru.Purge()
		}
		s.mu.Unlock()
	}
}

// removeIf drops every entry that matches; it walks the whole L1 and suits rare invalidations.
func (l *l1[V]) removeIf(match func(Key, *l1entry[V]) bool) int {
	n := 0
	for i := range l.shards {
		s := &l.shards[i]
		s.mu.Lock()
		var hashes []uint64
		if s.w != nil {
			hashes = s.w.keys()
		} else {
			hashes = s.lru.Keys()
		}
		for _, h := range hashes {
			if e, ok := s.peekHash(h); ok && match(e.key, e) && s.removeLocked(e.key) {
				n++
			}
		}
		s.mu.Unlock()
	}
	return n
}

func (l *l1[V]) counts() (hits, evictions, entries uint64) {
	for i := range l.shards {
		s := &l.shards[i]
		s.mu.Lock()
		hits += s.hits
		evictions += s.evictions
		entries += uint64(s.lenLocked())
		s.mu.Unlock()
	}
	return hits, evictions, entries
}

// The coarse clock: one goroutine for the whole process, running while at least one Cache is open,
// stores the monotonic time every clockTick. An L1 hit reads it with one atomic load instead of
// calling time.Now, which costs about as much as the whole LRU lookup.
const (
	clockTick = time.Millisecond
	// clockSlack is how near its expiry an entry must be for a read to consult the precise clock. It
	// covers the tick and a few milliseconds of scheduling delay of the clock goroutine, so an entry
	// outlives its expiry only if that goroutine is starved for longer than this.
	clockSlack = int64(5 * time.Millisecond)
)

var (
	clockEpoch = time.Now()
	clockNow   atomic.Int64

	clockMu   sync.Mutex // protects clockRefs and clockStop
	clockRefs int
	clockStop chan struct{}
	clockDone chan struct{}
)

func coarseNow() int64  { return clockNow.Load() }
func preciseNow() int64 { return int64(time.Since(clockEpoch)) }

// acquireClock starts the clock goroutine for the first open Cache; releaseClock stops it after the
// last Cache closes and waits for it to exit.
func acquireClock() {
	clockMu.Lock()
	defer clockMu.Unlock()
	clockRefs++
	if clockRefs > 1 {
		return
	}
	clockNow.Store(preciseNow())
	stop, done := make(chan struct{}), make(chan struct{})
	clockStop, clockDone = stop, done
	go func() {
		defer close(done)
		t := time.NewTicker(clockTick)
		defer t.Stop()
		for {
			select {
			case <-t.C:
				clockNow.Store(preciseNow())
			case <-stop:
				return
			}
		}
	}()
}

func releaseClock() {
	clockMu.Lock()
	defer clockMu.Unlock()
	clockRefs--
	if clockRefs > 0 {
		return
	}
	close(clockStop)
	<-clockDone
}
