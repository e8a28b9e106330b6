package imgcache

import (
	"context"
	"fmt"
	"slices"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
)

// The cluster suite: with IMGCACHE_REDIS_CLUSTER_ADDRS set, newEnv gives every test of the package
// that does not need one node a ClusterClient, so the whole suite runs on the Cluster (the load
// lease across instances, for one, in TestFleetStampede). The tests here check what only a Cluster
// can show: that keys really spread over the masters, and that batches, invalidations and the bus
// work across them. They skip without the variable.

// clusterMaster returns the address of the master that holds rkey.
func clusterMaster(t *testing.T, e *testEnv, rkey string) string {
	t.Helper()
	node, err := e.rdb.(*redis.ClusterClient).MasterForKey(ctx, rkey)
	if err != nil {
		t.Fatalf("MasterForKey(%s): %v", rkey, err)
	}
	return node.Options().Addr
}

// spreadKeys returns n keys of entity "artist" with the type parameter, n/3 of them (rounded up)
// with their values on each of the cluster's three masters. CRC16 of keys that differ in a
// character or two is far from uniform, so the ids are picked, not counted.
func spreadKeys(t *testing.T, e *testEnv, n int) []Key {
	t.Helper()
	perMaster := map[string]int{}
	var keys []Key
	for id := 0; len(keys) < n && id < 100*n; id++ {
		k := NewKey("artist", strconv.Itoa(id)).With("type", "avatar")
		if m := clusterMaster(t, e, e.redisKey(k)); perMaster[m] < (n+2)/3 {
			perMaster[m]++
			keys = append(keys, k)
		}
	}
	if len(keys) < n || len(perMaster) != 3 {
		t.Fatalf("found %d keys over %d masters, want %d over 3: %v", len(keys), len(perMaster), n, perMaster)
	}
	return keys
}

// An entity's meta hash and generation key share a hash slot (its scripts touch both), while its
// values, which carry no hash tag, spread over the masters.
func TestClusterBookkeepingOfAnEntitySharesASlot(t *testing.T) {
	e := newClusterEnv(t)
	c := newCache[ImageMeta](e, e.opts())
	for _, k := range spreadKeys(t, e, 12) {
		if err := c.Set(ctx, k, metaV(k.ID(), 1), WithTags("album:spread")); err != nil {
			t.Fatal(err)
		}
		meta, gen := c.l2.entityMeta("artist", k.ID()), c.l2.entityGen("artist", k.ID())
		if a, b := e.rdb.ClusterKeySlot(ctx, meta).Val(), e.rdb.ClusterKeySlot(ctx, gen).Val(); a != b {
			t.Errorf("%v: meta hash in slot %d, generation key in slot %d", k, a, b)
		}
		for _, rkey := range []string{e.redisKey(k), meta, gen} {
			if n := e.rdb.Exists(ctx, rkey).Val(); n != 1 {
				t.Errorf("%s does not exist after Set", rkey)
			}
		}
	}
}

// A batch over keys on every master: GetMany reads them all, GetOrLoadMany loads only the absent
// ones, once, and writes them with their TTL.
func TestClusterBatchesAcrossMasters(t *testing.T) {
	e := newClusterEnv(t)
	keys := spreadKeys(t, e, 12)
	writer := newCache[ImageMeta](e, e.opts())
	o := e.opts()
	o.L1Size = -1 // every read goes to the cluster
	reader := newCache[ImageMeta](e, o)
	for _, k := range keys[:6] {
		if err := writer.Set(ctx, k, metaV(k.ID(), 1)); err != nil {
			t.Fatal(err)
		}
	}
	vals, found, err := reader.GetMany(ctx, keys)
	if err != nil {
		t.Fatal(err)
	}
	for i, k := range keys {
		if want := i < 6; found[i] != want {
			t.Errorf("GetMany: %v found %v, want %v", k, found[i], want)
		} else if want && vals[i].ETag != metaV(k.ID(), 1).ETag {
			t.Errorf("GetMany: %v = %s, want %s", k, vals[i].ETag, metaV(k.ID(), 1).ETag)
		}
	}

	var mu sync.Mutex
	var loaded []Key
	load := func(_ context.Context, missing []Key) (map[Key]ImageMeta, error) {
		mu.Lock()
		loaded = append(loaded, missing...)
		mu.Unlock()
		m := map[Key]ImageMeta{}
		for _, k := range missing {
			m[k] = metaV(k.ID(), 2)
		}
		return m, nil
	}
	vals, found, err = reader.GetOrLoadMany(ctx, keys, load, WithTTL(time.Minute))
	if err != nil || slices.Contains(found, false) {
		t.Fatalf("GetOrLoadMany: found %v, %v", found, err)
	}
	if !slices.Equal(sortedKeys(loaded), sortedKeys(keys[6:])) {
		t.Errorf("loaded %v, want %v", loaded, keys[6:])
	}
	for i, k := range keys {
		want := metaV(k.ID(), 1).ETag
		if i >= 6 {
			want = metaV(k.ID(), 2).ETag
		}
		if vals[i].ETag != want {
			t.Errorf("GetOrLoadMany: %v = %s, want %s", k, vals[i].ETag, want)
		}
	}
	for _, k := range keys[6:] {
		if d := e.pttl(k); d <= 50*time.Second || d > time.Minute {
			t.Errorf("%v: PTTL %v, want about a minute", k, d)
		}
	}
}

func sortedKeys(keys []Key) []string {
	s := make([]string, len(keys))
	for i, k := range keys {
		s[i] = k.String()
	}
	slices.Sort(s)
	return s
}

// Each invalidation reaches keys on every master, in Redis and in the L1 of another instance,
// which hears of it through pub/sub on a node of its own.
func TestClusterInvalidationsAcrossMasters(t *testing.T) {
	for _, tc := range []struct {
		name       string
		invalidate func(c *Cache[ImageMeta], keys []Key) error
		gone       bool // the values are removed from Redis, not only made stale
	}{
		{"tags", func(c *Cache[ImageMeta], _ []Key) error { return c.InvalidateTags(ctx, "album:spread") }, false},
		{"pattern", func(c *Cache[ImageMeta], keys []Key) error {
			n, err := c.InvalidatePattern(ctx, "artist:*")
			if err == nil && n != len(keys) {
				err = fmt.Errorf("InvalidatePattern removed %d values, want %d", n, len(keys))
			}
			return err
		}, true},
		{"entities", func(c *Cache[ImageMeta], keys []Key) error {
			for _, k := range keys {
				if err := c.InvalidateEntity(ctx, k.Entity(), k.ID()); err != nil {
					return err
				}
			}
			return nil
		}, false},
		{"delete", func(c *Cache[ImageMeta], keys []Key) error { return c.Delete(ctx, keys...) }, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := newClusterEnv(t)
			keys := spreadKeys(t, e, 12)
			cs := instances(e, 2, e.opts())
			for _, k := range keys {
				warm(t, cs, k, metaV(k.ID(), 1), WithTags("album:spread"))
			}
			for _, k := range keys {
				if e.raw(k) == "" {
					t.Fatalf("%v is not in Redis", k)
				}
			}
			if err := tc.invalidate(cs[0], keys); err != nil {
				t.Fatal(err)
			}
			for _, k := range keys {
				for i, c := range cs {
					if _, ok := c.l1.get(k); ok && i == 0 {
						t.Errorf("instance 0 kept %v in its L1", k)
					}
					eventually(t, wantMiss(c, k))
				}
				if tc.gone && e.raw(k) != "" {
					t.Errorf("%v is still in Redis", k)
				}
			}
			if got := cs[1].Stats().BusReceived; got == 0 {
				t.Error("instance 1 received no bus message")
			}
		})
	}
}
