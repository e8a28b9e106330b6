package imgcache

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync/atomic"
	"unicode/utf8"

	"github.com/redis/go-redis/v9"
)

// How invalidation works.
//
// Every entity id ("artist", "123") and every tag has a small meta hash in Redis (see l2redis.go)
// holding a generation g, a delete epoch d and its members. A value is written with a stamp: the
// generations of its entity and tags as read before its load. A reader compares the stamp with the
// current generations and treats a mismatch, or a missing meta hash (evicted, expired), as a miss.
// So InvalidateEntity and InvalidateTags cost one script per meta hash plus an UNLINK per member,
// whatever else the keyspace holds, and a load that began before them can only ever store a value
// that reads as invalid.
//
// Delete and InvalidatePattern cannot bump a generation for keys that are not there yet, so a
// load that began before them would otherwise store its (stale) result afterwards. Loads therefore
// verify after writing: they re-read their entity's delete epoch d and the namespace's pattern
// epoch, and if either moved while they ran they remove their own write (only if it is still
// theirs). Delete and InvalidatePattern bump the epoch before they delete, so either the load sees
// the bump, or its write finished before the bump and the delete, which comes after, removes it.
//
// The L1 of every instance follows through the bus (bus.go). Locally, each L1 fill is checked
// against a sequence that every invalidation bumps before it removes entries, under the shard
// lock, so an L2 read or load that was in flight during an invalidation is not stored in L1.

// WithTags attaches tags (such as "artist:123", "album:9") to the value, so that InvalidateTags
// removes it. A value has at most 32 tags of at most 256 bytes each, with no control characters.
func WithTags(tags ...string) SetOption {
	return func(o *setOptions) { o.tags = append(o.tags, tags...) }
}

func checkTags(tags []string) error {
	if len(tags) > maxTags {
		return fmt.Errorf("%d tags, at most %d allowed", len(tags), maxTags)
	}
	for _, t := range tags {
		switch {
		case t == "":
			return errors.New("empty tag")
		case len(t) > maxTagLen:
			return fmt.Errorf("tag of %d bytes is longer than %d", len(t), maxTagLen)
		case hasControl(t) || !utf8.ValidString(t):
			return fmt.Errorf("tag %q has a control character or invalid UTF-8", t)
		}
	}
	return nil
}

// Delete removes the keys from both levels and from the L1 of every instance on the namespace.
// L1 copies go first and always; if Redis fails Delete returns the error, wrapped, and its message
// to the other instances waits until Redis answers (Redis may have changed in part). A load of one
// of the keys that was in flight does not store its result afterwards. It returns ErrClosed after
// Close, and an error naming the first invalid key, in which case nothing is deleted.
func (c *Cache[V]) Delete(ctx context.Context, ks ...Key) error {
	for _, k := range ks {
		if err := c.check(k); err != nil {
			return err
		}
	}
	if len(ks) == 0 {
		return nil
	}
	c.dropL1Keys(ks)
	if c.l2 == nil {
		return nil
	}
	err := c.l2.ordered(ctx,
		func(p redis.Pipeliner) {
			for _, k := range ks {
				eval(ctx, p, bumpDeleteScript, []string{c.l2.entityMetaOf(k)})
			}
		},
		func(p redis.Pipeliner) {
			for _, k := range ks {
				p.Unlink(ctx, c.l2.key(k))
			}
		})
	for _, k := range ks {
		c.l2.debug(ctx, "DEL", c.l2.key(k), resultOf(err))
	}
	// Again, now that Redis is clean (or, after a failure, may have changed in part): a read on
	// this instance between the first drop and the UNLINK may have refilled L1 with the old value,
	// and this instance ignores its own message.
	c.dropL1Keys(ks)
	items := make([]string, len(ks))
	for i, k := range ks {
		items[i] = k.canonical()
	}
	c.announce(ctx, err, busKeys, items)
	if err != nil {
		c.countL2Error(err)
		if len(ks) == 1 {
			return fmt.Errorf("imgcache: delete %s: %w", ks[0], err)
		}
		return fmt.Errorf("imgcache: delete %d keys: %w", len(ks), err)
	}
	return nil
}

// InvalidateEntity removes every cached value of NewKey(entity, id), whatever its parameters (every
// type and size of an artist's images), from Redis and from the L1 of every instance, and nothing
// else. The entity is normalised as NewKey does; the id is matched exactly. A load of one of those
// keys that was in flight cannot store a value that reads as valid afterwards. If Redis fails, it
// returns the error, wrapped, and its message to the other instances waits until Redis answers, as
// Delete's does.
func (c *Cache[V]) InvalidateEntity(ctx context.Context, entity, id string) error {
	k := NewKey(entity, id)
	if err := c.check(k); err != nil {
		return err
	}
	e, i := k.Entity(), k.ID()
	c.dropL1Entity(e, i)
	if c.l2 == nil {
		return nil
	}
	prefix := c.l2.prefix + entityPrefix(e, i)
	err := c.invalidateMetas(ctx, [][]string{{c.l2.entityMeta(e, i), c.l2.entityGen(e, i)}}, func(member string) string { return prefix + member })
	c.dropL1Entity(e, i) // again: see Delete
	c.announce(ctx, err, busEntity, []string{e, i})
	if err != nil {
		return fmt.Errorf("imgcache: invalidate entity %s: %w", strings.TrimSuffix(entityPrefix(e, i), ":"), err)
	}
	return nil
}

// InvalidateTags removes every value that carries any of the tags (see WithTags) from Redis and
// from the L1 of every instance. A load of a tagged key that was in flight cannot store a value that
// reads as valid afterwards. If Redis fails, it returns the error, wrapped, and its message to the
// other instances waits until Redis answers, as Delete's does.
func (c *Cache[V]) InvalidateTags(ctx context.Context, tags ...string) error {
	if c.closed.Load() {
		return ErrClosed
	}
	if err := checkTags(tags); err != nil {
		return fmt.Errorf("imgcache: invalidate tags: %w", err)
	}
	if len(tags) == 0 {
		return nil
	}
	c.dropL1Tags(tags)
	if c.l2 == nil {
		return nil
	}
	metas := make([][]string, len(tags))
	for i, t := range tags {
		metas[i] = []string{c.l2.tagMeta(t)}
	}
	err := c.invalidateMetas(ctx, metas, func(member string) string { return c.l2.prefix + member })
	c.dropL1Tags(tags) // again: see Delete
	c.announce(ctx, err, busTags, tags)
	if err != nil {
		return fmt.Errorf("imgcache: invalidate tags %q: %w", tags, err)
	}
	return nil
}

// invalidateMetas bumps the meta hashes' generations (each given with its generation key, for an
// entity) and then unlinks their members.
func (c *Cache[V]) invalidateMetas(ctx context.Context, metas [][]string, member func(string) string) error {
	cmds := make([]*redis.Cmd, len(metas))
	err := c.l2.pipelined(ctx, func(ctx context.Context, p redis.Pipeliner) {
		for i, keys := range metas {
			cmds[i] = eval(ctx, p, invalidateScript, keys)
		}
	})
	if err != nil {
		c.countL2Error(err)
		return err
	}
	var rkeys []string
	for _, cmd := range cmds {
		members, err := cmd.StringSlice()
		if err != nil {
			c.countL2Error(err)
			return err
		}
		for _, m := range members {
			rkeys = append(rkeys, member(m))
		}
	}
	if err := c.l2.del(ctx, rkeys...); err != nil {
		c.countL2Error(err)
		return afterChange{err}
	}
	return nil
}

// InvalidatePattern removes every cached value whose entity and id match pattern, from Redis and
// from the L1 of every instance, and returns how many values it removed from Redis. If Redis fails,
// it returns the error, wrapped, and its message to the other instances waits until Redis answers,
// as Delete's does.
//
// The pattern is "<entity>:<id>", split at the first ':' not escaped by '\'. In each part '*'
// matches any run of characters (none included), '\' makes the next character literal ("\*",
// "\:", "\\"), and everything else is literal: "album:*" (every album), "artist:12*" (ids starting
// with 12), "*:42" (id 42 of any entity). The entity part is trimmed and case-folded as NewKey does;
// the id part is matched exactly. Parameters are hashed into the key and cannot be matched: every
// variant of a matching entity id is removed.
//
// Redis is walked with SCAN (never KEYS), COUNT 1000 per call, on every master of a Cluster; each
// match is removed with UNLINK. The cost grows with the size of the namespace's keyspace, so prefer
// InvalidateEntity or InvalidateTags for routine invalidation.
func (c *Cache[V]) InvalidatePattern(ctx context.Context, pattern string) (int, error) {
	if c.closed.Load() {
		return 0, ErrClosed
	}
	p, err := parsePattern(pattern)
	if err != nil {
		return 0, err
	}
	c.dropL1Pattern(p)
	if c.l2 == nil {
		return 0, nil
	}
	fail := func(err error) (int, error) {
		c.countL2Error(err)
		c.dropL1Pattern(p) // again: see Delete
		c.announce(ctx, err, busPattern, []string{pattern})
		return 0, fmt.Errorf("imgcache: invalidate pattern %q: %w", pattern, err)
	}
	err = c.l2.call(ctx, func(ctx context.Context) error {
		return bumpEpochScript.Run(ctx, c.l2.rdb, []string{c.l2.epochKey()}, epochTTL.Milliseconds()).Err()
	})
	if err != nil {
		return fail(err)
	}
	var removed atomic.Int64 // scanEach walks a Cluster's masters concurrently
	err = c.l2.scanEach(ctx, p.redisMatch(c.l2.prefix), func(ctx context.Context, node redis.Cmdable, keys []string) error {
		var cmds []*redis.IntCmd
		err := c.l2.call(ctx, func(ctx context.Context) error {
			_, err := node.Pipelined(ctx, func(pl redis.Pipeliner) error {
				for _, rk := range keys {
					if e, id, ok := parseDataKey(strings.TrimPrefix(rk, c.l2.prefix)); ok && p.match(e, id) {
						cmds = append(cmds, pl.Unlink(ctx, rk))
					}
				}
				return nil
			})
			return err
		})
		for _, cmd := range cmds {
			removed.Add(cmd.Val())
		}
		return err
	})
	if err != nil {
		return fail(afterChange{err})
	}
	c.dropL1Pattern(p) // again: see Delete
	c.send(ctx, busPattern, []string{pattern})
	return int(removed.Load()), nil
}

// pattern is a parsed InvalidatePattern argument. Each part is a list of literal segments with a
// '*' between consecutive ones: "12*" is {"12", ""}, "*" is {"", ""}, "artist" is {"artist"}.
type pattern struct {
	entity, id []string
}

func parsePattern(s string) (pattern, error) {
	bad := func(why string) (pattern, error) {
		return pattern{}, fmt.Errorf("imgcache: invalid pattern %q: %s", s, why)
	}
	if !utf8.ValidString(s) || hasControl(s) {
		return bad("control character or invalid UTF-8")
	}
	var parts [2][]string
	part, seg := 0, strings.Builder{}
	for i := 0; i < len(s); i++ {
		switch ch := s[i]; {
		case ch == '\\':
			if i+1 == len(s) {
				return bad(`trailing '\'`)
			}
			i++
			seg.WriteByte(s[i])
		case ch == '*':
			parts[part] = append(parts[part], seg.String())
			seg.Reset()
		case ch == ':' && part == 0:
			parts[0] = append(parts[0], seg.String())
			seg.Reset()
			part = 1
		default:
			seg.WriteByte(ch)
		}
	}
	if part == 0 {
		return bad(`want "<entity>:<id>", such as "album:*"`)
	}
	parts[1] = append(parts[1], seg.String())
	// The entity is trimmed and case-folded like NewKey's.
	e := parts[0]
	e[0] = strings.TrimLeftFunc(e[0], isSpace)
	e[len(e)-1] = strings.TrimRightFunc(e[len(e)-1], isSpace)
	for i := range e {
		e[i] = strings.ToLower(e[i])
	}
	if len(e) == 1 && e[0] == "" {
		return bad("empty entity (use * for any)")
	}
	if len(parts[1]) == 1 && parts[1][0] == "" {
		return bad("empty id (use * for any)")
	}
	return pattern{entity: e, id: parts[1]}, nil
}

func isSpace(r rune) bool {
	return r == ' ' || r == '\t' || r == '\n' || r == '\r' || r == '\v' || r == '\f' || r == 0x85 || r == 0xA0
}

func (p pattern) match(entity, id string) bool {
	return globMatch(p.entity, entity) && globMatch(p.id, id)
}

// globMatch matches s against literal segments separated by '*'.
func globMatch(segs []string, s string) bool {
	if len(segs) == 1 {
		return s == segs[0]
	}
	if !strings.HasPrefix(s, segs[0]) {
		return false
	}
	s = s[len(segs[0]):]
	last := segs[len(segs)-1]
	for _, seg := range segs[1 : len(segs)-1] {
		i := strings.Index(s, seg)
		if i < 0 {
			return false
		}
		s = s[i+len(seg):]
	}
	return len(s) >= len(last) && strings.HasSuffix(s, last)
}

// redisMatch is a SCAN MATCH glob that every matching data key satisfies. Literal segments are
// escaped as keys are, which leaves no glob character in them; results are still checked with match,
// because a '*' in the glob can also match part of an escape sequence or a ':'.
func (p pattern) redisMatch(prefix string) string {
	glob := func(segs []string) string {
		var b []byte
		for i, seg := range segs {
			if i > 0 {
				b = append(b, '*')
			}
			b = appendEscaped(b, seg)
		}
		return string(b)
	}
	return prefix + glob(p.entity) + ":" + glob(p.id) + ":*"
}

// parseDataKey splits "<entity>:<id>:<16 hex>" and unescapes its parts; ok is false for anything
// else, bookkeeping keys included.
func parseDataKey(s string) (entity, id string, ok bool) {
	e, rest, ok1 := strings.Cut(s, ":")
	i, sum, ok2 := strings.Cut(rest, ":")
	if !ok1 || !ok2 || len(sum) != 16 || strings.Trim(sum, "0123456789abcdef") != "" {
		return "", "", false
	}
	if entity, ok = unescape(e); !ok {
		return "", "", false
	}
	id, ok = unescape(i)
	return entity, id, ok
}

// The L1 side of invalidation. Each bumps invSeq before it removes anything; see the comment at
// the top of this file.

func (c *Cache[V]) dropL1Keys(keys []Key) {
	for _, k := range keys {
		c.inv.key(k)
	}
	if c.l1 != nil {
		for _, k := range keys {
			c.l1.remove(k)
		}
	}
}

// dropL1Written applies another instance's Set of k, whose envelope hashes to wid. A copy read from
// that very write is kept: it is what a drop and a fresh read would give. That spares the reader who
// raced ahead of the message a second round trip. Loads already in flight are still kept out of L1,
// as by any invalidation of k.
func (c *Cache[V]) dropL1Written(k Key, wid uint64) {
	c.inv.key(k)
	if c.l1 != nil {
		c.l1.removeUnless(k, wid)
	}
}

func (c *Cache[V]) dropL1Entity(entity, id string) {
	c.inv.entity(entity, id)
	c.gens.forget(entity + "\x00" + id)
	if c.l1 != nil {
		c.l1.removeIf(func(k Key, _ *l1entry[V]) bool { return k.Entity() == entity && k.ID() == id })
	}
}

func (c *Cache[V]) dropL1Tags(tags []string) {
	c.inv.all()
	c.gens.forget(tags...)
	if c.l1 != nil {
		c.l1.removeIf(func(_ Key, e *l1entry[V]) bool {
			for _, t := range e.tags {
				for _, x := range tags {
					if t == x {
						return true
					}
				}
			}
			return false
		})
	}
}

func (c *Cache[V]) dropL1Pattern(p pattern) {
	c.inv.all()
	if c.l1 != nil {
		c.l1.removeIf(func(k Key, _ *l1entry[V]) bool { return p.match(k.Entity(), k.ID()) })
	}
}

func (c *Cache[V]) flushL1() {
	c.inv.all()
	c.gens.forgetAll()
	if c.l1 != nil {
		c.l1.purge()
	}
	c.stats.l1Flushes.Add(1)
}

func resultOf(err error) string {
	if err != nil {
		return "ERROR"
	}
	return "OK"
}
