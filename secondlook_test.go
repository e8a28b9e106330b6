package imgcache

import (
	"context"
	"errors"
	"sync/atomic"
	"testing"

	"github.com/redis/go-redis/v9"
)

// On a Cluster or a Ring a value and its entity's generation key live on different nodes, read at
// once, so the generation may be read before the value was written (its holder registered and
// stored in between; a scheduling delay on a loaded machine is enough). The value must not then be
// judged stale, deleted and loaded again: a generation read after the value decides. Here a hook on
// a one-shard Ring makes the first read of the generation key find it absent, as a read made before
// the holder's registration does.
func TestValueReadBeforeItsGenerationIsNotStale(t *testing.T) {
	for _, tc := range []struct {
		name string
		read func(c *Cache[ImageMeta], k Key, loads *int) (ImageMeta, error)
	}{
		{"Get", func(c *Cache[ImageMeta], k Key, _ *int) (ImageMeta, error) { return c.Get(ctx, k) }},
		{"GetMany", func(c *Cache[ImageMeta], k Key, _ *int) (ImageMeta, error) {
			vals, found, err := c.GetMany(ctx, []Key{k})
			if err == nil && !found[0] {
				err = ErrNotFound
			}
			return vals[0], err
		}},
		{"GetOrLoad", func(c *Cache[ImageMeta], k Key, loads *int) (ImageMeta, error) {
			return c.GetOrLoad(ctx, k, func(context.Context) (ImageMeta, error) {
				*loads++
				return metaV("secondlook", 2), nil
			})
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := newNodeEnv(t)
			k := NewKey("artist", "secondlook")
			a := newCache[ImageMeta](e, e.opts())
			if err := a.Set(ctx, k, metaV("secondlook", 1)); err != nil {
				t.Fatal(err)
			}
			rkey, genKey := a.l2.readKeys(k)
			hold := &absentOnce{key: genKey}
			bo := e.opts()
			bo.Redis = heldRing(t, e, hold)
			b := newCache[ImageMeta](e, bo)
			loads := 0
			v, err := tc.read(b, k, &loads)
			if !hold.done.Load() {
				t.Fatal("the generation key was never read")
			}
			if err != nil || v.ETag != `"secondlook-v1"` || loads != 0 {
				t.Errorf("read = %s, %v after %d loads; want the stored value", v.ETag, err, loads)
			}
			if st := b.Stats(); st.L2Stale != 0 {
				t.Errorf("L2Stale = %d: a current value was judged stale", st.L2Stale)
			}
			if n := e.rdb.Exists(ctx, rkey).Val(); n != 1 {
				t.Error("the stored value was deleted from Redis")
			}
		})
	}
}

// absentOnce answers the first GET of key (alone or in a pipeline) as if the key were absent.
type absentOnce struct {
	key  string
	done atomic.Bool
}

func (*absentOnce) DialHook(next redis.DialHook) redis.DialHook { return next }
func (h *absentOnce) ProcessHook(next redis.ProcessHook) redis.ProcessHook {
	return func(ctx context.Context, cmd redis.Cmder) error {
		pipe := h.ProcessPipelineHook(func(ctx context.Context, cmds []redis.Cmder) error { return next(ctx, cmds[0]) })
		return pipe(ctx, []redis.Cmder{cmd})
	}
}
func (h *absentOnce) ProcessPipelineHook(next redis.ProcessPipelineHook) redis.ProcessPipelineHook {
	return func(ctx context.Context, cmds []redis.Cmder) error {
		err := next(ctx, cmds)
		for _, c := range cmds {
			if g, ok := c.(*redis.StringCmd); ok && g.Name() == "get" && g.Args()[1] == h.key && h.done.CompareAndSwap(false, true) {
				g.SetVal("")
				g.SetErr(redis.Nil)
			}
		}
		return err
	}
}

// The second look still finds a value stale that is: on a Ring, a value whose entity's generation
// has moved (as an invalidation moves it before its UNLINK) is not served, and is removed.
func TestSecondLookKeepsAStaleValueStale(t *testing.T) {
	e := newNodeEnv(t)
	k := NewKey("artist", "stillstale")
	bo := e.opts()
	bo.Redis = heldRing(t, e, &absentOnce{key: "none"})
	bo.L1Size, bo.GenerationTTL = -1, -1 // every read checks the generation in Redis
	b := newCache[ImageMeta](e, bo)
	if err := b.Set(ctx, k, metaV("stillstale", 1)); err != nil {
		t.Fatal(err)
	}
	rkey, genKey := b.l2.readKeys(k)
	// What an entity invalidation leaves in Redis before its UNLINK: a new generation, the value.
	if err := e.rdb.Set(ctx, genKey, "12345", 0).Err(); err != nil {
		t.Fatal(err)
	}
	if v, err := b.Get(ctx, k); !errors.Is(err, ErrNotFound) {
		t.Errorf("Get = %s, %v; want ErrNotFound for a value stamped with an old generation", v.ETag, err)
	}
	if st := b.Stats(); st.L2Stale != 1 {
		t.Errorf("L2Stale = %d, want 1", st.L2Stale)
	}
	if n := e.rdb.Exists(ctx, rkey).Val(); n != 0 {
		t.Error("the stale value is still in Redis")
	}
}
