package imgcache

import (
	mrand "math/rand/v2"
	"strings"
	"sync"
	"sync/atomic"

	"github.com/cespare/xxhash/v2"
)

// trustedGens holds the generations (see invalidate.go) this instance has read from Redis and
// trusts for a while, so that a read of a value from Redis need not read its entity's generation
// key, or its tags' meta hashes, with it: a GET instead of an MGET of two keys, one round trip
// instead of two for a tagged value.
//
// A trusted generation is kept coherent as L1 is. Every invalidation of an entity or tag forgets it,
// locally before and after the Redis script (as dropL1Entity runs) and on the other instances
// through the bus; a resubscription forgets everything; and a generation is trusted for at most
// ttl, the bound while the bus is down. A fill checks, under its bucket's lock, that no invalidation
// of the key ran since the read began (the invalidations sequence, as L1 fills do), so a generation
// read before an invalidation is never stored after it.
//
// A value whose stamp differs from a trusted generation proves nothing by itself (the generation
// may have moved under a lost message): the read forgets the generation and reads again with the
// generation key, as an untrusting read does.
//
// Entries are keyed by an entity's head ("<entity>\x00<id>") or a tag; a head always holds a NUL
// and a tag never does, so they cannot collide.
//
// Every read of a value from Redis looks a generation up, so lookups take no lock: the table is a
// fixed array of buckets of genWays slots, one cache line each, picked by the name's xxhash, whose
// slots point to immutable records. A lookup loads the bucket, follows the slot whose hash matches
// and checks the record's name, which makes a torn or stale slot a miss, never a wrong answer: about
// three cache lines, where a mutex and a map took about six, and it writes nothing other cores
// read. Writers take the lock of the bucket's stripe, so that a fill and a forget of one name are
// ordered as before. A full bucket drops an arbitrary record to make room: a dropped generation
// costs one MGET, nothing else.
type trustedGens struct {
	// Read by every lookup; written by forgetAll alone.
	ttl     int64 // clock nanoseconds (see coarseNow)
	mask    uint64
	buckets []genBucket
	epoch   atomic.Uint64 // records of an earlier epoch are forgotten (forgetAll)

	_     [64]byte               // so that writers' locks do not share the lookups' cache line
	locks [genStripes]sync.Mutex // writers of bucket b hold locks[b%genStripes]
}

const (
	genWays    = 4
	genStripes = 64
	// maxTrustedGens bounds the table, which is made whole at New: 2^20 slots (16 MB) for an L1 of
	// half a million entries or more. Beyond that many entities, more reads carry their
	// generation key again: a larger MGET, never a wrong answer.
	maxTrustedGens = 1 << 19
)

// genBucket is genWays slots: 64 bytes, one cache line.
type genBucket [genWays]genSlot

type genSlot struct {
	h   atomic.Uint64 // the record's name's xxhash: a filter, the record is checked
	rec atomic.Pointer[trustedGen]
}

// trustedGen is one trusted generation; it is never modified once stored. A name that fits is held
// in the record itself, so that checking a record reads one cache line where a string would point
// to a second: most entities' heads ("artist\x00123") fit.
type trustedGen struct {
	gen   uint64
	exp   int64  // coarseNow reading after which the generation is not trusted
	epoch uint64 // trustedGens.epoch when it was stored
	long  string // the name, if short cannot hold it
	n     uint8  // the name's length, if short holds it
	short [shortName]byte
}

// shortName makes a trustedGen 64 bytes, a size the allocator aligns to a cache line.
const shortName = 23

// newTrustedGen returns name's record. A name longer than shortName is kept as given: the caller
// passes a copy of its own, not a part of a larger string that the record would keep alive.
func newTrustedGen(name string, gen uint64, exp int64, epoch uint64) *trustedGen {
	r := &trustedGen{gen: gen, exp: exp, epoch: epoch}
	if len(name) <= shortName {
		r.n = uint8(len(name))
		copy(r.short[:], name)
	} else {
		r.long = name
	}
	return r
}

// is reports whether r is name's record. Names are never empty.
func (r *trustedGen) is(name string) bool {
	if r.long != "" {
		return r.long == name
	}
	return string(r.short[:r.n]) == name
}

// live reports whether r is trusted in epoch at now.
func (r *trustedGen) live(epoch uint64, now int64) bool { return r.epoch == epoch && r.exp >= now }

// newTrustedGens returns a holder of about size generations (at most maxTrustedGens), each trusted
// for ttl clock nanoseconds. Its buckets hold twice that, rounded up to a power of two, in all:
// with size names about one in a hundred finds its bucket full, with half as many about one in a
// thousand, and a name that does is dropped and read again, or drops another, on every read.
func newTrustedGens(size int, ttl int64) *trustedGens {
	size = min(size, maxTrustedGens)
	n := 1
	for n*genWays < 2*size {
		n *= 2
	}
	return &trustedGens{ttl: ttl, mask: uint64(n - 1), buckets: make([]genBucket, n)}
}

// get returns the trusted generation of name (an entity's head or a tag), whose xxhash is h.
func (t *trustedGens) get(name string, h uint64) (uint64, bool) { return t.check(t.find(h), name) }

// find returns the record in h's bucket whose hash is h, or nil: the first half of get, which
// reads the bucket. A batch finds every name's record before it checks any (newL2Read), so that
// the processor overlaps the cache misses of many buckets, then of many records. Two names of one
// hash in a bucket make the second a miss, never a wrong answer: check compares the name.
func (t *trustedGens) find(h uint64) *trustedGen {
	b := &t.buckets[h&t.mask]
	for i := range b {
		if b[i].h.Load() == h {
			return b[i].rec.Load()
		}
	}
	return nil
}

// check returns r's generation if r (nil or not) is name's record and is trusted now: the second
// half of get, which reads the record.
func (t *trustedGens) check(r *trustedGen, name string) (uint64, bool) {
	if r == nil || !r.is(name) || !r.live(t.epoch.Load(), coarseNow()) {
		return 0, false
	}
	return r.gen, true
}

// lock locks the stripe of the bucket that h picks, and returns the bucket and its unlock.
func (t *trustedGens) lock(h uint64) (*genBucket, *sync.Mutex) {
	bi := h & t.mask
	mu := &t.locks[bi%genStripes]
	mu.Lock()
	return &t.buckets[bi], mu
}

// putIf trusts gen for name, read from Redis when name's invalidation sequence (inv.ofName) was
// seq, unless the sequence, read under the bucket's lock, shows that an invalidation has run since.
func (t *trustedGens) putIf(name string, gen uint64, seq uint64, inv *invalidations) {
	h := xxhash.Sum64String(name)
	b, mu := t.lock(h)
	defer mu.Unlock()
	if inv.ofName(name) != seq {
		return
	}
	now, epoch := coarseNow(), t.epoch.Load()
	at, free := -1, -1
	for i := range b {
		r := b[i].rec.Load()
		switch {
		case r != nil && r.is(name):
			at = i
		case free < 0 && (r == nil || !r.live(epoch, now)):
			free = i
		}
	}
	switch {
	case at >= 0:
	case free >= 0:
		at = free
	default: // full: drop one
		at = int(mrand.Uint32N(genWays))
	}
	if len(name) > shortName {
		if r := b[at].rec.Load(); r != nil && r.long == name {
			name = r.long // the record being refreshed has a copy of its own
		} else {
			name = strings.Clone(name)
		}
	}
	b[at].rec.Store(newTrustedGen(name, gen, now+t.ttl, epoch))
	b[at].h.Store(h)
}

// forget stops trusting the generations of names. The caller has bumped the invalidation sequence
// first, so a read that began before this cannot trust them again. A nil t trusts nothing.
func (t *trustedGens) forget(names ...string) {
	if t == nil {
		return
	}
	for _, n := range names {
		b, mu := t.lock(xxhash.Sum64String(n))
		for i := range b {
			if r := b[i].rec.Load(); r != nil && r.is(n) {
				b[i].rec.Store(nil)
				b[i].h.Store(0)
			}
		}
		mu.Unlock()
	}
}

// forgetAll stops trusting every generation, at once: it starts a new epoch, and the records of
// earlier ones stay in their slots, untrusted, until they are overwritten. It takes every lock, so
// that no putIf that read the old epoch stores after it.
func (t *trustedGens) forgetAll() {
	if t == nil {
		return
	}
	for i := range t.locks {
		t.locks[i].Lock()
	}
	t.epoch.Add(1)
	for i := range t.locks {
		t.locks[i].Unlock()
	}
}

// len returns how many generations t trusts.
func (t *trustedGens) len() int {
	n := 0
	now, epoch := coarseNow(), t.epoch.Load()
	for bi := range t.buckets {
		for i := range t.buckets[bi] {
			if r := t.buckets[bi][i].rec.Load(); r != nil && r.live(epoch, now) {
				n++
			}
		}
	}
	return n
}
