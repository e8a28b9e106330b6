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
// Each shard is golang-lru under a plain Mutex, beside a read index (l1index.go) that holds the same
// entries: writers (adds, removals, evictions, purges) change both in one critical section, and a
// hit reads the index without the lock. Shards are many (up to maxShards, at least minPerShard
// entries each), so writers rarely wait for each other. A hit writes almost nothing that another
// core reads: the hit counter has a stripe per P (l1hits.go), and the policy's bookkeeping is
// deferred (l1lazy.go), at most one write to an entry between two of its moves:
//   - An LRU hit on an entry that is due (see mover) marks it (ref) instead of moving it to the
//     front; when a marked entry reaches the end of the list, where it would be evicted, the
//     writer about to evict moves it to the front instead (a second chance, as in CLOCK).
//   - A W-TinyLFU hit in the protected segment, which holds most entries and takes most hits, is
//     served the same way, and the first hit that marks an entry takes the lock to count in the
//     sketch (see wtinylfu.get). A hit in the window or the probation segment takes the lock and
//     moves or promotes its entry, as before; a miss takes it too, to count in the sketch.
//   - An LRU with fewer than lazyFraction entries per shard is exact: every hit moves its entry
//     under the lock.
//
// On the traces of TestL1PolicyHitRatio (before the doorkeeper), W-TinyLFU kept the hit ratios it
// had with a lock per hit (86.96% on Zipf, 56.89% with scans, against 86.96% and 56.86%), and the
// second chance makes PolicyLRU keep more than it did (84.47% and 51.93%, against 84.18% and
// 51.82%).
//
// Hits used to take the shard's lock, for the lookup and the policy's update in one critical
// section: two atomic operations per hit, and hits on a shard took turns, so two goroutines were
// no faster than one. Moving an entry at every due hit, under the lock, would have kept that cost
// for a key set that cycles through more than a quarter of a shard: each key is then due at every
// hit. A read lock and a buffer of hits to apply later (Caffeine's design) were measured before
// and lost: four or five atomic operations per hit, and the hit took 2.6 times golang-lru's.
type l1[V any] struct {
	shards []l1shard[V]
	mask   uint64
	hits   hitCounter
}

const (
	maxShards   = 64
	minPerShard = 128
)

// l1shard: mu protects the policy (lru or w), evictions and capacity, and serialises the writers of
// index. A hit reads index, front and the entries' moved and ref fields without mu: they change
// atomically. The fields hits read fill the first cache line, mu and evictions the second, so that
// taking the lock does not take the line from the cores that are reading.
type l1shard[V any] struct {
	index    atomic.Pointer[l1index[V]]          // the entries of lru or w, for lock-free hits
	lru      *simplelru.LRU[uint64, *l1entry[V]] // PolicyLRU; its onEvict keeps index in step
	w        *wtinylfu[V]                        // PolicyTinyLFU; lru is nil then
	front    mover                               // lazy promotion: in lru, or in w's protected segment
	capacity int                                 // PolicyLRU: how many entries lru holds before it evicts
	_        [64 - 6*8]byte

	mu        sync.Mutex
	evictions uint64
	_         [64 - 2*8]byte // the array is 64-byte aligned in practice
}

// Policy chooses what L1 keeps when it is full.
type Policy int

const (
	// PolicyAuto, the zero value, is PolicyTinyLFU for an L1 of at least autoTinyLFU entries and
	// PolicyLRU for a smaller one, where a frequency sketch has too little to learn from and plain
	// recency is what a caller expects. The default by measurement: W-TinyLFU keeps 2.6 points more
	// hits than LRU on a Zipf trace and 5.5 more with scans (README, L1 policy).
	PolicyAuto Policy = iota
	// PolicyLRU evicts the least recently used entry, nearly: golang-lru's LRU, sharded, where a
	// hit marks its entry instead of moving it, and a marked entry that reaches the end of the
	// list moves to the front instead of being evicted (a second chance). Hits then need no lock.
	PolicyLRU
	// PolicyTinyLFU is W-TinyLFU (see wtinylfu.go) on golang-lru's LRUs: a new entry enters a
	// small window, and then stays only if it has been asked for more often than the entry it
	// would push out, by a small frequency sketch of recent lookups, and not for the first time
	// (a doorkeeper remembers the keys that asked). One-off keys and scans then cannot push out
	// popular entries, even a pass over every key.
	PolicyTinyLFU
)

// l1entry is one value in L1. Once added it is shared and read without locks: only moved and ref
// change, atomically; everything else is fixed. Copy an entry only through l1.snapshot, which
// leaves out the two fields that hits may be writing.
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
	ref         uint32   // 1: hit while due, to move to the front before eviction; atomic, set without the lock
	tags        []string // for InvalidateTags
	key         Key      // set when added: the policy is keyed by the hash, and lookups check the key
	moved       uint64   // the mover's count when last moved to the front (0: W-TinyLFU's window or probation); atomic, written under the lock
}

// autoTinyLFU is the smallest L1 for which PolicyAuto picks PolicyTinyLFU.
const autoTinyLFU = 1000

// newL1 makes an L1 of size entries. Shards get an equal share, and the first size%n shards one
// entry more, so that the total is exactly size (L1Size is the most entries L1 holds).
func newL1[V any](size int, policy Policy) *l1[V] {
	n := 1
	for n < maxShards && size/(n*2) >= minPerShard {
		n *= 2
	}
	l := &l1[V]{shards: make([]l1shard[V], n), mask: uint64(n - 1), hits: newHitCounter()}
	base, extra := size/n, size%n
	if policy == PolicyAuto {
		policy = PolicyLRU
		if size >= autoTinyLFU {
			policy = PolicyTinyLFU
		}
	}
	tomb := new(l1entry[V])
	for i := range l.shards {
		s := &l.shards[i]
		per := base
		if i < extra {
			per++
		}
		s.index.Store(newL1Index(0, tomb))
		if policy == PolicyTinyLFU {
			s.w = newWTinyLFU[V](per, &s.front)
			continue
		}
		// Every removal golang-lru makes (an eviction by Add, Remove, Purge) reaches the index
		// through onEvict, under the lock of the call that made it.
		c, err := simplelru.NewLRU(per, func(h uint64, _ *l1entry[V]) { s.unindexLocked(h) })
		if err != nil { // only for per <= 0, which New rules out
			panic(err)
		}
		s.lru = c
		s.front = newMover(per)
		s.capacity = per
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
	e := s.index.Load().find(k)
	if e == nil {
		if s.w != nil && !recheck { // W-TinyLFU counts every access, misses too
			s.mu.Lock()
			s.w.get(k.h)
			s.mu.Unlock()
		}
		return nil, false
	}
	// Reading the wall clock would cost more than the whole lookup, so the coarse clock decides unless
	// the entry is within clockSlack of its expiry; then the precise clock does.
	if d := e.exp - coarseNow(); d <= clockSlack && (d <= 0 || e.exp <= preciseNow()) {
		s.expired(k, e, recheck)
		return nil, false
	}
	l.hits.add()
	if !recheck {
		s.hit(k, e)
	}
	return e, true
}

// hit does the policy's work for a hit on e, taking the lock only when it must (see l1).
func (s *l1shard[V]) hit(k Key, e *l1entry[V]) {
	if w := s.w; w != nil {
		moved := e.lastMove()
		due := s.front.due(moved)
		switch {
		case moved == 0 || due && s.front.lazy == 0: // window, probation, or a segment too small to be lazy
			s.mu.Lock()
			w.get(k.h)
			s.mu.Unlock()
		case due && e.mark(): // its first hit since it was last moved: counted, see wtinylfu.get
			s.mu.Lock()
			w.freq.increment(k.h)
			s.mu.Unlock()
		}
		return
	}
	if !s.front.due(e.lastMove()) {
		return
	}
	if s.front.lazy > 0 {
		e.mark()
		return
	}
	s.mu.Lock()
	if cur, ok := s.lru.Peek(k.h); ok && cur == e {
		s.lru.Get(k.h)
		e.movedTo(&s.front)
	}
	s.mu.Unlock()
}

// expired handles a lookup that found e past its freshness: W-TinyLFU counts the access, and an
// entry past its fail-safe grace too is removed, unless another has taken its place meanwhile.
func (s *l1shard[V]) expired(k Key, e *l1entry[V], recheck bool) {
	count := s.w != nil && !recheck
	gone := e.staleUntil <= preciseNow()
	if !count && !gone {
		return
	}
	s.mu.Lock()
	if count {
		s.w.get(k.h)
	}
	if cur, ok := s.peekLocked(k); gone && ok && cur == e {
		s.removeLocked(k)
	}
	s.mu.Unlock()
}

// peekStale returns k's entry if it is past its freshness but within its fail-safe grace.
func (l *l1[V]) peekStale(k Key) *l1entry[V] {
	e := l.shard(k).index.Load().find(k)
	if e == nil || e.negative {
		return nil
	}
	if now := preciseNow(); e.exp > now || e.staleUntil <= now {
		return nil
	}
	return e
}

// snapshot returns a copy of e, k's entry (or one that was), for the caller to change and add. It
// copies every field but moved and ref, which hits may be writing as it reads (adding sets them),
// so it takes no lock; TestL1SnapshotCopiesEveryField checks that no field is left out.
func (l *l1[V]) snapshot(_ Key, e *l1entry[V]) l1entry[V] {
	return l1entry[V]{
		val: e.val, exp: e.exp, staleUntil: e.staleUntil, l2exp: e.l2exp, expMs: e.expMs, wid: e.wid,
		refreshFrom: e.refreshFrom, delta: e.delta, negative: e.negative, stale: e.stale,
		failures: e.failures, tags: e.tags, key: e.key,
	}
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

// addLocked adds e, to the policy and to the index. Under PolicyTinyLFU a new entry enters the
// window, where admission to the main area is decided later, so admit does not matter there; it is
// kept for the call sites' sake.
func (s *l1shard[V]) addLocked(k Key, e *l1entry[V], _ bool) bool {
	if e.key != k { // not written when equal: an entry is read without the lock once added
		e.key = k
	}
	if s.w != nil {
		if h, ok := s.w.add(k.h, e); ok {
			s.evictions++
			s.unindexLocked(h)
		}
	} else {
		if s.lru.Len() >= s.capacity && !s.lru.Contains(k.h) {
			s.secondChanceLocked()
		}
		if s.lru.Add(k.h, e) { // onEvict has removed the oldest from the index
			s.evictions++
		}
		e.movedTo(&s.front)
	}
	t := s.index.Load()
	t.put(k.h, e)
	if t.full() {
		s.index.Store(t.rebuilt())
	}
	return true
}

// unindexLocked removes the entry of hash h from the index.
func (s *l1shard[V]) unindexLocked(h uint64) { s.index.Load().remove(h) }

// removeLocked removes k's entry, not that of another key with the same hash.
func (s *l1shard[V]) removeLocked(k Key) bool {
	if _, ok := s.peekLocked(k); !ok {
		return false
	}
	if s.w != nil {
		s.unindexLocked(k.h)
		return s.w.remove(k.h)
	}
	return s.lru.Remove(k.h) // and onEvict removes it from the index
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

// removeOther removes k's entry unless it is keep.
func (l *l1[V]) removeOther(k Key, keep *l1entry[V]) {
	s := l.shard(k)
	s.mu.Lock()
	if e, ok := s.peekLocked(k); ok && e != keep {
		s.removeLocked(k)
	}
	s.mu.Unlock()
}

func (l *l1[V]) purge() {
	for i := range l.shards {
		s := &l.shards[i]
		s.mu.Lock()
		// An empty index first: LRU's onEvict then finds nothing to remove in it.
		s.index.Store(newL1Index(0, s.index.Load().tomb))
		if s.w != nil {
			s.w.purge()
		} else {
			s.lru.Purge()
		}
		s.mu.Unlock()
	}
}

// hashesLocked returns the hashes of the shard's entries, as its policy holds them.
func (s *l1shard[V]) hashesLocked() []uint64 {
	if s.w != nil {
		return s.w.keys()
	}
	return s.lru.Keys()
}

// removeIf drops every entry that matches; it walks the whole L1 and suits rare invalidations.
func (l *l1[V]) removeIf(match func(Key, *l1entry[V]) bool) int {
	n := 0
	for i := range l.shards {
		s := &l.shards[i]
		s.mu.Lock()
		for _, h := range s.hashesLocked() {
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
		evictions += s.evictions
		entries += uint64(s.lenLocked())
		s.mu.Unlock()
	}
	return l.hits.load(), evictions, entries
}

// The coarse clock: one goroutine for the whole process, running while at least one Cache is open,
// stores the monotonic time every clockTick and closes the Done channels of Redis calls whose
// deadlines have passed (deadline.go). An L1 hit reads it with one atomic load instead of
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

// clockNowMs returns preciseNow and the wall clock in Unix milliseconds, from one reading.
func clockNowMs() (now, unixMs int64) {
	t := time.Now()
	return int64(t.Sub(clockEpoch)), t.UnixMilli()
}

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
	deadlineTicks.setRunning(true)
	stop, done := make(chan struct{}), make(chan struct{})
	clockStop, clockDone = stop, done
	go func() {
		defer close(done)
		t := time.NewTicker(clockTick)
		defer t.Stop()
		for {
			select {
			case <-t.C:
				now := preciseNow()
				clockNow.Store(now)
				deadlineTicks.expire(now)
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
	deadlineTicks.setRunning(false)
	close(clockStop)
	<-clockDone
}
