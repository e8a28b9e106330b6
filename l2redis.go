package imgcache

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"strconv"
	"time"

	"github.com/redis/go-redis/v9"
)

// l2 is the shared level: Redis, through any go-redis UniversalClient. Every call runs under its own
// deadline of timeout, whatever the caller's context allows, so a slow or silent Redis costs a
// request at most about that much.
type l2 struct {
	rdb     redis.UniversalClient
	prefix  string // "<Namespace>:"
	epoch   string // the pattern epoch's key, "<Namespace>:%p"
	timeout time.Duration
	log     *slog.Logger // nil when debug logging is off
	brk     *breaker     // nil when disabled
	reads   readBatcher  // l2batch.go
	conns   readConns    // l2conns.go
}

// call runs one Redis round trip under the breaker and the L2Timeout budget. redis.Nil (an absent
// key) is a reply, not an error, to the breaker.
func (l *l2) call(ctx context.Context, f func(ctx context.Context) error) error {
	if err := ctx.Err(); err != nil {
		return &leftQueue{err} // the caller has left: do not ask Redis, and do not count it
	}
	if !l.brk.allow() {
		return ErrBreakerOpen
	}
	// A caller's deadline shorter than a tenth of L2Timeout says little about Redis when it passes:
	// such a call does not count for the breaker. A longer one does: a healthy Redis answers in
	// well under a millisecond.
	now := preciseNow()
	deadline := now + int64(l.timeout)
	var cctx context.Context
	short := false
	callerDeadline := maxInt64
	if dl, ok := ctx.Deadline(); ok {
		callerDeadline = int64(dl.Sub(clockEpoch))
		short = callerDeadline-now < int64(l.timeout/10)
		if callerDeadline <= deadline {
			cctx = ctx // the caller's deadline comes first: it bounds the call alone
		}
	}
	if cctx == nil {
		cctx = newCallCtx(ctx, deadline)
	}
	if cctx == nil { // every Cache is closed: no clock goroutine would end the call's waits
		var cancel context.CancelFunc
		cctx, cancel = context.WithTimeout(ctx, l.timeout)
		defer cancel()
	}
	// A call that panics (in a go-redis hook) says nothing about Redis; if it was the half-open
	// probe, the next call must be able to probe, or the breaker would stay open for ever.
	finished := false
	defer func() {
		if !finished {
			l.brk.abandon()
		}
	}()
	err := f(cctx)
	finished = true
	// A callCtx (a batch's, l2batch.go) reports its deadline a clock tick late: read the clock.
	if cerr := ctx.Err(); errors.Is(cerr, context.Canceled) || (short && (cerr != nil || preciseNow() >= callerDeadline)) {
		l.brk.abandon()
		return err
	}
	l.brk.observe(pipelineErr(err))
	return err
}

// pipelined runs a pipeline through call. Its error is firstFailure's: the first failed command's
// that is not an absent key's redis.Nil.
func (l *l2) pipelined(ctx context.Context, f func(ctx context.Context, p redis.Pipeliner)) error {
	return l.call(ctx, func(ctx context.Context) error {
		cmds, err := l.rdb.Pipelined(ctx, func(p redis.Pipeliner) error { f(ctx, p); return nil })
		return firstFailure(err, cmds...)
	})
}

// checkClient refuses a client that would ignore the per-call deadline. go-redis applies a context's
// deadline to the socket only with ContextTimeoutEnabled; without it a blackholed Redis holds every
// call for ReadTimeout (3 s by default), far past L2Timeout.
func checkClient(c redis.UniversalClient) error {
	var enabled bool
	switch c := c.(type) {
	case *redis.Client:
		enabled = c.Options().ContextTimeoutEnabled
	case *redis.ClusterClient:
		enabled = c.Options().ContextTimeoutEnabled
	case *redis.Ring:
		enabled = c.Options().ContextTimeoutEnabled
	default:
		return fmt.Errorf("imgcache: Options.Redis: cannot tell whether a %T honours context deadlines; "+
			"pass a *redis.Client, *redis.ClusterClient or *redis.Ring (redis.NewUniversalClient returns one)", c)
	}
	if !enabled {
		return errors.New("imgcache: Options.Redis: set ContextTimeoutEnabled: true in the client's options; " +
			"without it go-redis ignores context deadlines and a stalled Redis blocks calls for ReadTimeout instead of L2Timeout")
	}
	return nil
}

// key returns the Redis key of a valid k's value, built in one allocation.
func (l *l2) key(k Key) string { return l.keyOf("", k) }

// keyOf returns "<ns>:<kind><k>", the Redis key of this kind of k's ("" for its value), built in
// one allocation.
func (l *l2) keyOf(kind string, k Key) string { return l.prefix + kind + k.redis() }

// readKeys returns the Redis keys of a valid k's value and of its entity's generation, built in
// one allocation: a read needs both.
func (l *l2) readKeys(k Key) (rkey, genKey string) {
	var buf [256]byte
	b := append(append(buf[:0], l.prefix...), k.redis()...)
	n := len(b)
	s := string(l.appendEntityGen(b, k))
	return s[:n], s[n:]
}

// set writes val with its TTL in the same command (SET key val PX ms): there is no moment at which the
// key exists without a TTL. The TTL is truncated to whole milliseconds, Redis's resolution.
func (l *l2) set(ctx context.Context, rkey string, val []byte, ttl time.Duration) error {
	err := l.call(ctx, func(ctx context.Context) error {
		return l.rdb.Process(ctx, redis.NewStatusCmd(ctx, "set", rkey, val, "px", ttl.Milliseconds()))
	})
	l.debugSet(ctx, rkey, ttl, err)
	return err
}

// debugSet logs a SET; a conditional SET that found the key taken (redis.Nil) logs as SKIPPED.
func (l *l2) debugSet(ctx context.Context, rkey string, ttl time.Duration, err error) {
	if l.log != nil && l.log.Enabled(ctx, slog.LevelDebug) {
		result := "OK"
		switch {
		case errors.Is(err, redis.Nil):
			result = "SKIPPED"
		case err != nil:
			result = "ERROR"
		}
		l.log.LogAttrs(ctx, slog.LevelDebug, "imgcache L2 SET",
			slog.String("key", rkey), slog.Duration("ttl", ttl), slog.String("result", result))
	}
}

// del removes keys one command each, pipelined: a multi-key DEL would fail with CROSSSLOT on a Redis
// Cluster, while a pipeline is split by node.
func (l *l2) del(ctx context.Context, rkeys ...string) error {
	if len(rkeys) == 0 {
		return nil
	}
	err := l.pipelined(ctx, func(ctx context.Context, p redis.Pipeliner) {
		for _, k := range rkeys {
			p.Unlink(ctx, k)
		}
	})
	for _, k := range rkeys {
		l.debug(ctx, "DEL", k, resultOf(err))
	}
	return err
}

// delIfUnchanged deletes rkey only if it still holds val: an unreadable value is removed without
// racing a writer that has just replaced it with a good one.
var delIfUnchanged = redis.NewScript(`
if redis.call('GET', KEYS[1]) == ARGV[1] then
	return redis.call('DEL', KEYS[1])
end
return 0`)

func (l *l2) delUnreadable(ctx context.Context, rkey string, val []byte) error {
	return l.call(ctx, func(ctx context.Context) error {
		return delIfUnchanged.Run(ctx, l.rdb, []string{rkey}, val).Err()
	})
}

func (l *l2) debug(ctx context.Context, op, rkey, result string) {
	if l.log != nil && l.log.Enabled(ctx, slog.LevelDebug) {
		l.log.LogAttrs(ctx, slog.LevelDebug, "imgcache L2 "+op, slog.String("key", rkey), slog.String("result", result))
	}
}

// Bookkeeping keys live under the namespace, behind a '%' that escaping never puts in front of a
// non-hex letter, so no data key and no pattern over data keys can name them:
//
//	<ns>:%e:{<entity>:<id>} hash: generation "g", delete epoch "d", prune mark "p", one field per
//	                        stored variant (its value's expiry)
//	<ns>:%g:{<entity>:<id>} the generation again, as a string, so that a read fetches it with the
//	                        value in one MGET; the hash tag keeps it in the hash's slot, and the
//	                        scripts keep the two in step
//	<ns>:%t:<tag>           hash: as the entity's, one field per tagged key
//	<ns>:%p                 the pattern epoch, bumped by InvalidatePattern
//	<ns>:%bus               the pub/sub channel (not a key)
//
// A script touches one meta hash, and for an entity its generation key, which shares the hash's
// slot; so every script works on a Redis Cluster. Each key carries a TTL: a meta hash outlives the
// longest-lived value registered in it by metaTTL's margin.
func (l *l2) entityMeta(entity, id string) string { return l.entityKey("%e:", escapedHead(entity, id)) }
func (l *l2) entityGen(entity, id string) string  { return l.entityKey("%g:", escapedHead(entity, id)) }

// entityMetaOf and entityGenOf are entityMeta and entityGen of a valid k's entity, from the
// escaped parts that k holds.
func (l *l2) entityMetaOf(k Key) string { return l.entityKey("%e:", k.escapedHead()) }
func (l *l2) entityGenOf(k Key) string  { return l.entityKey("%g:", k.escapedHead()) }

// entityKey returns "<ns>:<kind>{<head>}", an entity's bookkeeping key of this kind ("%e:",
// "%g:"), head being its escaped "<entity>:<id>". The braces make a Redis Cluster hash tag
// (escaping leaves none in entity or id): an entity's keys share one slot.
func (l *l2) entityKey(kind, head string) string { return l.prefix + kind + "{" + head + "}" }

// appendEntityGen appends entityGenOf(k) to b, for a valid k: a read builds its keys in one buffer.
func (l *l2) appendEntityGen(b []byte, k Key) []byte {
	b = append(append(append(b, l.prefix...), "%g:{"...), k.escapedHead()...)
	return append(b, '}')
}

// tagMeta returns a tag's meta hash key, in one allocation.
func (l *l2) tagMeta(tag string) string {
	var buf [256]byte
	return string(appendEscaped(append(append(buf[:0], l.prefix...), "%t:"...), tag))
}

func (l *l2) epochKey() string { return l.epoch }

// oneNode reports whether every key lives on one node (a *redis.Client: one Redis, or Sentinel's
// failover client), so that one round trip's commands run in order, with nothing between them
// from this round trip's other commands.
func (l *l2) oneNode() bool {
	_, single := l.rdb.(*redis.Client)
	return single
}

func (l *l2) channel() string { return l.prefix + "%bus" }

// metaTTL is how long a meta hash lives past the values registered in it: long enough that a value
// never outlives the generation it is checked against (it would read as invalid, which is safe,
// but a wasted miss), short enough that bookkeeping does not linger.
func metaTTL(ttl time.Duration) time.Duration { return ttl + max(ttl/10, 5*time.Second) }

// epochTTL bounds the pattern epoch's life. If it expires while a load is in flight, that load
// sees a change and drops its write: safe.
const epochTTL = 24 * time.Hour

// registerScript returns a meta hash's generation and delete epoch, creating the hash with the
// given initial generation if it is missing, registers a member if one is given, optionally bumps
// the delete epoch first, and extends the TTL to at least ARGV[2] ms. With KEYS[2], an entity's
// generation key, it keeps that key equal to the hash's generation and alive as long.
//
// A member's field holds its value's expiry by Redis's own clock (TIME, so no host's clock is
// involved), so that members whose values have expired can be dropped: whenever the hash has grown
// past twice what the last prune kept ("p", at least 64 fields), it drops the expired ones. A tag on
// an endless stream of new keys therefore keeps only its live members, at O(1) amortised cost.
//
// Every call inside a script costs Redis about a microsecond on top of the command's own work, and
// this script runs on every miss and Set: it reads the hash's fields in one HMGET, writes them in
// one HSET, and skips the checks whose answers it knows (a hash it has just created has no TTL and
// three fields; a member already there leaves the hash's size as it was). A new entity costs 5
// calls.
var registerScript = redis.NewScript(`
local m = redis.call('HMGET', KEYS[1], 'g', 'd', 'p')
local g, d = m[1], m[2]
local ttl = tonumber(ARGV[2])
local created = not g
local fields = {}
if created then
	g, d = ARGV[1], '0'
	if ARGV[4] == '1' then d = '1' end
	fields = {'g', g, 'd', d}
elseif ARGV[4] == '1' then
	-- Delete epochs stay far below 2^53, where a Lua number prints as an integer.
	d = string.format('%d', redis.call('HINCRBY', KEYS[1], 'd', 1))
end
local now
if ARGV[3] ~= '' then
	local t = redis.call('TIME')
	now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
	fields[#fields + 1] = ARGV[3]
	fields[#fields + 1] = now + tonumber(ARGV[5])
end
if #fields > 0 and redis.call('HSET', KEYS[1], unpack(fields)) > 0 and not created
	and redis.call('HLEN', KEYS[1]) > tonumber(m[3] or '64') then
	local all = redis.call('HGETALL', KEYS[1])
	local kept = 0
	for i = 1, #all, 2 do
		local f = all[i]
		if f ~= 'g' and f ~= 'd' and f ~= 'p' then
			if tonumber(all[i + 1]) < now then redis.call('HDEL', KEYS[1], f) else kept = kept + 1 end
		end
	end
	redis.call('HSET', KEYS[1], 'p', math.max(64, 2 * kept + 3))
end
if KEYS[2] then
	if created or redis.call('GET', KEYS[2]) ~= g then
		redis.call('SET', KEYS[2], g, 'PX', ttl)
	elseif redis.call('PTTL', KEYS[2]) < ttl then
		redis.call('PEXPIRE', KEYS[2], ttl)
	end
end
if created or redis.call('PTTL', KEYS[1]) < ttl then redis.call('PEXPIRE', KEYS[1], ttl) end
return {g, d}`)

// bumpDeleteScript bumps an existing meta hash's delete epoch; it never creates one.
var bumpDeleteScript = redis.NewScript(`
if redis.call('EXISTS', KEYS[1]) == 1 then return redis.call('HINCRBY', KEYS[1], 'd', 1) end
return 0`)

// invalidateScript bumps a meta hash's generation and delete epoch, and an entity's generation key
// (KEYS[2]) with it, and returns and forgets the hash's members. Without the hash (evicted) it
// still bumps the generation key, which is what reads check.
var invalidateScript = redis.NewScript(`
if redis.call('EXISTS', KEYS[1]) == 0 then
	if KEYS[2] and redis.call('EXISTS', KEYS[2]) == 1 then redis.call('INCR', KEYS[2]) end
	return {}
end
redis.call('HINCRBY', KEYS[1], 'g', 1)
redis.call('HINCRBY', KEYS[1], 'd', 1)
-- The new generation as Redis's string: HINCRBY's reply is a Lua number, a double, which loses
-- digits past 2^53 (generations start at random values up to 2^62) and passed to SET would be
-- written in exponent form.
local g = redis.call('HGET', KEYS[1], 'g')
if KEYS[2] and redis.call('EXISTS', KEYS[2]) == 1 then redis.call('SET', KEYS[2], g, 'KEEPTTL') end
local members = {}
for _, f in ipairs(redis.call('HKEYS', KEYS[1])) do
	if f ~= 'g' and f ~= 'd' and f ~= 'p' then
		members[#members + 1] = f
		redis.call('HDEL', KEYS[1], f)
	end
end
return members`)

var bumpEpochScript = redis.NewScript(`
local v = redis.call('INCR', KEYS[1])
redis.call('PEXPIRE', KEYS[1], ARGV[1])
return v`)

// eval runs a script inside a pipeline as EVAL, which carries the script's text: for the rare
// paths (invalidations, clean-ups), where a retry after NOSCRIPT would complicate their ordering.
// The hot paths use scriptCalls.
func eval(ctx context.Context, p redis.Pipeliner, s *redis.Script, keys []string, args ...any) *redis.Cmd {
	return s.Eval(ctx, p, keys, args...)
}

// loadScripts caches scripts in Redis, on every node, so that their first calls need no NOSCRIPT
// retry. It is best effort, bounded by L2Timeout: a Redis that is down now, or restarts later,
// costs the first calls one more round trip each, nothing else.
func (l *l2) loadScripts(ctx context.Context, scripts ...*redis.Script) {
	ctx, cancel := context.WithTimeout(ctx, l.timeout)
	defer cancel()
	load := func(ctx context.Context, c redis.Scripter) error {
		for _, s := range scripts {
			if err := s.Load(ctx, c).Err(); err != nil {
				return err
			}
		}
		return nil
	}
	if r, ok := l.rdb.(*redis.Ring); ok { // a Ring would send SCRIPT LOAD to one shard only
		_ = r.ForEachShard(ctx, func(ctx context.Context, shard *redis.Client) error { return load(ctx, shard) })
		return
	}
	_ = load(ctx, l.rdb) // a ClusterClient loads on every master itself
}

// scriptCalls are the script calls of one pipeline, sent as EVALSHA: Redis neither receives nor
// hashes the script's text on every call (registerScript is over a kilobyte). A Redis whose script
// cache is empty (restarted, or SCRIPT FLUSH) answers NOSCRIPT; retry then sends those calls again
// as EVAL, which also caches the script for the next ones. A NOSCRIPT reply means the script did
// not run, so running it again is safe, whatever else the pipeline held.
type scriptCalls []scriptCall

type scriptCall struct {
	cmd  *redis.Cmd
	s    *redis.Script
	keys []string
	args []any
}

// run queues s in p and returns its command, whose result retry may replace.
func (sc *scriptCalls) run(ctx context.Context, p redis.Pipeliner, s *redis.Script, keys []string, args ...any) *redis.Cmd {
	cmd := s.EvalSha(ctx, p, keys, args...)
	*sc = append(*sc, scriptCall{cmd, s, keys, args})
	return cmd
}

// retry sends again, as EVAL in one more round trip, the calls that Redis answered NOSCRIPT, and
// puts their results in the original commands.
func (sc scriptCalls) retry(ctx context.Context, l *l2) {
	var again []scriptCall
	for _, c := range sc {
		if err := c.cmd.Err(); err != nil && redis.HasErrorPrefix(err, "NOSCRIPT") {
			again = append(again, c)
		}
	}
	if len(again) == 0 {
		return
	}
	cmds := make([]*redis.Cmd, len(again))
	err := l.pipelined(ctx, func(ctx context.Context, p redis.Pipeliner) {
		for i, c := range again {
			cmds[i] = c.s.Eval(ctx, p, c.keys, c.args...)
		}
	})
	for i, c := range again {
		if cmds[i] == nil { // the pipeline did not run (the breaker is open, the caller left)
			c.cmd.SetErr(err)
			continue
		}
		c.cmd.SetVal(cmds[i].Val())
		c.cmd.SetErr(cmds[i].Err())
	}
}

// newGeneration is the first generation of a meta hash: random, so that a hash that was evicted
// and created again cannot repeat a generation an old value was stamped with. Later generations
// come from Redis (HINCRBY); no host's clock is involved.
func newGeneration() uint64 { return rand.Uint64()>>2 | 1 }

// metaReply parses registerScript's {g, d}.
func metaReply(cmd *redis.Cmd) (g, d uint64, err error) {
	vals, err := cmd.Slice()
	if err != nil {
		return 0, 0, err
	}
	if len(vals) != 2 {
		return 0, 0, fmt.Errorf("meta reply has %d fields", len(vals))
	}
	gs, _ := vals[0].(string)
	ds, _ := vals[1].(string)
	if g, err = strconv.ParseUint(gs, 10, 64); err == nil {
		d, err = strconv.ParseUint(ds, 10, 64)
	}
	return g, d, err
}

// genReply parses an HGET of a generation: ok is false when the hash or field is missing.
func genReply(cmd *redis.StringCmd) (gen uint64, ok bool, err error) {
	s, err := cmd.Result()
	if errors.Is(err, redis.Nil) {
		return 0, false, nil
	}
	if err != nil {
		return 0, false, err
	}
	gen, err = strconv.ParseUint(s, 10, 64)
	return gen, err == nil, err
}

// ordered runs steps so that each finishes before the next starts: in one pipeline on a single
// Redis (which executes one connection's commands in order), or one round trip per step when the
// keys may live on different nodes (Cluster, Ring). Invalidation and the verify-after-write of
// loads rely on this order. Once the first step has been sent, the others are not cut short by
// ctx's end (Close, a caller leaving, a load's timeout): a write left unverified, or an
// invalidation half done, would leave a stale value; each step is still bounded by L2Timeout. A
// redis.Nil reply (an absent key) is not an error here. A later step's error is an afterChange.
func (l *l2) ordered(ctx context.Context, steps ...func(redis.Pipeliner)) error {
	if l.oneNode() {
		return l.pipelined(ctx, func(_ context.Context, p redis.Pipeliner) {
			for _, s := range steps {
				s(p)
			}
		})
	}
	for i, s := range steps {
		if i == 1 {
			ctx = context.WithoutCancel(ctx)
		}
		if err := l.pipelined(ctx, func(_ context.Context, p redis.Pipeliner) { s(p) }); err != nil {
			if i > 0 {
				return afterChange{err} // the steps before changed Redis
			}
			return err
		}
	}
	return nil
}

// orderedAll is ordered for steps whose commands are read one by one: on a Cluster or a Ring, a
// later step runs even when an earlier one failed in part (one node refused or lost its commands,
// the others answered), as long as the first was sent and did not fail for want of time: a step
// that timed out says the next would likely wait as long. It returns the first error.
func (l *l2) orderedAll(ctx context.Context, steps ...func(redis.Pipeliner)) error {
	if l.oneNode() || len(steps) == 0 {
		return l.ordered(ctx, steps...)
	}
	sent := false
	first := l.pipelined(ctx, func(_ context.Context, p redis.Pipeliner) { sent = true; steps[0](p) })
	if !sent || failedSlowly(first) {
		return first
	}
	ctx = context.WithoutCancel(ctx)
	var errs error
	for _, s := range steps[1:] {
		if err := l.pipelined(ctx, func(_ context.Context, p redis.Pipeliner) { s(p) }); err != nil && errs == nil {
			errs = afterChange{err}
		}
	}
	if first != nil {
		return first
	}
	return errs
}

// pipelineErr drops redis.Nil, which a pipeline returns when any of its commands read an absent key.
func pipelineErr(err error) error {
	if errors.Is(err, redis.Nil) {
		return nil
	}
	return err
}

// scanEach runs SCAN MATCH over every master (one node, each Cluster master, each Ring shard) and
// calls fn with each batch and the client of the node that holds it. On a Cluster or a Ring the
// nodes are walked concurrently (ForEachMaster, ForEachShard), so fn runs on several goroutines at
// once: what it shares must be synchronised.
func (l *l2) scanEach(ctx context.Context, match string, fn func(ctx context.Context, node redis.Cmdable, keys []string) error) error {
	scan := func(ctx context.Context, node *redis.Client) error {
		var cursor uint64
		for {
			var keys []string
			var next uint64
			err := l.call(ctx, func(ctx context.Context) (err error) {
				keys, next, err = node.Scan(ctx, cursor, match, scanCount).Result()
				return err
			})
			if err != nil {
				return err
			}
			if len(keys) > 0 {
				if err := fn(ctx, node, keys); err != nil {
					return err
				}
			}
			if cursor = next; cursor == 0 {
				return nil
			}
		}
	}
	switch c := l.rdb.(type) {
	case *redis.Client:
		return scan(ctx, c)
	case *redis.ClusterClient:
		return c.ForEachMaster(ctx, scan)
	case *redis.Ring:
		return c.ForEachShard(ctx, scan)
	}
	return fmt.Errorf("cannot scan a %T", l.rdb)
}

// scanCount is SCAN's COUNT hint: enough keys per round trip to cross a large keyspace quickly,
// few enough that one call never holds Redis for long.
const scanCount = 1000

func (l *l2) publish(ctx context.Context, msg []byte) error {
	return l.call(ctx, func(ctx context.Context) error { return l.rdb.Publish(ctx, l.channel(), msg).Err() })
}
