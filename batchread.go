package imgcache

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"unsafe"

	"github.com/cespare/xxhash/v2"
	"github.com/redis/go-redis/v9"
)

// The Redis side of a batch read: the plan (every Redis key in one buffer, each entity's generation
// key once), one MGET or pipeline, and the checks readL2 makes, with one read of the tags'
// generations for all the values that carry tags.

// readL2Many is readL2 for many distinct keys: it reads the values and their entities' generations
// in one round trip (and, if any value carries tags, all their tags' generations in one more),
// checks each value's stamp, fills L1 with the fresh ones, each under the invalidation sequence its
// key had before the read, and calls hit(i, e) for each fresh value e of keys[i]; e is valid only
// during the call. With StaleTTL, values past their TTL are returned in stale, for a load's
// fail-safe. Failures are misses.
//
// Entities whose generations this instance trusts (gens.go) have no generation key in the MGET. A
// value whose stamp differs from a trusted generation is read again, with the others like it, in
// one more round trip that trusts nothing; so, on a Cluster or a Ring, is one whose stamp differs
// from a generation read with it.
func (c *Cache[V]) readL2Many(ctx context.Context, keys []Key, hit func(i int32, e *l1entry[V])) (stale []*l1entry[V]) {
	if c.l2 == nil {
		if c.staleTTL > 0 {
			stale = make([]*l1entry[V], len(keys))
		}
		return stale
	}
	return c.readL2ManyTrusting(ctx, keys, hit, trustTags, nil)
}

// readL2ManyTrusting is readL2Many with the generations it may trust: tr is trustTags for a first
// read, trustNone for the read again of values that a trusted generation could not vouch for; seen
// then holds the values the first read found, keys[i]'s in seen[i].
func (c *Cache[V]) readL2ManyTrusting(ctx context.Context, keys []Key, hit func(i int32, e *l1entry[V]), tr trust, seen [][]byte) (stale []*l1entry[V]) {
	if c.staleTTL > 0 {
		stale = make([]*l1entry[V], len(keys))
	}
	r := c.newL2Read(keys, tr != trustNone)
	if len(r.rd) == 0 {
		return stale
	}
	vals, failed, err := c.mget(ctx, r.args)
	if err != nil {
		c.countL2Error(err) // one failed round trip, however many keys it carried
	}
	if vals == nil {
		for j := range r.rd {
			c.l2.debug(ctx, "GET", r.rkey(j), "ERROR")
		}
		return stale
	}
	c.readGens(keys, &r, vals, failed)
	// One clock reading for the batch: its values were read at one moment.
	now, nowMs := clockNowMs()
	// Without L1 or StaleTTL nothing keeps an entry past hit (a pending one waits in pending): one
	// will do for all of them.
	var reuse *l1entry[V]
	if c.l1 == nil && stale == nil {
		reuse = new(l1entry[V])
	}

	// Values whose stamps name tags wait in pending for one read of all those tags' generations.
	type pendingValue struct {
		j    int
		e    *l1entry[V]
		env  envelope
		data []byte
	}
	var pending []pendingValue
	var tags, missing []string
	var drop []int // values to delete from Redis (if unchanged): unreadable or stale
	var dropData [][]byte
	var retry []int32      // values stale against a trusted generation: to be read again (indexes in keys)
	var retryData [][]byte // the values read, retry's
	// On a Cluster or a Ring a value and its generation key are read from different nodes
	// concurrently, so the generation may have been read before the value was written: a first
	// read's stale verdict is checked by the read again too (see staleOnSecondLook), whose
	// generations come after this read's values.
	secondLook := tr != trustNone && !c.l2.oneNode()
	// The read again reads the values again too: one replaced since the first read (an
	// invalidation, then a new value) may again have been read after its generations. Its verdict
	// is checked against generations read after it, as staleOnSecondLook does for one key; a value
	// the first read found already was written before these generations were read. ok is false
	// when that check failed (counted): the value is neither served nor deleted.
	stillStale := func(j int, env envelope, data []byte) (old, ok bool) {
		if seen == nil || c.l2.oneNode() || string(seen[r.rd[j]]) == string(data) {
			return true, true
		}
		old, err := c.staleOnSecondLook(ctx, keys[r.rd[j]], env)
		return old, err == nil
	}
	miss := func(j int, data []byte) {
		c.guard.record(ctx, false)
		c.l2.debug(ctx, "GET", r.rkey(j), "MISS")
		if data != nil {
			drop, dropData = append(drop, j), append(dropData, data)
		}
	}
	fill := func(j int, e *l1entry[V]) {
		if r.seqs != nil { // L1 is on
			c.fillL1(keys[r.rd[j]], e, r.seqs[j])
		}
	}
	finish := func(j int, e *l1entry[V], env envelope, data []byte) {
		i := r.rd[j]
		c.finishEntry(e, env, data, now, nowMs)
		fresh := e.exp > now
		c.guard.record(ctx, fresh)
		if !fresh {
			c.l2.debug(ctx, "GET", r.rkey(j), "MISS")
			if stale != nil {
				fill(j, e) // kept for a GetOrLoad's fail-safe; Get does not serve it
				stale[i] = e
			}
			return
		}
		c.l2.debug(ctx, "GET", r.rkey(j), "HIT")
		fill(j, e)
		hit(i, e)
	}
	for j, i := range r.rd {
		s := vals[j]
		switch {
		case failed != nil && failed[j]: // this key's GET failed (a Cluster node down)
			c.l2.debug(ctx, "GET", r.rkey(j), "ERROR")
			continue
		case s == "":
			miss(j, nil)
			continue
		}
		g := r.genv[r.gen[j]]
		if g.failed { // unknown generation: the value cannot be checked
			c.l2.debug(ctx, "GET", r.rkey(j), "ERROR")
			continue
		}
		data := stringBytes(s)
		e := reuse
		if e == nil {
			e = new(l1entry[V])
		} else {
			*e = l1entry[V]{}
		}
		env, err := c.decodeValue(ctx, keys[i], data, e)
		if err != nil {
			miss(j, data)
			continue
		}
		var old bool
		if old, missing = stampStale(env, g.gen, g.ok, nil, nil, missing[:0]); old {
			if g.trusted || secondLook {
				retry, retryData = append(retry, i), append(retryData, data)
				continue
			}
			if old, ok := stillStale(j, env, data); !ok {
				c.l2.debug(ctx, "GET", r.rkey(j), "ERROR")
				continue
			} else if !old {
				finish(j, e, env, data)
				continue
			}
			c.stats.l2Stale.Add(1)
			miss(j, data)
			continue
		}
		if len(missing) > 0 { // tags: checked below, with one read for all the values
			if e == reuse {
				kept := *e
				e = &kept
			}
			pending = append(pending, pendingValue{j, e, env, data})
			for _, t := range missing {
				if !contains(tags, t) {
					tags = append(tags, t)
				}
			}
			continue
		}
		finish(j, e, env, data)
	}
	if len(pending) > 0 {
		var cur []tagGen
		if tr != trustNone {
			cur, tags = c.trustedTags(tags)
		}
		usedTrust := len(cur) > 0
		var err error
		if len(tags) > 0 {
			var read []tagGen
			read, err = c.tagGenerations(ctx, tags)
			if err != nil {
				c.countL2Error(err)
			}
			cur = append(cur, read...)
		}
		for _, p := range pending {
			if err != nil {
				miss(p.j, nil)
				continue
			}
			g := r.genv[r.gen[p.j]]
			old, left := stampStale(p.env, g.gen, g.ok, cur, nil, missing[:0])
			if old || len(left) > 0 { // a moved generation, or a missing meta hash
				if g.trusted || usedTrust || secondLook {
					retry, retryData = append(retry, r.rd[p.j]), append(retryData, p.data)
					continue
				}
				if old, ok := stillStale(p.j, p.env, p.data); !ok {
					c.l2.debug(ctx, "GET", r.rkey(p.j), "ERROR")
					continue
				} else if !old {
					finish(p.j, p.e, p.env, p.data)
					continue
				}
				c.stats.l2Stale.Add(1)
				miss(p.j, p.data)
				continue
			}
			finish(p.j, p.e, p.env, p.data)
		}
	}
	if len(drop) > 0 {
		err := c.l2.pipelined(ctx, func(ctx context.Context, p redis.Pipeliner) {
			for x, j := range drop {
				eval(ctx, p, delIfUnchanged, []string{r.rkey(j)}, dropData[x])
			}
		})
		if err != nil {
			c.countL2Error(err)
		}
	}
	if len(retry) > 0 {
		again := make([]Key, len(retry))
		for x, i := range retry {
			again[x] = keys[i]
			head, _ := keys[i].split()
			c.gens.forget(head)
		}
		st := c.readL2ManyTrusting(ctx, again, func(x int32, e *l1entry[V]) { hit(retry[x], e) }, trustNone, retryData)
		for x, e := range st {
			if e != nil {
				stale[retry[x]] = e
			}
		}
	}
	return stale
}

// l2Read is one batch read's plan: MGET args ("mget", then the Redis keys), which are the values
// of keys[rd[j]] for j < len(rd), then the generation keys of their entities that this
// instance does not trust (gens.go), each once. gen[j] is the index in genv of value j's entity,
// whose generation is trusted or read from the generation key after the values; seqs[j] (with L1
// on) is its key's invalidation sequence, read before the read (see fillL1).
type l2Read struct {
	rd   []int32
	gen  []int32
	seqs []uint64
	args []any
	// genv[x] is the x-th entity's generation; first[x] is the index in keys of its first key.
	// genRead[y] is the entity whose generation key is the y-th after the values, and genSeq[y] its
	// invalidation sequence before the read.
	genv    []genValue
	first   []int32
	genRead []int32
	genSeq  []uint64
}

// newL2Read plans the read of keys, trusting the generations this instance trusts if trusting.
// Every Redis key is written into one buffer and cut from it.
func (c *Cache[V]) newL2Read(keys []Key, trusting bool) l2Read {
	var r l2Read
	n := len(keys)
	// rd, gen, first, genRead and ends (below) hold at most n, n, n, n and 2n indexes: one
	// allocation for all of them.
	idx := make([]int32, 6*n)
	r.rd, r.gen, r.first, r.genRead = idx[:0:n], idx[n:n:2*n], idx[2*n:2*n:3*n], idx[3*n:3*n:4*n]
	ends := idx[4*n : 4*n : 6*n]
	if c.l1 != nil {
		r.seqs = make([]uint64, 0, n)
	}
	r.genv = make([]genValue, 0, n)
	hs := make([]uint64, 0, n) // the xxhash of each entity's head
	t := newHashIndex(n)
	size := 0
	for i, k := range keys {
		if c.guard.skipRead() { // the hit-rate guard skips the key as it would skip its Get
			continue
		}
		r.rd = append(r.rd, int32(i))
		if r.seqs != nil { // fillL1 needs it
			r.seqs = append(r.seqs, c.inv.of(k))
		}
		head, _ := k.split()
		h := xxhash.Sum64String(head)
		x := t.slot(h, func(x int32) bool { h, _ := keys[r.first[x]].split(); return h == head })
		if *x == 0 {
			r.first = append(r.first, int32(i))
			*x = int32(len(r.first))
			hs = append(hs, h)
		}
		r.gen = append(r.gen, *x-1)
		size += len(c.l2.prefix) + len(k.redis())
	}
	if len(r.rd) == 0 {
		return r
	}
	// The trusted generations are looked up in loops of their own: first every entity's bucket, then
	// every record. Each is a cache miss when the table is large, and one lookup's wait on each
	// other; in loops this short the processor overlaps those of many entities.
	r.genv = r.genv[:len(r.first)]
	if trusting && c.trusts() {
		recs := make([]*trustedGen, len(r.first))
		for x, h := range hs {
			recs[x] = c.gens.find(h)
		}
		for x, i := range r.first {
			head, _ := keys[i].split()
			g, ok := c.gens.check(recs[x], head)
			r.genv[x] = genValue{gen: g, ok: ok, trusted: ok}
		}
	}
	for x, i := range r.first {
		if !r.genv[x].trusted {
			r.genRead = append(r.genRead, int32(x))
			r.genSeq = append(r.genSeq, c.inv.of(keys[i]))
			size += len(c.l2.prefix) + len("%g:{}") + len(keys[i].escapedHead())
		}
	}
	var b strings.Builder // its String does not copy the buffer
	b.Grow(size)
	var scratch [256]byte
	for _, i := range r.rd {
		b.WriteString(c.l2.prefix)
		b.WriteString(keys[i].redis())
		ends = append(ends, int32(b.Len()))
	}
	for _, x := range r.genRead {
		b.Write(c.l2.appendEntityGen(scratch[:0], keys[r.first[x]]))
		ends = append(ends, int32(b.Len()))
	}
	all := b.String()
	r.args = make([]any, 1+len(ends))
	r.args[0] = "mget"
	start := int32(0)
	for x, end := range ends {
		r.args[1+x] = all[start:end]
		start = end
	}
	return r
}

// rkey is the Redis key of the j-th value read.
func (r *l2Read) rkey(j int) string { return r.args[1+j].(string) }

// readGens takes the generations read with the values (mget's results) into genv, and trusts
// those it found.
func (c *Cache[V]) readGens(keys []Key, r *l2Read, vals []string, failed []bool) {
	for y, x := range r.genRead {
		at := len(r.rd) + y
		g := parseGen(vals[at], failed != nil && failed[at])
		r.genv[x] = g
		if g.ok {
			head, _ := keys[r.first[x]].split()
			c.trustGen(head, g.gen, r.genSeq[y])
		}
	}
}

// stringBytes returns s's bytes without copying them, as go-redis's StringCmd.Bytes does for a
// single GET: the bytes must not be modified. They go to decodeEnvelope, the codec (Codec says
// that Unmarshal must not modify its input), xxhash and a Redis command's argument, and none
// of them writes to its input.
func stringBytes(s string) []byte { return unsafe.Slice(unsafe.StringData(s), len(s)) }

func contains(ss []string, s string) bool {
	for _, x := range ss {
		if x == s {
			return true
		}
	}
	return false
}

// genValue is an entity's generation as read with a batch, or trusted: ok is false when the
// generation key is missing or malformed (every value of the entity then reads as invalid); failed
// when it could not be read.
type genValue struct {
	gen        uint64
	ok, failed bool
	trusted    bool // this instance trusts it (gens.go): it was not read with the batch
}

// parseGen reads a generation key's value as mget returns it.
func parseGen(s string, failed bool) genValue {
	if failed {
		return genValue{failed: true}
	}
	// An absent ("") or malformed generation reads as missing: its values are invalid.
	g, err := strconv.ParseUint(s, 10, 64)
	return genValue{gen: g, ok: err == nil}
}

// mget reads the keys args[1:] in one round trip: one MGET (args[0] is "mget") on a single Redis,
// a pipeline of GETs otherwise (a Cluster's keys are in many slots; go-redis splits the pipeline
// by node). vals[j] is the j-th key's value, "" when it is absent (nothing imgcache writes is
// empty); in a pipeline, failed[j] reports that the j-th key's GET failed (failed is nil on a
// single Redis). vals is nil when nothing could be read.
func (c *Cache[V]) mget(ctx context.Context, args []any) (vals []string, failed []bool, err error) {
	if c.l2.oneNode() {
		err = c.l2.call(ctx, func(ctx context.Context) error {
			// A StringSliceCmd reads the replies as strings, nil as "": no interface per value.
			cmd := redis.NewStringSliceCmd(ctx, args...)
			err := c.l2.processRead(ctx, cmd)
			vals = cmd.Val()
			return err
		})
		if err == nil && len(vals) != len(args)-1 {
			err = fmt.Errorf("MGET of %d keys returned %d values", len(args)-1, len(vals))
		}
		if err != nil {
			return nil, nil, err
		}
		return vals, nil, nil
	}
	cmds := make([]*redis.StringCmd, len(args)-1)
	err = c.l2.pipelined(ctx, func(ctx context.Context, p redis.Pipeliner) {
		for j, k := range args[1:] {
			cmds[j] = p.Get(ctx, k.(string))
		}
	})
	if cmds[0] == nil { // not sent: the breaker is open, or ctx has ended
		return nil, nil, err
	}
	vals, failed = make([]string, len(cmds)), make([]bool, len(cmds))
	for j, cmd := range cmds {
		s, e := cmd.Result()
		vals[j], failed[j] = s, e != nil && !errors.Is(e, redis.Nil)
	}
	return vals, failed, err
}
