package imgcache

import (
	"strings"
	"sync"

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
// ttl, the bound while the bus is down. A fill checks, under its shard's lock, that no invalidation
// of the key ran since the read began (the invalidations sequence, as L1 fills do), so a generation
// read before an invalidation is never stored after it.
//
// A value whose stamp differs from a trusted generation proves nothing by itself (the generation
// may have moved under a lost message): the read forgets the generation and reads again with the
// generation key, as an untrusting read does.
//
// Entries are keyed by an entity's head ("<entity>\x00<id>") or a tag; a head always holds a NUL
// and a tag never does, so they cannot collide. Each shard holds at most perShard entries and
// drops an arbitrary one (Go's map iteration order) to make room: a dropped generation costs one
// MGET, nothing else.
type trustedGens struct {
	ttl      int64 // clock nanoseconds (see coarseNow)
	perShard int
	shards   [genShards]genShard
}

const genShards = 64

type genShard struct {
	mu sync.Mutex // protects m
	m  map[string]trustedGen
}

type trustedGen struct {
	gen uint64
	exp int64 // coarseNow reading after which the generation is not trusted
}

// newTrustedGens returns a holder of up to size generations, each trusted for ttl clock
// nanoseconds.
func newTrustedGens(size int, ttl int64) *trustedGens {
	t := &trustedGens{ttl: ttl, perShard: max(1, size/genShards)}
	for i := range t.shards {
		t.shards[i].m = make(map[string]trustedGen)
	}
	return t
}

func (t *trustedGens) shard(name string) *genShard {
	return &t.shards[xxhash.Sum64String(name)%genShards]
}

// get returns the trusted generation of name (an entity's head or a tag), whose xxhash is h.
func (t *trustedGens) get(name string, h uint64) (uint64, bool) {
	s := &t.shards[h%genShards]
	s.mu.Lock()
	g, ok := s.m[name]
	s.mu.Unlock()
	if !ok || g.exp < coarseNow() {
		return 0, false
	}
	return g.gen, true
}

// putIf trusts gen for name, read from Redis when name's invalidation sequence (inv.ofName) was
// seq, unless the sequence, read under the shard lock, shows that an invalidation has run since.
func (t *trustedGens) putIf(name string, gen uint64, seq uint64, inv *invalidations) {
	s := t.shard(name)
	s.mu.Lock()
	defer s.mu.Unlock()
	if inv.ofName(name) != seq {
		return
	}
	if _, ok := s.m[name]; !ok && len(s.m) >= t.perShard {
		for n := range s.m {
			delete(s.m, n)
			break
		}
	}
	s.m[strings.Clone(name)] = trustedGen{gen: gen, exp: coarseNow() + t.ttl}
}

// forget stops trusting the generations of names. The caller has bumped the invalidation sequence
// first, so a read that began before this cannot trust them again. A nil t trusts nothing.
func (t *trustedGens) forget(names ...string) {
	if t == nil {
		return
	}
	for _, n := range names {
		s := t.shard(n)
		s.mu.Lock()
		delete(s.m, n)
		s.mu.Unlock()
	}
}

// forgetAll stops trusting every generation.
func (t *trustedGens) forgetAll() {
	if t == nil {
		return
	}
	for i := range t.shards {
		s := &t.shards[i]
		s.mu.Lock()
		clear(s.m)
		s.mu.Unlock()
	}
}
