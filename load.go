package imgcache

import (
	"context"
	"encoding"
	"errors"
	"fmt"
	"log/slog"
	"strconv"
	"sync"
	"time"

	"github.com/cespare/xxhash/v2"
	"github.com/redis/go-redis/v9"
)

// This file holds the paths between the levels: an L2 read that fills L1, the body of a GetOrLoad
// flight, and the encoding of values with their stamps. invalidate.go explains the stamps.

// readL2 reads k from Redis with its entity's current generation (one round trip), checks the
// value's stamp, fills L1 on a hit, and counts the outcome. Failures are misses; failed reports a
// failed Redis call.
func (c *Cache[V]) readL2(ctx context.Context, k Key) (e *l1entry[V], ok, failed bool) {
	if c.l2 == nil {
		return nil, false, false
	}
	if c.guard.skipRead() {
		return nil, false, false
	}
	seq := c.inv.of(k)
	rkey, e, fresh, got, err := c.readChecked(ctx, k, seq)
	switch {
	case !got && errors.Is(err, redis.Nil):
		c.l2.debug(ctx, "GET", rkey, "MISS")
		c.guard.record(ctx, false)
		return nil, false, false
	case !got:
		c.l2.debug(ctx, "GET", rkey, "ERROR")
		c.countL2Error(err)
		return nil, false, true
	}
	c.guard.record(ctx, fresh)
	if !fresh {
		c.l2.debug(ctx, "GET", rkey, "MISS")
		if err == nil && c.staleTTL > 0 {
			c.fillL1(k, e, seq) // kept for a GetOrLoad's fail-safe; Get does not serve it
		}
		return nil, false, errors.Is(err, errL2Call)
	}
	c.l2.debug(ctx, "GET", rkey, "HIT")
	c.stats.l2Hits.Add(1)
	c.fillL1(k, e, seq)
	return e, true, false
}

// readChecked reads k's value from Redis and checks its stamp (decodeChecked), seq being k's
// invalidation sequence before the read. If this instance trusts the entity's generation (gens.go)
// it reads the value alone; otherwise the value and the generation in one round trip, and it trusts
// the generation from then on. A stamp that differs from a trusted generation is read again with
// the current one.
//
// got reports that the read itself succeeded: if not, err is redis.Nil for an absent value or the
// read's error, not yet counted. If so, e, fresh and err are decodeChecked's.
func (c *Cache[V]) readChecked(ctx context.Context, k Key, seq uint64) (rkey string, e *l1entry[V], fresh, got bool, err error) {
	head, _ := k.split()
	g, trusted := c.trustedGen(head)
	tr := trustTags
	if trusted {
		tr = trustAll
	}
	for {
		var data []byte
		gok := trusted
		if trusted {
			rkey = c.l2.key(k)
			data, err = c.readValue(ctx, rkey)
		} else {
			var genKey string
			rkey, genKey = c.l2.readKeys(k)
			data, g, gok, err = c.readWithGen(ctx, rkey, genKey)
			if gok {
				c.trustGen(head, g, seq)
			}
		}
		if err != nil {
			return rkey, nil, false, false, err
		}
		e, fresh, err = c.decodeChecked(ctx, k, rkey, data, g, gok, nil, tr)
		if !errors.Is(err, errUntrusted) {
			return rkey, e, fresh, true, err
		}
		c.gens.forget(head)
		trusted, tr = false, trustNone
	}
}

// trusts reports whether this instance trusts generations it has read: it keeps them (gens.go),
// and only while it is subscribed to the bus, which is what keeps the trust coherent.
func (c *Cache[V]) trusts() bool { return c.gens != nil && c.subscribed.Load() }

// trustedGen returns the generation of name (an entity's head or a tag) that this instance
// trusts, if any.
func (c *Cache[V]) trustedGen(name string) (uint64, bool) {
	if !c.trusts() {
		return 0, false
	}
	return c.gens.get(name, xxhash.Sum64String(name))
}

// trustGen trusts g, read from Redis as name's generation when name's invalidation sequence
// (invalidations.ofName) was seq, unless an invalidation has run since.
func (c *Cache[V]) trustGen(name string, g, seq uint64) {
	if c.trusts() {
		c.gens.putIf(name, g, seq, &c.inv)
	}
}

// readWithGen reads a value and its entity's current generation in one round trip (l2.read). It
// returns redis.Nil when the value is absent, and the generation either way; gok is false when the
// generation is missing or malformed.
func (c *Cache[V]) readWithGen(ctx context.Context, rkey, genKey string) (data []byte, g uint64, gok bool, err error) {
	r, err := c.l2.read(ctx, rkey, genKey)
	if err != nil {
		return nil, 0, false, err
	}
	if r.ok[1] {
		// A malformed generation (invalidateScript once wrote one in exponent form) reads as a
		// missing one: the value is invalid, and the miss's registration rewrites it.
		var perr error
		g, perr = strconv.ParseUint(r.val[1], 10, 64)
		gok = perr == nil
	}
	if !r.ok[0] {
		return nil, g, gok, redis.Nil
	}
	return stringBytes(r.val[0]), g, gok, nil
}

// readValue reads a value alone (l2.read): redis.Nil when it is absent.
func (c *Cache[V]) readValue(ctx context.Context, rkey string) ([]byte, error) {
	r, err := c.l2.read(ctx, rkey, "")
	if err == nil && !r.ok[0] {
		err = redis.Nil
	}
	return stringBytes(r.val[0]), err
}

var (
	errStale  = errors.New("value was written before an invalidation of its entity or tags")
	errL2Call = errors.New("redis call failed")
	// errUntrusted: a stamp did not match a trusted generation; the value must be read again with
	// the current generations.
	errUntrusted = errors.New("stamp differs from a trusted generation")
)

// decodeChecked decodes a value read from Redis and checks its stamp against the current
// generations: the entity's (g, gok: missing means invalid) and its tags', read now unless known
// already holds them (or, as tr allows, this instance trusts them). An unreadable value is deleted
// and counted; a stale one is counted. Both are misses. A stamp judged stale against a trusted
// generation returns errUntrusted, with nothing deleted or counted: the caller reads it again.
// GetMany runs the same steps (decodeValue, stampStale, finishEntry) over many values, with one read
// of all their tags' generations. fresh reports whether the entry has not expired.
func (c *Cache[V]) decodeChecked(ctx context.Context, k Key, rkey string, data []byte, g uint64, gok bool, known []tagGen, tr trust) (e *l1entry[V], fresh bool, err error) {
	e = new(l1entry[V])
	env, err := c.decodeValue(ctx, k, data, e)
	if err != nil {
		c.delUnreadable(ctx, rkey, data)
		return nil, false, err
	}
	stale, missing := stampStale(env, g, gok, known, nil, nil)
	trusted := tr == trustAll
	if !stale && len(missing) > 0 {
		var cur []tagGen
		if tr != trustNone {
			cur, missing = c.trustedTags(missing)
			trusted = trusted || len(cur) > 0
		}
		if len(missing) > 0 {
			read, err := c.tagGenerations(ctx, missing)
			if err != nil {
				c.countL2Error(err)
				return nil, false, errL2Call
			}
			cur = append(cur, read...)
		}
		stale, missing = stampStale(env, g, gok, known, cur, missing[:0])
		stale = stale || len(missing) > 0 // a missing meta hash: evicted or expired
	}
	if stale && !trusted && !c.l2.oneNode() {
		if stale, err = c.staleOnSecondLook(ctx, k, env); err != nil {
			return nil, false, errL2Call // a miss; the value may be current, so it stays
		}
	}
	if stale {
		if trusted {
			return nil, false, errUntrusted
		}
		c.stats.l2Stale.Add(1)
		c.delUnreadable(ctx, rkey, data)
		return nil, false, errStale
	}
	now, nowMs := clockNowMs()
	c.finishEntry(e, env, data, now, nowMs)
	return e, e.exp > now, nil
}

// trust says which generations a stamp check may take from this instance's trusted ones (gens.go)
// rather than from Redis.
type trust uint8

const (
	trustNone trust = iota // none: every generation is read from Redis (or given)
	trustTags              // the tags'
	trustAll               // the tags', and the entity's generation given is a trusted one
)

// trustedTags splits tags into those whose generations this instance trusts, returned with them,
// and the rest, returned in tags' storage.
func (c *Cache[V]) trustedTags(tags []string) (cur []tagGen, rest []string) {
	rest = tags[:0]
	for _, t := range tags {
		if g, ok := c.trustedGen(t); ok {
			cur = append(cur, tagGen{t, g})
		} else {
			rest = append(rest, t)
		}
	}
	return cur, rest
}

// staleOnSecondLook judges again, on a Cluster or a Ring, a stamp found stale against generations
// read in the value's own round trip. There the value and its generations live on different nodes,
// whose parts of a pipeline go out concurrently, so a generation may be read before the value was
// written (a scheduling delay on a loaded machine is enough): a value its holder has just stored
// would look stale, be deleted, and be loaded a second time. Generations read after the value are
// at least as new as the value: a stamp that matches them was current when the value was read (a
// generation never takes an old value again). If they cannot be read, err is the read's error
// (counted): the value may well be current, so the caller must neither serve nor delete it.
func (c *Cache[V]) staleOnSecondLook(ctx context.Context, k Key, env envelope) (bool, error) {
	_, genKey := c.l2.readKeys(k)
	var tags []string
	env.eachTag(func(tag []byte, _ uint64) { tags = append(tags, string(tag)) })
	var gen *redis.StringCmd
	tagCmds := make([]*redis.StringCmd, len(tags))
	err := c.l2.pipelined(ctx, func(ctx context.Context, p redis.Pipeliner) {
		gen = p.Get(ctx, genKey)
		for i, t := range tags {
			tagCmds[i] = p.HGet(ctx, c.l2.tagMeta(t), "g")
		}
	})
	if err != nil {
		c.countL2Error(err)
		return false, err
	}
	// Every reply is a value or an absent key's now (pipelined reports any other failure). One that
	// does not parse (invalidateScript once wrote a generation in exponent form) reads as a missing
	// generation, as readWithGen reads it: the value is invalid.
	g, gok, _ := genReply(gen)
	cur := make([]tagGen, 0, len(tags))
	for i, cmd := range tagCmds {
		if tg, ok, _ := genReply(cmd); ok {
			cur = append(cur, tagGen{tags[i], tg})
		}
	}
	stale, missing := stampStale(env, g, gok, cur, nil, nil)
	return stale || len(missing) > 0, nil
}

// decodeValue checks data's envelope and decodes its payload into e.val. An unreadable value is
// counted and logged; the caller deletes it.
func (c *Cache[V]) decodeValue(ctx context.Context, k Key, data []byte, e *l1entry[V]) (envelope, error) {
	env, err := decodeEnvelope(data, c.codecID, c.maxValue)
	if err == nil && !env.negative {
		err = c.decode(env.payload, &e.val)
	}
	if err != nil {
		c.stats.l2Errors.Add(1)
		c.stats.l2Unreadable.Add(1)
		c.logError(ctx, "decode", k.String(), err)
	}
	return env, err
}

// stampStale reports whether env's stamp is older than the current generations: the entity's (g;
// gok false means its generation key is missing, which makes every value of it invalid) and the
// tags' found in known or more. Tags found in neither are appended to missing, for the caller to
// read; they do not make the value stale here.
func stampStale(env envelope, g uint64, gok bool, known, more []tagGen, missing []string) (bool, []string) {
	if !gok || env.entityGen != g {
		return true, missing
	}
	stale := false
	env.eachTag(func(tag []byte, gen uint64) {
		cur, ok := lookupTag(known, tag)
		if !ok {
			cur, ok = lookupTag(more, tag)
		}
		switch {
		case !ok:
			missing = append(missing, string(tag))
		case cur != gen:
			stale = true
		}
	})
	return stale, missing
}

// finishEntry completes an entry decoded from data, whose stamp was found current, at now
// (preciseNow) and nowMs (Unix ms).
func (c *Cache[V]) finishEntry(e *l1entry[V], env envelope, data []byte, now, nowMs int64) {
	if env.ntags > 0 {
		e.tags = make([]string, 0, env.ntags)
		env.eachTag(func(tag []byte, _ uint64) { e.tags = append(e.tags, string(tag)) })
	}
	e.negative, e.expMs = env.negative, env.expiryMs
	if c.l1 != nil { // the bus compares it with L1's copy (see dropL1Written)
		e.wid = xxhash.Sum64(data)
	}
	// The envelope carries the L2 expiry, so L1 can stop at it without asking Redis for the PTTL.
	c.stampAt(e, time.Duration(env.expiryMs-nowMs)*time.Millisecond, now)
}

func lookupTag(gens []tagGen, tag []byte) (uint64, bool) {
	for _, t := range gens {
		if t.tag == string(tag) {
			return t.gen, true
		}
	}
	return 0, false
}

// tagGenerations reads the current generations of tags, and trusts them from then on; a tag whose
// meta hash is missing is left out of the result.
func (c *Cache[V]) tagGenerations(ctx context.Context, tags []string) ([]tagGen, error) {
	seq := c.inv.global.Load() // what a tag invalidation bumps
	cmds := make([]*redis.StringCmd, len(tags))
	if err := c.l2.pipelined(ctx, func(ctx context.Context, p redis.Pipeliner) {
		for i, t := range tags {
			cmds[i] = p.HGet(ctx, c.l2.tagMeta(t), "g")
		}
	}); err != nil {
		return nil, err
	}
	out := make([]tagGen, 0, len(tags))
	for i, cmd := range cmds {
		g, ok, err := genReply(cmd)
		if err != nil {
			return nil, err
		}
		if ok {
			out = append(out, tagGen{tags[i], g})
		}
	}
	for _, t := range out {
		c.trustGen(t.tag, t.gen, seq)
	}
	return out, nil
}

// countL2Error counts a failed Redis call; a call the breaker skipped is counted there instead.
func (c *Cache[V]) countL2Error(err error) {
	var left *leftQueue
	if !errors.Is(err, ErrBreakerOpen) && !errors.As(err, &left) { // a read that left no call behind
		c.stats.l2Errors.Add(1)
	}
}

// delUnreadable removes a value that did not decode or is stale, only if it is still the same
// value: a writer may have just replaced it with a good one.
func (c *Cache[V]) delUnreadable(ctx context.Context, rkey string, data []byte) {
	if err := c.l2.delUnreadable(ctx, rkey, data); err != nil {
		c.countL2Error(err)
	}
}

// fillL1 stores an entry read from L2 or loaded, unless an invalidation ran since seq was read.
func (c *Cache[V]) fillL1(k Key, e *l1entry[V], seq uint64) {
	if c.l1 != nil && e.staleUntil > preciseNow() {
		c.l1.addIf(k, e, &c.inv, seq, true)
	}
}

// registration is what a writer learns from the meta hashes before it writes: the stamp to write
// under, and (for loads) the epochs to verify against afterwards.
type registration struct {
	st    stamp
	d     uint64 // the entity's delete epoch
	epoch string // the namespace's pattern epoch
}

// register creates or extends the meta hashes of k's entity and of tags, registers k as a member
// of each, and returns their generations and the pattern epoch; with bumpDelete it also moves the
// entity's delete epoch (Set does, so that loads in flight drop their writes rather than race it).
func (c *Cache[V]) register(ctx context.Context, k Key, tags []string, ttl time.Duration, bumpDelete bool) (registration, error) {
	rs, err := c.registerMany(ctx, []Key{k}, tags, ttl, bumpDelete, []bool{false}, false)
	if err != nil {
		return registration{}, err
	}
	return rs[0].reg, rs[0].err
}

// registered is registerMany's result for one key.
type registered struct {
	reg  registration
	data []byte // the value, when it was read and is there
	err  error  // this key's registration or read failed
	// lease is the token registerMany tried to take the key's lease with; leaseBusy reports that
	// the lease was found taken, by another holder or by this token itself.
	lease     string
	leaseBusy bool
}

// registerMany registers many keys (distinct or not) in one pipeline: one script per key and tag,
// one GET per key whose get is set, and one GET of the pattern epoch; with lease, also a SET NX of
// each key's lease. err is set when the pipeline as a whole failed (Redis unreachable, the breaker
// open, the epoch unreadable); a key whose own commands failed (a script refused at maxmemory) has
// its registered.err set. With lease, the result holds each key's lease even when err is set, so
// that the caller releases what it may hold.
func (c *Cache[V]) registerMany(ctx context.Context, ks []Key, tags []string, ttl time.Duration, bumpDelete bool, get []bool, lease bool) ([]registered, error) {
	bump := "0"
	if bumpDelete {
		bump = "1"
	}
	metaMs := metaTTL(ttl).Milliseconds()
	var epochCmd *redis.SliceCmd // set when the pipeline runs
	getCmds := make([]*redis.SliceCmd, len(ks))
	entityCmds := make([]*redis.Cmd, len(ks))
	tagCmds := make([]*redis.Cmd, len(ks)*len(tags))
	var leaseCmds []*redis.StatusCmd
	var token string // one for all the keys: this call is their leases' holder
	if lease {
		leaseCmds, token = make([]*redis.StatusCmd, len(ks)), newLeaseToken()
	}
	// The generations the scripts return are current: trusted from then on (gens.go), unless an
	// invalidation runs meanwhile.
	seqs := make([]uint64, len(ks))
	for i, k := range ks {
		seqs[i] = c.inv.of(k)
	}
	tagSeq := c.inv.global.Load()
	var scripts scriptCalls
	ran := false
	err := c.l2.pipelined(ctx, func(ctx context.Context, p redis.Pipeliner) {
		ran = true
		epochCmd = getOne(ctx, p, c.l2.epochKey()) // always: the load's verify compares against it
		for i, k := range ks {
			ks := k.String()
			if get[i] {
				getCmds[i] = getOne(ctx, p, c.l2.prefix+ks)
			}
			entityCmds[i] = scripts.run(ctx, p, registerScript, []string{c.l2.entityMetaOf(k), c.l2.entityGenOf(k)},
				newGeneration(), metaMs, ks[len(ks)-16:], bump, ttl.Milliseconds())
			for j, t := range tags {
				tagCmds[i*len(tags)+j] = scripts.run(ctx, p, registerScript, []string{c.l2.tagMeta(t)}, newGeneration(), metaMs, ks, "0", ttl.Milliseconds())
			}
			if lease {
				leaseCmds[i] = redis.NewStatusCmd(ctx, "set", c.leaseKey(k), token, "px", c.lockTTL.Milliseconds(), "nx")
				_ = p.Process(ctx, leaseCmds[i])
			}
		}
	})
	if !ran {
		return nil, err
	}
	scripts.retry(ctx, c.l2)
	rs := make([]registered, len(ks))
	if lease {
		for i := range rs {
			// A lease is taken or not whatever else failed, and the caller must release one it
			// took. Without a reply the outcome is unknown: the lease may have been taken, so the
			// token is kept for a release (which deletes only a lease that holds it).
			switch err := leaseCmds[i].Err(); {
			case err == nil || !isReply(err):
				rs[i].lease = token
			case errors.Is(err, redis.Nil):
				// NX: another holder has it, or this very token does (go-redis retried the SET
				// after a lost reply); the wait tells them apart.
				rs[i].lease, rs[i].leaseBusy = token, true
			}
		}
	}
	epoch, _, err := oneValue(epochCmd)
	if err != nil {
		return rs, err
	}
	for i := range ks {
		r := &rs[i]
		r.reg.epoch = epoch
		if r.reg.st.entityGen, r.reg.d, r.err = metaReply(entityCmds[i]); r.err != nil {
			continue
		}
		head, _ := ks[i].split()
		c.trustGen(head, r.reg.st.entityGen, seqs[i])
		for j, cmd := range tagCmds[i*len(tags) : (i+1)*len(tags)] {
			g, _, err := metaReply(cmd)
			if err != nil {
				r.err = err
				break
			}
			r.reg.st.tags = append(r.reg.st.tags, tagGen{tags[j], g})
			c.trustGen(tags[j], g, tagSeq)
		}
		if r.err == nil && getCmds[i] != nil {
			var v string
			var ok bool
			if v, ok, r.err = oneValue(getCmds[i]); ok {
				r.data = stringBytes(v)
			}
		}
	}
	return rs, nil
}

// getOne queues a read of key as an MGET of that key alone. A GET of an absent key gets a nil
// reply, which go-redis turns into an error (redis.Nil) and runs through its checks of errors:
// about a dozen errors.As calls, each allocating, when it is a pipeline's first command (its retry
// and connection checks), and two otherwise. An MGET's nil is a value.
func getOne(ctx context.Context, p redis.Pipeliner, key string) *redis.SliceCmd {
	return p.MGet(ctx, key)
}

// oneValue is getOne's answer: the key's value and whether it exists, or the read's error.
func oneValue(cmd *redis.SliceCmd) (v string, ok bool, err error) {
	vals, err := cmd.Result()
	switch {
	case err != nil:
		return "", false, err
	case len(vals) != 1:
		return "", false, fmt.Errorf("imgcache: MGET of one key answered %d values", len(vals))
	}
	v, ok = vals[0].(string)
	return v, ok, nil
}

// l2write is one loaded value for writeVerified to store.
type l2write struct {
	k      Key
	data   []byte
	ttl    time.Duration // the Redis TTL
	absent bool          // the key was absent when its load began: write only if it still is
	reg    registration  // what the load registered under before it began
	lease  *heldLease    // the key's lease, held by this load; nil if none
}

// heldLease is a lease a load holds: its token, and whether its write has released it.
type heldLease struct {
	token    string
	released bool
}

// releaseIfUnchangedScript releases a load's lease (KEYS[1], if it still holds ARGV[1]) in the
// pipeline of the load's write on a single Redis, only if the entity's delete epoch (KEYS[2]'s "d")
// and the pattern epoch (KEYS[3]) are still what the load registered under (ARGV[2], ARGV[3]). A
// load whose epochs moved keeps its lease until it has taken its write back: a waiter must not read
// that write. It returns 1 when it released the lease.
var releaseIfUnchangedScript = redis.NewScript(`
if redis.call('GET', KEYS[1]) == ARGV[1] and redis.call('HGET', KEYS[2], 'd') == ARGV[2]
	and (redis.call('GET', KEYS[3]) or '') == ARGV[3] then
	return redis.call('DEL', KEYS[1])
end
return 0`)

// releaseManyIfUnchangedScript is releaseIfUnchangedScript for the many leases of a batch's
// writes, in one call: a script call costs Redis several microseconds of its own, and a batch of
// 100 keys spent most of that on its releases. KEYS[1] is the pattern epoch and ARGV[1] the value
// the loads registered under; then each lease's key and meta hash (KEYS[2i], KEYS[2i+1]), token
// and delete epoch (ARGV[2i], ARGV[2i+1]). It returns 1 or 0 per lease, in order.
var releaseManyIfUnchangedScript = redis.NewScript(`
local same = (redis.call('GET', KEYS[1]) or '') == ARGV[1]
local out = {}
for i = 2, #KEYS, 2 do
	local r = 0
	if same and redis.call('GET', KEYS[i]) == ARGV[i] and redis.call('HGET', KEYS[i + 1], 'd') == ARGV[i + 1] then
		r = redis.call('DEL', KEYS[i])
	end
	out[#out + 1] = r
end
return out`)

// writeVerified writes loaded values so that none survives a Delete, Set or InvalidatePattern that
// moved the epochs it registered under while it loaded; kept[i] is false for a value that was not
// kept (L1 drops it). Invalidations by entity or tag need no check: they move a generation, and the
// value's stamp then reads as stale. The values are written, then the epochs read, in one
// pipeline on a single Redis (which runs it in order) and in two on a Cluster or Ring, where the
// keys involved live on different nodes (l2.orderedAll: writes one node refused do not keep the
// others from being checked). A write whose epochs moved is removed (only if it is still there)
// and the other instances, which may have read it meanwhile, are told. A write that may have
// landed but could not be checked (its reply or the check timed out) is taken back the same way:
// only a reply from Redis proves it did not land. On a single Redis the leases are released in
// the same pipeline, each only if its epochs did not move; on a Cluster by the loader's own
// deferred release.
func (c *Cache[V]) writeVerified(ctx context.Context, ws []l2write) (kept []bool) {
	kept = make([]bool, len(ws))
	rkeys := make([]string, len(ws))
	sets := make([]*redis.StatusCmd, len(ws))
	ds := make([]*redis.StringCmd, len(ws))
	for i, w := range ws {
		rkeys[i] = c.l2.key(w.k)
		args := []any{"set", rkeys[i], w.data, "px", w.ttl.Milliseconds()}
		if w.absent {
			args = append(args, "nx") // never over a value someone stored while this one loaded
		}
		sets[i], ds[i] = redis.NewStatusCmd(ctx, args...), new(redis.StringCmd)
	}
	epoch := new(redis.SliceCmd)
	sent := false
	// On a single Redis the leases go in the same pipeline, each released only if its load's
	// epochs did not move; on a Cluster their keys live on other nodes, and the loads' deferred
	// releases let them go after the write.
	single := c.l2.oneNode()
	releases := make([]*redis.Cmd, len(ws))
	var releaseMany *redis.Cmd // a batch's: one call for all of its leases
	var manyOf []int           // the writes whose leases releaseMany releases, in order
	var scripts scriptCalls
	// l2.orderedAll applies the L2Timeout budget; replies are read per command, and on a Cluster the
	// writes that landed are checked even if another node refused its part.
	_ = c.l2.orderedAll(ctx,
		func(p redis.Pipeliner) {
			sent = true
			for _, set := range sets {
				_ = p.Process(ctx, set)
			}
		},
		func(p redis.Pipeliner) {
			var keys []string
			var args []any
			for i, w := range ws {
				meta := c.l2.entityMetaOf(w.k)
				ds[i] = p.HGet(ctx, meta, "d")
				switch {
				case !single || w.lease == nil:
				case len(ws) == 1 || (keys != nil && args[0] != any(w.reg.epoch)):
					// One lease; or (never, as batches register together) one under another epoch.
					releases[i] = scripts.run(ctx, p, releaseIfUnchangedScript,
						[]string{c.leaseKey(w.k), meta, c.l2.epochKey()}, w.lease.token, w.reg.d, w.reg.epoch)
				default:
					if keys == nil {
						// A batch's loads registered together, under one pattern epoch.
						keys, args = []string{c.l2.epochKey()}, []any{w.reg.epoch}
					}
					keys = append(keys, c.leaseKey(w.k), meta)
					args = append(args, w.lease.token, w.reg.d)
					manyOf = append(manyOf, i)
				}
			}
			if keys != nil {
				releaseMany = scripts.run(ctx, p, releaseManyIfUnchangedScript, keys, args...)
			}
			epoch = getOne(ctx, p, c.l2.epochKey())
		})
	if sent {
		scripts.retry(ctx, c.l2)
	}
	for i, r := range releases {
		if r != nil && r.Val() == int64(1) {
			ws[i].lease.released = true
		}
	}
	if releaseMany != nil {
		if rs, err := releaseMany.Int64Slice(); err == nil && len(rs) == len(manyOf) {
			for j, i := range manyOf {
				ws[i].lease.released = rs[j] == 1
			}
		}
	}
	epochNow, _, epochErr := oneValue(epoch)
	var back []int
	var checkErr error
	for i, w := range ws {
		setErr := sets[i].Err()
		if sent {
			c.l2.debugSet(ctx, rkeys[i], w.ttl, setErr)
		}
		if !sent || isReply(setErr) {
			// Not written: the breaker skipped it, NX found the key taken, or Redis refused (OOM).
			if setErr != nil && !errors.Is(setErr, redis.Nil) {
				c.countL2Error(setErr)
				c.logError(ctx, "L2 write", w.k.String(), setErr)
			}
			kept[i] = true
			continue
		}
		dNow, err := ds[i].Uint64()
		if setErr == nil && err == nil && epochErr == nil && dNow == w.reg.d && epochNow == w.reg.epoch {
			kept[i] = true
			continue
		}
		if err = errors.Join(setErr, err, epochErr); err != nil {
			checkErr = err
		} else {
			c.stats.loadsSuperseded.Add(1)
		}
		back = append(back, i)
	}
	if checkErr != nil {
		c.countL2Error(checkErr) // one failed round trip, however many writes it carried
	}
	if len(back) == 0 {
		return kept
	}
	// Moved, or unknown: the writes may be stale, so take them back, and make sure no instance
	// keeps a copy it read in between. The writes may have landed, so this goes on even if the
	// load's context has ended since (Close, LoadTimeout): each call is bounded by L2Timeout.
	ctx = context.WithoutCancel(ctx)
	items := make([]string, len(back))
	keys := make([]Key, len(back))
	for j, i := range back {
		c.delUnreadable(ctx, rkeys[i], ws[i].data)
		items[j], keys[j] = ws[i].k.canonical(), ws[i].k
	}
	// This instance ignores its own message: a read here that found the write before it was taken
	// back must not fill L1 after the removal, as the message keeps the other instances' reads out.
	c.dropL1Keys(keys)
	c.send(ctx, busKeys, items)
	return kept
}

// callLoad runs load, turning a panic into an error so that one bad load cannot crash the service
// or leave the flight's waiters blocked. Under a deadline (LoadTimeout) it returns when the deadline
// passes even if load ignores its context; the load's goroutine then finishes on its own, and Close
// waits for it (wg is the flight group's, which the calling flight holds open).
func callLoad[T any](ctx context.Context, wg *sync.WaitGroup, load func(context.Context) (T, error)) (v T, err error) {
	if _, ok := ctx.Deadline(); !ok {
		return recoverLoad(ctx, load)
	}
	type result struct {
		v   T
		err error
	}
	done := make(chan result, 1)
	wg.Add(1) // the calling flight holds the group open, so this cannot race close's Wait
	go func() {
		defer wg.Done()
		v, err := recoverLoad(ctx, load)
		done <- result{v, err}
	}()
	select {
	case r := <-done:
		return r.v, r.err
	case <-ctx.Done():
		return v, ctx.Err()
	}
}

// recoverLoad calls load, turning a panic into an error. A function of its own, not a closure in
// callLoad: the closure would escape through callLoad's goroutine and be allocated on every load.
func recoverLoad[T any](ctx context.Context, load func(context.Context) (T, error)) (v T, err error) {
	defer func() {
		if r := recover(); r != nil {
			err = fmt.Errorf("load panicked: %v", r)
		}
	}()
	return load(ctx)
}

// decode runs the codec, turning a panic in a custom codec into an error.
func (c *Cache[V]) decode(payload []byte, v *V) (err error) {
	defer func() {
		if r := recover(); r != nil {
			err = fmt.Errorf("codec panicked: %v", r)
		}
	}()
	return c.codec.Unmarshal(payload, v)
}

// encodePayload returns v as the codec encodes it (nil for a negative entry), turning a panic in a
// custom codec into an error.
func (c *Cache[V]) encodePayload(v V) (b []byte, err error) {
	defer func() {
		if r := recover(); r != nil {
			b, err = nil, fmt.Errorf("codec panicked: %v", r)
		}
	}()
	if a, ok := any(v).(encoding.BinaryAppender); ok && c.codec == (binaryCodec{}) {
		return a.AppendBinary(make([]byte, 0, 128))
	}
	return c.codec.Marshal(v)
}

// checkSize refuses a payload that cannot fit MaxValueSize under any stamp of ntags tags.
func (c *Cache[V]) checkSize(payload []byte, tags []string) error {
	n := envHeaderLen + 2*binaryMaxVarint + len(payload)
	for _, t := range tags {
		n += 2*binaryMaxVarint + len(t)
	}
	if n > c.maxValue {
		return fmt.Errorf("encoded value of up to %d bytes exceeds MaxValueSize %d", n, c.maxValue)
	}
	return nil
}

const binaryMaxVarint = 10

// minMaxValueSize is the smallest MaxValueSize that lets a value through checkSize: an envelope
// with room for its stamp and a payload of one byte.
const minMaxValueSize = envHeaderLen + 2*binaryMaxVarint + 1

// encode returns v in its envelope, ready for Redis, expiring at expMs (Unix ms).
func (c *Cache[V]) encode(v V, negative bool, expMs int64, st stamp) ([]byte, error) {
	var payload []byte
	if !negative {
		var err error
		if payload, err = c.encodePayload(v); err != nil {
			return nil, fmt.Errorf("encode: %w", err)
		}
	}
	tags := make([]string, len(st.tags))
	for i, t := range st.tags {
		tags[i] = t.tag
	}
	if err := c.checkSize(payload, tags); err != nil {
		return nil, err
	}
	b := make([]byte, 0, envHeaderLen+32+len(payload))
	b = appendHeader(b, c.codecID, negative, expMs, st)
	return append(b, payload...), nil
}

func (c *Cache[V]) logError(ctx context.Context, op, what string, err error) {
	if c.log != nil {
		c.log.LogAttrs(ctx, slog.LevelDebug, "imgcache "+op+" failed", slog.String("key", what), slog.Any("error", err))
	}
}
