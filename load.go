package imgcache

import (
	"context"
	"encoding"
	"errors"
	"fmt"
	"log/slog"
	"strconv"
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
	rkey := c.l2.key(k)
	data, g, gok, err := c.readWithGen(ctx, k, rkey)
	switch {
	case errors.Is(err, redis.Nil):
		c.l2.debug(ctx, "GET", rkey, "MISS")
		c.guard.record(ctx, false)
		return nil, false, false
	case err != nil:
		c.l2.debug(ctx, "GET", rkey, "ERROR")
		c.countL2Error(err)
		return nil, false, true
	}
	e, err = c.decodeChecked(ctx, k, rkey, data, g, gok, nil)
	fresh := err == nil && e.exp > preciseNow()
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

// readWithGen reads a value and its entity's current generation in one round trip: one MGET on a
// single Redis, a pipeline of two GETs on a Cluster (the keys are in different slots). It returns
// redis.Nil when the value is absent; gok is false when the generation is missing.
func (c *Cache[V]) readWithGen(ctx context.Context, k Key, rkey string) (data []byte, g uint64, gok bool, err error) {
	genKey := c.l2.entityGen(k.Entity(), k.ID())
	var vals [2]any
	if single, ok := c.l2.rdb.(*redis.Client); ok {
		err = c.l2.call(ctx, func(ctx context.Context) error {
			res, err := single.MGet(ctx, rkey, genKey).Result()
			if err == nil && len(res) == 2 {
				vals[0], vals[1] = res[0], res[1]
			}
			return err
		})
	} else {
		var a, b *redis.StringCmd
		err = c.l2.pipelined(ctx, func(ctx context.Context, p redis.Pipeliner) {
			a, b = p.Get(ctx, rkey), p.Get(ctx, genKey)
		})
		if err == nil {
			if s, e := a.Result(); e == nil {
				vals[0] = s
			}
			if s, e := b.Result(); e == nil {
				vals[1] = s
			}
		}
	}
	if err != nil {
		return nil, 0, false, err
	}
	s, ok := vals[0].(string)
	if !ok {
		return nil, 0, false, redis.Nil
	}
	if gs, ok := vals[1].(string); ok {
		if g, err = strconv.ParseUint(gs, 10, 64); err != nil {
			return nil, 0, false, err
		}
		gok = true
	}
	return []byte(s), g, gok, nil
}

var (
	errStale  = errors.New("value was written before an invalidation of its entity or tags")
	errL2Call = errors.New("redis call failed")
)

// decodeChecked decodes a value read from Redis and checks its stamp against the current
// generations: the entity's (g, gok: missing means invalid) and its tags', read now unless known
// already holds them. An unreadable value is deleted and counted; a stale one is counted. Both are
// misses.
func (c *Cache[V]) decodeChecked(ctx context.Context, k Key, rkey string, data []byte, g uint64, gok bool, known []tagGen) (*l1entry[V], error) {
	e := new(l1entry[V])
	env, err := decodeEnvelope(data, c.codecID, c.maxValue)
	if err == nil && !env.negative {
		err = c.decode(env.payload, &e.val)
	}
	if err != nil {
		c.stats.l2Errors.Add(1)
		c.stats.l2Unreadable.Add(1)
		c.logError(ctx, "decode", k.String(), err)
		c.delUnreadable(ctx, rkey, data)
		return nil, err
	}
	stale := !gok || env.entityGen != g
	if !stale && env.ntags > 0 {
		var missing []string
		env.eachTag(func(tag []byte, gen uint64) {
			e.tags = append(e.tags, string(tag))
			if cur, ok := lookupTag(known, string(tag)); ok {
				stale = stale || cur != gen
			} else {
				missing = append(missing, string(tag))
			}
		})
		if !stale && len(missing) > 0 {
			cur, err := c.tagGenerations(ctx, missing)
			if err != nil {
				c.countL2Error(err)
				return nil, errL2Call
			}
			env.eachTag(func(tag []byte, gen uint64) {
				if g, ok := lookupTag(cur, string(tag)); ok && g != gen {
					stale = true
				}
			})
			stale = stale || len(cur) < len(missing) // a missing meta hash: evicted or expired
		}
	}
	if stale {
		c.stats.l2Stale.Add(1)
		c.delUnreadable(ctx, rkey, data)
		return nil, errStale
	}
	e.negative, e.expMs, e.wid = env.negative, env.expiryMs, xxhash.Sum64(data)
	// The envelope carries the L2 expiry, so L1 can stop at it without asking Redis for the PTTL.
	c.stamp(e, time.Duration(env.expiryMs-time.Now().UnixMilli())*time.Millisecond)
	return e, nil
}

func lookupTag(gens []tagGen, tag string) (uint64, bool) {
	for _, t := range gens {
		if t.tag == tag {
			return t.gen, true
		}
	}
	return 0, false
}

// tagGenerations reads the current generations of tags; a tag whose meta hash is missing is left
// out of the result.
func (c *Cache[V]) tagGenerations(ctx context.Context, tags []string) ([]tagGen, error) {
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
	return out, nil
}

// countL2Error counts a failed Redis call; a call the breaker skipped is counted there instead.
func (c *Cache[V]) countL2Error(err error) {
	if !errors.Is(err, ErrBreakerOpen) {
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
// of each, and returns their generations; with bumpDelete it also moves the entity's delete epoch
// (Set does, so that loads in flight drop their writes rather than race it). With get it also reads
// the value and the pattern epoch, in the same round trip.
func (c *Cache[V]) register(ctx context.Context, k Key, tags []string, ttl time.Duration, bumpDelete, get bool) (reg registration, data []byte, err error) {
	ks := k.String()
	bump := "0"
	if bumpDelete {
		bump = "1"
	}
	metaMs := metaTTL(ttl).Milliseconds()
	var getCmd, epochCmd *redis.StringCmd
	entityCmd := new(redis.Cmd)
	tagCmds := make([]*redis.Cmd, len(tags))
	if err := c.l2.pipelined(ctx, func(ctx context.Context, p redis.Pipeliner) {
		epochCmd = p.Get(ctx, c.l2.epochKey()) // always: the load's verify compares against it
		if get {
			getCmd = p.Get(ctx, c.l2.prefix+ks)
		}
		entityCmd = eval(ctx, p, registerScript, []string{c.l2.entityMeta(k.Entity(), k.ID()), c.l2.entityGen(k.Entity(), k.ID())},
			newGeneration(), metaMs, ks[len(ks)-16:], bump, ttl.Milliseconds())
		for i, t := range tags {
			tagCmds[i] = eval(ctx, p, registerScript, []string{c.l2.tagMeta(t)}, newGeneration(), metaMs, ks, "0", ttl.Milliseconds())
		}
	}); err != nil {
		return reg, nil, err
	}
	if reg.st.entityGen, reg.d, err = metaReply(entityCmd); err != nil {
		return reg, nil, err
	}
	for i, cmd := range tagCmds {
		g, _, err := metaReply(cmd)
		if err != nil {
			return reg, nil, err
		}
		reg.st.tags = append(reg.st.tags, tagGen{tags[i], g})
	}
	if reg.epoch, err = epochCmd.Result(); err != nil && !errors.Is(err, redis.Nil) {
		return reg, nil, err
	}
	if get {
		if data, err = getCmd.Bytes(); err != nil && !errors.Is(err, redis.Nil) {
			return reg, nil, err
		}
	}
	return reg, data, nil
}

// writeVerified writes a loaded value and then checks that no Delete, Set or InvalidatePattern
// moved the epochs it registered under while it loaded; if one did, it removes its write (only if
// it is still there), tells the other instances, which may have read it meanwhile, and reports
// false. Invalidations by entity or tag need no check: they move a generation, and the value's
// stamp then reads as stale. A write that may have landed but could not be checked (its reply or
// the check timed out) is taken back the same way: only a reply from Redis proves it did not land.
func (c *Cache[V]) writeVerified(ctx context.Context, k Key, rkey string, data []byte, ttl time.Duration, absent bool, reg registration) bool {
	args := []any{"set", rkey, data, "px", ttl.Milliseconds()}
	if absent {
		args = append(args, "nx") // never over a value someone stored while this one loaded
	}
	set := redis.NewStatusCmd(ctx, args...)
	d, epoch := new(redis.StringCmd), new(redis.StringCmd)
	sent := false
	_ = c.l2.ordered(ctx, // l2.ordered applies the L2Timeout budget; replies are read per command
		func(p redis.Pipeliner) { sent = true; _ = p.Process(ctx, set) },
		func(p redis.Pipeliner) {
			d = p.HGet(ctx, c.l2.entityMeta(k.Entity(), k.ID()), "d")
			epoch = p.Get(ctx, c.l2.epochKey())
		})
	setErr := set.Err()
	if sent {
		c.l2.debugSet(ctx, rkey, ttl, setErr)
	}
	if !sent || isReply(setErr) {
		// Not written: the breaker skipped it, NX found the key taken, or Redis refused (OOM).
		if setErr != nil && !errors.Is(setErr, redis.Nil) {
			c.countL2Error(setErr)
			c.logError(ctx, "L2 write", k.String(), setErr)
		}
		return true
	}
	dNow, err := d.Uint64()
	epochNow, err2 := epoch.Result()
	if errors.Is(err2, redis.Nil) {
		err2 = nil
	}
	if setErr == nil && err == nil && err2 == nil && dNow == reg.d && epochNow == reg.epoch {
		return true
	}
	if err = errors.Join(setErr, err, err2); err != nil {
		c.countL2Error(err)
	} else {
		c.stats.loadsSuperseded.Add(1)
	}
	// Moved, or unknown: the write may be stale, so take it back, and make sure no instance keeps
	// a copy it read in between.
	c.delUnreadable(ctx, rkey, data)
	c.send(ctx, busKeys, []string{k.s})
	return false
}

// callLoad runs load, turning a panic into an error so that one bad load cannot crash the service
// or leave the flight's waiters blocked. Under a deadline (LoadTimeout) it returns when the deadline
// passes even if load ignores its context; the load's goroutine then finishes on its own, and Close
// waits for it.
func (c *Cache[V]) callLoad(ctx context.Context, load func(context.Context) (V, error)) (v V, err error) {
	call := func() (v V, err error) {
		defer func() {
			if r := recover(); r != nil {
				err = fmt.Errorf("load panicked: %v", r)
			}
		}()
		return load(ctx)
	}
	if _, ok := ctx.Deadline(); !ok {
		return call()
	}
	type result struct {
		v   V
		err error
	}
	done := make(chan result, 1)
	c.flights.wg.Add(1) // the calling flight holds the group open, so this cannot race close's Wait
	go func() {
		defer c.flights.wg.Done()
		v, err := call()
		done <- result{v, err}
	}()
	select {
	case r := <-done:
		return r.v, r.err
	case <-ctx.Done():
		return v, ctx.Err()
	}
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
