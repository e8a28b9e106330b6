package imgcache

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"os/exec"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/cespare/xxhash/v2"
	"github.com/redis/go-redis/v9"
)

// instances makes n caches on one Redis and namespace: a fleet of service instances.
func instances(e *testEnv, n int, opts Options) []*Cache[ImageMeta] {
	cs := make([]*Cache[ImageMeta], n)
	for i := range cs {
		cs[i] = newCache[ImageMeta](e, opts)
	}
	return cs
}

// metaV returns sample metadata of an id at a version, so that tests can tell versions apart.
func metaV(id string, version int) ImageMeta {
	m := sampleMeta(id)
	m.ETag = fmt.Sprintf(`"%s-v%d"`, id, version)
	return m
}

// eventually polls f until it returns nil or a second passes, and fails with f's last error.
func eventually(t *testing.T, f func() error) {
	t.Helper()
	eventuallyWithin(t, time.Second, f)
}

// eventuallyWithin is eventually with a deadline of d.
func eventuallyWithin(t *testing.T, d time.Duration, f func() error) {
	t.Helper()
	deadline := time.Now().Add(d)
	for {
		err := f()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatal(err)
		}
		time.Sleep(time.Millisecond)
	}
}

func wantETag(c *Cache[ImageMeta], k Key, etag string) func() error {
	return func() error {
		v, err := c.Get(ctx, k)
		if err != nil || v.ETag != etag {
			return fmt.Errorf("Get(%v) = %q, %v; want ETag %q", k, v.ETag, err, etag)
		}
		return nil
	}
}

func wantMiss(c *Cache[ImageMeta], k Key) func() error {
	return func() error {
		if v, err := c.Get(ctx, k); !errors.Is(err, ErrNotFound) {
			return fmt.Errorf("Get(%v) = %q, %v; want ErrNotFound", k, v.ETag, err)
		}
		return nil
	}
}

// warm puts k in the L1 of every cache through GetOrLoad of v.
func warm(t *testing.T, cs []*Cache[ImageMeta], k Key, v ImageMeta, opts ...SetOption) {
	t.Helper()
	for _, c := range cs {
		if _, err := c.GetOrLoad(ctx, k, func(context.Context) (ImageMeta, error) { return v, nil }, opts...); err != nil {
			t.Fatal(err)
		}
	}
}

func TestSetReachesEveryInstancesL1(t *testing.T) {
	e := newEnv(t)
	cs := instances(e, 3, e.opts())
	a, b, c := cs[0], cs[1], cs[2]
	k := NewKey("artist", "1").With("type", "avatar")
	warm(t, cs, k, metaV("1", 1))
	if s := b.Stats(); s.L1Entries != 1 {
		t.Fatalf("b has %d L1 entries, want 1", s.L1Entries)
	}
	if err := a.Set(ctx, k, metaV("1", 2)); err != nil {
		t.Fatal(err)
	}
	eventually(t, wantETag(b, k, `"1-v2"`))
	eventually(t, wantETag(c, k, `"1-v2"`))
	if err := a.Delete(ctx, k); err != nil {
		t.Fatal(err)
	}
	eventually(t, wantMiss(b, k))
	eventually(t, wantMiss(c, k))
	sa, sb := a.Stats(), b.Stats()
	if sa.BusSent != 2 || sa.BusReceived != 0 {
		t.Errorf("a: sent %d received %d, want 2 sent and its own messages ignored", sa.BusSent, sa.BusReceived)
	}
	if sb.BusReceived != 2 {
		t.Errorf("b received %d messages, want 2", sb.BusReceived)
	}
}

// A Set's message names the envelope it wrote: an instance that already read that very write keeps
// its copy, and drops any other.
func TestBusSetKeepsOnlyACopyOfThatWrite(t *testing.T) {
	e := newEnv(t)
	cs := instances(e, 2, e.opts())
	a, b := cs[0], cs[1]
	k := NewKey("artist", "7").With("type", "avatar")
	if err := a.Set(ctx, k, metaV("7", 1)); err != nil {
		t.Fatal(err)
	}
	waitFor(t, func() bool { return b.Stats().BusReceived == 1 })
	if _, err := b.Get(ctx, k); err != nil { // an L2 hit: b's copy is a's write
		t.Fatal(err)
	}
	written := xxhash.Sum64String(e.raw(k))
	msg := func(wid uint64) []byte {
		return encodeBus(busSet, b.instance+1, []string{k.canonical(), string(binary.BigEndian.AppendUint64(nil, wid))})
	}

	b.applyBus(msg(written)) // the same write, reported late
	if _, err := b.Get(ctx, k); err != nil {
		t.Fatal(err)
	}
	if s := b.Stats(); s.L1Hits != 1 || s.L2Hits != 1 {
		t.Errorf("after a late message for the write b holds: %+v, want the copy kept (1 L1 hit, 1 L2 hit)", s)
	}

	b.applyBus(msg(written + 1)) // another write
	if s := b.Stats(); s.L1Entries != 0 {
		t.Errorf("after a message for another write b has %d L1 entries, want its copy dropped", s.L1Entries)
	}

	before := b.Stats().BusErrors
	b.applyBus(encodeBus(busSet, b.instance+1, []string{k.canonical(), "short"}))
	b.applyBus(encodeBus(busSet, b.instance+1, []string{k.canonical()}))
	if got := b.Stats().BusErrors - before; got != 2 {
		t.Errorf("malformed set messages counted %d bus errors, want 2", got)
	}
}

func TestInvalidateEntityRemovesEveryVariantAndNothingElse(t *testing.T) {
	e := newEnv(t)
	cs := instances(e, 3, e.opts())
	a := cs[0]
	target := []Key{
		NewKey("artist", "123").With("type", "avatar"),
		NewKey("artist", "123").With("type", "background").With("size", "1920"),
		NewKey("Artist", "123").With("type", "avatar").With("size", "64"),
	}
	others := []Key{
		NewKey("artist", "12").With("type", "avatar"),
		NewKey("artist", "1234").With("type", "avatar"),
		NewKey("artist", "*").With("type", "avatar"),
		NewKey("album", "123").With("type", "cover"),
	}
	for i, k := range append(append([]Key{}, target...), others...) {
		warm(t, cs, k, metaV(k.ID(), i))
	}
	// A remembered "not found" of the artist goes too: the admin may just have uploaded it.
	gone := NewKey("artist", "123").With("type", "banner")
	load, loads := countingLoader(ImageMeta{}, ErrNotFound)
	for _, c := range cs {
		_, _ = c.GetOrLoad(ctx, gone, load)
	}

	if err := a.InvalidateEntity(ctx, " ARTIST ", "123"); err != nil {
		t.Fatal(err)
	}
	for i, c := range cs {
		for _, k := range target {
			eventually(t, wantMiss(c, k))
		}
		for j, k := range others {
			if v, err := c.Get(ctx, k); err != nil {
				t.Errorf("instance %d: %v was removed too (%v, %v)", i, k, v, err)
			} else if want := fmt.Sprintf(`"%s-v%d"`, k.ID(), len(target)+j); v.ETag != want {
				t.Errorf("instance %d: %v = %s, want %s", i, k, v.ETag, want)
			}
		}
	}
	for _, k := range target {
		if e.raw(k) != "" {
			t.Errorf("Redis still holds %s", e.redisKey(k))
		}
	}
	if _, err := cs[1].GetOrLoad(ctx, gone, load); !errors.Is(err, ErrNotFound) || loads.Load() != 2 {
		t.Errorf("after InvalidateEntity the not-found was not loaded again: %v, %d loads", err, loads.Load())
	}
	// An id of "*" is an id, not a glob.
	if err := a.InvalidateEntity(ctx, "artist", "*"); err != nil {
		t.Fatal(err)
	}
	eventually(t, wantMiss(cs[2], others[2]))
	for _, k := range []Key{others[0], others[1], others[3]} {
		if _, err := cs[2].Get(ctx, k); err != nil {
			t.Errorf("InvalidateEntity(artist, *) removed %v", k)
		}
	}
	if err := a.InvalidateEntity(ctx, "", "1"); err == nil {
		t.Error("InvalidateEntity with an empty entity: nil error")
	}
}

func TestInvalidateTags(t *testing.T) {
	e := newEnv(t)
	cs := instances(e, 3, e.opts())
	a := cs[0]
	k1 := NewKey("album", "9").With("type", "cover")
	k2 := NewKey("artist", "123").With("type", "avatar")
	k3 := NewKey("artist", "7").With("type", "avatar")
	if err := a.Set(ctx, k1, metaV("9", 1), WithTags("artist:123", "album:9")); err != nil {
		t.Fatal(err)
	}
	warm(t, cs, k1, metaV("9", 1))
	warm(t, cs, k2, metaV("123", 1), WithTags("artist:123"))
	warm(t, cs, k3, metaV("7", 1), WithTags("artist:7"))

	if err := a.InvalidateTags(ctx, "artist:123"); err != nil {
		t.Fatal(err)
	}
	for _, c := range cs {
		eventually(t, wantMiss(c, k1))
		eventually(t, wantMiss(c, k2))
		if _, err := c.Get(ctx, k3); err != nil {
			t.Errorf("an untouched tag's value was removed: %v", err)
		}
	}
	for _, k := range []Key{k1, k2} {
		if e.raw(k) != "" {
			t.Errorf("Redis still holds %s", e.redisKey(k))
		}
	}
	if err := a.InvalidateTags(ctx, ""); err == nil {
		t.Error("InvalidateTags of an empty tag: nil error")
	}
	if err := a.Set(ctx, k1, metaV("9", 1), WithTags(strings.Repeat("t", maxTagLen+1))); err == nil {
		t.Error("Set with an over-long tag: nil error")
	}
}

// A value is only as valid as the bookkeeping it was stamped with: if Redis evicts a tag's meta
// hash or an entity's generation, the values that carried it read as invalid; if it evicts an
// entity's meta hash, an InvalidateEntity still invalidates them.
func TestEvictedBookkeepingInvalidates(t *testing.T) {
	for _, which := range []string{"tag", "entity generation", "entity hash then InvalidateEntity"} {
		t.Run(which, func(t *testing.T) {
			e := newEnv(t)
			w := newCache[ImageMeta](e, e.opts())
			k := NewKey("artist", "5").With("type", "avatar")
			if err := w.Set(ctx, k, metaV("5", 1), WithTags("artist:5")); err != nil {
				t.Fatal(err)
			}
			evict := map[string]string{
				"tag":                               e.ns + ":%t:artist%3A5",
				"entity generation":                 e.ns + ":%g:{artist:5}",
				"entity hash then InvalidateEntity": e.ns + ":%e:{artist:5}",
			}[which]
			if n := e.rdb.Del(ctx, evict).Val(); n != 1 {
				t.Fatalf("deleting %s removed %d keys; the bookkeeping is not where the test expects", evict, n)
			}
			if which == "entity hash then InvalidateEntity" {
				if err := w.InvalidateEntity(ctx, "artist", "5"); err != nil {
					t.Fatal(err)
				}
			}
			r := newCache[ImageMeta](e, e.opts()) // nothing in L1
			if _, err := r.Get(ctx, k); !errors.Is(err, ErrNotFound) {
				t.Errorf("Get after the %s was evicted: %v, want ErrNotFound", which, err)
			}
			if s := r.Stats(); s.L2Stale != 1 {
				t.Errorf("L2Stale = %d, want 1", s.L2Stale)
			}
		})
	}
}

func TestBookkeepingStaysInTheNamespaceWithTTLs(t *testing.T) {
	e := newEnv(t)
	c := newCache[ImageMeta](e, e.opts())
	ttl := 2 * time.Minute
	k := NewKey("artist", "1").With("type", "avatar")
	_ = c.Set(ctx, k, metaV("1", 1), WithTTL(ttl), WithTags("artist:1", "fleet"))
	_, _ = c.GetOrLoad(ctx, NewKey("album", "2"), func(context.Context) (ImageMeta, error) { return metaV("2", 1), nil },
		WithTTL(ttl), WithTags("album:2"))
	_ = c.Delete(ctx, NewKey("album", "2"))
	if _, err := c.InvalidatePattern(ctx, "album:*"); err != nil {
		t.Fatal(err)
	}
	keys := e.allNamespaceKeys()
	if len(keys) < 5 {
		t.Fatalf("namespace holds %v, want a value and its bookkeeping", keys)
	}
	for _, key := range keys {
		d := e.rdb.PTTL(ctx, key).Val()
		limit := metaTTL(ttl)
		if key == e.ns+":%p" {
			limit = epochTTL
		}
		if d <= 0 || d > limit {
			t.Errorf("%s has PTTL %v, want a TTL of at most %v", key, d, limit)
		}
	}
	if e.mr != nil {
		for _, key := range e.mr.Keys() {
			if !strings.HasPrefix(key, e.ns+":") {
				t.Errorf("key %q is outside the namespace", key)
			}
		}
	}
}

func TestInvalidatePattern(t *testing.T) {
	ids := map[string][]string{
		"album":  {"1", "2", "42"},
		"artist": {"1", "12", "123", "12x", "a*b", "a:b", "42"},
		"x":      {"42"},
	}
	tests := []struct {
		pattern string
		want    []string // entity:id pairs removed
	}{
		{"album:*", []string{"album:1", "album:2", "album:42"}},
		{"artist:12*", []string{"artist:12", "artist:123", "artist:12x"}},
		{"*:42", []string{"album:42", "artist:42", "x:42"}},
		{" ARTIST :1", []string{"artist:1"}},
		{`artist:a\*b`, []string{"artist:a*b"}},
		{"artist:a:b", []string{"artist:a:b"}},
		{"artist:a*", []string{"artist:a*b", "artist:a:b"}},
		{"nobody:*", nil},
	}
	for _, tt := range tests {
		t.Run(tt.pattern, func(t *testing.T) {
			e := newEnv(t)
			cs := instances(e, 2, e.opts())
			all := map[string]Key{}
			for entity, list := range ids {
				for _, id := range list {
					for _, typ := range []string{"avatar", "cover"} {
						k := NewKey(entity, id).With("type", typ)
						all[entity+":"+id+"/"+typ] = k
						warm(t, cs, k, metaV(id, 1))
					}
				}
			}
			n, err := cs[0].InvalidatePattern(ctx, tt.pattern)
			if err != nil {
				t.Fatal(err)
			}
			if n != 2*len(tt.want) {
				t.Errorf("removed %d entries, want %d", n, 2*len(tt.want))
			}
			removed := map[string]bool{}
			for _, w := range tt.want {
				removed[w] = true
			}
			for name, k := range all {
				eid, _, _ := strings.Cut(name, "/")
				for i, c := range cs {
					if removed[eid] {
						eventually(t, wantMiss(c, k))
					} else if _, err := c.Get(ctx, k); err != nil {
						t.Errorf("instance %d: %s was removed", i, name)
					}
				}
			}
		})
	}
}

func TestInvalidatePatternRefusesBadPatterns(t *testing.T) {
	c := newCache[ImageMeta](newEnv(t), Options{})
	for _, p := range []string{"", "album", "album:", ":1", " :1", `artist:1\`, "artist:\x00"} {
		if _, err := c.InvalidatePattern(ctx, p); err == nil || !strings.Contains(err.Error(), "invalid pattern") {
			t.Errorf("InvalidatePattern(%q): err = %v", p, err)
		}
	}
}

// TestNoStaleResurrection runs each invalidation while a load of an affected key is blocked, on
// the instance that invalidates and on another: the load's result may reach its callers, but no
// instance may serve it afterwards, from L1 or from Redis.
func TestNoStaleResurrection(t *testing.T) {
	kinds := map[string]func(c *Cache[ImageMeta], k Key) error{
		"Delete":            func(c *Cache[ImageMeta], k Key) error { return c.Delete(ctx, k) },
		"InvalidateEntity":  func(c *Cache[ImageMeta], k Key) error { return c.InvalidateEntity(ctx, k.Entity(), k.ID()) },
		"InvalidateTags":    func(c *Cache[ImageMeta], k Key) error { return c.InvalidateTags(ctx, "artist:3") },
		"InvalidatePattern": func(c *Cache[ImageMeta], k Key) error { _, err := c.InvalidatePattern(ctx, "artist:3"); return err },
	}
	for name, invalidate := range kinds {
		for _, where := range []string{"same instance", "other instance"} {
			t.Run(name+"/"+where, func(t *testing.T) {
				e := newEnv(t)
				cs := instances(e, 3, e.opts())
				loader, invalidator, fresh := cs[0], cs[1], cs[2]
				if where == "same instance" {
					invalidator = loader
				}
				k := NewKey("artist", "3").With("type", "avatar")
				started, release := make(chan struct{}), make(chan struct{})
				done := make(chan error, 1)
				go func() {
					v, err := loader.GetOrLoad(ctx, k, func(context.Context) (ImageMeta, error) {
						close(started)
						<-release
						return metaV("3", 1), nil // read from the database before the invalidation
					}, WithTags("artist:3"))
					if err == nil && v.ETag != `"3-v1"` {
						err = fmt.Errorf("got %v", v.ETag)
					}
					done <- err
				}()
				<-started
				if err := invalidate(invalidator, k); err != nil {
					t.Fatal(err)
				}
				close(release)
				if err := <-done; err != nil {
					t.Fatalf("the loader's caller: %v", err)
				}
				for i, c := range []*Cache[ImageMeta]{loader, invalidator, fresh} {
					eventually(t, func() error {
						if err := wantMiss(c, k)(); err != nil {
							return fmt.Errorf("instance %d serves the stale load: %w", i, err)
						}
						return nil
					})
				}
			})
		}
	}
}

func TestL2ReadInFlightDuringInvalidationDoesNotFillL1(t *testing.T) {
	e := newNodeEnv(t) // holds the MGET that only a single node's read sends
	k := NewKey("artist", "4").With("type", "avatar")
	// Hold the read (MGET of the value and its generation) after its reply arrived and before the
	// cache sees it: an L2 read in flight.
	hook := newHold("mget", e.redisKey(k), true)
	slow := heldClient(t, e, hook)
	writer := newCache[ImageMeta](e, e.opts())
	opts := e.opts()
	opts.Redis = slow
	opts.L2Timeout = 5 * time.Second // the hook holds the read; the budget must not end it
	reader := newCache[ImageMeta](e, opts)
	if err := writer.Set(ctx, k, metaV("4", 1)); err != nil {
		t.Fatal(err)
	}
	got := make(chan string, 1)
	go func() {
		v, _ := reader.Get(ctx, k)
		got <- v.ETag
	}()
	<-hook.held
	// The writer's Set published a message too: wait for the one after it.
	eventually(t, func() error {
		if reader.Stats().BusReceived != 1 {
			return errors.New("the reader has not received the Set's message")
		}
		return nil
	})
	if err := writer.InvalidateEntity(ctx, "artist", "4"); err != nil {
		t.Fatal(err)
	}
	// The invalidation reached the reader before its read finished.
	eventually(t, func() error {
		if reader.Stats().BusReceived != 2 {
			return errors.New("the reader has not received the invalidation")
		}
		return nil
	})
	close(hook.release)
	<-got // the read may return what it read
	if s := reader.Stats(); s.L1Entries != 0 {
		t.Errorf("the read in flight filled L1 after the invalidation: %+v", s)
	}
	if _, err := reader.Get(ctx, k); !errors.Is(err, ErrNotFound) {
		t.Errorf("Get after the invalidation: %v, want ErrNotFound", err)
	}
}

// killPubSub drops the cache's subscription as a Redis restart or a network fault would: CLIENT
// KILL of the pubsub connections named after the namespace on a real Redis, a restart of miniredis.
func (e *testEnv) killPubSub(t *testing.T) {
	t.Helper()
	if e.mr != nil {
		e.mr.Close()
		if err := e.mr.Restart(); err != nil {
			t.Fatal(err)
		}
		return
	}
	list, err := e.rdb.ClientList(ctx).Result()
	if err != nil {
		t.Fatal(err)
	}
	killed := 0
	for _, line := range strings.Split(list, "\n") {
		if !strings.Contains(line, " name="+e.ns+" ") || !strings.Contains(line, "flags=P") {
			continue
		}
		for _, f := range strings.Fields(line) {
			if id, ok := strings.CutPrefix(f, "id="); ok {
				n, _ := strconv.ParseInt(id, 10, 64)
				killed += int(e.rdb.ClientKillByFilter(ctx, "ID", strconv.FormatInt(n, 10), "TYPE", "pubsub").Val())
			}
		}
	}
	if killed == 0 {
		t.Fatalf("no pubsub connection named %s to kill", e.ns)
	}
}

// namedEnv returns an env whose client names its connections after the namespace.
func namedEnv(t *testing.T) *testEnv {
	e := newNodeEnv(t) // killPubSub lists one node's clients
	rdb := redis.NewClient(&redis.Options{Addr: e.node().Options().Addr, ContextTimeoutEnabled: true, ClientName: e.ns})
	t.Cleanup(func() { _ = rdb.Close() })
	e.rdb = rdb
	return e
}

func TestResubscriptionFlushesL1(t *testing.T) {
	e := namedEnv(t)
	cs := instances(e, 2, e.opts())
	a, b := cs[0], cs[1]
	k := NewKey("artist", "8").With("type", "avatar")
	warm(t, cs, k, metaV("8", 1))
	e.killPubSub(t)
	eventually(t, func() error {
		if s := b.Stats(); s.BusResubscribes < 1 || s.L1Flushes < 1 {
			return fmt.Errorf("b stats after its subscription was killed: %+v", s)
		}
		return nil
	})
	if s := b.Stats(); s.L1Entries != 0 {
		t.Errorf("L1 was not flushed on resubscription: %d entries", s.L1Entries)
	}
	// The bus works again.
	warm(t, cs, k, metaV("8", 1))
	if err := a.Set(ctx, k, metaV("8", 2)); err != nil {
		t.Fatal(err)
	}
	eventually(t, wantETag(b, k, `"8-v2"`))
}

func TestL1ServesWithinL1TTLWhileRedisIsDown(t *testing.T) {
	e := newMiniEnv(t)
	opts := e.opts()
	opts.L1TTL = 300 * time.Millisecond
	c := newCache[ImageMeta](e, opts)
	k := NewKey("artist", "9")
	if err := c.Set(ctx, k, metaV("9", 1)); err != nil {
		t.Fatal(err)
	}
	e.mr.Close()
	if _, err := c.Get(ctx, k); err != nil {
		t.Errorf("L1 stopped serving when Redis went down: %v", err)
	}
	time.Sleep(opts.L1TTL + 50*time.Millisecond)
	if _, err := c.Get(ctx, k); !errors.Is(err, ErrNotFound) {
		t.Errorf("L1 served past L1TTL while the bus was down: %v", err)
	}
}

// TestRedisRestart restarts the Redis the caches use: a restarted miniredis by default, a
// redis-server of the test's own (SHUTDOWN NOSAVE, then started again on the same port) in the
// real-Redis run.
func TestRedisRestart(t *testing.T) {
	var e *testEnv
	var restart func()
	if realRedisAddr == "" {
		e = newMiniEnv(t)
		restart = func() {
			e.mr.Close()
			if err := e.mr.Restart(); err != nil {
				t.Fatal(err)
			}
		}
	} else {
		e, restart = ownRedisServer(t)
	}
	cs := instances(e, 2, e.opts())
	a, b := cs[0], cs[1]
	k := NewKey("album", "3").With("type", "cover")
	warm(t, cs, k, metaV("3", 1))
	restart()
	eventually(t, func() error {
		if s := b.Stats(); s.BusResubscribes < 1 {
			return fmt.Errorf("b did not resubscribe: %+v", s)
		}
		return nil
	})
	if _, err := b.Get(ctx, k); err == nil && realRedisAddr != "" {
		t.Error("b served its pre-restart L1 copy after resubscribing")
	}
	warm(t, cs, k, metaV("3", 1))
	if err := a.Set(ctx, k, metaV("3", 2)); err != nil {
		t.Fatal(err)
	}
	eventually(t, wantETag(b, k, `"3-v2"`))
}

// ownRedisServer starts a redis-server of the test's own on a free loopback port and returns an
// env on it and a function that restarts it (SHUTDOWN NOSAVE, then start again on the same port).
func ownRedisServer(t *testing.T) (*testEnv, func()) {
	t.Helper()
	bin, err := exec.LookPath("redis-server")
	if err != nil {
		t.Fatalf("the real-Redis suite needs redis-server on PATH: %v", err)
	}
	port := freePort(t)
	start := func() {
		cmd := exec.Command(bin, "--bind", "127.0.0.1", "--port", strconv.Itoa(port), "--save", "", "--appendonly", "no")
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		go func() { _ = cmd.Wait() }()
		c := redis.NewClient(&redis.Options{Addr: fmt.Sprintf("127.0.0.1:%d", port)})
		defer c.Close()
		eventually(t, func() error { return c.Ping(ctx).Err() })
	}
	stop := func() {
		c := redis.NewClient(&redis.Options{Addr: fmt.Sprintf("127.0.0.1:%d", port)})
		defer c.Close()
		_ = c.Do(ctx, "shutdown", "nosave").Err() // the connection drops: the error is expected
		eventually(t, func() error {
			if c.Ping(ctx).Err() == nil {
				return errors.New("redis-server still answers after SHUTDOWN")
			}
			return nil
		})
	}
	start()
	t.Cleanup(stop)
	rdb := redis.NewClient(&redis.Options{Addr: fmt.Sprintf("127.0.0.1:%d", port), ContextTimeoutEnabled: true})
	t.Cleanup(func() { _ = rdb.Close() })
	e := &testEnv{t: t, rdb: rdb, ns: uniqueNamespace(t)}
	return e, func() { stop(); start() }
}

func freePort(t *testing.T) int {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port
}

// A tag that is never invalidated, on an endless stream of new keys, keeps only its live members.
func TestTagBookkeepingDropsExpiredMembers(t *testing.T) {
	e := newEnv(t)
	o := e.opts()
	o.L2Timeout = time.Second // 400 Sets under -race: a slow one is not what this test is about
	c := newCache[ImageMeta](e, o)
	meta := e.ns + ":%t:fleet"
	for round := range 4 {
		for i := range 100 {
			k := NewKey("artist", fmt.Sprint(round, "-", i))
			if err := c.Set(ctx, k, metaV("x", i), WithTTL(30*time.Millisecond), WithTags("fleet")); err != nil {
				t.Fatal(err)
			}
		}
		time.Sleep(40 * time.Millisecond) // the round's values expire
	}
	if n := e.rdb.HLen(ctx, meta).Val(); n > 3+2*100+1 {
		t.Errorf("the tag's meta hash has %d fields after 400 short-lived members, want the expired ones dropped", n)
	}
	// Pruning keeps what is live: invalidating the tag still reaches the newest values.
	k := NewKey("artist", "live")
	if err := c.Set(ctx, k, metaV("live", 1), WithTags("fleet")); err != nil {
		t.Fatal(err)
	}
	if err := c.InvalidateTags(ctx, "fleet"); err != nil {
		t.Fatal(err)
	}
	if e.raw(k) != "" {
		t.Errorf("InvalidateTags left %s in Redis", e.redisKey(k))
	}
}

// TestEntityGenerationSurvivesInvalidation: generations start at random values past 2^53, where a
// Lua number (a double) loses digits and prints in exponent form. An invalidation that wrote the
// new generation through a Lua number left "3.0444194110504044e+18" in the generation key, and
// every later read of the entity failed to parse it: a Redis error instead of a hit (the soak
// counted about 1,700 of them a minute).
func TestEntityGenerationSurvivesInvalidation(t *testing.T) {
	e, c := redisOnlyCache(t)
	k := NewKey("artist", "7").With("type", "avatar")
	for round := range 3 {
		if err := c.Set(ctx, k, metaV("7", round)); err != nil {
			t.Fatal(err)
		}
		if err := c.InvalidateEntity(ctx, "artist", "7"); err != nil {
			t.Fatal(err)
		}
		_, genKey := c.l2.readKeys(k)
		if g, err := e.rdb.Get(ctx, genKey).Result(); err == nil {
			if _, perr := strconv.ParseUint(g, 10, 64); perr != nil {
				t.Fatalf("round %d: generation key holds %q, not an integer", round, g)
			}
		}
		if err := c.Set(ctx, k, metaV("7", round)); err != nil {
			t.Fatal(err)
		}
		if v, err := c.Get(ctx, k); err != nil || v.ETag != metaV("7", round).ETag {
			t.Fatalf("round %d: Get after invalidating and setting again = %v, %v", round, v, err)
		}
	}
	if n := c.Stats().L2Errors; n != 0 {
		t.Errorf("%d L2 errors, want 0", n)
	}
}

// TestMalformedGenerationReadsAsMissing: a generation key that does not parse (an older version's
// invalidation wrote "1.6998026639623291e+18") makes the entity's values invalid, as a missing one
// does, not a Redis error; the next load's registration writes a proper generation again. The
// generation is written behind the cache's back, with no bus message, so the cache must not trust
// the one it read (GenerationTTL -1): every read reads the generation key.
func TestMalformedGenerationReadsAsMissing(t *testing.T) {
	e := newEnv(t)
	o := e.opts()
	o.L1Size = -1
	o.GenerationTTL = -1
	c := newCache[ImageMeta](e, o)
	k := NewKey("artist", "8").With("type", "avatar")
	if err := c.Set(ctx, k, metaV("8", 1)); err != nil {
		t.Fatal(err)
	}
	_, genKey := c.l2.readKeys(k)
	if err := e.rdb.Set(ctx, genKey, "1.6998026639623291e+18", time.Minute).Err(); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Get(ctx, k); !errors.Is(err, ErrNotFound) {
		t.Fatalf("Get with a malformed generation = %v, want ErrNotFound", err)
	}
	if vs, found, err := c.GetMany(ctx, []Key{k}); err != nil || found[0] {
		t.Fatalf("GetMany with a malformed generation = %v, %v, %v; want not found", vs, found, err)
	}
	load, loads := countingLoader(metaV("8", 2), nil)
	if v, err := c.GetOrLoad(ctx, k, load); err != nil || v.ETag != metaV("8", 2).ETag || loads.Load() != 1 {
		t.Fatalf("GetOrLoad = %v, %v after %d loads; want the loaded value", v, err, loads.Load())
	}
	if g, err := e.rdb.Get(ctx, genKey).Result(); err != nil {
		t.Fatalf("generation key after the load: %v", err)
	} else if _, err := strconv.ParseUint(g, 10, 64); err != nil {
		t.Fatalf("generation key after the load holds %q, want an integer", g)
	}
	if v, err := c.Get(ctx, k); err != nil || v.ETag != metaV("8", 2).ETag {
		t.Fatalf("Get after the load = %v, %v; want the loaded value", v, err)
	}
	if n := c.Stats().L2Errors; n != 0 {
		t.Errorf("%d L2 errors, want 0", n)
	}
}

// redisOnlyCache is a test's Cache with no L1: every read goes to Redis.
func redisOnlyCache(t *testing.T) (*testEnv, *Cache[ImageMeta]) {
	e := newEnv(t)
	o := e.opts()
	o.L1Size = -1
	return e, newCache[ImageMeta](e, o)
}
